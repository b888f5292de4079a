// The real CUDA and NCCL layers, linked with the real libcudart and libnccl,
// on a machine without a GPU: every forwarder reaches the library and comes
// back with its own result code (no device: CUDA's "no device" or "no
// driver" errors; NCCL's invalid-argument for a null communicator), never a
// crash. On a GPU machine the device checks are skipped: the GPU tests cover
// them.
#include <gtest/gtest.h>

#include "cuda_resources.h"
#include "errors.h"
#include "gpu_apis.h"
#include "nccl_calls.h"

namespace pycomm {
namespace {

bool hasDevice(CudaApi& cuda) {
  int device = -1;
  return cuda.getDevice(&device) == cudaSuccess && cuda.setDevice(0) == cudaSuccess;
}

TEST(RealCudaApi, EveryCallReportsCudasOwnErrorWithoutADevice) {
  auto cuda = runtimeCudaApi();
  EXPECT_EQ(cuda, runtimeCudaApi()) << "one instance per process";
  if (hasDevice(*cuda)) {
    GTEST_SKIP() << "a GPU is present: tests/test_cuda.py covers the real calls";
  }
  auto noDevice = [](cudaError_t e) {
    return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
        e == cudaErrorInvalidDevice || e == cudaErrorInitializationError ||
        e == cudaErrorInvalidResourceHandle || e == cudaErrorInvalidValue ||
        e == cudaErrorContextIsDestroyed;
  };
  int value = 0, least = 0, greatest = 0;
  EXPECT_PRED1(noDevice, cuda->setDevice(0));
  EXPECT_FALSE(cuda->hasPrimaryContext(0));
  EXPECT_PRED1(noDevice, cuda->deviceGetStreamPriorityRange(&least, &greatest));
  EXPECT_PRED1(noDevice, cuda->deviceGetAttribute(&value, cudaDevAttrComputeCapabilityMajor, 0));
  cudaStream_t stream = nullptr;
  EXPECT_PRED1(noDevice, cuda->streamCreateWithPriority(&stream, cudaStreamNonBlocking, 0));
  cudaEvent_t event = nullptr;
  EXPECT_PRED1(noDevice, cuda->eventCreateWithFlags(&event, cudaEventDisableTiming));
  EXPECT_PRED1(noDevice, cuda->eventRecord(event, stream));
  EXPECT_PRED1(noDevice, cuda->eventQuery(event));
  EXPECT_PRED1(noDevice, cuda->streamWaitEvent(stream, event, 0));
  EXPECT_PRED1(noDevice, cuda->streamGetPriority(stream, &value));
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  EXPECT_PRED1(noDevice, cuda->streamIsCapturing(stream, &status));
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  (void)cuda->threadExchangeStreamCaptureMode(&mode); // host-side: may succeed
  EXPECT_PRED1(noDevice, cuda->eventDestroy(event));
  EXPECT_PRED1(noDevice, cuda->streamDestroy(stream));
  EXPECT_STREQ(cuda->getErrorName(cudaErrorNotReady), "cudaErrorNotReady");
  EXPECT_NE(std::string(cuda->getErrorString(cudaErrorNotReady)), "");
  // The named error pycomm makes of it.
  try {
    checkCuda(*cuda, cudaErrorNoDevice, "cudaSetDevice");
    ADD_FAILURE();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice failed: cudaErrorNoDevice"), std::string::npos);
  }
  // torch's current stream needs a device: torch raises, pycomm lets it.
  EXPECT_ANY_THROW(cuda->currentStream(0));
}

TEST(RealNcclApi, VersionIdAndNullCommunicatorCalls) {
  auto nccl = libraryNcclApi();
  EXPECT_EQ(nccl, libraryNcclApi()) << "one instance per process";
  EXPECT_GE(nccl::loadedVersion(*nccl), 21800);
  EXPECT_EQ(nccl::usableVersion(*nccl), std::min(nccl::builtVersion(), nccl::loadedVersion(*nccl)));
  const std::string a = nccl::newUniqueId(*nccl), b = nccl::newUniqueId(*nccl);
  EXPECT_EQ(a.size(), 128u);
  EXPECT_NE(a, b);
  EXPECT_STRNE(nccl->getErrorString(ncclInvalidArgument), "");
  EXPECT_EQ(nccl->torchGroupDepth(), 0) << "torch opened no NCCL group here";
  (void)nccl->getLastError(nullptr);

  const ncclComm_t none = nullptr;
  int value = 0;
  ncclResult_t state = ncclSuccess;
  EXPECT_NE(nccl->commCount(none, &value), ncclSuccess);
  EXPECT_NE(nccl->commUserRank(none, &value), ncclSuccess);
  EXPECT_NE(nccl->commGetAsyncError(none, &state), ncclSuccess);
  // NCCL takes finalizing and destroying nothing as done.
  EXPECT_EQ(nccl->commFinalize(none), ncclSuccess);
  EXPECT_EQ(nccl->commDestroy(none), ncclSuccess);
  EXPECT_NE(nccl->commAbort(none), ncclInProgress);
  void* handle = nullptr;
  char buffer[64];
  EXPECT_NE(nccl->commRegister(none, buffer, sizeof(buffer), &handle), ncclSuccess);
  EXPECT_NE(nccl->commDeregister(none, handle), ncclSuccess);
  ncclComm_t child = nullptr;
  ncclConfig_t config = nccl::makeConfig({}, nccl::usableVersion(*nccl), "test");
  EXPECT_EQ(config.blocking, 0);
  EXPECT_NE(nccl->commSplit(none, 0, 0, &child, &config), ncclSuccess);
  ncclRedOp_t op;
  float scalar = 0.5f;
  EXPECT_NE(nccl->redOpCreatePreMulSum(&op, &scalar, ncclFloat32, ncclScalarHostImmediate, none), ncclSuccess);
  EXPECT_NE(nccl->redOpDestroy(ncclSum, none), ncclSuccess);
  // Collectives on a null communicator inside a group: refused when called
  // or at the group's end.
  EXPECT_EQ(nccl->groupStart(), ncclSuccess);
  const ncclResult_t calls[] = {
      nccl->allGather(buffer, buffer, 1, ncclFloat32, none, nullptr),
      nccl->reduceScatter(buffer, buffer, 1, ncclFloat32, ncclSum, none, nullptr),
      nccl->allReduce(buffer, buffer, 1, ncclFloat32, ncclSum, none, nullptr),
      nccl->broadcast(buffer, buffer, 1, ncclFloat32, 0, none, nullptr)};
  for (ncclResult_t r : calls) {
    EXPECT_NE(r, ncclInProgress);
  }
  (void)nccl->groupEnd();
  // Without a GPU there is no communicator to create: NCCL says so.
  ncclComm_t comm = nullptr;
  const ncclResult_t init = nccl->commInitRankConfig(&comm, 1, nccl::uniqueIdFromBytes(a), 0, &config);
  if (init == ncclSuccess || init == ncclInProgress) {
    GTEST_SKIP() << "a GPU is present";
  }
  try {
    nccl::check(*nccl, init, "ncclCommInitRankConfig", comm);
    ADD_FAILURE();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("ncclCommInitRankConfig failed: "), std::string::npos) << e.what();
  }
}

} // namespace
} // namespace pycomm

namespace pycomm {
namespace {

TEST(NcclCalls, ConfigTakesEverySettingTheVersionKnows) {
  NcclSettings s;
  s.cgaClusterSize = 2;
  s.minCtas = 4;
  s.maxCtas = 16;
  s.netName = "IB";
  s.trafficClass = 106;
  s.ctaPolicy = 1;
  s.commName = "pycomm_ag_of_0";
  s.nvlsCtas = 16;
  s.collnetEnable = 1;
  s.maxP2pPeers = 8;
  s.nChannelsPerNetPeer = 4;
  s.nvlinkCentricSched = 1;
  s.graphUsageMode = 1;
  s.numRmaCtx = 2;
  s.graphStreamOrdering = 0;
  ncclConfig_t config = nccl::makeConfig(s, 23007, "test");
  EXPECT_EQ(config.blocking, 0);
  EXPECT_EQ(config.splitShare, 0);
  EXPECT_EQ(config.cgaClusterSize, 2);
  EXPECT_EQ(config.minCTAs, 4);
  EXPECT_EQ(config.maxCTAs, 16);
  EXPECT_STREQ(config.netName, "IB");
  EXPECT_EQ(config.trafficClass, 106);
  EXPECT_EQ(config.CTAPolicy, 1);
  EXPECT_STREQ(config.commName, "pycomm_ag_of_0");
  EXPECT_EQ(config.nvlsCTAs, 16);
  EXPECT_EQ(config.collnetEnable, 1);
  EXPECT_EQ(config.maxP2pPeers, 8);
  EXPECT_EQ(config.nChannelsPerNetPeer, 4);
  EXPECT_EQ(config.nvlinkCentricSched, 1);
  EXPECT_EQ(config.graphUsageMode, 1);
  EXPECT_EQ(config.numRmaCtx, 2);
  EXPECT_EQ(config.graphStreamOrdering, 0);
  // Sharing asked for: children split from this communicator share it.
  s.splitShare = 1;
  EXPECT_EQ(nccl::makeConfig(s, 23007, "test").splitShare, 1);
  // An older NCCL would give its default for the newer fields: refused by
  // name instead, and nothing reaches NCCL.
  EXPECT_THROW(nccl::makeConfig(s, 22907, "test"), NcclVersionError);
  NcclSettings old;
  old.minCtas = 4;
  EXPECT_EQ(nccl::makeConfig(old, 21800, "test").minCTAs, 4);
  // NCCL 2.31's field, on the 2.30 header pycomm is built with here.
  NcclSettings newest;
  newest.launchOrderImplicit = 1;
  try {
    nccl::makeConfig(newest, 23007, "pooled rs");
    ADD_FAILURE();
  } catch (const NcclVersionError& e) {
    EXPECT_NE(std::string(e.what()).find("pooled rs: ncclConfig_t.launchOrderImplicit needs NCCL 2.31.0"), std::string::npos);
  }
}

TEST(NcclCalls, TypesAndReduceOps) {
  const std::pair<at::ScalarType, ncclDataType_t> types[] = {
      {at::kFloat, ncclFloat32}, {at::kHalf, ncclFloat16}, {at::kBFloat16, ncclBfloat16},
      {at::kDouble, ncclFloat64}, {at::kChar, ncclInt8}, {at::kByte, ncclUint8},
      {at::kBool, ncclUint8}, {at::kInt, ncclInt32}, {at::kUInt32, ncclUint32},
      {at::kLong, ncclInt64}, {at::kUInt64, ncclUint64},
      {at::kFloat8_e4m3fn, ncclFloat8e4m3}, {at::kFloat8_e5m2, ncclFloat8e5m2}};
  for (auto [torchType, ncclType] : types) {
    EXPECT_EQ(nccl::dataType(torchType, 23007, "op"), ncclType) << c10::toString(torchType);
  }
  try {
    nccl::dataType(at::kFloat8_e4m3fn, 22300, "all_gather");
    ADD_FAILURE() << "fp8 on NCCL 2.23";
  } catch (const UnsupportedOpError& e) {
    EXPECT_NE(std::string(e.what()).find("needs NCCL 2.24, loaded 2.23.0"), std::string::npos);
  }
  EXPECT_THROW(nccl::dataType(at::kComplexFloat, 23007, "op"), UnsupportedOpError);

  using Op = c10d::ReduceOp;
  EXPECT_EQ(nccl::reduceOp(Op::SUM, at::kFloat, 9, "op"), ncclSum);
  EXPECT_EQ(nccl::reduceOp(Op::SUM, at::kBool, 9, "op"), ncclMax); // logical or
  EXPECT_EQ(nccl::reduceOp(Op::PRODUCT, at::kBool, 9, "op"), ncclMin); // logical and
  EXPECT_EQ(nccl::reduceOp(Op::PRODUCT, at::kLong, 9, "op"), ncclProd);
  EXPECT_EQ(nccl::reduceOp(Op::MIN, at::kInt, 9, "op"), ncclMin);
  EXPECT_EQ(nccl::reduceOp(Op::MAX, at::kInt, 9, "op"), ncclMax);
  EXPECT_EQ(nccl::reduceOp(Op::AVG, at::kBFloat16, 9, "op"), ncclAvg);
  EXPECT_EQ(nccl::reduceOp(Op::SUM, at::kFloat8_e5m2, 9, "op"), ncclSum);
  EXPECT_THROW(nccl::reduceOp(Op::SUM, at::kFloat8_e5m2, 8, "op"), UnsupportedOpError);
  // A Hopper rank in a group with an older GPU: NCCL checks the lowest.
  EXPECT_THROW(nccl::reduceOp(Op::SUM, at::kFloat8_e5m2, 9, "op", /*groupReducesFp8=*/false), UnsupportedOpError);
  EXPECT_EQ(nccl::reduceOp(Op::MAX, at::kFloat, 9, "op", /*groupReducesFp8=*/false), ncclMax);
  EXPECT_THROW(nccl::reduceOp(Op::AVG, at::kLong, 9, "op"), UnsupportedOpError);
  EXPECT_THROW(nccl::reduceOp(Op::PREMUL_SUM, at::kFloat, 9, "op"), UnsupportedOpError);
  EXPECT_THROW(nccl::uniqueIdFromBytes("short"), ConfigError);
}

} // namespace
} // namespace pycomm
