#pragma once
// CommMemory for users: torch's caching allocator over ncclMemAlloc, in a
// memory pool of its own, as ProcessGroupNCCL's allocate_tensor keeps one
// (a pluggable allocator whose alloc and free are ncclMemAlloc and
// ncclMemFree, and a MemPool the tensors are allocated into). The pool
// caches freed blocks, so a training step's buffers do not each pay for
// ncclMemAlloc's virtual-memory mapping. Compiled into the extension only
// (it needs torch's CUDA runtime); runs only on a GPU.
//
// Thread-safety: every method may be called from any thread; the pool is
// made once, under a lock.
#include <memory>
#include <mutex>

#include "comm_memory.h"

namespace at::cuda {
struct MemPool;
}
namespace c10::cuda::CUDACachingAllocator {
class CUDAAllocator;
}

namespace pycomm {

class TorchCommMemory final : public CommMemory {
 public:
  TorchCommMemory(GpuApis apis, int device, std::string label);
  ~TorchCommMemory() override;

  std::shared_ptr<c10::Allocator> allocator() override;
  at::Tensor allocate(int64_t numel, const at::TensorOptions& options) override;

 private:
  GpuApis apis_;
  const int device_;
  const std::string label_;
  std::mutex mutex_;
  std::shared_ptr<c10::cuda::CUDACachingAllocator::CUDAAllocator> allocator_;
  std::unique_ptr<at::cuda::MemPool> pool_;
};

// Hands every event of torch's CUDA caching allocator to MemPoolHooks (once
// per process: trackers cannot be detached).
void attachMemPoolHooksToTorchAllocator();

} // namespace pycomm
