#pragma once
// Calls of the simulated GPU or NCCL that a test makes block, for a set time
// or until released: on a sick GPU cudaEventDestroy, cudaEventQuery,
// ncclCommAbort and ncclCommDestroy hang in practice, which is why torch's
// ProcessGroupNCCL has a heartbeat monitor watching its watchdog
// (torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp, HeartbeatMonitor).
// Test code only.
//
// Thread-safety: every method may be called from any thread.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>

namespace pycomm::sim {

class CallGate {
 public:
  // Blocks until released: a call that never returns.
  static constexpr std::chrono::milliseconds kForever{-1};

  // From now on each call of kind `call` blocks for `howLong` (kForever:
  // until releaseAll()) before it does anything.
  void block(int call, std::chrono::milliseconds howLong) {
    std::lock_guard<std::mutex> lock(mutex_);
    delays_[call] = howLong;
  }

  // Ends every block, those in progress included; later calls pass.
  void releaseAll() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      delays_.clear();
      ++generation_;
    }
    changed_.notify_all();
  }

  // Called first by each call of kind `call`.
  void pass(int call) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto it = delays_.find(call);
    if (it == delays_.end()) {
      return;
    }
    const auto howLong = it->second;
    const uint64_t generation = generation_;
    ++blocked_;
    const auto released = [&] { return generation_ != generation; };
    if (howLong == kForever) {
      changed_.wait(lock, released);
    } else {
      changed_.wait_for(lock, howLong, released);
    }
    --blocked_;
    changed_.notify_all();
  }

  // Calls blocked right now.
  int blocked() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocked_;
  }

  // Waits until no call is blocked (after releaseAll()), so an owner can
  // go away without a call still inside it.
  void drain() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return blocked_ == 0; });
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::map<int, std::chrono::milliseconds> delays_;
  uint64_t generation_ = 0;
  int blocked_ = 0;
};

} // namespace pycomm::sim
