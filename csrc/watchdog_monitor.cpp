#include "watchdog_monitor.h"

#include "erase_if.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace pycomm {

namespace {

int64_t steadyUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The process's monitor: lives as long as the process (never destroyed, so
// no exit-time destructor races its thread).
class Monitor {
 public:
  static Monitor& instance() {
    static Monitor* monitor = new Monitor();
    return *monitor;
  }

  void add(const std::shared_ptr<StallWatch>& watch) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      watches_.push_back(watch);
      if (!started_) {
        started_ = true;
        std::thread([this] { run(); }).detach();
      }
    }
    changed_.notify_all();
  }

  // Drops watches that are gone.
  void prune() {
    std::lock_guard<std::mutex> lock(mutex_);
    dropExpiredLocked();
  }

 private:
  Monitor() = default;

  void dropExpiredLocked() {
    eraseIf(watches_, [](const std::weak_ptr<StallWatch>& w) { return w.expired(); });
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      dropExpiredLocked();
      if (watches_.empty()) {
        changed_.wait(lock, [&] { return !watches_.empty(); });
        continue;
      }
      // A few looks per bound: a stall is reported within 1.25 bounds.
      auto tick = std::chrono::milliseconds(1000);
      std::vector<std::shared_ptr<StallWatch>> live;
      for (const auto& w : watches_) {
        if (auto watch = w.lock()) {
          tick = std::min(tick, std::max(watch->bound() / 4, std::chrono::milliseconds(1)));
          live.push_back(std::move(watch));
        }
      }
      lock.unlock();
      const int64_t now = steadyUs();
      for (const auto& watch : live) {
        if (std::string report = watch->takeStall(now); !report.empty()) {
          try {
            watch->runHandler(report);
          } catch (...) {
            // A handler's failure must not end the monitor of every lane.
          }
        }
      }
      live.clear(); // a watch may be destroyed here, outside the lock
      lock.lock();
      changed_.wait_for(lock, tick);
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::weak_ptr<StallWatch>> watches_;
  bool started_ = false;
};

} // namespace

StallWatch::StallWatch(std::string label, std::chrono::milliseconds bound, Handler onStall)
    : label_(std::move(label)), bound_(bound), onStall_(std::move(onStall)) {}

std::shared_ptr<StallWatch> StallWatch::create(
    std::string label, std::chrono::milliseconds bound, Handler onStall) {
  std::shared_ptr<StallWatch> watch(
      new StallWatch(std::move(label), bound, std::move(onStall)));
  Monitor::instance().add(watch);
  return watch;
}

StallWatch::~StallWatch() {
  Monitor::instance().prune();
}

StallWatch::Call::Call(StallWatch& watch, const char* what) : watch_(watch) {
  watch_.activity_.store(what, std::memory_order_relaxed);
  watch_.sinceUs_.store(steadyUs(), std::memory_order_release);
}

StallWatch::Call::~Call() {
  watch_.sinceUs_.store(0, std::memory_order_release);
}

std::string StallWatch::takeStall(int64_t nowUs) {
  const int64_t since = sinceUs_.load(std::memory_order_acquire);
  if (since == 0 || nowUs - since <= bound_.count() * 1000 || reported_.load()) {
    return {};
  }
  if (reported_.exchange(true)) {
    return {};
  }
  const char* activity = activity_.load(std::memory_order_relaxed);
  return label_ + ": the watchdog has been blocked for " +
      std::to_string((nowUs - since) / 1000) + " ms " +
      (activity != nullptr ? activity : "in a CUDA or NCCL call") +
      " (more than the " + std::to_string(bound_.count()) +
      " ms allowed; the GPU or NCCL may be hung)";
}

bool runBounded(std::chrono::milliseconds bound, std::function<void()> call) {
  struct State {
    std::mutex mutex;
    std::condition_variable done;
    bool finished = false;
  };
  auto state = std::make_shared<State>();
  try {
    std::thread([state, call = std::move(call)]() mutable {
      try {
        call();
      } catch (...) {
        // The caller may be gone: nothing to report to.
      }
      call = nullptr; // what it captured goes before the caller is told
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished = true;
      state->done.notify_all();
    }).detach();
  } catch (const std::system_error&) {
    call(); // no thread to be had: unbounded, but never skipped
    return true;
  }
  std::unique_lock<std::mutex> lock(state->mutex);
  return state->done.wait_for(lock, bound, [&] { return state->finished; });
}

} // namespace pycomm
