#pragma once
// The Work handle of one op on an NCCL lane. wait() and synchronize() make the
// caller's current stream wait on the op's end event, on the device: the host
// does not block (as with torch's NCCL backend), unless wait() is given an
// explicit timeout, which then bounds a host-side wait for completion, or
// NCCL's thread has not yet put the op on the lane's stream (then wait()
// waits for that first, bounded by the lane's timeout). The
// lane's watchdog completes the work (and its future) once the end event has
// passed, or fails it with the error it found.
//
// A failure (an NCCL error, a timeout, abort()) that the watchdog found
// before wait() is raised by wait(), synchronize(), isCompleted()'s
// exception() and the future; one found after wait() made the caller's
// stream wait cannot be taken back from the stream, which is why errors and
// timeouts tear the process down by default (see NcclLaneSpec).
//
// Thread-safety: every method may be called concurrently from any thread.
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "work_result.h"
#include "cuda_resources.h"

namespace pycomm {

class NcclWork : public c10d::Work {
 public:
  // `profilingTitle` (null when no profiler listens) opens the op's span
  // over `inputs` until the work completes, as ProcessGroupNCCL's Works do.
  NcclWork(
      std::shared_ptr<CudaApi> cuda,
      int rank,
      c10d::OpType opType,
      const char* profilingTitle,
      const std::vector<at::Tensor>& inputs,
      std::vector<at::Tensor> outputs,
      std::shared_ptr<EndEvent> start,
      std::shared_ptr<EndEvent> end,
      std::function<void()> settle,
      c10::Device device,
      uint64_t seq,
      std::string description);

  // Called by the watchdog; the first call wins. Returns whether it did.
  bool complete(std::exception_ptr error);
  // Whether the op's end event has passed on the device (no lock, no error).
  bool endPassed() const;

  bool isCompleted() override;
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void synchronize() override;
  std::vector<at::Tensor> result() override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  // The c10d::WorkResult the op ends with, as a future (work_result.h).
  c10::intrusive_ptr<c10::ivalue::Future> getFutureResult() override {
    return futureWorkResult(getFuture());
  }

  // Milliseconds between the op's start and end events on the device
  // (torch's Work._get_duration()): ConfigError when the lane was made with
  // timing off (no start event), PycommError before the end event passed.
  float getDuration() const override;

  const std::string& description() const {
    return description_;
  }
  // The op's place among its group's ops (torch's Work._get_sequence_number).
  uint64_t getSequencenumber() const override {
    return seq_;
  }

 private:
  void throwIfFailed();
  // Records the end event first if NCCL has not yet been seen to take the
  // op (a wait for NCCL's thread, bounded by the lane's timeout).
  void makeCurrentStreamWait();

  std::shared_ptr<CudaApi> cuda_;
  std::vector<at::Tensor> outputs_;
  std::shared_ptr<EndEvent> start_; // null without timing
  std::shared_ptr<EndEvent> end_;
  std::function<void()> settle_; // makes the lane see NCCL take its last launch
  c10::Device device_;
  uint64_t seq_;
  std::string description_;
  std::atomic<bool> claimed_{false};
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

} // namespace pycomm
