#include "nccl_lane.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "errors.h"
#include "nccl_api.h"

namespace pycomm {

namespace {
// How often the watchdog looks at the oldest op while ops are in flight. It
// only releases tensors and completes futures: the caller's stream never
// waits for it.
constexpr auto kWatchInterval = std::chrono::microseconds(500);

int64_t toUs(std::chrono::milliseconds ms) {
  return std::chrono::duration_cast<std::chrono::microseconds>(ms).count();
}
} // namespace

int NcclLane::resolvePriority(const NcclLaneSpec& spec) {
  const auto range = streamPriorityRange(spec.comm.device);
  // By default parameter all-gathers go first (they gate the next layer's
  // compute); gradient reduce-scatters can trail.
  const int priority = spec.streamPriority.value_or(
      spec.role == "ag" ? range.greatest : range.least);
  if (priority < range.greatest || priority > range.least) {
    throw ConfigError(
        spec.comm.label + ": stream_priority " + std::to_string(priority) +
        " is outside this device's range " + std::to_string(range.greatest) +
        " (highest) to " + std::to_string(range.least) + " (lowest)");
  }
  return priority;
}

std::shared_ptr<NcclLane> NcclLane::create(
    const NcclLaneSpec& spec,
    const std::string& uniqueId,
    uintptr_t parent) {
  // Not make_shared: the constructor is private, so every lane is owned by a
  // shared_ptr, which the watchdog relies on.
  return std::shared_ptr<NcclLane>(new NcclLane(spec, uniqueId, parent));
}

NcclLane::NcclLane(
    const NcclLaneSpec& spec,
    const std::string& uniqueId,
    uintptr_t parent)
    : spec_(spec),
      device_(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(spec.comm.device)),
      createdBySplit_(parent != 0) {
  const int priority = resolvePriority(spec);
  comm_ = createdBySplit_
      ? NcclComm::split(spec.comm, reinterpret_cast<ncclComm_t>(parent))
      : NcclComm::initRank(spec.comm, uniqueId);
  c10::cuda::CUDAGuard guard(device_.index());
  stream_ = std::make_unique<CudaStream>(priority);
}

NcclLane::~NcclLane() {
  // The watchdog holds a reference while it runs, so it has returned from
  // watch() by now; it may be this very thread, ending.
  if (watchdog_.joinable()) {
    if (watchdog_.get_id() == std::this_thread::get_id()) {
      watchdog_.detach();
    } else {
      watchdog_.join();
    }
  }
  // comm_ aborts itself if nobody destroyed it.
}

c10::Device NcclLane::device() const {
  return device_;
}

void NcclLane::bindStats(std::shared_ptr<LaneStats> stats) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_ = std::move(stats);
}

size_t NcclLane::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return inFlight_.size();
}

int NcclLane::streamPriority() const {
  return stream_->priority();
}

bool NcclLane::onWatchdogThread() const {
  return std::this_thread::get_id() == watchdogId_.load();
}

void NcclLane::enqueueCollective(const Collective& op, const std::string& what) {
  const cudaStream_t stream = stream_->get();
  // Each tensor pair has its own type: a coalesced op may mix them.
  std::vector<ncclDataType_t> types;
  std::vector<ncclRedOp_t> reduces;
  for (const auto& in : op.inputs) {
    types.push_back(nccl::dataType(in.scalar_type(), what));
    if (op.kind == CollectiveKind::ReduceScatter ||
        op.kind == CollectiveKind::AllReduce) {
      reduces.push_back(nccl::reduceOp(op.reduceOp, in.scalar_type(), what));
    }
  }
  comm_->enqueue(what, [&](ncclComm_t comm) -> ncclResult_t {
    nccl::check(nccl::groupStart(), what + ": ncclGroupStart", comm);
    ncclResult_t result = ncclSuccess;
    for (size_t i = 0; i < op.inputs.size(); ++i) {
      const at::Tensor& in = op.inputs[i];
      switch (op.kind) {
        case CollectiveKind::AllGather:
          result = nccl::allGather(
              in.data_ptr(), op.outputs[i].data_ptr(), in.numel(), types[i],
              comm, stream);
          break;
        case CollectiveKind::ReduceScatter:
          result = nccl::reduceScatter(
              in.data_ptr(), op.outputs[i].data_ptr(), op.outputs[i].numel(),
              types[i], reduces[i], comm, stream);
          break;
        case CollectiveKind::AllReduce:
          result = nccl::allReduce(
              in.data_ptr(), in.data_ptr(), in.numel(), types[i], reduces[i],
              comm, stream);
          break;
        case CollectiveKind::Broadcast:
          result = nccl::broadcast(
              in.data_ptr(), in.data_ptr(), in.numel(), types[i],
              static_cast<int>(op.root), comm, stream);
          break;
        case CollectiveKind::Barrier:
          break; // barriers go through the CPU lane
      }
      if (result != ncclSuccess && result != ncclInProgress) {
        break;
      }
    }
    // The group is always closed, also after a failed call, so the thread
    // is not left inside an NCCL group.
    const ncclResult_t end = nccl::groupEnd();
    return result != ncclSuccess && result != ncclInProgress ? result : end;
  });
}

c10::intrusive_ptr<c10d::Work> NcclLane::issue(
    const Collective& op,
    c10d::OpType type,
    std::string description) {
  std::unique_lock<std::mutex> issueLock(issueMutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Failed && failure_) {
      std::rethrow_exception(failure_);
    }
    if (state_ != State::Open) {
      throw PoolClosedError(description + ": the NCCL lane was closed");
    }
  }
  // Before anything is issued: if the thread cannot start, nothing is lost.
  ensureWatchdog();
  c10::cuda::CUDAGuard guard(device_.index());
  const cudaStream_t caller =
      at::cuda::getCurrentCUDAStream(device_.index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  checkCuda(cudaStreamIsCapturing(caller, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) {
    throw UnsupportedOpError(
        description + ": pooled NCCL lanes cannot be captured into a CUDA "
        "graph; issue the op outside the capture or use the base group");
  }
  std::shared_ptr<CudaEvent> end;
  try {
    CudaEvent ready; // freed at once; CUDA keeps it until the wait is done
    ready.record(caller);
    ready.block(stream_->get());
    enqueueCollective(op, description);
    end = std::make_shared<CudaEvent>();
    end->record(stream_->get());
  } catch (const UnsupportedOpError&) {
    throw; // a type or reduce op NCCL lacks: nothing was issued
  } catch (...) {
    // NCCL may have taken part of the op, or may still: the communicator
    // can no longer be trusted with the next one.
    auto error = std::current_exception();
    issueLock.unlock();
    fail(error, State::Failed);
    // If the watchdog failed the lane first (the reason this issue broke),
    // its error is the one to report.
    std::lock_guard<std::mutex> lock(mutex_);
    std::rethrow_exception(failure_ ? failure_ : error);
  }

  std::vector<at::Tensor> tensors = op.inputs;
  tensors.insert(tensors.end(), op.outputs.begin(), op.outputs.end());
  auto work = c10::make_intrusive<NcclWork>(
      static_cast<int>(spec_.comm.rank),
      type,
      op.results(),
      std::move(end),
      device_,
      std::move(description));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    inFlight_.push_back(InFlight{
        work, std::move(tensors), op.kind, op.bytes(), LaneStats::nowUs()});
  }
  changed_.notify_all();
  return work;
}

void NcclLane::ensureWatchdog() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!watchdog_.joinable()) {
    watchdog_ = std::thread([self = shared_from_this()] { self->watch(); });
    watchdogId_.store(watchdog_.get_id());
  }
}

void NcclLane::watch() {
  try {
    watchUntilDone();
  } catch (...) {
    // Nothing may escape a thread; whatever broke here fails the lane.
    try {
      fail(std::current_exception(), State::Failed);
    } catch (...) {
    }
  }
  watchdogId_.store(std::thread::id()); // the id may be reused by a new thread
}

void NcclLane::watchUntilDone() {
  try {
    // Event queries need this device's context (not device 0's), and must
    // not be refused while another thread captures a CUDA graph.
    checkCuda(cudaSetDevice(device_.index()), "cudaSetDevice");
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    checkCuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  } catch (...) {
    fail(std::current_exception(), State::Failed);
    return;
  }
  int64_t previousEndUs = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  while (watchOnce(lock, previousEndUs)) {
  }
  const bool freeComm = state_ == State::Closing && freeWhenDrained_;
  if (freeComm) {
    state_ = State::Closed;
  }
  lock.unlock();
  changed_.notify_all();
  if (freeComm) {
    try {
      comm_->destroy();
    } catch (...) {
      // release() has no caller to report to; destroy() aborted instead.
    }
  }
}

bool NcclLane::watchOnce(std::unique_lock<std::mutex>& lock, int64_t& previousEndUs) {
  changed_.wait(lock, [&] { return !inFlight_.empty() || state_ != State::Open; });
  if (inFlight_.empty()) {
    return false; // no longer open, and nothing left to finish
  }
  auto work = inFlight_.front().work;
  const int64_t issuedUs = inFlight_.front().issuedUs;
  lock.unlock();

  std::exception_ptr error;
  bool passed = false;
  try {
    passed = work->endPassed();
  } catch (...) {
    error = std::current_exception();
  }
  if (!passed && !error) {
    const ncclResult_t async = comm_->asyncError();
    if (async != ncclSuccess && async != ncclInProgress) {
      error = std::make_exception_ptr(CollectiveError(
          work->description() + " failed in NCCL: " + nccl::errorText(async) +
          " (NCCL: " + comm_->lastError() + ")"));
    }
  }
  const int64_t now = LaneStats::nowUs();
  // Each op's timeout counts from when it could start: its issue, or the end
  // of the op before it, whichever is later.
  const int64_t startedUs = std::max(issuedUs, previousEndUs);
  if (!passed && !error && now - startedUs > toUs(spec_.comm.timeout)) {
    error = std::make_exception_ptr(CollectiveTimeoutError(
        work->description() + " did not finish within its timeout of " +
        std::to_string(spec_.comm.timeout.count()) +
        " ms; a peer may be gone or may not have issued the same op. The "
        "communicator was aborted"));
  }
  if (error) {
    fail(error, State::Failed);
    lock.lock();
    return true;
  }
  lock.lock();
  if (!passed) {
    changed_.wait_for(lock, kWatchInterval);
    return true;
  }
  if (inFlight_.empty() || inFlight_.front().work != work) {
    return true; // fail() took it meanwhile
  }
  InFlight done = std::move(inFlight_.front());
  inFlight_.pop_front();
  auto stats = stats_;
  lock.unlock();
  changed_.notify_all(); // close() may be waiting for the lane to drain
  if (stats) {
    stats->record(OpRecord{done.kind, done.bytes, startedUs, now, true});
  }
  previousEndUs = now;
  work->complete(nullptr); // may run callbacks; no lock held
  done.tensors.clear();
  lock.lock();
  return true;
}

void NcclLane::fail(std::exception_ptr error, State next) {
  {
    // Recorded before the abort, so an issue() that the abort breaks reports
    // this error, not the abort.
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Open || state_ == State::Closing) {
      state_ = next;
      if (next == State::Failed) {
        failure_ = error;
      }
    }
  }
  // Aborting makes NCCL's kernels return and ends any poll inside an
  // issue(), so held tensors are safe to release afterwards and issueMutex_
  // is free soon.
  comm_->abort();
  std::deque<InFlight> unfinished;
  std::shared_ptr<LaneStats> stats;
  {
    std::lock_guard<std::mutex> issueLock(issueMutex_);
    std::lock_guard<std::mutex> lock(mutex_);
    unfinished.swap(inFlight_);
    stats = stats_;
  }
  changed_.notify_all();
  const int64_t now = LaneStats::nowUs();
  for (auto& op : unfinished) {
    if (stats) {
      stats->record(OpRecord{op.kind, op.bytes, op.issuedUs, now, false});
    }
    op.work->complete(error);
  }
}

bool NcclLane::stopTakingOps(bool freeWhenDrained) {
  std::lock_guard<std::mutex> issueLock(issueMutex_); // no issue half done
  std::lock_guard<std::mutex> lock(mutex_);
  if (state_ != State::Open) {
    return false;
  }
  state_ = State::Closing;
  freeWhenDrained_ = freeWhenDrained;
  return true;
}

void NcclLane::close() {
  if (onWatchdogThread()) {
    // From a completion callback: waiting for the drain would wait for this
    // very thread, so what is left is failed instead.
    fail(
        std::make_exception_ptr(PoolClosedError(
            spec_.comm.label + ": the lane was closed from a completion "
            "callback before this op finished")),
        State::Closed);
    return;
  }
  stopTakingOps(/*freeWhenDrained=*/false);
  changed_.notify_all();
  {
    // The watchdog finishes or fails every op, each bounded by its timeout.
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return inFlight_.empty(); });
    if (state_ == State::Closing) {
      state_ = State::Closed;
    }
  }
  changed_.notify_all();
  joinWatchdog();
  comm_->destroy(); // after an abort, a no-op
}

void NcclLane::release() {
  if (!stopTakingOps(/*freeWhenDrained=*/true)) {
    return; // closed, failed or aborted already: nothing left to free
  }
  bool watched = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    watched = watchdog_.joinable();
  }
  changed_.notify_all();
  if (!watched) {
    // Nothing was ever issued, but finalizing may still wait for peers; a
    // short-lived thread does it, so release() never blocks.
    try {
      std::thread([self = shared_from_this()] {
        try {
          self->comm_->destroy();
        } catch (...) {
          // destroy() aborted the communicator; no caller to report to.
        }
      }).detach();
    } catch (...) {
      comm_->abort(); // no thread to be had: free without waiting
    }
  }
}

void NcclLane::abort() {
  fail(
      std::make_exception_ptr(PoolClosedError(
          spec_.comm.label + ": the op was failed by abort()")),
      State::Closed);
  joinWatchdog();
}

void NcclLane::joinWatchdog() {
  if (onWatchdogThread()) {
    return; // from a callback: the thread ends by itself, and must not wait here
  }
  std::lock_guard<std::mutex> lock(joinMutex_);
  if (watchdog_.joinable()) {
    watchdog_.join();
  }
}

} // namespace pycomm
