#pragma once
// The Work handle of one pooled op. Completed exactly once, by the lane that
// ran the op or by abort(); waiting never blocks longer than the op's timeout
// after the op started on its lane.
//
// Thread-safety: complete(), markStarted() and every Work method may be called
// concurrently from any thread.
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <string>
#include <vector>

namespace pycomm {

class PooledWork : public c10d::Work {
 public:
  PooledWork(
      int rank,
      c10d::OpType opType,
      std::vector<at::Tensor> outputs,
      std::chrono::milliseconds timeout,
      std::string description);

  // The lane began running the op; its timeout counts from here, not from the
  // time spent queued behind earlier ops of the lane.
  void markStarted();
  // First call wins; later calls (a lane finishing an op abort() already
  // failed) are ignored. Returns whether this call completed the work.
  bool complete(std::exception_ptr error);

  // A zero timeout means "the op's own timeout". Throws
  // CollectiveTimeoutError past it, or the op's error.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  std::vector<at::Tensor> result() override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;

  const std::string& description() const {
    return description_;
  }

 private:
  std::vector<at::Tensor> outputs_;
  std::chrono::milliseconds timeout_;
  std::string description_;
  std::atomic<int64_t> startedAtMs_{-1};
  std::atomic<bool> claimed_{false};
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

} // namespace pycomm
