#include "pooled_backend.h"

#include <torch/csrc/distributed/c10d/ParamCommsUtils.hpp>

#include <algorithm>
#include <functional>
#include <sstream>
#include <system_error>
#include <thread>

#include "errors.h"
#include "op_timing.h"
#include "flight_recorder_dump.h"

namespace pycomm {

namespace {
// Waiting gives the transport's own timeout this long to report first, so its
// more precise error wins over the generic one.
constexpr auto kWaitGrace = std::chrono::seconds(2);
// A shorter timeout could only ever fail (pycomm/config.py's floor).
constexpr auto kShortestTimeout = std::chrono::milliseconds(100);

bool isTimeout(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const CollectiveTimeoutError&) {
    return true;
  } catch (...) {
    return false;
  }
}

int64_t elementsOf(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) {
    n += t.numel();
  }
  return n;
}

// Global ranks as torch's records give them: the first, and the stride when
// they are evenly spaced (-1 when not).
std::pair<int, int> rankStartAndStride(const std::vector<int64_t>& ranks) {
  if (ranks.empty()) {
    return {-1, -1};
  }
  const int64_t stride = ranks.size() > 1 ? ranks[1] - ranks[0] : 1;
  for (size_t i = 1; i < ranks.size(); ++i) {
    if (ranks[i] - ranks[i - 1] != stride) {
      return {static_cast<int>(ranks[0]), -1};
    }
  }
  return {static_cast<int>(ranks[0]), static_cast<int>(stride)};
}
} // namespace

std::string PooledGroupSpec::label() const {
  std::ostringstream out;
  out << "role '" << role << "' of group '" << baseGroupName << "' (ranks ";
  for (size_t i = 0; i < globalRanks.size(); ++i) {
    out << (i ? "," : "") << globalRanks[i];
  }
  out << ")";
  return out.str();
}

PooledBackend::LaneContext::LaneContext(
    c10::intrusive_ptr<c10d::Backend> comm,
    const PooledGroupSpec& spec)
    : transport(
          std::move(comm),
          spec.label(),
          spec.rank,
          static_cast<int64_t>(spec.globalRanks.size())),
      lane("pycomm-" + spec.role),
      checkOrder(spec.checkOrder),
      globalRank(static_cast<int>(
          static_cast<size_t>(spec.rank) < spec.globalRanks.size() ? spec.globalRanks[spec.rank]
                                                                    : spec.rank)) {}

PooledBackend::PooledBackend(
    PooledGroupSpec spec,
    c10::intrusive_ptr<c10d::Backend> cpuComm)
    : c10d::Backend(
          static_cast<int>(spec.rank),
          static_cast<int>(spec.globalRanks.size())),
      spec_(std::move(spec)),
      label_(std::make_shared<const std::string>(spec_.label())),
      context_(std::make_shared<LaneContext>(std::move(cpuComm), spec_)),
      timeout_(spec_.timeout),
      timed_(opTimingRequested()) {}

PooledBackend::~PooledBackend() {
  close(/*wait=*/false);
}

bool PooledBackend::isOpen() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_ == State::Open;
}

void PooledBackend::throwIfNotOpen() const {
  if (state_ == State::Closed) {
    throw PoolClosedError(
        spec_.label() + " was destroyed; duplicate the group again");
  }
  if (state_ == State::Aborted) {
    throw PoolClosedError(
        spec_.label() + " was aborted; duplicate the group again");
  }
}

c10::intrusive_ptr<c10d::Work> PooledBackend::submit(
    Collective op,
    c10d::OpType type,
    const char* collective,
    const char* spanName) {
  if (!at::hasCallbacks()) {
    return route(std::move(op), type); // no profiler listens: nothing to build
  }
  // What torch's NCCL backend records for torch.profiler (and the tools
  // reading its traces: HTA, Chakra), under this group's own name, on the
  // calling thread, whichever lane runs the op. The sequence number is the
  // one the op takes unless another thread issues on the group meanwhile.
  const auto [rankStart, rankStride] = rankStartAndStride(spec_.globalRanks);
  const std::vector<at::Tensor>& outputs = op.outputs.empty() ? op.inputs : op.outputs;
  RECORD_PARAM_COMMS_DATA(
      std::make_tuple(static_cast<int64_t>(getSequenceNumberForGroup()), false),
      std::make_tuple(spec_.name, spec_.description),
      op.inputs,
      outputs,
      static_cast<int>(spec_.rank),
      collective,
      elementsOf(op.inputs),
      elementsOf(outputs),
      op.firstTensor().defined() ? op.firstTensor().scalar_type() : at::kByte,
      std::vector<int64_t>(),
      std::vector<int64_t>(),
      rankStart,
      rankStride,
      static_cast<int>(spec_.globalRanks.size()));
  op.spanName = spanName;
  return route(std::move(op), type);
}

c10::intrusive_ptr<c10d::Work> PooledBackend::route(Collective op, c10d::OpType type) {
  auto work = routeNow(std::move(op), type);
  if (coalescingOpen_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (coalescing_) {
      lastWhileCoalescing_ = work;
    }
  }
  return work;
}

c10::intrusive_ptr<c10d::Work> PooledBackend::routeNow(Collective op, c10d::OpType type) {
  if (auto lane = deviceLaneFor(op)) {
    // No staging here: torch's NCCL groups refuse non-contiguous tensors too.
    validate(op, size_, rank_);
    return submitToDevice(std::move(op), type, std::move(lane));
  }
  // The Work holds (and returns) the caller's tensors; the transport may
  // run on contiguous copies of them.
  auto callers = std::make_shared<Collective>(std::move(op));
  auto running = callers;
  std::vector<StagedTensor> writeBack;
  if (!callers->allContiguous()) {
    running = std::make_shared<Collective>(*callers);
    writeBack = stageNonContiguous(*running);
  }
  validate(*running, size_, rank_);
  return enqueue(callers, running, type, std::move(writeBack), Run::Op).first;
}

std::pair<c10::intrusive_ptr<PooledWork>, uint64_t> PooledBackend::enqueue(
    std::shared_ptr<const Collective> callers,
    std::shared_ptr<Collective> running,
    c10d::OpType type,
    std::vector<StagedTensor> writeBack,
    Run run) {
  std::lock_guard<std::mutex> lock(mutex_);
  throwIfNotOpen();
  const uint64_t seq = nextSeq_++;
  auto work = c10::make_intrusive<PooledWork>(
      rank_, type, std::move(callers), label_, seq, timeout_ + kWaitGrace, timed_);
  {
    std::lock_guard<std::mutex> contextLock(context_->mutex);
    context_->unfinished.emplace(seq, work);
  }
  auto context = context_;
  context_->lane.post(
      [context, op = std::move(running), writeBack = std::move(writeBack), seq, work, run]() mutable {
        start(context, op, std::move(writeBack), seq, work, run);
      });
  return {work, seq};
}

std::shared_ptr<DeviceLane> PooledBackend::deviceLaneFor(const Collective& op) const {
  if (!op.firstTensor().defined()) {
    return nullptr; // a barrier: the CPU lane (see the README)
  }
  const auto device = op.firstTensor().device();
  std::lock_guard<std::mutex> lock(mutex_);
  if (deviceLane_ && deviceLane_->device() == device) {
    return deviceLane_;
  }
  if (device.type() == c10::DeviceType::CPU) {
    return nullptr;
  }
  throwIfNotOpen(); // a closed group says so, whatever its tensors
  if (!deviceLane_) {
    throw UnsupportedOpError(
        spec_.label() + ": " + op.describe() + " has tensors on " +
        device.str() +
        ", but this pooled group has no lane for that device: it was built "
        "without CUDA, or duplicated while no CUDA device was set (see "
        "pycomm.build_info() and CommPool(device=...))");
  }
  throw TensorMismatchError(
      spec_.label() + ": " + op.describe() + " has tensors on " +
      device.str() + ", but this pooled group's NCCL lane is on " +
      deviceLane_->device().str() + "; a pooled group serves one CUDA device");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::submitToDevice(
    Collective op,
    c10d::OpType type,
    std::shared_ptr<DeviceLane> lane) {
  uint64_t seq = 0;
  if (context_->checkOrder && !isPointToPoint(op.kind)) {
    // The fingerprints meet on the CPU lane, in order with its other ops;
    // the op reaches NCCL only once every rank agreed, so a mismatch is an
    // OrderMismatchError here instead of two NCCL kernels waiting on each
    // other forever. Costs one CPU round trip per op (a debug mode).
    auto shared = std::make_shared<Collective>(op);
    shared->spanName = nullptr; // the device lane's Work spans the op
    auto [check, checkSeq] = enqueue(shared, shared, type, {}, Run::OrderCheckOnly);
    check->wait(); // throws the mismatch, a timeout or PoolClosedError
    seq = checkSeq;
  } else {
    std::lock_guard<std::mutex> lock(mutex_);
    throwIfNotOpen();
    seq = nextSeq_++;
  }
  return lane->issue(op, type, seq, describeOp(*label_, op, seq));
}

void PooledBackend::attachDeviceLane(std::shared_ptr<DeviceLane> lane) {
  // The device lane counts its ops into the same stats as the CPU lane.
  lane->bindStats(std::shared_ptr<LaneStats>(context_, &context_->stats));
  std::lock_guard<std::mutex> lock(mutex_);
  throwIfNotOpen();
  deviceLane_ = std::move(lane);
}

std::shared_ptr<DeviceLane> PooledBackend::deviceLane() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return deviceLane_;
}

std::shared_ptr<DeviceLane> PooledBackend::requireDeviceLane(const std::string& what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  throwIfNotOpen();
  if (!deviceLane_) {
    throw UnsupportedOpError(
        spec_.label() + ": " + what + " needs an NCCL lane, and this pooled "
        "group has none: it was built without CUDA, or duplicated while no "
        "CUDA device was set (see pycomm.build_info() and CommPool(device=...))");
  }
  return deviceLane_;
}

namespace {
std::string listText(const std::vector<int64_t>& values, size_t from, size_t count) {
  std::string out = "[";
  for (size_t i = 0; i < count; ++i) {
    out += (i ? ", " : "") + std::to_string(values[from + i]);
  }
  return out + "]";
}
} // namespace

std::vector<int64_t> PooledBackend::allGatherOnHost(const std::vector<int64_t>& values) {
  auto op = std::make_shared<Collective>();
  op->kind = CollectiveKind::AllGather;
  op->inputs = {at::tensor(values, at::kLong)};
  op->outputs = {at::empty({static_cast<int64_t>(values.size()) * getSize()}, at::kLong)};
  const at::Tensor output = op->outputs[0];
  // Straight to the CPU lane, whatever lane host tensors would be routed to:
  // its wait() returns once the bytes are here.
  enqueue(op, op, c10d::OpType::_ALLGATHER_BASE, {}, Run::Op).first->wait();
  return std::vector<int64_t>(output.data_ptr<int64_t>(), output.data_ptr<int64_t>() + output.numel());
}

void PooledBackend::registerMemory(const Segments& segments, bool symmetric) {
  auto lane = requireDeviceLane("register_mem_pool");
  Segments fresh;
  for (const auto& segment : segments) {
    if (!lane->isRegistered(reinterpret_cast<void*>(segment.first))) {
      fresh.push_back(segment);
    }
  }
  if (symmetric) {
    const std::string what = spec_.label() +
        ": register_mem_pool(symm=True) is collective, one window per segment on every member, "
        "but the members hold different segments not yet registered: ";
    const auto counts = allGatherOnHost({static_cast<int64_t>(fresh.size())});
    if (std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) != counts.end()) {
      throw TensorMismatchError(
          what + "counts by group rank " + listText(counts, 0, counts.size()) +
          "; every member must register a pool of the same layout");
    }
    std::vector<int64_t> sizes;
    for (const auto& segment : fresh) {
      sizes.push_back(static_cast<int64_t>(segment.second));
    }
    if (!sizes.empty()) {
      const auto all = allGatherOnHost(sizes);
      const size_t n = sizes.size();
      bool same = true;
      for (int r = 1; r < getSize(); ++r) {
        same = same && std::equal(all.begin(), all.begin() + n, all.begin() + r * n);
      }
      if (!same) {
        std::string bySize;
        for (int r = 0; r < getSize(); ++r) {
          bySize += (r ? ", rank " : "rank ") + std::to_string(r) + " " + listText(all, r * n, n);
        }
        throw TensorMismatchError(
            what + "segment sizes in bytes by group rank: " + bySize +
            "; every member must register a pool of the same layout");
      }
    }
  }
  for (const auto& [address, bytes] : fresh) {
    lane->registerMemory(reinterpret_cast<void*>(address), bytes, symmetric);
  }
}

bool PooledBackend::supportsTensorAlloc(c10::DeviceIndex device) {
  std::shared_ptr<DeviceLane> lane;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    lane = deviceLane_;
  }
  return lane && lane->device().index() == device && lane->memAllocator() != nullptr;
}

std::shared_ptr<c10::Allocator> PooledBackend::getMemAllocator() {
  auto allocator = requireDeviceLane("mem_allocator")->memAllocator();
  if (!allocator) {
    throw UnsupportedOpError(
        spec_.label() + ": mem_allocator needs ncclMemAlloc (NCCL 2.19 or newer), which the NCCL in use lacks");
  }
  return allocator;
}

at::Tensor PooledBackend::allocateTensor(long size, at::TensorOptions options) {
  auto lane = requireDeviceLane("allocate_tensor");
  if (options.has_device() && options.device() != lane->device()) {
    throw TensorMismatchError(
        spec_.label() + ": allocate_tensor on " + options.device().str() + ", but this pooled group's "
        "NCCL lane serves " + lane->device().str());
  }
  return lane->allocateTensor(size, options);
}

void PooledBackend::deregisterMemory(const Segments& segments) {
  auto lane = requireDeviceLane("deregister_mem_pool");
  for (const auto& segment : segments) {
    lane->deregisterMemory(reinterpret_cast<void*>(segment.first));
  }
}

void PooledBackend::start(
    const std::shared_ptr<LaneContext>& context,
    std::shared_ptr<Collective> op,
    std::vector<StagedTensor> writeBack,
    uint64_t seq,
    const c10::intrusive_ptr<PooledWork>& work,
    Run run) {
  work->markStarted();
  const int64_t startUs = LaneStats::nowUs();
  // A send or recv frees the lane once issued, not once ended: two ranks
  // that each isend then irecv (a ring exchange, batch_isend_irecv) would
  // otherwise each wait for the other's recv behind its own send.
  const bool freesLaneAtIssue = isPointToPoint(op->kind);
  auto onDone = [context,
                 freesLaneAtIssue,
                 kind = op->kind,
                 bytes = op->bytes(),
                 writeBack = std::move(writeBack),
                 seq,
                 work = work,
                 startUs,
                 run](std::exception_ptr error) mutable {
    if (!error) {
      try {
        for (const auto& staged : writeBack) {
          at::Tensor callers = staged.callers;
          callers.copy_(staged.copy);
        }
      } catch (...) {
        error = std::current_exception();
      }
    }
    writeBack.clear(); // the copies go now; the caller's tensors stay with the Work
    if (error && isTimeout(error) && !context->dumped.exchange(true)) {
      dumpFlightRecorder(context->globalRank, work->description() + " timed out");
    }
    if (run == Run::Op) { // the device lane counts the op it checked
      context->stats.record(OpRecord{kind, bytes, startUs, LaneStats::nowUs(), !error});
    }
    {
      std::lock_guard<std::mutex> lock(context->mutex);
      context->unfinished.erase(seq);
    }
    work->complete(error);
    // Let go of the Work (and the tensors it holds) before starting the next
    // op: its caller, woken just now, is then the one to drop it.
    work.reset();
    if (!freesLaneAtIssue) {
      context->lane.done(); // may start the next op on this thread
    }
  };
  try {
    if (run == Run::OrderCheckOnly) {
      context->transport.checkOrder(op, seq, onDone);
    } else if (context->checkOrder && !freesLaneAtIssue) {
      // Point-to-point ops are not checked: ranks issue different ones
      // (a send here, its recv there) at the same place.
      context->transport.startChecked(op, seq, onDone);
    } else {
      context->transport.start(op, onDone);
    }
  } catch (...) {
    onDone(std::current_exception()); // the transport reports through onDone; this is a bug guard
  }
  if (freesLaneAtIssue) {
    context->lane.done();
  }
}

c10::intrusive_ptr<c10d::Work> PooledBackend::_allgather_base(
    at::Tensor& output,
    at::Tensor& input,
    const c10d::AllgatherOptions& /*opts*/) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = {input};
  op.outputs = {output};
  return submit(std::move(op), c10d::OpType::_ALLGATHER_BASE, "_allgather_base", "_all_gather_base");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& /*opts*/) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = inputs;
  op.outputs = outputs;
  // OpType::COALESCED, not the per-kind values torch 2.14 added, so the
  // same source builds against torch 2.11 to 2.15.
  return submit(std::move(op), c10d::OpType::COALESCED, "allgather_into_tensor_coalesced", "all_gather_into_tensor_coalesced");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::_reduce_scatter_base(
    at::Tensor& output,
    at::Tensor& input,
    const c10d::ReduceScatterOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.inputs = {input};
  op.outputs = {output};
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::_REDUCE_SCATTER_BASE, "_reduce_scatter_base", "_reduce_scatter_base");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.inputs = inputs;
  op.outputs = outputs;
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::COALESCED, "reduce_scatter_tensor_coalesced", "reduce_scatter_tensor_coalesced"); // see above
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allreduce(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::AllReduce;
  op.inputs = tensors;
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::ALLREDUCE, "allreduce", "all_reduce");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::broadcast(
    std::vector<at::Tensor>& tensors,
    const c10d::BroadcastOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::Broadcast;
  op.inputs = tensors;
  op.root = opts.rootRank;
  return submit(std::move(op), c10d::OpType::BROADCAST, "broadcast", "broadcast");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::barrier(
    const c10d::BarrierOptions& /*opts*/) {
  Collective op;
  op.kind = CollectiveKind::Barrier;
  return submit(std::move(op), c10d::OpType::BARRIER, "barrier", "barrier");
}

uint64_t PooledBackend::getSequenceNumberForGroup() {
  std::lock_guard<std::mutex> lock(mutex_);
  return nextSeq_;
}

c10::intrusive_ptr<c10d::Backend::Options> PooledBackend::getBackendOptions() {
  auto options = c10::make_intrusive<Options>(getBackendName());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    options->timeout = timeout_;
  }
  options->group_name = spec_.name;
  options->group_desc = spec_.description;
  options->global_ranks_in_group.assign(spec_.globalRanks.begin(), spec_.globalRanks.end());
  return options;
}

void PooledBackend::setTimeout(std::chrono::milliseconds timeout) {
  if (timeout < kShortestTimeout) {
    throw ConfigError(
        spec_.label() + ": set_timeout(" + std::to_string(timeout.count()) +
        " ms): a pooled group's timeout is at least " +
        std::to_string(kShortestTimeout.count()) + " ms");
  }
  std::lock_guard<std::mutex> serial(setTimeoutMutex_);
  std::shared_ptr<DeviceLane> lane;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    throwIfNotOpen();
    timeout_ = timeout;
    lane = deviceLane_;
  }
  context_->transport.setTimeout(timeout);
  if (lane) {
    lane->setTimeout(timeout);
  }
}

void PooledBackend::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Aborted) {
      return;
    }
    state_ = State::Aborted;
  }
  if (auto lane = deviceLane()) {
    lane->abort();
  }
  // Unstarted tasks are dropped; their works are failed below with the rest.
  context_->lane.abandon();
  const bool opInFlight = context_->lane.pending() > 0;
  auto comm = context_->transport.release();
  if (opInFlight && comm) {
    // Dropping gloo now would wait for the op in flight (up to its timeout);
    // abort() must not wait for peers, so a short-lived thread drops it.
    std::thread([comm = std::move(comm)]() mutable { comm.reset(); }).detach();
  }
  std::map<uint64_t, c10::intrusive_ptr<PooledWork>> unfinished;
  {
    std::lock_guard<std::mutex> lock(context_->mutex);
    unfinished.swap(context_->unfinished);
  }
  for (auto& [seq, work] : unfinished) {
    work->complete(std::make_exception_ptr(PoolClosedError(
        work->description() + " was failed by abort()")));
  }
}

void PooledBackend::shutdown() {
  close(/*wait=*/true);
}

void PooledBackend::close(bool wait) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == State::Open) {
      state_ = State::Closed;
    }
  }
  // After abort() the lane is abandoned: close() waits only for the op in
  // flight, which abort() already failed.
  const bool drain = isOpenOrClosed();
  bool handedOff = false;
  if (!wait && drain && context_->lane.pending() > 0) {
    // A destructor must not wait for queued ops (it may hold the GIL that an
    // op's callback needs): a short-lived thread drains and frees instead.
    try {
      std::thread([context = context_] {
        context->lane.close();
        context->transport.release();
      }).detach();
      handedOff = true;
    } catch (const std::system_error&) {
      // no thread to be had: drain here after all
    }
  }
  if (!handedOff) {
    if (drain) {
      context_->lane.close();
    }
    context_->transport.release(); // idle now: gloo joins its workers here
  }
  if (auto lane = deviceLane()) {
    if (wait) {
      lane->close(); // after abort() this only joins its watchdog
    } else {
      lane->release();
    }
  }
}

StatsSnapshot PooledBackend::stats() const {
  return context_->stats.snapshot();
}

std::vector<OpRecord> PooledBackend::trace() const {
  return context_->stats.trace();
}

size_t PooledBackend::pending() const {
  auto lane = deviceLane();
  return context_->lane.pending() + (lane ? lane->pending() : 0);
}

bool PooledBackend::isOpenOrClosed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_ != State::Aborted;
}

void PooledBackend::refuse(const char* op, const char* instead) const {
  throw UnsupportedOpError(spec_.label() + ": " + op + " is not supported on pooled groups; " + instead);
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allgather(
    std::vector<std::vector<at::Tensor>>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& /*opts*/) {
  if (outputs.size() != 1 || inputs.size() != 1) {
    throw TensorMismatchError(
        spec_.label() + ": all_gather takes one input and one list of outputs, got " +
        std::to_string(inputs.size()) + " inputs and " + std::to_string(outputs.size()) + " lists");
  }
  Collective op;
  op.kind = CollectiveKind::AllGatherList;
  op.inputs = inputs;
  op.outputs = outputs.front();
  return submit(std::move(op), c10d::OpType::ALLGATHER, "all_gather", "all_gather");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allgather_coalesced(
    std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&, const c10d::AllgatherOptions&) {
  refuse(
      "all_gather_coalesced (deprecated by torch)",
      "use all_gather_into_tensor in _coalescing_manager, or the base group");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceCoalescedOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::AllReduce;
  op.inputs = tensors;
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::ALLREDUCE_COALESCED, "allreduce_coalesced", "all_reduce_coalesced");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::allreduce_sparse(
    std::vector<at::Tensor>&, const c10d::AllreduceOptions&) {
  refuse("a sparse all_reduce", "they take dense tensors; issue it on the base group");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::reduce(
    std::vector<at::Tensor>& tensors,
    const c10d::ReduceOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::Reduce;
  op.inputs = tensors;
  op.root = opts.rootRank;
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::REDUCE, "reduce", "reduce");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::reduce_scatter(
    std::vector<at::Tensor>& outputs,
    std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  if (outputs.size() != 1 || inputs.size() != 1) {
    throw TensorMismatchError(
        spec_.label() + ": reduce_scatter takes one output and one list of inputs, got " +
        std::to_string(outputs.size()) + " outputs and " + std::to_string(inputs.size()) + " lists");
  }
  Collective op;
  op.kind = CollectiveKind::ReduceScatterList;
  op.inputs = inputs.front();
  op.outputs = outputs;
  setReduceOp(op, opts.reduceOp);
  return submit(std::move(op), c10d::OpType::REDUCE_SCATTER, "reduce_scatter", "reduce_scatter");
}

std::vector<at::Tensor> PooledBackend::rootsList(
    const std::vector<std::vector<at::Tensor>>& lists,
    const char* op,
    const char* what) const {
  if (lists.size() > 1) {
    throw TensorMismatchError(
        spec_.label() + ": " + op + " takes one list of " + what + " (on the root), got " +
        std::to_string(lists.size()));
  }
  return lists.empty() ? std::vector<at::Tensor>() : lists.front();
}

c10::intrusive_ptr<c10d::Work> PooledBackend::gather(
    std::vector<std::vector<at::Tensor>>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::GatherOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::Gather;
  op.inputs = inputs;
  op.outputs = rootsList(outputs, "gather", "outputs");
  op.root = opts.rootRank;
  return submit(std::move(op), c10d::OpType::GATHER, "gather", "gather");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::scatter(
    std::vector<at::Tensor>& outputs,
    std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ScatterOptions& opts) {
  Collective op;
  op.kind = CollectiveKind::Scatter;
  op.inputs = rootsList(inputs, "scatter", "inputs");
  op.outputs = outputs;
  op.root = opts.rootRank;
  return submit(std::move(op), c10d::OpType::SCATTER, "scatter", "scatter");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::alltoall(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllToAllOptions& /*opts*/) {
  Collective op;
  op.kind = CollectiveKind::AllToAllList;
  op.inputs = inputs;
  op.outputs = outputs;
  return submit(std::move(op), c10d::OpType::ALLTOALL, "all_to_all", "all_to_all");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::alltoall_base(
    at::Tensor& output,
    at::Tensor& input,
    std::vector<int64_t>& outputSplits,
    std::vector<int64_t>& inputSplits,
    const c10d::AllToAllOptions& /*opts*/) {
  Collective op;
  op.kind = CollectiveKind::AllToAll;
  op.inputs = {input};
  op.outputs = {output};
  op.inputSplits = inputSplits;
  op.outputSplits = outputSplits;
  // torch's NCCL backend's names: "all_to_allv" when splits are given.
  const bool even = inputSplits.empty() && outputSplits.empty();
  return submit(
      std::move(op), c10d::OpType::ALLTOALL_BASE, even ? "all_to_all" : "all_to_allv",
      even ? "all_to_all" : "all_to_allv");
}

bool PooledBackend::holdWhileCoalescing(const std::vector<at::Tensor>& tensors, const PointToPointPart& part) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!coalescing_) {
    return false;
  }
  for (const auto& t : tensors) {
    coalescing_->inputs.push_back(t);
    coalescing_->parts.push_back(part);
  }
  return true;
}

void PooledBackend::startCoalescing() {
  std::lock_guard<std::mutex> lock(mutex_);
  throwIfNotOpen();
  if (coalescing_) {
    throw UnsupportedOpError(
        spec_.label() + ": startCoalescing while a batch is open; batches "
        "(batch_isend_irecv, _coalescing_manager) do not nest");
  }
  coalescing_.emplace();
  coalescing_->kind = CollectiveKind::SendRecvBatch;
  coalescingOpen_.store(true);
}

c10::intrusive_ptr<c10d::Work> PooledBackend::endCoalescing() {
  Collective batch;
  c10::intrusive_ptr<c10d::Work> last;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!coalescing_) {
      throw UnsupportedOpError(spec_.label() + ": endCoalescing without startCoalescing");
    }
    batch = std::move(*coalescing_);
    coalescing_.reset();
    coalescingOpen_.store(false);
    last = std::move(lastWhileCoalescing_);
    lastWhileCoalescing_.reset();
  }
  if (batch.inputs.empty()) {
    return last;
  }
  return submit(std::move(batch), c10d::OpType::COALESCED, "coalesced", "coalesced");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::send(std::vector<at::Tensor>& tensors, int dstRank, int tag) {
  if (holdWhileCoalescing(tensors, PointToPointPart{true, dstRank, tag})) {
    return {};
  }
  Collective op;
  op.kind = CollectiveKind::Send;
  op.inputs = tensors;
  op.peer = dstRank;
  op.tag = tag;
  return submit(std::move(op), c10d::OpType::SEND, "send", "send");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) {
  if (holdWhileCoalescing(tensors, PointToPointPart{false, srcRank, tag})) {
    return {};
  }
  Collective op;
  op.kind = CollectiveKind::Recv;
  op.inputs = tensors;
  op.peer = srcRank;
  op.tag = tag;
  return submit(std::move(op), c10d::OpType::RECV, "recv", "recv");
}

c10::intrusive_ptr<c10d::Work> PooledBackend::recvAnysource(std::vector<at::Tensor>&, int) {
  refuse("recv from any source", "give recv its source (src= or group_src=)");
}

} // namespace pycomm
