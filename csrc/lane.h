#pragma once
// An execution lane: ops posted to it start one at a time, in post order, and
// the next one starts only when the previous one reported done(). That is the
// semantics of one NCCL communicator on one CUDA stream (FIFO inside a lane);
// two lanes run concurrently.
//
// A lane owns no thread. Like a CUDA stream it only orders work that runs
// elsewhere: the op that finds the lane idle starts on the posting thread,
// and each later one starts on the thread that reports its predecessor done
// (on the CPU, the gloo worker that finished it). So a pooled op costs no
// thread hand-off beyond the transport's own.
//
// Thread-safety: every public method may be called from any thread, also
// concurrently and from inside a starting op.
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace pycomm {

class Lane {
 public:
  // Starts one op. It must lead to exactly one done() call, from any thread,
  // possibly before it returns. It must not throw; one that does is counted
  // as done.
  using Start = std::function<void()>;

  explicit Lane(std::string name);
  ~Lane();
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;

  const std::string& name() const {
    return name_;
  }

  // Starts `start` now when the lane is idle, else queues it. Throws
  // PoolClosedError once the lane is closed or abandoned.
  void post(Start start);

  // The op in flight has ended: start the next queued one.
  void done();

  // Stops taking ops and waits until the queued ones have started and ended.
  // Idempotent.
  void close();

  // Stops taking ops and hands back those not yet started, without waiting
  // for the one in flight. Idempotent.
  std::vector<Start> abandon();

  // Ops queued or in flight.
  size_t pending() const;

 private:
  // Starts queued ops while they finish synchronously; the caller holds the
  // "in flight" token.
  void drain();

  std::string name_;
  mutable std::mutex mutex_;
  std::condition_variable idle_;
  std::deque<Start> queue_;
  bool inFlight_ = false;
  bool closing_ = false;
};

} // namespace pycomm
