#pragma once
// Keeps a torch memory pool registered with the NCCL lanes it was given to
// (register_mem_pool) as the pool changes: torch's caching allocator reports
// every segment it gets from the device and gives back to its trace trackers,
// and a segment a watched pool gains is registered with the lane at once, a
// segment it frees deregistered (ProcessGroupNCCL hooks the allocator the
// same way). Registration with ncclCommRegister is local to each rank, so
// the allocator's callback, on whatever thread allocates, may make it.
// Symmetric windows are not: a window is collective over the members, so a
// pool registered with symm=True gets windows for the segments it gained at
// the next register_mem_pool call (where the members agree on them).
//
// Thread-safety: every method may be called from any thread; onTrace runs
// under the caching allocator's lock, then under this registry's, then
// takes the lane's issue lock.
#include <c10/core/CachingDeviceAllocator.h>

#include <memory>
#include <mutex>
#include <vector>

#include "device_lane.h"

namespace pycomm {

class MemPoolHooks {
 public:
  // The process's registry (the allocator's trackers cannot be detached).
  static MemPoolHooks& instance();

  // From now on, segments `pool` gains on `lane`'s device are registered
  // with `lane` and those it frees deregistered (symmetric pools: freed
  // ones only); until unwatch() or the lane's end.
  void watch(const std::shared_ptr<DeviceLane>& lane, c10::MempoolId_t pool, bool symmetric);
  void unwatch(const DeviceLane* lane, c10::MempoolId_t pool);
  // What the allocator's trace tracker calls for each event.
  void onTrace(const c10::CachingDeviceAllocator::TraceEntry& entry);
  // Pools watched on live lanes.
  size_t watched();

 private:
  struct Watch {
    std::weak_ptr<DeviceLane> lane;
    const DeviceLane* key;
    c10::MempoolId_t pool;
    c10::DeviceIndex device;
    bool symmetric;
  };
  // Drops the lane's watch of the pool and every watch whose lane is gone.
  void dropLocked(const DeviceLane* lane, c10::MempoolId_t pool);
  std::mutex mutex_;
  std::vector<Watch> watches_;
};

} // namespace pycomm
