#include "nccl_api.h"

#include <algorithm>
#include <cstring>

#include "errors.h"

namespace pycomm::nccl {

int builtVersion() {
  return NCCL_VERSION_CODE;
}

int loadedVersion() {
  // The library cannot change while the process runs.
  static const int version = [] {
    int v = 0;
    check(ncclGetVersion(&v), "ncclGetVersion", nullptr);
    return v;
  }();
  return version;
}

int usableVersion() {
  return std::min(builtVersion(), loadedVersion());
}

std::string newUniqueId() {
  ncclUniqueId id;
  check(ncclGetUniqueId(&id), "ncclGetUniqueId", nullptr);
  return std::string(id.internal, sizeof(id.internal));
}

std::string errorText(ncclResult_t result) {
  return ncclGetErrorString(result);
}

std::string lastError(ncclComm_t comm) {
  const char* text = ncclGetLastError(comm);
  return text != nullptr ? text : "";
}

ncclResult_t check(ncclResult_t result, const std::string& what, ncclComm_t comm) {
  if (result == ncclSuccess || result == ncclInProgress) {
    return result;
  }
  std::string message = what + " failed: " + errorText(result);
  const std::string last = lastError(comm);
  if (!last.empty()) {
    message += " (NCCL: " + last + ")";
  }
  throw CollectiveError(message);
}

ncclConfig_t makeConfig(const NcclSettings& settings) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  // Nonblocking: creation, finalize and group ends return at once, so a hung
  // peer is noticed by our polling (bounded by the timeout), never by a
  // thread stuck inside NCCL.
  config.blocking = 0;
#if NCCL_VERSION_CODE >= 21800
  // Children sharing resources share a stream, and the AG and RS duplicates
  // would serialize again. NCCL reads splitShare from the parent when
  // splitting, so pycomm/nccl.py refuses parents that share; this value
  // matters for communicators split from ours.
  config.splitShare = 0;
#endif
  const auto plan = planNcclFields(settings, usableVersion());
  for (NcclField field : plan.applied) {
    switch (field) {
#if NCCL_VERSION_CODE >= 21700
      case NcclField::CgaClusterSize:
        config.cgaClusterSize = *settings.cgaClusterSize;
        break;
      case NcclField::MinCtas:
        config.minCTAs = *settings.minCtas;
        break;
      case NcclField::MaxCtas:
        config.maxCTAs = *settings.maxCtas;
        break;
      case NcclField::NetName:
        config.netName = settings.netName->c_str();
        break;
#endif
#if NCCL_VERSION_CODE >= 22600
      case NcclField::TrafficClass:
        config.trafficClass = *settings.trafficClass;
        break;
#endif
#if NCCL_VERSION_CODE >= 22700
      case NcclField::CommName:
        config.commName = settings.commName->c_str();
        break;
      case NcclField::CtaPolicy:
        config.CTAPolicy = *settings.ctaPolicy;
        break;
#endif
      default:
        break; // the compiled header lacks the field: planNcclFields skipped it
    }
  }
  return config;
}

ncclDataType_t dataType(at::ScalarType type, const std::string& context) {
  switch (type) {
    case at::kFloat:
      return ncclFloat32;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kDouble:
      return ncclFloat64;
    case at::kChar:
      return ncclInt8;
    case at::kByte:
    case at::kBool:
      return ncclUint8;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
#if NCCL_VERSION_CODE >= 22400
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2:
      // The header may know FP8 while the library loaded is older.
      if (loadedVersion() < 22400) {
        throw UnsupportedOpError(
            context + ": " + c10::toString(type) + " needs NCCL 2.24, loaded " +
            ncclVersionText(loadedVersion()));
      }
      return type == at::kFloat8_e4m3fn ? ncclFloat8e4m3 : ncclFloat8e5m2;
#endif
    default:
      throw UnsupportedOpError(
          context + ": NCCL has no type for " + c10::toString(type));
  }
}

ncclRedOp_t reduceOp(
    c10d::ReduceOp::RedOpType op,
    at::ScalarType type,
    const std::string& context) {
  switch (op) {
    case c10d::ReduceOp::SUM:
      return type == at::kBool ? ncclMax : ncclSum; // a logical or
    case c10d::ReduceOp::PRODUCT:
      return type == at::kBool ? ncclMin : ncclProd; // a logical and
    case c10d::ReduceOp::MIN:
      return ncclMin;
    case c10d::ReduceOp::MAX:
      return ncclMax;
    case c10d::ReduceOp::AVG:
      if (!at::isFloatingType(type)) {
        throw UnsupportedOpError(
            context + ": AVG needs a floating-point type, got " +
            c10::toString(type));
      }
      return ncclAvg;
    default:
      throw UnsupportedOpError(
          context + ": reduce op " + std::to_string(static_cast<int>(op)) +
          " is not supported by the NCCL lane (SUM, AVG, MIN, MAX, PRODUCT)");
  }
}

ncclResult_t commInitRank(
    ncclComm_t* comm,
    int nranks,
    const std::string& uniqueId,
    int rank,
    ncclConfig_t* config) {
  ncclUniqueId id;
  if (uniqueId.size() != sizeof(id.internal)) {
    throw ConfigError(
        "an NCCL unique id has " + std::to_string(sizeof(id.internal)) +
        " bytes, got " + std::to_string(uniqueId.size()));
  }
  std::memcpy(id.internal, uniqueId.data(), sizeof(id.internal));
  return ncclCommInitRankConfig(comm, nranks, id, rank, config);
}

ncclResult_t commSplit(
    ncclComm_t parent,
    int color,
    int key,
    ncclComm_t* child,
    ncclConfig_t* config) {
  return ncclCommSplit(parent, color, key, child, config);
}

ncclResult_t getAsyncError(ncclComm_t comm, ncclResult_t* error) {
  return ncclCommGetAsyncError(comm, error);
}

ncclResult_t commFinalize(ncclComm_t comm) {
  return ncclCommFinalize(comm);
}

ncclResult_t commDestroy(ncclComm_t comm) {
  return ncclCommDestroy(comm);
}

ncclResult_t commAbort(ncclComm_t comm) {
  return ncclCommAbort(comm);
}

ncclResult_t commCount(ncclComm_t comm, int* count) {
  return ncclCommCount(comm, count);
}

ncclResult_t commUserRank(ncclComm_t comm, int* rank) {
  return ncclCommUserRank(comm, rank);
}

ncclResult_t groupStart() {
  return ncclGroupStart();
}

ncclResult_t groupEnd() {
  return ncclGroupEnd();
}

ncclResult_t allGather(
    const void* input,
    void* output,
    size_t countPerRank,
    ncclDataType_t type,
    ncclComm_t comm,
    cudaStream_t stream) {
  return ncclAllGather(input, output, countPerRank, type, comm, stream);
}

ncclResult_t reduceScatter(
    const void* input,
    void* output,
    size_t countPerRank,
    ncclDataType_t type,
    ncclRedOp_t op,
    ncclComm_t comm,
    cudaStream_t stream) {
  return ncclReduceScatter(input, output, countPerRank, type, op, comm, stream);
}

ncclResult_t allReduce(
    const void* input,
    void* output,
    size_t count,
    ncclDataType_t type,
    ncclRedOp_t op,
    ncclComm_t comm,
    cudaStream_t stream) {
  return ncclAllReduce(input, output, count, type, op, comm, stream);
}

ncclResult_t broadcast(
    const void* input,
    void* output,
    size_t count,
    ncclDataType_t type,
    int root,
    ncclComm_t comm,
    cudaStream_t stream) {
  return ncclBroadcast(input, output, count, type, root, comm, stream);
}

} // namespace pycomm::nccl
