#pragma once
// Tensors in NCCL's own memory (ncclMemAlloc) on a lane's device: what
// ProcessGroupNCCL's mem_allocator and allocate_tensor give FSDP2's
// set_allocate_memory_from_process_group_for_comm. Memory from ncclMemAlloc
// is what NCCL's buffer registration, symmetric windows and NVLS take best.
//
// The implementation is injected (NcclLaneSpec::memory): the extension's
// runs torch's caching allocator over ncclMemAlloc (torch_comm_memory.h);
// the simulated GPU's tests give one over the simulated ncclMemAlloc.
//
// Thread-safety: implementations accept every call from any thread.
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "gpu_apis.h"

namespace pycomm {

class CommMemory {
 public:
  virtual ~CommMemory() = default;
  // torch's allocator of that memory.
  virtual std::shared_ptr<c10::Allocator> allocator() = 0;
  // A 1-D tensor of `numel` elements of `options`' type in that memory.
  virtual at::Tensor allocate(int64_t numel, const at::TensorOptions& options) = 0;
};

namespace nccl {

// ncclMemAlloc and ncclMemFree came with NCCL 2.19.
constexpr int kMemAllocMinVersion = 21900;

// ncclMemAlloc of `bytes` on `device` (made current for the call);
// CollectiveError naming `what` and NCCL's error when it fails.
void* allocateMemory(const GpuApis& apis, int device, size_t bytes, const std::string& what);
// ncclMemFree of what allocateMemory gave, on `device`; NCCL's answer (a
// deleter cannot throw).
ncclResult_t freeMemory(const GpuApis& apis, int device, void* ptr);

} // namespace nccl
} // namespace pycomm
