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

int64_t countOf(const at::Tensor& tensor) {
  return tensor.numel();
}
} // namespace

int NcclLane::defaultPriority(const std::string& role, int device) {
  const auto range = streamPriorityRange(device);
  // Parameter all-gathers gate the next layer's compute, so they go first;
  // gradient reduce-scatters can trail.
  return role == "ag" ? range.greatest : range.least;
}

NcclLane::NcclLane(
    const NcclLaneSpec& spec,
    const std::string& uniqueId,
    uintptr_t parent)
    : spec_(spec),
      device_(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(spec.comm.device)),
      createdBySplit_(parent != 0) {
  const auto range = streamPriorityRange(spec.comm.device);
  const int priority = spec.streamPriority.value_or(
      defaultPriority(spec.role, spec.comm.device));
  if (priority < range.greatest || priority > range.least) {
    throw ConfigError(
        spec.comm.label + ": stream_priority " + std::to_string(priority) +
        " is outside this device's range " + std::to_string(range.greatest) +
        " (highest) to " + std::to_string(range.least) + " (lowest)");
  }
  comm_ = createdBySplit_
      ? NcclComm::split(spec.comm, reinterpret_cast<ncclComm_t>(parent))
      : NcclComm::initRank(spec.comm, uniqueId);
  c10::cuda::CUDAGuard guard(device_.index());
  stream_ = std::make_unique<CudaStream>(priority);
  watchdog_ = std::thread([this] { watch(); });
}

NcclLane::~NcclLane() {
  try {
    close();
  } catch (const std::exception&) {
    // close() already aborted the communicator when it could not flush it;
    // nothing is left to free.
  }
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

uintptr_t NcclLane::streamHandle() const {
  return reinterpret_cast<uintptr_t>(stream_->get());
}

void NcclLane::enqueueCollective(const Collective& op, const std::string& what) {
  const cudaStream_t stream = stream_->get();
  const ncclDataType_t type = nccl::dataType(op.inputs.empty()
                                                 ? at::kByte
                                                 : op.inputs[0].scalar_type(),
                                             what);
  std::optional<ncclRedOp_t> reduce;
  if (op.kind == CollectiveKind::ReduceScatter ||
      op.kind == CollectiveKind::AllReduce) {
    reduce = nccl::reduceOp(op.reduceOp, op.inputs[0].scalar_type(), what);
  }
  comm_->enqueue(what, [&](ncclComm_t comm) -> ncclResult_t {
    nccl::check(nccl::groupStart(), what + ": ncclGroupStart", comm);
    ncclResult_t result = ncclSuccess;
    for (size_t i = 0; i < op.inputs.size(); ++i) {
      const at::Tensor& in = op.inputs[i];
      switch (op.kind) {
        case CollectiveKind::AllGather:
          result = nccl::allGather(
              in.data_ptr(), op.outputs[i].data_ptr(), countOf(in), type, comm, stream);
          break;
        case CollectiveKind::ReduceScatter:
          result = nccl::reduceScatter(
              in.data_ptr(), op.outputs[i].data_ptr(),
              countOf(op.outputs[i]), type, *reduce, comm, stream);
          break;
        case CollectiveKind::AllReduce:
          result = nccl::allReduce(
              in.data_ptr(), in.data_ptr(), countOf(in), type, *reduce, comm, stream);
          break;
        case CollectiveKind::Broadcast:
          result = nccl::broadcast(
              in.data_ptr(), in.data_ptr(), countOf(in), type,
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
  std::lock_guard<std::mutex> issueLock(issueMutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Failed && failure_) {
      std::rethrow_exception(failure_);
    }
    if (state_ != State::Open) {
      throw PoolClosedError(description + ": the NCCL lane was closed");
    }
  }
  c10::cuda::CUDAGuard guard(device_.index());
  const cudaStream_t caller = at::cuda::getCurrentCUDAStream(device_.index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  checkCuda(cudaStreamIsCapturing(caller, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) {
    throw UnsupportedOpError(
        description + ": pooled NCCL lanes cannot be captured into a CUDA "
        "graph; issue the op outside the capture or use the base group");
  }
  CudaEvent ready; // freed at once; CUDA keeps it until the wait is done
  ready.record(caller);
  ready.block(stream_->get());
  enqueueCollective(op, description);
  auto end = std::make_shared<CudaEvent>();
  end->record(stream_->get());

  std::vector<at::Tensor> tensors = op.inputs;
  tensors.insert(tensors.end(), op.outputs.begin(), op.outputs.end());
  const bool outOfPlace = op.kind == CollectiveKind::AllGather ||
      op.kind == CollectiveKind::ReduceScatter;
  auto work = c10::make_intrusive<NcclWork>(
      static_cast<int>(spec_.comm.rank),
      type,
      outOfPlace ? op.outputs : op.inputs,
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

void NcclLane::watch() {
  // Each op's timeout counts from when it could start: its issue, or the end
  // of the op before it, whichever is later.
  int64_t previousEndUs = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] {
      return !inFlight_.empty() || state_ == State::Closed || state_ == State::Failed;
    });
    if (inFlight_.empty()) {
      return; // closed or failed, and nothing left to finish
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
    lock.lock();
    if (inFlight_.empty() || inFlight_.front().work != work) {
      continue; // fail() took it meanwhile
    }
    if (passed) {
      InFlight done = std::move(inFlight_.front());
      inFlight_.pop_front();
      auto stats = stats_;
      lock.unlock();
      changed_.notify_all(); // close() may be waiting for the lane to drain
      if (stats) {
        stats->record(OpRecord{
            done.kind, done.bytes, std::max(done.issuedUs, previousEndUs), now, true});
      }
      previousEndUs = now;
      work->complete(nullptr);
      done.tensors.clear();
      lock.lock();
      continue;
    }
    const int64_t startedUs = std::max(issuedUs, previousEndUs);
    if (!error &&
        now - startedUs > std::chrono::duration_cast<std::chrono::microseconds>(
                              spec_.comm.timeout)
                              .count()) {
      error = std::make_exception_ptr(CollectiveTimeoutError(
          work->description() + " did not finish within its timeout of " +
          std::to_string(spec_.comm.timeout.count()) +
          " ms; a peer may be gone or may not have issued the same op. The "
          "communicator was aborted"));
    }
    if (error) {
      lock.unlock();
      fail(error, State::Failed);
      lock.lock();
      continue;
    }
    changed_.wait_for(lock, kWatchInterval);
  }
}

void NcclLane::fail(std::exception_ptr error, State next) {
  // Aborting first makes NCCL's kernels return, so held tensors are safe to
  // release afterwards.
  comm_->abort();
  std::deque<InFlight> unfinished;
  std::shared_ptr<LaneStats> stats;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Open || state_ == State::Closing) {
      state_ = next;
      if (next == State::Failed) {
        failure_ = error;
      }
    }
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

void NcclLane::close() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (state_ == State::Open) {
      state_ = State::Closing;
    }
    // The watchdog finishes or fails every op, each bounded by its timeout.
    changed_.wait(lock, [&] { return inFlight_.empty(); });
    if (state_ == State::Closing) {
      state_ = State::Closed;
    }
  }
  changed_.notify_all();
  if (watchdog_.joinable() && watchdog_.get_id() != std::this_thread::get_id()) {
    watchdog_.join();
  }
  comm_->destroy();
}

void NcclLane::abort() {
  fail(
      std::make_exception_ptr(PoolClosedError(
          spec_.comm.label + ": the op was failed by abort()")),
      State::Closed);
  if (watchdog_.joinable() && watchdog_.get_id() != std::this_thread::get_id()) {
    watchdog_.join();
  }
}

} // namespace pycomm
