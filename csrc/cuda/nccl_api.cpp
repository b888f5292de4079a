// The libnccl loaded behind NcclApi: forwarders only.
#include "nccl_api.h"

#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL // ProcessGroupNCCL.hpp declares nothing without it
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace pycomm {

namespace {

// torch counts the NCCL groups each thread has open in a protected member.
struct TorchNcclGroups : c10d::ProcessGroupNCCL {
  static int depth() {
    return static_cast<int>(ncclActiveGroupCounter_);
  }
};

class LibraryNcclApi final : public NcclApi {
 public:
  ncclResult_t getVersion(int* version) override {
    return ncclGetVersion(version);
  }
  ncclResult_t getUniqueId(ncclUniqueId* id) override {
    return ncclGetUniqueId(id);
  }
  const char* getErrorString(ncclResult_t result) override {
    return ncclGetErrorString(result);
  }
  const char* getLastError(ncclComm_t comm) override {
    return ncclGetLastError(comm);
  }
  ncclResult_t commInitRankConfig(
      ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
      ncclConfig_t* config) override {
    return ncclCommInitRankConfig(comm, nranks, id, rank, config);
  }
  ncclResult_t commSplit(
      ncclComm_t parent, int color, int key, ncclComm_t* child,
      ncclConfig_t* config) override {
    return ncclCommSplit(parent, color, key, child, config);
  }
  ncclResult_t commFinalize(ncclComm_t comm) override {
    return ncclCommFinalize(comm);
  }
  ncclResult_t commDestroy(ncclComm_t comm) override {
    return ncclCommDestroy(comm);
  }
  ncclResult_t commAbort(ncclComm_t comm) override {
    return ncclCommAbort(comm);
  }
  ncclResult_t commGetAsyncError(ncclComm_t comm, ncclResult_t* state) override {
    return ncclCommGetAsyncError(comm, state);
  }
  ncclResult_t commCount(ncclComm_t comm, int* count) override {
    return ncclCommCount(comm, count);
  }
  ncclResult_t commUserRank(ncclComm_t comm, int* rank) override {
    return ncclCommUserRank(comm, rank);
  }
  ncclResult_t commRegister(
      ncclComm_t comm, void* buffer, size_t size, void** handle) override {
    return ncclCommRegister(comm, buffer, size, handle);
  }
  ncclResult_t commDeregister(ncclComm_t comm, void* handle) override {
    return ncclCommDeregister(comm, handle);
  }
  ncclResult_t commWindowRegister(
      ncclComm_t comm, void* buffer, size_t size, void** window, int flags) override {
#if NCCL_VERSION_CODE >= 22700
    return ncclCommWindowRegister(
        comm, buffer, size, reinterpret_cast<ncclWindow_t*>(window), flags);
#else
    return ncclInvalidUsage;
#endif
  }
  ncclResult_t commWindowDeregister(ncclComm_t comm, void* window) override {
#if NCCL_VERSION_CODE >= 22700
    return ncclCommWindowDeregister(comm, static_cast<ncclWindow_t>(window));
#else
    return ncclInvalidUsage;
#endif
  }
  ncclResult_t groupStart() override {
    return ncclGroupStart();
  }
  ncclResult_t groupEnd() override {
    return ncclGroupEnd();
  }
  int torchGroupDepth() override {
    return TorchNcclGroups::depth();
  }
  ncclResult_t allGather(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) override {
    return ncclAllGather(input, output, countPerRank, type, comm, stream);
  }
  ncclResult_t reduceScatter(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm,
      cudaStream_t stream) override {
    return ncclReduceScatter(input, output, countPerRank, type, op, comm, stream);
  }
  ncclResult_t allReduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) override {
    return ncclAllReduce(input, output, count, type, op, comm, stream);
  }
  ncclResult_t broadcast(
      const void* input, void* output, size_t count, ncclDataType_t type,
      int root, ncclComm_t comm, cudaStream_t stream) override {
    return ncclBroadcast(input, output, count, type, root, comm, stream);
  }
  ncclResult_t reduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) override {
    return ncclReduce(input, output, count, type, op, root, comm, stream);
  }
  ncclResult_t memAlloc(void** ptr, size_t size) override {
    return ncclMemAlloc(ptr, size);
  }
  ncclResult_t memFree(void* ptr) override {
    return ncclMemFree(ptr);
  }
  ncclResult_t send(
      const void* input, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) override {
    return ncclSend(input, count, type, peer, comm, stream);
  }
  ncclResult_t recv(
      void* output, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) override {
    return ncclRecv(output, count, type, peer, comm, stream);
  }
  ncclResult_t redOpCreatePreMulSum(
      ncclRedOp_t* op, void* scalar, ncclDataType_t type,
      ncclScalarResidence_t residence, ncclComm_t comm) override {
    return ncclRedOpCreatePreMulSum(op, scalar, type, residence, comm);
  }
  ncclResult_t redOpDestroy(ncclRedOp_t op, ncclComm_t comm) override {
    return ncclRedOpDestroy(op, comm);
  }
};

} // namespace

std::shared_ptr<NcclApi> libraryNcclApi() {
  static const std::shared_ptr<NcclApi> api = std::make_shared<LibraryNcclApi>();
  return api;
}

} // namespace pycomm
