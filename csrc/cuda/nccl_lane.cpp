#include "nccl_lane.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <utility>

#include "errors.h"
#include "flight_recorder_dump.h"
#include "nccl_calls.h"
#include "op_timing.h"

namespace pycomm {

namespace {

// The kinds the lane issues to NCCL.
bool runsOnNccl(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::AllGather:
    case CollectiveKind::ReduceScatter:
    case CollectiveKind::AllReduce:
    case CollectiveKind::Broadcast:
    case CollectiveKind::Reduce:
    case CollectiveKind::AllGatherList:
    case CollectiveKind::ReduceScatterList:
    case CollectiveKind::Gather:
    case CollectiveKind::Scatter:
    case CollectiveKind::AllToAll:
    case CollectiveKind::AllToAllList:
    case CollectiveKind::Send:
    case CollectiveKind::Recv:
    case CollectiveKind::SendRecvBatch:
      return true;
    default:
      return false; // barriers go through the CPU lane
  }
}

// The kinds the lane builds from NCCL's sends and recvs (pointToPointCalls).
bool builtFromSendsAndRecvs(CollectiveKind kind) {
  return kind == CollectiveKind::Gather || kind == CollectiveKind::Scatter ||
      kind == CollectiveKind::AllToAll || kind == CollectiveKind::AllToAllList ||
      isPointToPoint(kind);
}

// Gather, scatter and all-to-all are sends and recvs in one NCCL group, as
// NCCL's user guide builds them ("Point-to-point communication": one-to-all,
// all-to-one, all-to-all); so is a batch of isend/irecv, each of its
// tensors with its own type. Calls stop at the first failure; the caller
// closes the group.
ncclResult_t pointToPointCalls(
    NcclApi& api, const Collective& op, const std::vector<ncclDataType_t>& types, int rank, int size,
    ncclComm_t comm, cudaStream_t stream) {
  ncclResult_t result = ncclSuccess;
  auto going = [&] { return result == ncclSuccess || result == ncclInProgress; };
  auto sendAs = [&](ncclDataType_t type, const void* data, int64_t count, int peer) {
    if (going()) {
      result = api.send(data, static_cast<size_t>(count), type, peer, comm, stream);
    }
  };
  auto recvAs = [&](ncclDataType_t type, void* data, int64_t count, int peer) {
    if (going()) {
      result = api.recv(data, static_cast<size_t>(count), type, peer, comm, stream);
    }
  };
  // Every kind but a batch has one type.
  auto send = [&](const void* data, int64_t count, int peer) { sendAs(types[0], data, count, peer); };
  auto recv = [&](void* data, int64_t count, int peer) { recvAs(types[0], data, count, peer); };
  const int root = static_cast<int>(op.root);
  switch (op.kind) {
    case CollectiveKind::Send:
      send(op.inputs[0].data_ptr(), op.inputs[0].numel(), static_cast<int>(op.peer));
      break;
    case CollectiveKind::Recv:
      recv(op.inputs[0].data_ptr(), op.inputs[0].numel(), static_cast<int>(op.peer));
      break;
    case CollectiveKind::SendRecvBatch:
      for (size_t i = 0; i < op.parts.size(); ++i) {
        const at::Tensor& t = op.inputs[i];
        const int peer = static_cast<int>(op.parts[i].peer);
        if (op.parts[i].send) {
          sendAs(types[i], t.data_ptr(), t.numel(), peer);
        } else {
          recvAs(types[i], t.data_ptr(), t.numel(), peer);
        }
      }
      break;
    case CollectiveKind::Gather:
      send(op.inputs[0].data_ptr(), op.inputs[0].numel(), root);
      for (int r = 0; rank == root && r < size; ++r) {
        recv(op.outputs[r].data_ptr(), op.outputs[r].numel(), r);
      }
      break;
    case CollectiveKind::Scatter:
      for (int r = 0; rank == root && r < size; ++r) {
        send(op.inputs[r].data_ptr(), op.inputs[r].numel(), r);
      }
      recv(op.outputs[0].data_ptr(), op.outputs[0].numel(), root);
      break;
    case CollectiveKind::AllToAll: {
      // Splits count dim-0 rows (even when none are given); validate()
      // checked that they cover each tensor.
      auto rowsOf = [&](const at::Tensor& t, const std::vector<int64_t>& splits, int r) {
        return splits.empty() ? (t.dim() > 0 ? t.size(0) : 1) / size : splits[r];
      };
      auto rowElements = [](const at::Tensor& t) {
        return t.dim() > 0 && t.size(0) > 0 ? t.numel() / t.size(0) : t.numel();
      };
      const at::Tensor& in = op.inputs[0];
      const at::Tensor& out = op.outputs[0];
      const int64_t inRow = rowElements(in) * in.element_size();
      const int64_t outRow = rowElements(out) * out.element_size();
      auto* inBytes = static_cast<const char*>(in.data_ptr());
      auto* outBytes = static_cast<char*>(out.data_ptr());
      int64_t inAt = 0;
      int64_t outAt = 0;
      for (int r = 0; r < size; ++r) {
        const int64_t inRows = rowsOf(in, op.inputSplits, r);
        const int64_t outRows = rowsOf(out, op.outputSplits, r);
        send(inBytes + inAt * inRow, inRows * rowElements(in), r);
        recv(outBytes + outAt * outRow, outRows * rowElements(out), r);
        inAt += inRows;
        outAt += outRows;
      }
      break;
    }
    case CollectiveKind::AllToAllList:
      for (int r = 0; r < size; ++r) {
        send(op.inputs[r].data_ptr(), op.inputs[r].numel(), r);
        recv(op.outputs[r].data_ptr(), op.outputs[r].numel(), r);
      }
      break;
    default:
      break;
  }
  return result;
}
// How often the watchdog looks at the oldest op while ops are in flight. It
// only releases tensors and completes futures: the caller's stream never
// waits for it.
constexpr auto kWatchInterval = std::chrono::microseconds(500);
// How long the watchdog keeps looking after the last op finished before it
// sleeps until woken: ops of a training step follow each other closely, and
// an issue() that finds the watchdog looking need not wake it (a wake-up is
// a context switch on the issuing thread's core).
constexpr int kIdleLooks = 20; // 10 ms at kWatchInterval

int64_t steadyUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t toUs(std::chrono::milliseconds ms) {
  return std::chrono::duration_cast<std::chrono::microseconds>(ms).count();
}


void abortProcess(const std::string& message) {
  std::fprintf(
      stderr,
      "pycomm: %s\npycomm: tearing the process down, as torch's NCCL backend "
      "does: a stream may already consume the failed op's output "
      "(TORCH_NCCL_ASYNC_ERROR_HANDLING=0 or 2 only reports the error)\n",
      message.c_str());
  std::fflush(stderr);
  std::abort();
}
} // namespace

int NcclLane::resolvePriority(const NcclLaneSpec& spec) {
  const auto range = streamPriorityRange(*spec.comm.apis.cuda, spec.comm.device);
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
    const std::shared_ptr<NcclLane>& parent) {
  // Not make_shared: the constructor is private, so every lane is owned by a
  // shared_ptr, which the watchdog relies on.
  std::shared_ptr<NcclLane> lane(new NcclLane(spec, uniqueId, parent));
  std::weak_ptr<NcclLane> weak = lane;
  lane->stallWatch_ = StallWatch::create(
      lane->spec_.comm.label, lane->spec_.stallTimeout, [weak](const std::string& report) {
        if (auto self = weak.lock()) {
          self->onStall(report);
        }
      });
  return lane;
}

NcclLane::NcclLane(
    const NcclLaneSpec& spec,
    const std::string& uniqueId,
    const std::shared_ptr<NcclLane>& parent)
    : spec_(spec),
      device_(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(spec.comm.device)),
      createdBySplit_(parent != nullptr) {
  if (!spec_.tearDown) {
    spec_.tearDown = abortProcess;
  }
  // Everything that can fail on this rank alone comes before the collective
  // creation, so it cannot leave the peers waiting.
  const int priority = resolvePriority(spec_);
  checkCuda(
      cuda(),
      cuda().deviceGetAttribute(
          &computeMajor_, cudaDevAttrComputeCapabilityMajor, spec_.comm.device),
      "cudaDeviceGetAttribute");
  loadedVersion_ = nccl::loadedVersion(*spec_.comm.apis.nccl);
  {
    DeviceScope device(cuda(), device_.index());
    stream_ = std::make_unique<CudaStream>(spec_.comm.apis.cuda, priority);
    callerReady_ = std::make_unique<CudaEvent>(spec_.comm.apis.cuda);
  }
  // Timing needs timed end events and a start event per op, as torch's NCCL
  // backend records them only under TORCH_NCCL_ENABLE_TIMING.
  const bool timed = opTimingRequested();
  endEvents_ = std::make_shared<EndEventPool>(spec_.comm.apis.cuda, timed);
  if (timed) {
    startEvents_ = std::make_shared<EndEventPool>(spec_.comm.apis.cuda, true);
  }
  const int64_t freeBefore = freeDeviceMemory();
  comm_ = parent != nullptr ? NcclComm::split(spec_.comm, *parent->comm_)
                            : NcclComm::initRank(spec_.comm, uniqueId);
  creationBytes_ = std::max<int64_t>(0, freeBefore - freeDeviceMemory());
}

int64_t NcclLane::freeDeviceMemory() const {
  DeviceScope device(cuda(), device_.index());
  size_t free = 0;
  size_t total = 0;
  checkCuda(cuda(), cuda().memGetInfo(&free, &total), "cudaMemGetInfo");
  return static_cast<int64_t>(free);
}

NcclLane::MemoryUse NcclLane::memoryUse() const {
  MemoryUse use;
  use.creationBytes = creationBytes_;
  if (const int64_t first = firstUseBytes_.load(); first >= 0) {
    use.firstUseBytes = first;
  }
  return use;
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

bool NcclLane::splittable() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_ == State::Open && !comm_->aborted();
}

int NcclLane::streamPriority() const {
  return stream_->priority();
}

bool NcclLane::onWatchdogThread() const {
  return std::this_thread::get_id() == watchdogId_.load();
}

NcclLane::NcclTypes NcclLane::ncclTypesOf(
    const Collective& op, const std::string& what) const {
  // Each tensor pair has its own type: a coalesced op may mix them.
  NcclTypes out;
  const bool reduces = isReducing(op.kind);
  const bool premul = reduces && op.reduceOp == c10d::ReduceOp::PREMUL_SUM;
  if (op.inputs.empty() && op.kind != CollectiveKind::Barrier) {
    // A scatter's non-root ranks have only their output.
    out.types.push_back(nccl::dataType(op.firstTensor().scalar_type(), loadedVersion_, what));
  }
  for (const auto& in : op.inputs) {
    out.types.push_back(nccl::dataType(in.scalar_type(), loadedVersion_, what));
    if (premul) {
      out.premul.push_back(nccl::preMulFactor(op.premulScalar, op.premulTensor, in.scalar_type()));
    } else if (reduces) {
      out.reduces.push_back(
          nccl::reduceOp(op.reduceOp, in.scalar_type(), computeMajor_, what, spec_.groupReducesFp8));
    }
  }
  return out;
}

void NcclLane::launchCollective(
    const Collective& op,
    const NcclTypes& nccl,
    const std::string& what,
    const std::shared_ptr<EndEvent>& end) {
  const cudaStream_t stream = stream_->get();
  NcclApi& api = *spec_.comm.apis.nccl;
  auto calls = [&](ncclComm_t comm) -> ncclResult_t {
    nccl::check(api, api.groupStart(), what + ": ncclGroupStart", comm);
    ncclResult_t result = ncclSuccess;
    const bool premul = !nccl.premul.empty();
    // PREMUL_SUM's ops are all made before any collective call: a failed
    // creation does not fail the open group, which would otherwise launch
    // the calls made before it on this rank alone.
    std::vector<ncclRedOp_t> premulOps;
    for (size_t i = 0; premul && i < op.inputs.size(); ++i) {
      ncclRedOp_t made = ncclSum;
      result = api.redOpCreatePreMulSum(
          &made, nccl.premul[i].scalar(), nccl.types[i], nccl.premul[i].residence(), comm);
      if (result != ncclSuccess) {
        for (ncclRedOp_t done : premulOps) {
          (void)api.redOpDestroy(done, comm); // the creation's error is the one reported
        }
        premulOps.clear();
        break;
      }
      premulOps.push_back(made);
    }
    size_t premulDestroyed = 0; // premulOps[0, premulDestroyed) are gone
    // One NCCL call per input; a list all-gather makes one per output, a
    // broadcast from each rank in turn (its one input's type).
    const bool perOutput = op.kind == CollectiveKind::AllGatherList;
    const bool pointToPoint = builtFromSendsAndRecvs(op.kind);
    if (pointToPoint) {
      result = pointToPointCalls(api, op, nccl.types, spec_.comm.rank, spec_.comm.size, comm, stream);
    }
    const size_t callCount = pointToPoint ? 0 : perOutput ? op.outputs.size() : op.inputs.size();
    for (size_t i = 0; i < callCount && (result == ncclSuccess || result == ncclInProgress); ++i) {
      const at::Tensor& in = op.inputs[perOutput ? 0 : i];
      const ncclDataType_t type = nccl.types[perOutput ? 0 : i];
      const ncclRedOp_t red = premul ? premulOps[i] : (nccl.reduces.empty() ? ncclSum : nccl.reduces[i]);
      switch (op.kind) {
        case CollectiveKind::AllGather:
          result = api.allGather(
              in.data_ptr(), op.outputs[i].data_ptr(), in.numel(), nccl.types[i],
              comm, stream);
          break;
        case CollectiveKind::ReduceScatter:
          result = api.reduceScatter(
              in.data_ptr(), op.outputs[i].data_ptr(), op.outputs[i].numel(),
              nccl.types[i], red, comm, stream);
          break;
        case CollectiveKind::AllReduce:
          result = api.allReduce(
              in.data_ptr(), in.data_ptr(), in.numel(), nccl.types[i], red, comm, stream);
          break;
        case CollectiveKind::Broadcast:
          result = api.broadcast(
              in.data_ptr(), in.data_ptr(), in.numel(), nccl.types[i],
              static_cast<int>(op.root), comm, stream);
          break;
        case CollectiveKind::Reduce:
          result = api.reduce(
              in.data_ptr(), in.data_ptr(), in.numel(), type, red, static_cast<int>(op.root), comm, stream);
          break;
        case CollectiveKind::ReduceScatterList:
          // Input i reduced onto rank i's output: its reduce-scatter, with
          // inputs that need not be one buffer.
          result = api.reduce(
              in.data_ptr(), op.outputs[0].data_ptr(), in.numel(), type, red, static_cast<int>(i), comm, stream);
          break;
        case CollectiveKind::AllGatherList:
          // Rank i's input broadcast into everyone's output i (NCCL reads
          // the send buffer on the root only).
          result = api.broadcast(
              in.data_ptr(), op.outputs[i].data_ptr(), in.numel(), type, static_cast<int>(i), comm, stream);
          break;
        default:
          break; // barriers go through the CPU lane; issue() refused the rest
      }
      if (premul) {
        // "An operator may be destroyed as soon as the last NCCL function
        // which is given that operator returns" (NCCL API, ncclRedOpDestroy).
        const ncclResult_t destroyed = api.redOpDestroy(red, comm);
        ++premulDestroyed;
        if (destroyed != ncclSuccess && (result == ncclSuccess || result == ncclInProgress)) {
          result = destroyed;
        }
      }
    }
    for (size_t j = premulDestroyed; j < premulOps.size(); ++j) {
      (void)api.redOpDestroy(premulOps[j], comm); // calls skipped after a failure: its error is reported
    }
    // The group is always closed, also after a failed call, so the thread
    // is not left inside an NCCL group.
    const ncclResult_t ended = api.groupEnd();
    return result != ncclSuccess && result != ncclInProgress ? result : ended;
  };
  // The end event goes behind the kernels, which NCCL's thread puts on the
  // stream after the group end returned: whoever sees NCCL take them first
  // records it (the next issue, the watchdog, a wait()).
  comm_->launch(what, calls, [end, stream] { end->record(stream); });
}

c10::intrusive_ptr<c10d::Work> NcclLane::issue(
    const Collective& op,
    c10d::OpType type,
    uint64_t seq,
    std::string description) {
  if (!runsOnNccl(op.kind)) {
    throw UnsupportedOpError(
        description + ": " + kindName(op.kind) + " does not run on pooled NCCL lanes; "
        "the pooled group's CPU lane runs it");
  }
  const NcclTypes types = ncclTypesOf(op, description);
  if (spec_.comm.apis.nccl->torchGroupDepth() > 0) {
    throw UnsupportedOpError(
        description + ": issued inside an NCCL group torch has open on this "
        "thread (_coalescing_manager or batch_isend_irecv on an NCCL group); "
        "NCCL refuses pycomm's nonblocking communicators in torch's blocking "
        "group, so issue the pooled op before or after it");
  }
  std::unique_lock<std::mutex> issueLock(issueMutex_);
  throwUnlessOpen(description);
  // Before anything is issued: if the thread cannot start, nothing is lost.
  ensureWatchdog();
  DeviceScope device(cuda(), device_.index());
  const cudaStream_t caller = cuda().currentStream(device_.index());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  checkCuda(cuda(), cuda().streamIsCapturing(caller, &capture), "cudaStreamIsCapturing");
  // Captured as ProcessGroupNCCL captures its ops: the lane's stream joins
  // the caller's capture through the ready event, the kernels and the end
  // event are recorded into it, and the caller's wait() joins the lane back.
  // Each replay of the graph runs the op again; the watchdog never sees it.
  const bool captured = capture != cudaStreamCaptureStatusNone;
  if (captured && freeBeforeFirstUse_ < 0) {
    throw UnsupportedOpError(
        description + ": a CUDA graph cannot capture the first op of a pooled NCCL lane: NCCL "
        "connects the communicator's peers at its first op, which a capture cannot hold; run "
        "one op on the group before capturing (as torch's graph warm-up does)");
  }
  if (freeBeforeFirstUse_ < 0) {
    // Only the first op pays for this read, which a later lane's creation
    // would otherwise be counted in.
    freeBeforeFirstUse_ = freeDeviceMemory();
  }
  std::shared_ptr<EndEvent> start;
  std::shared_ptr<EndEvent> end;
  try {
    callerReady_->record(caller);
    callerReady_->block(stream_->get());
    if (startEvents_ && !captured) {
      // Behind what the op waits for, ahead of the kernels NCCL's thread
      // appends: it passes when the op can start. The previous op's launch
      // is settled first (it is already, in program order), or its kernels
      // could land behind this event and count in this op's time.
      comm_->settle();
      start = startEvents_->take();
      start->record(stream_->get());
    }
    end = endEvents_->take();
    launchCollective(op, types, description, end);
    if (captured) {
      // The kernels and the end event must land in the capture, before the
      // caller can end it: whoever would otherwise record the end event
      // later (the watchdog, the next op) may do it after the capture.
      comm_->settle();
    }
  } catch (...) {
    // NCCL may have taken part of the op, or may still: the communicator
    // can no longer be trusted with the next one.
    auto error = std::current_exception();
    issueLock.unlock();
    failOnError(error);
    // If the watchdog or an abort ended the lane first (the reason this
    // issue broke), its error is the one to report.
    std::lock_guard<std::mutex> lock(mutex_);
    std::rethrow_exception(failure_ ? failure_ : error);
  }

  std::vector<at::Tensor> tensors = op.inputs;
  tensors.insert(tensors.end(), op.outputs.begin(), op.outputs.end());
  if (op.premulTensor.defined()) {
    tensors.push_back(op.premulTensor); // the kernel reads the factor there
  }
  const std::string title = op.spanName != nullptr ? op.profilingTitle("nccl") : "";
  auto work = c10::make_intrusive<NcclWork>(
      spec_.comm.apis.cuda,
      static_cast<int>(spec_.comm.rank),
      type,
      op.spanName != nullptr ? title.c_str() : nullptr,
      op.inputs,
      op.results(),
      std::move(start),
      std::move(end),
      [lane = weak_from_this()] {
        if (auto self = lane.lock()) {
          self->settleOrFail();
        }
      },
      device_,
      seq,
      std::move(description));
  if (captured) {
    // Nothing to watch: the op runs at each replay, which the caller orders
    // on its streams. A replay reads and writes its tensors whenever it
    // runs, so the lane keeps them for as long as it lives.
    work->complete(nullptr);
    std::lock_guard<std::mutex> lock(mutex_);
    capturedTensors_.push_back(std::move(tensors));
    return work;
  }
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    inFlight_.push_back(
        InFlight{work, std::move(tensors), op.kind, op.bytes(), steadyUs(), comm_->timeout()});
    wake = watchdogAsleep_;
  }
  if (wake) {
    changed_.notify_all();
  }
  return work;
}

void NcclLane::settleOrFail() {
  try {
    comm_->settle();
  } catch (...) {
    auto error = std::current_exception();
    failOnError(error);
    std::lock_guard<std::mutex> lock(mutex_);
    std::rethrow_exception(failure_ ? failure_ : error);
  }
}

void NcclLane::ensureWatchdog() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!watchdog_.joinable()) {
    watchdog_ = std::thread([self = shared_from_this()] { self->watch(); });
    watchdogId_.store(watchdog_.get_id());
    watchdogRunning_ = true;
  }
}

void NcclLane::watch() {
  try {
    watchUntilDone();
  } catch (...) {
    // Nothing may escape a thread; whatever broke here fails the lane.
    try {
      failOnError(std::current_exception());
    } catch (...) {
    }
  }
  watchdogId_.store(std::thread::id()); // the id may be reused by a new thread
  {
    std::lock_guard<std::mutex> lock(mutex_);
    watchdogRunning_ = false;
  }
  changed_.notify_all();
}

void NcclLane::watchUntilDone() {
  try {
    // Event queries need this device's context (not device 0's), and must
    // not be refused while another thread captures a CUDA graph: in the
    // default Global mode CUDA fails them with "operation not permitted
    // when stream is capturing" and invalidates that capture. This thread
    // never captures, so thread-local mode frees it, as torch's NCCL
    // watchdog does (ProcessGroupNCCL.cpp, Watchdog::runLoop: "allow
    // watchdog to do an event query on a side thread").
    StallWatch::Call call(*stallWatch_, "setting its device and capture mode");
    checkCuda(cuda(), cuda().setDevice(device_.index()), "cudaSetDevice");
    cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal;
    checkCuda(
        cuda(), cuda().threadExchangeStreamCaptureMode(&mode),
        "cudaThreadExchangeStreamCaptureMode");
  } catch (...) {
    failOnError(std::current_exception());
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
      StallWatch::Call call(*stallWatch_, "freeing the NCCL communicator");
      comm_->destroy();
    } catch (...) {
      // release() has no caller to report to; destroy() aborted instead.
    }
  }
}

bool NcclLane::watchOnce(std::unique_lock<std::mutex>& lock, int64_t& previousEndUs) {
  const auto busy = [&] { return !inFlight_.empty() || state_ != State::Open; };
  for (int look = 0; look < kIdleLooks && !busy(); ++look) {
    changed_.wait_for(lock, kWatchInterval);
  }
  if (!busy()) {
    watchdogAsleep_ = true;
    changed_.wait(lock, busy);
    watchdogAsleep_ = false;
  }
  if (inFlight_.empty()) {
    return false; // no longer open, and nothing left to finish
  }
  auto work = inFlight_.front().work;
  const int64_t issuedUs = inFlight_.front().issuedUs;
  const auto timeout = inFlight_.front().timeout;
  const CollectiveKind kind = inFlight_.front().kind;
  lock.unlock();

  std::exception_ptr error;
  bool passed = false;
  try {
    StallWatch::Call call(*stallWatch_, "querying the end event of the oldest op");
    passed = work->endPassed();
  } catch (...) {
    error = std::current_exception();
  }
  if (!error && comm_->aborted()) {
    // NCCL's kernels return early on an abort, so an end event that passes
    // now says nothing about the op's output.
    error = std::make_exception_ptr(CollectiveError(
        work->description() + " cannot finish: the NCCL communicator was "
        "aborted (" + comm_->abortReason() + ")"));
    passed = false;
  }
  if (!passed && !error) {
    StallWatch::Call call(*stallWatch_, "asking NCCL for the communicator's asynchronous error");
    const auto async = comm_->tryAsyncError();
    if (async && *async != ncclSuccess && *async != ncclInProgress) {
      error = std::make_exception_ptr(CollectiveError(
          work->description() + " failed in NCCL: " +
          nccl::errorText(*spec_.comm.apis.nccl, *async) + " (NCCL: " +
          comm_->lastError() + ")"));
    }
  }
  const int64_t now = steadyUs();
  // Each op's timeout counts from when it could start: its issue, or the end
  // of the op before it, whichever is later.
  const int64_t startedUs = std::max(issuedUs, previousEndUs);
  if (!passed && !error && now - startedUs > toUs(timeout)) {
    error = std::make_exception_ptr(CollectiveTimeoutError(
        work->description() + " did not finish within its timeout of " +
        std::to_string(timeout.count()) +
        " ms; a peer may be gone or may not have issued the same op" +
        (isLonePointToPoint(kind)
             ? std::string(", or the matching call may be queued behind one of the peer's own: a "
                           "lone send or recv holds the lane's stream until its peer's runs (NCCL's "
                           "send and recv block the GPU), so an exchange where both ranks send "
                           "first goes through batch_isend_irecv")
             : std::string()) +
        ". The communicator was aborted"));
  }
  if (error) {
    // When the lane is ending already (abort(), another failure), the ops
    // fail with the error that ended it.
    failOnError(error);
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
    // Traces are in wall-clock time, so the ranks of one host line up.
    const int64_t wallNow = LaneStats::nowUs();
    stats->record(OpRecord{
        done.kind, done.bytes, wallNow - (now - startedUs), wallNow, true});
  }
  previousEndUs = now;
  if (firstUseBytes_.load() == kNotMeasured) {
    try {
      StallWatch::Call call(*stallWatch_, "reading the device's free memory");
      firstUseBytes_ = std::max<int64_t>(0, freeBeforeFirstUse_ - freeDeviceMemory());
    } catch (const std::exception&) {
      firstUseBytes_ = kNotMeasurable; // a report, not worth failing the op for
    }
  }
  {
    StallWatch::Call call(*stallWatch_, "completing an op (its callbacks run on the watchdog)");
    work->complete(nullptr); // may run callbacks; no lock held
  }
  done.tensors.clear();
  lock.lock();
  return true;
}

bool NcclLane::fail(std::exception_ptr error, State next) {
  bool ended = false;
  std::deque<InFlight> unfinished;
  std::shared_ptr<LaneStats> stats;
  {
    // Recorded before the abort, so an issue() that the abort breaks reports
    // this error, not the abort.
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Open || state_ == State::Closing) {
      state_ = next;
      ended = true;
      endedBy_ = error;
      if (next == State::Failed) {
        failure_ = error;
      }
    } else if (endedBy_) {
      error = endedBy_; // the first failure names what happened
    }
    unfinished.swap(inFlight_);
    stats = stats_;
  }
  if (ended && (next == State::Failed || !unfinished.empty())) {
    // Before anything is failed or torn down, as ProcessGroupNCCL's watchdog
    // dumps first: the recorder still shows these ops as they were.
    dumpFlightRecorder(spec_.globalRank, messageOf(error));
  }
  // The works fail before the communicator is aborted, which may take long
  // (or hang): a wait() meanwhile must raise, not let the caller's stream
  // go on to a half-written output. Their tensors stay held until NCCL's
  // kernels returned.
  completeFailed(unfinished, error, stats);
  // Aborting makes NCCL's kernels return and ends any poll inside an
  // issue(), so held tensors are safe to release afterwards and issueMutex_
  // is free soon.
  const bool aborted = abortCommunicator(messageOf(error));
  std::deque<InFlight> late; // pushed by an issue() the abort let finish
  {
    // A hung abort may hold the communicator that an issue() is inside:
    // then the ops pushed so far are taken without waiting for it.
    std::unique_lock<std::mutex> issueLock(issueMutex_, std::defer_lock);
    if (aborted) {
      issueLock.lock();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    late.swap(inFlight_);
  }
  changed_.notify_all();
  completeFailed(late, error, stats);
  if (!aborted) {
    // NCCL's kernels may still read and write these: they live as long as
    // the lane, which the hung abort holds.
    abandon(unfinished);
    abandon(late);
  }
  return ended;
}

bool NcclLane::abortCommunicator(const std::string& reason) {
  if (onWatchdogThread()) {
    StallWatch::Call call(*stallWatch_, "aborting the NCCL communicator");
    comm_->abort(reason);
    return true;
  }
  return runBounded(spec_.stallTimeout, [self = shared_from_this(), reason] {
    self->comm_->abort(reason);
  });
}

void NcclLane::onStall(const std::string& report) {
  // No CUDA or NCCL call here: they may hang as well.
  auto error = std::make_exception_ptr(CollectiveTimeoutError(report));
  std::deque<InFlight> unfinished;
  std::shared_ptr<LaneStats> stats;
  bool ended = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Open || state_ == State::Closing) {
      state_ = State::Failed;
      failure_ = error;
      endedBy_ = error;
      ended = true;
    }
    unfinished.swap(inFlight_);
    stats = stats_;
  }
  changed_.notify_all();
  completeFailed(unfinished, error, stats);
  abandon(unfinished);
  if (ended && spec_.tearDownOnError) {
    spec_.tearDown(report);
  }
}

void NcclLane::abandon(std::deque<InFlight>& ops) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::move(ops.begin(), ops.end(), std::back_inserter(abandoned_));
}

void NcclLane::completeFailed(
    std::deque<InFlight>& ops,
    const std::exception_ptr& error,
    const std::shared_ptr<LaneStats>& stats) {
  const int64_t now = LaneStats::nowUs();
  for (auto& op : ops) {
    if (stats) {
      stats->record(OpRecord{op.kind, op.bytes, now, now, false});
    }
    op.work->complete(error);
  }
}

void NcclLane::failOnError(std::exception_ptr error) {
  if (fail(error, State::Failed) && spec_.tearDownOnError) {
    spec_.tearDown(spec_.comm.label + ": " + messageOf(error));
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
  // After an abort, a no-op. Finalizing may hang on a sick GPU: the caller
  // waits for it at most the stall timeout.
  auto failure = std::make_shared<std::exception_ptr>();
  const bool returned = runBounded(spec_.stallTimeout, [self = shared_from_this(), failure] {
    try {
      self->comm_->destroy();
    } catch (...) {
      *failure = std::current_exception();
    }
  });
  if (returned && *failure) {
    std::rethrow_exception(*failure);
  }
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
      comm_->abort("no thread could be started to finalize it"); // free without waiting
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

void NcclLane::throwUnlessOpen(const std::string& what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (state_ == State::Failed && failure_) {
    std::rethrow_exception(failure_);
  }
  if (state_ != State::Open) {
    throw PoolClosedError(what + ": the NCCL lane was closed");
  }
}

void NcclLane::registerMemory(void* buffer, size_t bytes, bool symmetric) {
  // Under the issue lock: a registration is a call on the communicator
  // between two ops, and a closed or failed lane takes none.
  std::unique_lock<std::mutex> issueLock(issueMutex_);
  throwUnlessOpen(spec_.comm.label);
  try {
    comm_->registerBuffer(buffer, bytes, symmetric);
  } catch (const UnsupportedOpError&) {
    throw; // refused before NCCL took anything: the lane is as it was
  } catch (...) {
    // NCCL failed the registration (the communicator is in error), or it
    // did not complete and may still be running: the lane cannot be
    // trusted with another op. No op consumed anything, so it fails
    // without tearing the process down; its ops raise this error.
    auto error = std::current_exception();
    issueLock.unlock();
    fail(error, State::Failed);
    std::rethrow_exception(error);
  }
}

std::shared_ptr<c10::Allocator> NcclLane::memAllocator() {
  return spec_.memory ? spec_.memory->allocator() : nullptr;
}

at::Tensor NcclLane::allocateTensor(int64_t numel, const at::TensorOptions& options) {
  if (!spec_.memory) {
    throw UnsupportedOpError(
        spec_.comm.label + ": allocate_tensor needs ncclMemAlloc (NCCL 2.19 or newer), which the NCCL "
        "in use lacks");
  }
  if (numel < 0) {
    throw TensorMismatchError(spec_.comm.label + ": allocate_tensor of " + std::to_string(numel) + " elements");
  }
  return spec_.memory->allocate(numel, options.device(device_));
}

void NcclLane::deregisterMemory(void* buffer) {
  std::lock_guard<std::mutex> issueLock(issueMutex_);
  comm_->deregisterBuffer(buffer);
}

void NcclLane::joinWatchdog() {
  if (onWatchdogThread()) {
    return; // from a callback: the thread ends by itself, and must not wait here
  }
  std::lock_guard<std::mutex> lock(joinMutex_);
  if (!watchdog_.joinable()) {
    return;
  }
  bool exited = false;
  {
    std::unique_lock<std::mutex> stateLock(mutex_);
    exited = changed_.wait_for(
        stateLock, spec_.stallTimeout, [&] { return !watchdogRunning_; });
  }
  if (exited) {
    watchdog_.join();
  } else {
    // Stuck in a CUDA or NCCL call (the stall monitor reported it): it
    // holds the lane and ends by itself if the call ever returns.
    watchdog_.detach();
  }
}

} // namespace pycomm
