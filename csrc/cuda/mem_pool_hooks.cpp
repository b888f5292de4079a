#include "mem_pool_hooks.h"

#include "erase_if.h"

#include <c10/util/Logging.h>

#include <algorithm>
#include <exception>

namespace pycomm {

MemPoolHooks& MemPoolHooks::instance() {
  static MemPoolHooks* hooks = new MemPoolHooks(); // never destroyed: the allocator may call late
  return *hooks;
}

void MemPoolHooks::watch(const std::shared_ptr<DeviceLane>& lane, c10::MempoolId_t pool, bool symmetric) {
  std::lock_guard<std::mutex> lock(mutex_);
  dropLocked(lane.get(), pool);
  watches_.push_back(Watch{lane, lane.get(), pool, lane->device().index(), symmetric});
}

void MemPoolHooks::unwatch(const DeviceLane* lane, c10::MempoolId_t pool) {
  std::lock_guard<std::mutex> lock(mutex_);
  dropLocked(lane, pool);
}

void MemPoolHooks::dropLocked(const DeviceLane* lane, c10::MempoolId_t pool) {
  eraseIf(watches_, [&](const Watch& w) { return w.lane.expired() || (w.key == lane && w.pool == pool); });
}

size_t MemPoolHooks::watched() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<size_t>(std::count_if(
      watches_.begin(), watches_.end(), [](const Watch& w) { return !w.lane.expired(); }));
}

void MemPoolHooks::onTrace(const c10::CachingDeviceAllocator::TraceEntry& entry) {
  using Action = c10::CachingDeviceAllocator::TraceEntry::Action;
  // Expandable segments grow and shrink by maps and unmaps.
  const bool gained = entry.action_ == Action::SEGMENT_ALLOC || entry.action_ == Action::SEGMENT_MAP;
  const bool freed = entry.action_ == Action::SEGMENT_FREE || entry.action_ == Action::SEGMENT_UNMAP;
  if (!gained && !freed) {
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (const Watch& w : watches_) {
    if (w.pool != entry.mempool_ || w.device != entry.device_ || (gained && w.symmetric)) {
      continue;
    }
    auto lane = w.lane.lock();
    if (!lane) {
      continue;
    }
    void* address = reinterpret_cast<void*>(entry.addr_);
    try {
      if (gained) {
        lane->registerMemory(address, entry.size_, /*symmetric=*/false);
      } else {
        lane->deregisterMemory(address);
      }
    } catch (const std::exception& e) {
      // Nothing may escape into the allocator; a failed registration
      // failed the lane, whose next op reports it.
      LOG(ERROR) << "pycomm: " << (gained ? "registering" : "deregistering") << " a segment of a watched "
                 << "memory pool failed: " << e.what();
    }
  }
}

} // namespace pycomm
