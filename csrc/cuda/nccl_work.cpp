#include "nccl_work.h"

#include <ATen/core/jit_type.h>

#include "errors.h"
#include "op_timing.h"

#include <chrono>
#include <optional>
#include <utility>

namespace pycomm {

namespace {
// One type object for every future (made once, not per op).
const c10::TypePtr& tensorListType() {
  static const c10::TypePtr type = c10::ListType::create(c10::TensorType::get());
  return type;
}
} // namespace

NcclWork::NcclWork(
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
    std::string description)
    : c10d::Work(
          rank,
          opType,
          profilingTitle,
          profilingTitle != nullptr ? std::optional(inputs) : std::nullopt),
      cuda_(std::move(cuda)),
      outputs_(std::move(outputs)),
      start_(std::move(start)),
      end_(std::move(end)),
      settle_(std::move(settle)),
      device_(device),
      seq_(seq),
      description_(std::move(description)),
      future_(c10::make_intrusive<c10::ivalue::Future>(tensorListType())) {}

float NcclWork::getDuration() const {
  if (!start_) {
    throw ConfigError(opTimingOffMessage(description_));
  }
  DeviceScope device(*cuda_, device_.index());
  if (!end_->passed()) {
    throw PycommError(
        description_ + ": Work._get_duration() is known once the op ended on the device");
  }
  return end_->millisecondsSince(*start_);
}

bool NcclWork::complete(std::exception_ptr error) {
  if (claimed_.exchange(true)) {
    return false;
  }
  finish(error); // takes mutex_ and wakes host-side waiters
  if (error) {
    future_->setErrorIfNeeded(error);
  } else if (!future_->completed()) {
    future_->markCompleted(c10::IValue(outputs_));
  }
  return true;
}

bool NcclWork::endPassed() const {
  return end_->passed();
}

bool NcclWork::isCompleted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_;
}

void NcclWork::throwIfFailed() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (exception_) {
    std::rethrow_exception(exception_);
  }
}

void NcclWork::makeCurrentStreamWait() {
  if (!end_->recorded()) {
    settle_();
    throwIfFailed(); // what ended the lane meanwhile
    if (!end_->recorded()) {
      throw CollectiveError(description_ + ": NCCL never put the op on the lane's stream");
    }
  }
  // The wait is queued on the op's device, whatever device the caller has
  // current.
  DeviceScope device(*cuda_, device_.index());
  end_->block(cuda_->currentStream(device_.index()));
}

bool NcclWork::wait(std::chrono::milliseconds timeout) {
  throwIfFailed();
  makeCurrentStreamWait();
  if (timeout != kNoTimeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
      throw CollectiveTimeoutError(
          description_ + " did not finish within the " +
          std::to_string(timeout.count()) + " ms given to wait()");
    }
    if (exception_) {
      std::rethrow_exception(exception_);
    }
  }
  return true;
}

void NcclWork::synchronize() {
  throwIfFailed();
  makeCurrentStreamWait();
}

std::vector<at::Tensor> NcclWork::result() {
  return outputs_;
}

c10::intrusive_ptr<c10::ivalue::Future> NcclWork::getFuture() {
  return future_;
}

} // namespace pycomm
