#pragma once
// The one thin layer over NCCL: every nccl* call of pycomm is made in
// nccl_api.cpp. Return codes become named exceptions carrying NCCL's own
// message; ncclConfig_t is filled with the version guards of nccl_fields.h;
// torch types map to NCCL's.
//
// Thread-safety: the functions are thread-safe as NCCL's are: calls on one
// communicator must not run concurrently (NcclComm serializes them), except
// getAsyncError() and abort(), which NCCL allows from any thread.
#include <nccl.h>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <cstddef>
#include <string>

#include "nccl_fields.h"

namespace pycomm::nccl {

// The version in the nccl.h compiled against, and the one of the libnccl
// loaded now (they may differ: the library is found at run time).
int builtVersion();
int loadedVersion();
// The version both understand: the config fields that can be set.
int usableVersion();

// NCCL's text for a result code, and its last error message for `comm`
// (may be null: the last error of the thread).
std::string errorText(ncclResult_t result);
std::string lastError(ncclComm_t comm);

// A fresh ncclUniqueId as bytes, for the store exchange.
std::string newUniqueId();

// Throws CollectiveError naming `what`, the result and NCCL's last error text
// for `comm` (may be null). ncclInProgress is not an error for nonblocking
// communicators and is returned to the caller.
ncclResult_t check(ncclResult_t result, const std::string& what, ncclComm_t comm);

// ncclConfig_t with blocking=0, splitShare=0 and the fields `settings` sets
// that usableVersion() understands. Pointers in the result point into
// `settings`, which must outlive the config's use.
ncclConfig_t makeConfig(const NcclSettings& settings);

// Throw UnsupportedOpError naming `context` for types or ops NCCL lacks.
ncclDataType_t dataType(at::ScalarType type, const std::string& context);
ncclRedOp_t reduceOp(
    c10d::ReduceOp::RedOpType op,
    at::ScalarType type,
    const std::string& context);

ncclResult_t commInitRank(
    ncclComm_t* comm,
    int nranks,
    const std::string& uniqueId,
    int rank,
    ncclConfig_t* config);
ncclResult_t commSplit(
    ncclComm_t parent,
    int color,
    int key,
    ncclComm_t* child,
    ncclConfig_t* config);
ncclResult_t getAsyncError(ncclComm_t comm, ncclResult_t* error);
ncclResult_t commFinalize(ncclComm_t comm);
ncclResult_t commDestroy(ncclComm_t comm);
ncclResult_t commAbort(ncclComm_t comm);
ncclResult_t commCount(ncclComm_t comm, int* count);
ncclResult_t commUserRank(ncclComm_t comm, int* rank);

ncclResult_t groupStart();
ncclResult_t groupEnd();
ncclResult_t allGather(
    const void* input,
    void* output,
    size_t countPerRank,
    ncclDataType_t type,
    ncclComm_t comm,
    cudaStream_t stream);
ncclResult_t reduceScatter(
    const void* input,
    void* output,
    size_t countPerRank,
    ncclDataType_t type,
    ncclRedOp_t op,
    ncclComm_t comm,
    cudaStream_t stream);
ncclResult_t allReduce(
    const void* input,
    void* output,
    size_t count,
    ncclDataType_t type,
    ncclRedOp_t op,
    ncclComm_t comm,
    cudaStream_t stream);
ncclResult_t broadcast(
    const void* input,
    void* output,
    size_t count,
    ncclDataType_t type,
    int root,
    ncclComm_t comm,
    cudaStream_t stream);

} // namespace pycomm::nccl
