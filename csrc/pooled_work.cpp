#include "pooled_work.h"

#include <ATen/core/jit_type.h>

#include "errors.h"
#include "op_timing.h"

#include <optional>
#include <utility>

namespace pycomm {

namespace {
int64_t steadyNowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// How often a waiter re-reads whether a queued op has started.
constexpr auto kWaitSlice = std::chrono::milliseconds(50);
} // namespace

PooledWork::PooledWork(
    int rank,
    c10d::OpType opType,
    std::shared_ptr<const Collective> op,
    std::shared_ptr<const std::string> label,
    uint64_t seq,
    std::chrono::milliseconds timeout,
    bool timed)
    // torch's Work opens the span when given a title, and finish() closes it.
    // "pycomm:", not "gloo:": gloo's own spans of the ops it runs for this
    // one are there too, under gloo's names.
    : c10d::Work(
          rank,
          opType,
          op->spanName != nullptr ? op->profilingTitle("pycomm").c_str() : nullptr,
          op->spanName != nullptr ? std::optional(op->inputs) : std::nullopt),
      op_(std::move(op)),
      label_(std::move(label)),
      seq_(seq),
      timeout_(timeout),
      timed_(timed) {}

std::string describeOp(const std::string& label, const Collective& op, uint64_t seq) {
  return label + ": " + op.describe() + " (op #" + std::to_string(seq) + ")";
}

std::string PooledWork::description() const {
  return describeOp(*label_, *op_, seq_);
}

void PooledWork::markStarted() {
  startedAtUs_.store(steadyNowUs());
}

float PooledWork::getDuration() const {
  if (!timed_) {
    throw ConfigError(opTimingOffMessage(description()));
  }
  const int64_t started = startedAtUs_.load();
  const int64_t ended = endedAtUs_.load();
  if (started < 0 || ended < 0) {
    throw PycommError(
        description() + ": Work._get_duration() is known once the op ran " +
        (started < 0 ? "(it has not started)" : "and ended (it has not ended)"));
  }
  return static_cast<float>(ended - started) / 1000.0f;
}

bool PooledWork::complete(std::exception_ptr error) {
  if (claimed_.exchange(true)) {
    return false;
  }
  if (timed_) {
    endedAtUs_.store(steadyNowUs()); // before any waiter can ask for the duration
  }
  // finish() takes mutex_ itself and wakes every waiter.
  finish(error);
  c10::intrusive_ptr<c10::ivalue::Future> future;
  {
    std::lock_guard<std::mutex> lock(futureMutex_);
    ended_ = true;
    error_ = error;
    future = future_;
  }
  if (future) {
    completeFuture(*future);
  }
  return true;
}

void PooledWork::completeFuture(c10::ivalue::Future& future) const {
  if (error_) {
    future.setError(error_);
  } else {
    future.markCompleted(c10::IValue(op_->results()));
  }
}

bool PooledWork::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout != kNoTimeout) {
    // An explicit timeout counts from now, as for torch's own backends.
    if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
      throw CollectiveTimeoutError(
          description() + " did not finish within the " +
          std::to_string(timeout.count()) + " ms given to wait()");
    }
  } else {
    while (!cv_.wait_for(lock, kWaitSlice, [&] { return completed_; })) {
      const int64_t started = startedAtUs_.load();
      if (started >= 0 && steadyNowUs() - started > timeout_.count() * 1000) {
        throw CollectiveTimeoutError(
            description() + " did not finish within its timeout of " +
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
  return op_->results();
}

c10::intrusive_ptr<c10::ivalue::Future> PooledWork::getFuture() {
  c10::intrusive_ptr<c10::ivalue::Future> future;
  bool endedBefore = false;
  {
    std::lock_guard<std::mutex> lock(futureMutex_);
    if (!future_) {
      future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::ofTensors());
      endedBefore = ended_;
    }
    future = future_;
  }
  // Outside the lock: completing runs the future's callbacks. Exactly one of
  // complete() and this call completes it: whichever saw the other's mark.
  if (endedBefore) {
    completeFuture(*future);
  }
  return future;
}

} // namespace pycomm
