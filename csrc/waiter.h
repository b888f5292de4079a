#pragma once
// A thread that waits for Works which cannot report their completion
// themselves (no future: gloo's list reduce-scatter, send and recv), and then
// calls their callback. Ops whose Work has a future never come here.
//
// Thread-safety: watch() may be called from any thread; callbacks run on the
// waiter's thread, one at a time, in watch() order.
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace pycomm {

class Waiter {
 public:
  using Callback = std::function<void(std::exception_ptr)>;

  explicit Waiter(std::string name);
  // Stops after the works being watched have ended. If one never ends, the
  // thread is detached rather than waited for; it owns what it touches.
  ~Waiter();
  Waiter(const Waiter&) = delete;
  Waiter& operator=(const Waiter&) = delete;

  void watch(c10::intrusive_ptr<c10d::Work> work, Callback callback);
  // Nothing queued and nothing being waited for.
  bool idle() const;

 private:
  struct Item {
    c10::intrusive_ptr<c10d::Work> work;
    Callback callback;
  };
  struct State {
    std::mutex mutex;
    std::condition_variable wake;
    std::deque<Item> queue; // an item leaves once its callback returned
    bool stopping = false;
  };
  static void run(std::shared_ptr<State> state, std::string name);

  std::string name_;
  std::shared_ptr<State> state_;
  std::thread thread_;
};

} // namespace pycomm
