#pragma once
// Owned CUDA streams and events, the device scope, and the check every CUDA
// call goes through; all made through a CudaApi.
//
// Thread-safety: CudaStream and CudaEvent are immutable handles after
// construction; CUDA allows their use from any thread. A DeviceScope belongs
// to the thread that made it.
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_api.h"

namespace pycomm {

// Throws CollectiveError naming `what` and CUDA's message.
void checkCuda(CudaApi& api, cudaError_t result, const std::string& what);

// Makes `device` current for the scope. On leaving, the thread's previous
// device is current again as torch sees it, the way torch's own device
// guards leave it (CudaApi::restoreDevice): a device without a primary
// context only becomes torch's target, since setting it would create a
// context there (about 0.5 GiB of GPU 0 from every rank whose thread never
// used a device). `Throw` reports a failure to set the device; `Quiet`
// ignores it (teardown paths, where the NCCL call after it reports it).
class DeviceScope {
 public:
  enum class Errors { Throw, Quiet };
  DeviceScope(CudaApi& api, int device, Errors errors = Errors::Throw);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  CudaApi& api_;
  int previous_ = -1;
};

// The stream priorities `device` allows: `greatest` is the numerically
// lowest, i.e. the most urgent.
struct StreamPriorityRange {
  int least = 0;
  int greatest = 0;
};
StreamPriorityRange streamPriorityRange(CudaApi& api, int device);

// A non-blocking stream (it does not synchronize with the legacy default
// stream) of a given priority on the current device, destroyed with it.
class CudaStream {
 public:
  CudaStream(std::shared_ptr<CudaApi> api, int priority);
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  cudaStream_t get() const {
    return stream_;
  }
  int priority() const;

 private:
  std::shared_ptr<CudaApi> api_;
  cudaStream_t stream_ = nullptr;
};

// An event on the current device, destroyed with it; CUDA releases it once
// pending work is done. Without timing unless asked (cheaper to record and
// wait on).
class CudaEvent {
 public:
  explicit CudaEvent(std::shared_ptr<CudaApi> api, bool timed = false);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void record(cudaStream_t stream);
  // `stream` waits on the device until the event's work is done.
  void block(cudaStream_t stream) const;
  // True once the recorded work is done; throws on a device error.
  bool query() const;
  // Milliseconds from `start` to this event, both timed and passed.
  float millisecondsSince(const CudaEvent& start) const;

 private:
  std::shared_ptr<CudaApi> api_;
  cudaEvent_t event_ = nullptr;
};

// An op's end event. A nonblocking group end hands the launch to NCCL's own
// thread, so the event can only be recorded once NCCL has put the op's
// kernels on the stream, after issue() returned; until then the op counts as
// not passed (an event never recorded would count as passed in CUDA).
class EndEvent {
 public:
  explicit EndEvent(std::shared_ptr<CudaApi> api, bool timed = false)
      : event_(std::move(api), timed) {}
  void record(cudaStream_t stream) {
    event_.record(stream);
    recorded_.store(true, std::memory_order_release);
  }
  bool recorded() const {
    return recorded_.load(std::memory_order_acquire);
  }
  // False until recorded; throws on a device error.
  bool passed() const {
    return recorded() && event_.query();
  }
  void block(cudaStream_t stream) const {
    event_.block(stream);
  }
  // Milliseconds from `start` to this event (both timed and passed).
  float millisecondsSince(const EndEvent& start) const {
    return event_.millisecondsSince(start.event_);
  }
  // For reuse by the next op.
  void reset() {
    recorded_.store(false, std::memory_order_release);
  }

 private:
  CudaEvent event_;
  std::atomic<bool> recorded_{false};
};

// Recycles end events: creating and destroying a CUDA event per op costs the
// host (torch's NCCL backend caches its events too, CUDAEventCache). An
// event goes back when the last holder of the op's Work lets go; a wait
// already queued on it keeps the state it had, so reuse is safe.
class EndEventPool : public std::enable_shared_from_this<EndEventPool> {
 public:
  // `timed`: its events can time the span between two of them.
  EndEventPool(std::shared_ptr<CudaApi> api, bool timed)
      : api_(std::move(api)), timed_(timed) {}
  std::shared_ptr<EndEvent> take();

 private:
  void giveBack(EndEvent* event);
  static constexpr size_t kKept = 64;
  std::shared_ptr<CudaApi> api_;
  bool timed_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<EndEvent>> free_;
};

} // namespace pycomm
