#pragma once
// What pycomm makes of NCCL through an NcclApi: return codes -> named
// exceptions carrying NCCL's own message, ncclConfig_t filled behind the
// version guards of nccl_fields.h, torch types and reduce ops -> NCCL's.
//
// Thread-safety: pure functions of their arguments and of the NcclApi, which
// is thread-safe as NCCL is.
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <array>
#include <string>

#include "nccl_api.h"
#include "nccl_fields.h"

namespace pycomm::nccl {

// The version in the nccl.h compiled against, the one of the library behind
// `api` (they may differ: the library is found at run time), and the one both
// understand (which config fields can be set).
int builtVersion();
int loadedVersion(NcclApi& api);
int usableVersion(NcclApi& api);

// NCCL's text for a result code, and its last error message for `comm`
// (may be null: the last error of the thread).
std::string errorText(NcclApi& api, ncclResult_t result);
std::string lastError(NcclApi& api, ncclComm_t comm);

// A fresh unique id as bytes, for the store exchange, and back.
std::string newUniqueId(NcclApi& api);
ncclUniqueId uniqueIdFromBytes(const std::string& bytes);

// Throws CollectiveError naming `what`, the result and NCCL's last error text
// for `comm` (may be null). ncclInProgress is not an error for nonblocking
// communicators and is returned to the caller.
ncclResult_t check(NcclApi& api, ncclResult_t result, const std::string& what, ncclComm_t comm);

// ncclConfig_t with blocking=0, splitShare=0 (unless `settings` asks for
// sharing) and every field `settings` sets; NcclVersionError (prefixed with
// `context`) when `usableVersion` is too old for any of them. Pointers in the
// result point into `settings`, which must outlive the config's use.
ncclConfig_t makeConfig(const NcclSettings& settings, int usableVersion, const std::string& context);

// NCCL's type for `type`; UnsupportedOpError naming `context` when NCCL (or
// the library loaded, of `loadedVersion`) has none.
ncclDataType_t dataType(at::ScalarType type, int loadedVersion, const std::string& context);

// NCCL reduces FP8 only on Hopper and later, checked against the lowest
// compute capability of a communicator's ranks (comm->minCompCap, NCCL
// 2.30.7 src/enqueue.cc): older devices fail inside NCCL, after the
// communicator took the op.
constexpr int kFp8ReduceMinComputeMajor = 9;

// NCCL's reduce op for `op` on `type`, on a device of compute capability
// `computeMajor` in a group where every rank's GPU reduces FP8 or not
// (`groupReducesFp8`); UnsupportedOpError naming `context` for what NCCL
// cannot reduce there.
ncclRedOp_t reduceOp(
    c10d::ReduceOp::RedOpType op,
    at::ScalarType type,
    int computeMajor,
    const std::string& context,
    bool groupReducesFp8 = true);

// A PREMUL_SUM factor as ncclRedOpCreatePreMulSum takes it, for inputs of
// `type` (half, float, bfloat16 or double: collective.cpp checked): the
// number converted to `type` (host-immediate), or the address of the
// one-element factor tensor (device residence; the caller keeps it alive
// until the op ended, as the kernel reads it).
struct PreMulFactor {
  std::array<unsigned char, 8> value{};
  void* deviceAddress = nullptr;
  // NCCL takes the scalar as void* but only reads it.
  void* scalar() const {
    return deviceAddress != nullptr ? deviceAddress : const_cast<unsigned char*>(value.data());
  }
  ncclScalarResidence_t residence() const {
    return deviceAddress != nullptr ? ncclScalarDevice : ncclScalarHostImmediate;
  }
};
PreMulFactor preMulFactor(double scalar, const at::Tensor& tensor, at::ScalarType type);

} // namespace pycomm::nccl
