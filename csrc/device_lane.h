#pragma once
// The interface through which a PooledBackend hands ops on device tensors to a
// device transport (the NCCL lane of the CUDA build). Declared here, free of
// CUDA headers, so the backend is the same in every build variant.
//
// Thread-safety: implementations must accept every call from any thread.
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "collective.h"
#include "lane_stats.h"

namespace pycomm {

class DeviceLane {
 public:
  virtual ~DeviceLane() = default;

  // The one device this lane's communicator was created on.
  virtual c10::Device device() const = 0;
  // Issues `op` (validated, all tensors on device()) behind every op issued
  // before it, ordered after the work already queued on the caller's current
  // stream. Never blocks the host on the device.
  // `seq` is the op's place among its group's ops.
  virtual c10::intrusive_ptr<c10d::Work> issue(
      const Collective& op,
      c10d::OpType type,
      uint64_t seq,
      std::string description) = 0;
  // Where finished ops are counted; set once before the first issue().
  virtual void bindStats(std::shared_ptr<LaneStats> stats) = 0;
  // Ops issued and not yet observed finished.
  virtual size_t pending() const = 0;
  // Lets issued ops finish (bounded by the timeout), then frees the
  // communicator; waits for both. Idempotent.
  virtual void close() = 0;
  // close() without waiting: the lane finishes and frees on its own thread.
  // For destructors, which must not block (they may run holding Python's
  // GIL, which an op's completion callback may need).
  virtual void release() = 0;
  // Aborts the communicator without waiting for peers; unfinished ops fail.
  // Idempotent.
  virtual void abort() = 0;
  // Registers device memory with the communicator for zero-copy collectives
  // (`symmetric`: a symmetric window, collective over the members);
  // registering it again does nothing. Freed by close() and abort().
  virtual void registerMemory(void* buffer, size_t bytes, bool symmetric) = 0;
  // Forgets a registration; memory that is not registered is ignored.
  virtual void deregisterMemory(void* buffer) = 0;
  virtual bool isRegistered(void* buffer) const = 0;
  // The timeout of ops issued from now on (ops in flight keep theirs).
  virtual void setTimeout(std::chrono::milliseconds timeout) = 0;
  // torch's allocator of the transport's own memory on device() (NCCL's
  // ncclMemAlloc), what ProcessGroupNCCL's mem_allocator gives; null when
  // the transport has none.
  virtual std::shared_ptr<c10::Allocator> memAllocator() = 0;
  // A 1-D tensor of `numel` elements in that memory, as ProcessGroupNCCL's
  // allocate_tensor gives; UnsupportedOpError when there is none.
  virtual at::Tensor allocateTensor(int64_t numel, const at::TensorOptions& options) = 0;
};

} // namespace pycomm
