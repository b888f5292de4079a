#include "pooled_work.h"

#include <ATen/core/jit_type.h>

#include "errors.h"

namespace pycomm {

namespace {
int64_t steadyNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// How often a waiter re-reads whether a queued op has started.
constexpr auto kWaitSlice = std::chrono::milliseconds(50);
} // namespace

PooledWork::PooledWork(
    int rank,
    c10d::OpType opType,
    std::vector<at::Tensor> outputs,
    std::chrono::milliseconds timeout,
    std::string description)
    : c10d::Work(rank, opType),
      outputs_(std::move(outputs)),
      timeout_(timeout),
      description_(std::move(description)),
      future_(c10::make_intrusive<c10::ivalue::Future>(
          c10::ListType::create(c10::TensorType::get()))) {}

void PooledWork::markStarted() {
  startedAtMs_.store(steadyNowMs());
}

bool PooledWork::complete(std::exception_ptr error) {
  if (claimed_.exchange(true)) {
    return false;
  }
  // finish() takes mutex_ itself and wakes every waiter.
  finish(error);
  if (error) {
    future_->setErrorIfNeeded(error);
  } else if (!future_->completed()) {
    future_->markCompleted(c10::IValue(outputs_));
  }
  return true;
}

bool PooledWork::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout != kNoTimeout) {
    // An explicit timeout counts from now, as for torch's own backends.
    if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
      throw CollectiveTimeoutError(
          description_ + " did not finish within the " +
          std::to_string(timeout.count()) + " ms given to wait()");
    }
  } else {
    while (!cv_.wait_for(lock, kWaitSlice, [&] { return completed_; })) {
      const int64_t started = startedAtMs_.load();
      if (started >= 0 && steadyNowMs() - started > timeout_.count()) {
        throw CollectiveTimeoutError(
            description_ + " did not finish within its timeout of " +
            std::to_string(timeout_.count()) +
            " ms; a peer may be gone or may not have issued the same op");
      }
    }
  }
  if (exception_) {
    std::rethrow_exception(exception_);
  }
  return true;
}

std::vector<at::Tensor> PooledWork::result() {
  return outputs_;
}

c10::intrusive_ptr<c10::ivalue::Future> PooledWork::getFuture() {
  return future_;
}

} // namespace pycomm
