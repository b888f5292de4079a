#pragma once
// Watches the threads that must never block for long (the NCCL lanes'
// watchdogs) as torch's HeartbeatMonitor watches ProcessGroupNCCL's
// watchdog (torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp,
// HeartbeatMonitor::runLoop): on a sick GPU a CUDA or NCCL call can hang
// (cudaEventQuery, cudaEventDestroy, ncclCommAbort, ncclCommDestroy), and a
// watchdog stuck in one fires no timeout and lets no teardown finish.
//
// A watched thread marks each call that may block with a StallWatch::Call.
// One monitor thread per process looks at every watch a few times per bound;
// a call that lasts longer than its watch's bound is reported once, on the
// monitor's thread, to the watch's handler, with what the thread was doing.
// The handler must not make the calls that may hang: it fails what waits on
// the stuck thread and ends the lane or the process.
//
// Calls from other threads that may hang (an abort or a destroy asked for by
// the user) go through runBounded(), so their caller returns within a bound.
//
// Thread-safety: StallWatch::Call is for one thread per watch at a time (the
// watched thread); everything else may be called from any thread.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace pycomm {

class StallWatch {
 public:
  using Handler = std::function<void(const std::string& report)>;

  // Registers with the process's monitor, whose thread starts with the
  // first watch. `label` names the watched thread in reports.
  static std::shared_ptr<StallWatch> create(
      std::string label, std::chrono::milliseconds bound, Handler onStall);
  ~StallWatch();
  StallWatch(const StallWatch&) = delete;
  StallWatch& operator=(const StallWatch&) = delete;

  // Marks a call that may block, for the scope; `what` is a string literal
  // ("querying the end event"): no allocation on the watched thread.
  class Call {
   public:
    Call(StallWatch& watch, const char* what);
    ~Call();
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;

   private:
    StallWatch& watch_;
  };

  std::chrono::milliseconds bound() const {
    return bound_;
  }
  // Whether the handler was called.
  bool stalled() const {
    return reported_.load();
  }

  // For the monitor: the report when the marked call has lasted longer than
  // the bound and was not reported yet (then it counts as reported), else
  // empty.
  std::string takeStall(int64_t nowUs);
  void runHandler(const std::string& report) const {
    onStall_(report);
  }

 private:
  StallWatch(std::string label, std::chrono::milliseconds bound, Handler onStall);

  const std::string label_;
  const std::chrono::milliseconds bound_;
  const Handler onStall_;
  std::atomic<const char*> activity_{nullptr};
  std::atomic<int64_t> sinceUs_{0}; // 0: not in a marked call
  std::atomic<bool> reported_{false};
};

// Runs `call` on a thread of its own and waits for it at most `bound`; true
// when it returned in time. Past the bound it goes on alone, keeping alive
// whatever it captured, and the caller goes on without it. A thread that
// cannot be started runs `call` here, unbounded.
bool runBounded(std::chrono::milliseconds bound, std::function<void()> call);

} // namespace pycomm
