#include "nccl_calls.h"

#include <algorithm>
#include <cstring>

#include "collective.h"
#include "comm_memory.h"
#include "cuda_resources.h"
#include "errors.h"

namespace pycomm::nccl {

int builtVersion() {
  return NCCL_VERSION_CODE;
}

int loadedVersion(NcclApi& api) {
  int version = 0;
  check(api, api.getVersion(&version), "ncclGetVersion", nullptr);
  return version;
}

int usableVersion(NcclApi& api) {
  return std::min(builtVersion(), loadedVersion(api));
}

std::string errorText(NcclApi& api, ncclResult_t result) {
  const char* text = api.getErrorString(result);
  return text != nullptr ? text : "result " + std::to_string(static_cast<int>(result));
}

std::string lastError(NcclApi& api, ncclComm_t comm) {
  const char* text = api.getLastError(comm);
  return text != nullptr ? text : "";
}

std::string newUniqueId(NcclApi& api) {
  ncclUniqueId id;
  check(api, api.getUniqueId(&id), "ncclGetUniqueId", nullptr);
  return std::string(id.internal, sizeof(id.internal));
}

ncclUniqueId uniqueIdFromBytes(const std::string& bytes) {
  ncclUniqueId id;
  if (bytes.size() != sizeof(id.internal)) {
    throw ConfigError(
        "an NCCL unique id has " + std::to_string(sizeof(id.internal)) +
        " bytes, got " + std::to_string(bytes.size()));
  }
  std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  return id;
}

ncclResult_t check(NcclApi& api, ncclResult_t result, const std::string& what, ncclComm_t comm) {
  if (result == ncclSuccess || result == ncclInProgress) {
    return result;
  }
  std::string message = what + " failed: " + errorText(api, result);
  const std::string last = lastError(api, comm);
  if (!last.empty()) {
    message += " (NCCL: " + last + ")";
  }
  throw CollectiveError(message);
}

ncclConfig_t makeConfig(const NcclSettings& settings, int usableVersion, const std::string& context) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  // Nonblocking: creation, finalize and group ends return at once, so a hung
  // peer is noticed by our polling (bounded by the timeout), never by a
  // thread stuck inside NCCL.
  config.blocking = 0;
#if NCCL_VERSION_CODE >= 21800
  // Children sharing resources share the device stream, and the AG and RS
  // duplicates would serialize again. NCCL reads splitShare from the parent
  // when splitting, so unless a role asks for sharing every communicator
  // pycomm splits from has it off.
  config.splitShare = 0;
#endif
  const auto plan = requireNcclFields(settings, usableVersion, context);
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
#if NCCL_VERSION_CODE >= 21800
      case NcclField::SplitShare:
        config.splitShare = *settings.splitShare;
        break;
#endif
#if NCCL_VERSION_CODE >= 22500
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
      case NcclField::NvlsCtas:
        config.nvlsCTAs = *settings.nvlsCtas;
        break;
      case NcclField::CollnetEnable:
        config.collnetEnable = *settings.collnetEnable;
        break;
#endif
#if NCCL_VERSION_CODE >= 22800
      case NcclField::NChannelsPerNetPeer:
        config.nChannelsPerNetPeer = *settings.nChannelsPerNetPeer;
        break;
      case NcclField::NvlinkCentricSched:
        config.nvlinkCentricSched = *settings.nvlinkCentricSched;
        break;
#endif
#if NCCL_VERSION_CODE >= 22900
      case NcclField::GraphUsageMode:
        config.graphUsageMode = *settings.graphUsageMode;
        break;
      case NcclField::NumRmaCtx:
        config.numRmaCtx = *settings.numRmaCtx;
        break;
#endif
#if NCCL_VERSION_CODE >= 23000
      case NcclField::MaxP2pPeers:
        config.maxP2pPeers = *settings.maxP2pPeers;
        break;
#endif
#if NCCL_VERSION_CODE >= 23005
      case NcclField::GraphStreamOrdering:
        config.graphStreamOrdering = *settings.graphStreamOrdering;
        break;
#endif
#if NCCL_VERSION_CODE >= 23100
      case NcclField::LaunchOrderImplicit:
        config.launchOrderImplicit = *settings.launchOrderImplicit;
        break;
#endif
      default:
        // The usable version is at most the compiled header's, so the
        // header has every field requireNcclFields let through.
        throw NcclVersionError(
            context + ": ncclConfig_t." + ncclFieldName(field) + " is not in the nccl.h pycomm was built with");
    }
  }
  return config;
}

ncclDataType_t dataType(at::ScalarType type, int loadedVersion, const std::string& context) {
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
    case at::kUInt32:
      return ncclUint32;
    case at::kLong:
      return ncclInt64;
    case at::kUInt64:
      return ncclUint64;
#if NCCL_VERSION_CODE >= 22400
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2:
      // The header may know FP8 while the library loaded is older.
      if (loadedVersion < 22400) {
        throw UnsupportedOpError(
            context + ": " + c10::toString(type) + " needs NCCL 2.24, loaded " +
            ncclVersionText(loadedVersion));
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
    int computeMajor,
    const std::string& context,
    bool groupReducesFp8) {
  const bool fp8 = type == at::kFloat8_e4m3fn || type == at::kFloat8_e5m2;
  if (fp8 && !groupReducesFp8) {
    throw UnsupportedOpError(
        context + ": NCCL reduces " + c10::toString(type) +
        " only when every rank of the communicator has compute capability 9.0 "
        "or later (it checks the lowest); a rank of this group has an older GPU");
  }
  if (fp8 && computeMajor < kFp8ReduceMinComputeMajor) {
    throw UnsupportedOpError(
        context + ": NCCL reduces " + c10::toString(type) +
        " only on compute capability 9.0 and later (Hopper); this device is " +
        std::to_string(computeMajor) + ".x");
  }
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
          context + ": reduce op " + reduceOpName(op) +
          " is not supported by the NCCL lane: NCCL has no bitwise reductions (SUM, AVG, MIN, MAX, "
          "PRODUCT, PREMUL_SUM run); reduce CPU tensors for BAND, BOR, BXOR");
  }
}

PreMulFactor preMulFactor(double scalar, const at::Tensor& tensor, at::ScalarType type) {
  PreMulFactor factor;
  if (tensor.defined()) {
    factor.deviceAddress = const_cast<void*>(tensor.const_data_ptr());
    return factor;
  }
  // The value in the data type NCCL reads it as, as ProcessGroupNCCL's
  // unpackPreMulSum converts the factor.
  auto put = [&](auto value) {
    static_assert(sizeof(value) <= sizeof(factor.value));
    std::memcpy(factor.value.data(), &value, sizeof(value));
  };
  switch (type) {
    case at::kHalf:
      put(static_cast<at::Half>(scalar));
      break;
    case at::kBFloat16:
      put(static_cast<at::BFloat16>(scalar));
      break;
    case at::kFloat:
      put(static_cast<float>(scalar));
      break;
    default:
      put(scalar);
      break;
  }
  return factor;
}

void* allocateMemory(const GpuApis& apis, int device, size_t bytes, const std::string& what) {
  DeviceScope scope(*apis.cuda, device); // ncclMemAlloc serves the current device
  void* ptr = nullptr;
  const ncclResult_t result = apis.nccl->memAlloc(&ptr, bytes);
  if (result != ncclSuccess) {
    throw CollectiveError(
        what + ": ncclMemAlloc of " + std::to_string(bytes) + " bytes on cuda:" + std::to_string(device) +
        " failed: " + errorText(*apis.nccl, result));
  }
  return ptr;
}

ncclResult_t freeMemory(const GpuApis& apis, int device, void* ptr) {
  DeviceScope scope(*apis.cuda, device, DeviceScope::Errors::Quiet);
  return apis.nccl->memFree(ptr);
}

} // namespace pycomm::nccl
