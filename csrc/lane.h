#pragma once
// An execution lane on the CPU: one worker thread running posted tasks one at
// a time in post order. That is the semantics of one NCCL communicator on one
// CUDA stream (FIFO inside a lane); two lanes run concurrently.
//
// Thread-safety: every public method may be called from any thread, also
// concurrently with each other and with the worker.
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pycomm {

class CpuLane {
 public:
  using Task = std::function<void()>;

  explicit CpuLane(std::string name);
  // Runs whatever was posted, then joins the worker (close()).
  ~CpuLane();

  CpuLane(const CpuLane&) = delete;
  CpuLane& operator=(const CpuLane&) = delete;

  const std::string& name() const {
    return name_;
  }

  // Queues a task. Tasks must not throw; one that does is logged and dropped so
  // the lane keeps its order for the tasks after it. Throws PoolClosedError
  // once the lane is closed or abandoned.
  void post(Task task);

  // Stops taking tasks, lets the queued ones run, and joins the worker.
  // Idempotent.
  void close();

  // Stops taking tasks and hands back those not yet started, for the caller to
  // fail. Does not wait for a task already running (it may be blocked on a
  // peer that is gone): the worker is detached and exits when that task
  // returns; it owns what it needs, so nothing dangles. Idempotent.
  std::vector<Task> abandon();

  // Tasks queued or running.
  size_t pending() const;

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable wake;
    std::deque<Task> queue;
    bool running = false;
    bool closing = false;
  };
  static void work(std::shared_ptr<State> state, std::string name);

  std::string name_;
  std::shared_ptr<State> state_;
  std::mutex threadMutex_;
  std::thread worker_;
};

} // namespace pycomm
