#pragma once
// The one thin layer over NCCL: the lane and its communicator make every
// nccl* call through an NcclApi handed in by whoever creates them.
// libraryNcclApi() forwards to the libnccl loaded (what users get); the tests
// hand in a simulated NCCL (csrc/tests/simgpu/). What pycomm makes of NCCL's
// answers (named errors, ncclConfig_t, type mapping) is in nccl_calls.h.
//
// Thread-safety: as NCCL's: calls on one communicator must not run
// concurrently (NcclComm serializes them), except commGetAsyncError() and
// commAbort(), which NCCL allows from any thread.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <memory>

namespace pycomm {

class NcclApi {
 public:
  virtual ~NcclApi() = default;

  virtual ncclResult_t getVersion(int* version) = 0;
  virtual ncclResult_t getUniqueId(ncclUniqueId* id) = 0;
  virtual const char* getErrorString(ncclResult_t result) = 0;
  // The last error text for `comm` (null: of the calling thread); may be null.
  virtual const char* getLastError(ncclComm_t comm) = 0;

  virtual ncclResult_t commInitRankConfig(
      ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
      ncclConfig_t* config) = 0;
  virtual ncclResult_t commSplit(
      ncclComm_t parent, int color, int key, ncclComm_t* child,
      ncclConfig_t* config) = 0;
  virtual ncclResult_t commFinalize(ncclComm_t comm) = 0;
  virtual ncclResult_t commDestroy(ncclComm_t comm) = 0;
  virtual ncclResult_t commAbort(ncclComm_t comm) = 0;
  virtual ncclResult_t commGetAsyncError(ncclComm_t comm, ncclResult_t* state) = 0;
  virtual ncclResult_t commCount(ncclComm_t comm, int* count) = 0;
  virtual ncclResult_t commUserRank(ncclComm_t comm, int* rank) = 0;
  virtual ncclResult_t commRegister(
      ncclComm_t comm, void* buffer, size_t size, void** handle) = 0;
  virtual ncclResult_t commDeregister(ncclComm_t comm, void* handle) = 0;
  // A symmetric window (ncclCommWindowRegister, NCCL 2.27; collective over
  // the communicator); `window` stands for ncclWindow_t, which older headers
  // lack.
  virtual ncclResult_t commWindowRegister(
      ncclComm_t comm, void* buffer, size_t size, void** window, int flags) = 0;
  virtual ncclResult_t commWindowDeregister(ncclComm_t comm, void* window) = 0;

  virtual ncclResult_t groupStart() = 0;
  virtual ncclResult_t groupEnd() = 0;
  // NCCL groups torch has open on the calling thread (ProcessGroupNCCL's
  // _coalescing_manager, batch_isend_irecv): a pooled op issued inside one
  // would nest pycomm's nonblocking group in torch's blocking one, which
  // NCCL refuses, failing the communicator.
  virtual int torchGroupDepth() = 0;

  virtual ncclResult_t allGather(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) = 0;
  virtual ncclResult_t reduceScatter(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm,
      cudaStream_t stream) = 0;
  virtual ncclResult_t allReduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) = 0;
  virtual ncclResult_t broadcast(
      const void* input, void* output, size_t count, ncclDataType_t type,
      int root, ncclComm_t comm, cudaStream_t stream) = 0;
  // `output` is written on `root` only (and may be null elsewhere).
  virtual ncclResult_t reduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) = 0;
  // Point-to-point: a send to `peer` is matched with that peer's recv from
  // this rank, in the order each side calls them, with the same count and
  // type ("Any point-to-point communication needs two NCCL calls", NCCL
  // user guide, "Point-to-point communication").
  virtual ncclResult_t send(
      const void* input, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) = 0;
  virtual ncclResult_t recv(
      void* output, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) = 0;
  // Device memory of the calling thread's current device from CUDA's
  // virtual memory API (ncclMemAlloc, NCCL >= 2.19): what NCCL's user
  // buffer registration, symmetric windows and NVLS take best. ncclMemFree
  // frees only what ncclMemAlloc gave.
  virtual ncclResult_t memAlloc(void** ptr, size_t size) = 0;
  virtual ncclResult_t memFree(void* ptr) = 0;
  // A reduce op that multiplies each input by `*scalar` (of `type`: read on
  // the host at this call with ncclScalarHostImmediate, by the kernel from
  // device memory with ncclScalarDevice) before summing; destroyed with
  // redOpDestroy.
  virtual ncclResult_t redOpCreatePreMulSum(
      ncclRedOp_t* op, void* scalar, ncclDataType_t type,
      ncclScalarResidence_t residence, ncclComm_t comm) = 0;
  virtual ncclResult_t redOpDestroy(ncclRedOp_t op, ncclComm_t comm) = 0;
};

// The libnccl this process loaded; one instance per process.
std::shared_ptr<NcclApi> libraryNcclApi();

} // namespace pycomm
