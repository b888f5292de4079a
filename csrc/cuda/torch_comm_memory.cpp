#include "torch_comm_memory.h"

#include "mem_pool_hooks.h"

#include <ATen/cuda/MemPool.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Logging.h>
#include <c10/util/ScopeExit.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <thread>
#include <utility>

namespace pycomm {

TorchCommMemory::TorchCommMemory(GpuApis apis, int device, std::string label)
    : apis_(std::move(apis)), device_(device), label_(std::move(label)) {}

TorchCommMemory::~TorchCommMemory() = default;

std::shared_ptr<c10::Allocator> TorchCommMemory::allocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!allocator_) {
    // The allocator is asked for the device a block is for, which is this
    // lane's: a pool holds the blocks of one device.
    allocator_ = torch::cuda::CUDAPluggableAllocator::createCustomAllocator(
        [apis = apis_, label = label_](size_t bytes, int device, cudaStream_t) {
          return nccl::allocateMemory(apis, device, bytes, label);
        },
        [apis = apis_, label = label_](void* ptr, size_t, int device, cudaStream_t) {
          const ncclResult_t result = nccl::freeMemory(apis, device, ptr);
          if (result != ncclSuccess) {
            LOG(ERROR) << label << ": ncclMemFree failed: " << apis.nccl->getErrorString(result);
          }
        });
  }
  return allocator_;
}

at::Tensor TorchCommMemory::allocate(int64_t numel, const at::TensorOptions& options) {
  allocator(); // made once
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  c10::MempoolId_t id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!pool_) {
      pool_ = std::make_unique<at::cuda::MemPool>(allocator_, /*is_user_created=*/true);
    }
    id = pool_->id();
  }
  // Only this thread's allocation goes to the pool, for as long as it takes.
  const auto me = std::this_thread::get_id();
  const auto device = static_cast<c10::DeviceIndex>(device_);
  c10::cuda::CUDACachingAllocator::beginAllocateToPool(
      device, id, [me](cudaStream_t) { return std::this_thread::get_id() == me; });
  const auto routed = c10::make_scope_exit([&] { c10::cuda::CUDACachingAllocator::endAllocateToPool(device, id); });
  return at::empty({numel}, options);
}

void attachMemPoolHooksToTorchAllocator() {
  static std::once_flag attached;
  std::call_once(attached, [] {
    c10::cuda::CUDACachingAllocator::attachAllocatorTraceTracker(
        [](const c10::CachingDeviceAllocator::TraceEntry& entry) { MemPoolHooks::instance().onTrace(entry); });
  });
}

} // namespace pycomm
