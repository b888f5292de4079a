#pragma once
// The Work handle of one pooled op. Completed exactly once, by the lane that
// ran the op or by abort(); waiting never blocks longer than the op's timeout
// after the op started on its lane.
//
// It holds the op (its tensors) as long as the caller holds the Work, as
// torch's own Works do: the last references to the caller's tensors are then
// dropped where the caller drops the Work, not on the transport's thread that
// finished the op (dropping a tensor that Python also holds takes the GIL).
// Its description is built only when an error needs it, its future only
// when someone asks for it (most callers only wait).
//
// Thread-safety: complete(), markStarted() and every Work method may be called
// concurrently from any thread.
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "work_result.h"
#include "collective.h"

namespace pycomm {

// "role 'ag' of group '3' (ranks 0,2): all_gather(...) (op #7)": how errors
// and timeouts name one op of the group `label`, at place `seq` of its lane.
std::string describeOp(const std::string& label, const Collective& op, uint64_t seq);

class PooledWork : public c10d::Work {
 public:
  // `label` names the group ("role 'ag' of group '3' (ranks 0,2)"), `seq`
  // the op's place on its lane; `timed`: getDuration() answers
  // (op_timing.h).
  PooledWork(
      int rank,
      c10d::OpType opType,
      std::shared_ptr<const Collective> op,
      std::shared_ptr<const std::string> label,
      uint64_t seq,
      std::chrono::milliseconds timeout,
      bool timed);

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
  // The c10d::WorkResult the op ends with, as a future (work_result.h).
  c10::intrusive_ptr<c10::ivalue::Future> getFutureResult() override {
    return futureWorkResult(getFuture());
  }

  // Milliseconds from the op's start on its lane to its end (torch's
  // Work._get_duration()): ConfigError when the group was made with timing
  // off, PycommError before the op ended.
  float getDuration() const override;

  // describeOp() of this Work's op.
  std::string description() const;
  // The op's place among its group's ops (torch's Work._get_sequence_number).
  uint64_t getSequencenumber() const override {
    return seq_;
  }

 private:
  std::shared_ptr<const Collective> op_;
  std::shared_ptr<const std::string> label_;
  uint64_t seq_;
  std::chrono::milliseconds timeout_;
  bool timed_;
  // Steady-clock microseconds; -1 until then.
  std::atomic<int64_t> startedAtUs_{-1};
  std::atomic<int64_t> endedAtUs_{-1}; // only when timed_: one clock read less per op
  std::atomic<bool> claimed_{false};

  // Marks `future` with the op's result or error_; called once per Work.
  void completeFuture(c10::ivalue::Future& future) const;
  // Guards the future's creation against complete(): after both, exactly one
  // of them completed it.
  std::mutex futureMutex_;
  bool ended_ = false;
  std::exception_ptr error_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

} // namespace pycomm
