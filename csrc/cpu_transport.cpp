#include "cpu_transport.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "errors.h"

namespace pycomm {

namespace {

bool mentionsTimeout(std::string message) {
  std::transform(message.begin(), message.end(), message.begin(), [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  });
  return message.find("timed out") != std::string::npos ||
      message.find("timeout") != std::string::npos;
}

// One gloo op of a pooled op and what must run on its result before the
// pooled op may complete (reduce-scatter: copy this rank's slice out).
struct Issued {
  c10::intrusive_ptr<c10d::Work> work;
  std::function<void()> finish;
};

// gloo has no PREMUL_SUM: it is run as NCCL defines it, each rank's input
// multiplied by the factor (premultiply()), then a SUM.
c10d::ReduceOp::RedOpType reduceOpForGloo(const Collective& op) {
  return op.reduceOp == c10d::ReduceOp::PREMUL_SUM ? c10d::ReduceOp::SUM : op.reduceOp;
}

void premultiply(at::Tensor& tensor, const Collective& op) {
  if (op.reduceOp != c10d::ReduceOp::PREMUL_SUM) {
    return;
  }
  if (op.premulTensor.defined()) {
    tensor.mul_(op.premulTensor);
  } else {
    tensor.mul_(op.premulScalar);
  }
}

// A reduce-scatter issued the way gloo runs its own (an all-reduce of a copy
// of the input, then this rank's slice), but as gloo's all-reduce, whose Work
// completes through a future on gloo's worker: gloo's reduce-scatter Work has
// no future and would need a thread of ours to observe it. The op's tensors
// are contiguous and of one dtype here (staged and validated), so the copy in
// and the slice out are plain memcpys: through clone() and a
// view/narrow/copy_ chain each would cost a round of dispatcher calls per op.
Issued issueReduceScatter(
    c10d::Backend& comm,
    const at::Tensor& input,
    const at::Tensor& output,
    const Collective& op,
    int64_t rank) {
  at::Tensor buffer = at::empty({input.numel()}, input.options());
  const size_t inputBytes = input.nbytes();
  if (inputBytes > 0) {
    std::memcpy(buffer.data_ptr(), input.const_data_ptr(), inputBytes);
  }
  premultiply(buffer, op); // the copy: the caller's input stays as it was
  std::vector<at::Tensor> buffers = {buffer};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(reduceOpForGloo(op));
  Issued issued{comm.allreduce(buffers, opts), nullptr};
  issued.finish = [reduced = std::move(buffer), output, rank]() mutable {
    const size_t sliceBytes = output.nbytes();
    if (sliceBytes > 0) {
      std::memcpy(
          output.data_ptr(),
          static_cast<const char*>(reduced.const_data_ptr()) + rank * sliceBytes,
          sliceBytes);
    }
  };
  return issued;
}

// The all-gather as gloo takes it. gloo wants the output shaped as the
// inputs stacked along dim 0 (ProcessGroupGloo's _allgather_base checks each
// chunk's shape), where torch's NCCL backend only checks element counts:
// shapes that agree in size alone, and 0-dim inputs, go to gloo flattened
// (both tensors are contiguous here, so the views cost no copy). Shapes gloo
// takes as they are skip the two dispatcher calls.
Issued issueAllGather(c10d::Backend& comm, at::Tensor& input, at::Tensor& output) {
  const auto in = input.sizes();
  const auto out = output.sizes();
  const bool stacked = !in.empty() && out.size() == in.size() &&
      out[0] == in[0] * comm.getSize() &&
      std::equal(in.begin() + 1, in.end(), out.begin() + 1);
  if (stacked) {
    return {comm._allgather_base(output, input), nullptr};
  }
  at::Tensor flatInput = input.view({-1});
  at::Tensor flatOutput = output.view({-1});
  return {comm._allgather_base(flatOutput, flatInput), nullptr};
}

// A reduce issued on a premultiplied copy of the tensor (PREMUL_SUM, which
// gloo lacks): the root's tensor takes the result, the others stay as they
// were, as with NCCL's out-of-place reduce.
Issued issuePremulReduce(c10d::Backend& comm, const Collective& op, int64_t rank) {
  const at::Tensor& tensor = op.inputs.front();
  at::Tensor buffer = tensor.clone();
  premultiply(buffer, op);
  std::vector<at::Tensor> buffers = {buffer};
  c10d::ReduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  opts.rootRank = op.root;
  Issued issued{comm.reduce(buffers, opts), nullptr};
  if (rank == op.root) {
    issued.finish = [reduced = std::move(buffer), tensor]() mutable { tensor.copy_(reduced); };
  }
  return issued;
}

// A list all-to-all as gloo's split all-to-all of the lists laid end to end:
// gloo's own list form takes only tensors of one size, torch's NCCL backend
// any sizes. Only bytes move, so the result is the same.
Issued issueAllToAllList(c10d::Backend& comm, const Collective& op) {
  std::vector<at::Tensor> flatInputs;
  std::vector<int64_t> inputSplits;
  std::vector<int64_t> outputSplits;
  for (const auto& t : op.inputs) {
    flatInputs.push_back(t.reshape({-1}));
    inputSplits.push_back(t.numel());
  }
  int64_t received = 0;
  for (const auto& t : op.outputs) {
    outputSplits.push_back(t.numel());
    received += t.numel();
  }
  at::Tensor input = at::cat(flatInputs);
  at::Tensor output = at::empty({received}, input.options());
  Issued issued{
      comm.alltoall_base(output, input, outputSplits, inputSplits, c10d::AllToAllOptions()),
      nullptr};
  issued.finish = [output, outputs = op.outputs]() mutable {
    int64_t offset = 0;
    for (auto& t : outputs) {
      t.view({-1}).copy_(output.narrow(0, offset, t.numel()));
      offset += t.numel();
    }
  };
  return issued;
}

// Issues the gloo ops that make up `op` (several for the coalesced forms).
// Group ranks (roots, peers) are the gloo communicator's own ranks: it spans
// exactly the pooled group.
std::vector<Issued> issue(c10d::Backend& comm, Collective& op, int64_t rank) {
  std::vector<Issued> issued;
  switch (op.kind) {
    case CollectiveKind::AllGather:
      for (size_t i = 0; i < op.inputs.size(); ++i) {
        issued.push_back(issueAllGather(comm, op.inputs[i], op.outputs[i]));
      }
      break;
    case CollectiveKind::ReduceScatter:
      for (size_t i = 0; i < op.inputs.size(); ++i) {
        issued.push_back(issueReduceScatter(comm, op.inputs[i], op.outputs[i], op, rank));
      }
      break;
    case CollectiveKind::AllReduce: {
      for (auto& tensor : op.inputs) {
        premultiply(tensor, op); // in place: the all-reduce's result replaces it
      }
      if (op.inputs.size() > 1) {
        // gloo's all-reduce of several tensors sums them together (one per
        // device); the coalesced form reduces each across ranks.
        c10d::AllreduceCoalescedOptions opts;
        opts.reduceOp = c10d::ReduceOp(reduceOpForGloo(op));
        issued.push_back({comm.allreduce_coalesced(op.inputs, opts), nullptr});
        break;
      }
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp(reduceOpForGloo(op));
      issued.push_back({comm.allreduce(op.inputs, opts), nullptr});
      break;
    }
    case CollectiveKind::Broadcast: {
      c10d::BroadcastOptions opts;
      opts.rootRank = op.root;
      issued.push_back({comm.broadcast(op.inputs, opts), nullptr});
      break;
    }
    case CollectiveKind::Barrier:
      issued.push_back({comm.barrier(c10d::BarrierOptions()), nullptr});
      break;
    case CollectiveKind::AllGatherList: {
      std::vector<std::vector<at::Tensor>> outputs = {op.outputs};
      issued.push_back({comm.allgather(outputs, op.inputs, c10d::AllgatherOptions()), nullptr});
      break;
    }
    case CollectiveKind::ReduceScatterList: {
      // gloo's own list reduce-scatter (its sum order, so results equal a
      // plain group's bit for bit), on premultiplied copies for PREMUL_SUM.
      std::vector<at::Tensor> inputs = op.inputs;
      if (op.reduceOp == c10d::ReduceOp::PREMUL_SUM) {
        for (auto& t : inputs) {
          t = t.clone();
          premultiply(t, op);
        }
      }
      std::vector<std::vector<at::Tensor>> lists = {inputs};
      c10d::ReduceScatterOptions opts;
      opts.reduceOp = c10d::ReduceOp(reduceOpForGloo(op));
      issued.push_back({comm.reduce_scatter(op.outputs, lists, opts), nullptr});
      break;
    }
    case CollectiveKind::Reduce: {
      if (op.reduceOp == c10d::ReduceOp::PREMUL_SUM) {
        issued.push_back(issuePremulReduce(comm, op, rank));
        break;
      }
      c10d::ReduceOptions opts;
      opts.reduceOp = c10d::ReduceOp(op.reduceOp);
      opts.rootRank = op.root;
      issued.push_back({comm.reduce(op.inputs, opts), nullptr});
      break;
    }
    case CollectiveKind::Gather: {
      c10d::GatherOptions opts;
      opts.rootRank = op.root;
      std::vector<std::vector<at::Tensor>> outputs;
      if (rank == op.root) {
        outputs.push_back(op.outputs);
      }
      issued.push_back({comm.gather(outputs, op.inputs, opts), nullptr});
      break;
    }
    case CollectiveKind::Scatter: {
      c10d::ScatterOptions opts;
      opts.rootRank = op.root;
      std::vector<std::vector<at::Tensor>> inputs;
      if (rank == op.root) {
        inputs.push_back(op.inputs);
      }
      issued.push_back({comm.scatter(op.outputs, inputs, opts), nullptr});
      break;
    }
    case CollectiveKind::AllToAll:
      issued.push_back(
          {comm.alltoall_base(
               op.outputs.front(), op.inputs.front(), op.outputSplits, op.inputSplits,
               c10d::AllToAllOptions()),
           nullptr});
      break;
    case CollectiveKind::AllToAllList:
      issued.push_back(issueAllToAllList(comm, op));
      break;
    case CollectiveKind::Send:
      issued.push_back(
          {comm.send(op.inputs, static_cast<int>(op.peer), static_cast<int>(op.tag)), nullptr});
      break;
    case CollectiveKind::Recv:
      issued.push_back(
          {comm.recv(op.inputs, static_cast<int>(op.peer), static_cast<int>(op.tag)), nullptr});
      break;
    case CollectiveKind::SendRecvBatch:
      // gloo's sends and recvs already progress together once issued.
      for (size_t i = 0; i < op.parts.size(); ++i) {
        std::vector<at::Tensor> one{op.inputs[i]};
        const PointToPointPart& part = op.parts[i];
        const int peer = static_cast<int>(part.peer);
        const int tag = static_cast<int>(part.tag);
        issued.push_back({part.send ? comm.send(one, peer, tag) : comm.recv(one, peer, tag), nullptr});
      }
      break;
  }
  return issued;
}

// Counts the gloo works of one op down to zero; the last one reports.
struct Completion {
  Completion(size_t count, CpuTransport::OnDone onDone)
      : remaining(count), onDone(std::move(onDone)) {}
  void finishOne(std::exception_ptr error) {
    if (error) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!firstError) {
        firstError = error;
      }
    }
    if (remaining.fetch_sub(1) == 1) {
      onDone(firstError);
    }
  }
  std::atomic<size_t> remaining;
  std::mutex mutex;
  std::exception_ptr firstError;
  CpuTransport::OnDone onDone;
};

// What the order check exchanges per rank; decodable, so a mismatch can name
// the other rank's op.
enum OrderField : int64_t {
  kSeq = 0,
  kFingerprint,
  kKind,
  kReduceOp,
  kDtype,
  kNumel,
  kTensorCount,
  kFieldCount
};

std::string describeFields(const int64_t* f) {
  auto kind = static_cast<CollectiveKind>(f[kKind]);
  std::string text = std::string(kindName(kind)) + "(" +
      std::to_string(f[kTensorCount]) + " x " +
      c10::toString(static_cast<at::ScalarType>(f[kDtype])) + ", " +
      std::to_string(f[kNumel]) + " elements";
  if (kind == CollectiveKind::ReduceScatter ||
      kind == CollectiveKind::AllReduce) {
    text += std::string(", ") +
        reduceOpName(static_cast<c10d::ReduceOp::RedOpType>(f[kReduceOp]));
  }
  return text + ")";
}

at::Tensor orderFields(const Collective& op, uint64_t seq) {
  auto mine = at::zeros({kFieldCount}, at::kLong);
  auto* f = mine.data_ptr<int64_t>();
  f[kSeq] = static_cast<int64_t>(seq);
  f[kFingerprint] = static_cast<int64_t>(op.fingerprint());
  f[kKind] = static_cast<int64_t>(op.kind);
  f[kReduceOp] = static_cast<int64_t>(op.reduceOp);
  const auto& matched = op.matchedTensors();
  f[kDtype] = static_cast<int64_t>(matched.empty() ? at::kLong : matched.front().scalar_type());
  for (const auto& t : matched) {
    f[kNumel] += t.numel();
  }
  f[kTensorCount] = static_cast<int64_t>(matched.size());
  return mine;
}

} // namespace

CpuTransport::CpuTransport(
    c10::intrusive_ptr<c10d::Backend> comm,
    std::string label,
    int64_t rank,
    int64_t size)
    : comm_(std::move(comm)), label_(std::move(label)), rank_(rank), size_(size) {
  if (!comm_) {
    throw CollectiveError(label_ + ": no CPU communicator was given");
  }
}

void CpuTransport::setTimeout(std::chrono::milliseconds timeout) const {
  CommInUse guard(*this);
  if (guard.comm) {
    guard.comm->setTimeout(timeout);
  }
}

CpuTransport::CommInUse::CommInUse(const CpuTransport& transport)
    : transport_(transport) {
  std::lock_guard<std::mutex> lock(transport_.mutex_);
  comm = transport_.comm_;
  if (comm) {
    ++transport_.commUsers_;
  }
}

CpuTransport::CommInUse::~CommInUse() {
  if (!comm) {
    return;
  }
  // Dropped before the count: release() returns only once this reference
  // is gone.
  comm.reset();
  // Notified under the lock: once release() sees the count at 0 it may
  // return and the transport go.
  std::lock_guard<std::mutex> lock(transport_.mutex_);
  --transport_.commUsers_;
  transport_.commUsersGone_.notify_all();
}

c10::intrusive_ptr<c10d::Backend> CpuTransport::release() {
  std::unique_ptr<Waiter> waiter;
  std::vector<std::unique_ptr<Waiter>> pointToPointWaiters;
  c10::intrusive_ptr<c10d::Backend> comm;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    comm.swap(comm_);
    waiter.swap(waiter_);
    pointToPointWaiters.swap(pointToPointWaiters_);
    // Issuing never waits for peers (gloo queues the op), so this is short.
    commUsersGone_.wait(lock, [this] { return commUsers_ == 0; });
  }
  // The waiters are destroyed outside the lock: each joins its thread when
  // nothing is watched.
  return comm;
}

std::string CpuTransport::OpName::text() const {
  auto named = op.lock();
  return prefix + (named ? named->describe() : std::string("an op")) + suffix;
}

std::exception_ptr CpuTransport::describedError(
    const OpName& name,
    std::exception_ptr error) const {
  try {
    std::rethrow_exception(error);
  } catch (const PycommError&) {
    return error;
  } catch (...) {
  }
  const std::string gloo = messageOf(error);
  const std::string message = label_ + ": " + name.text() + " failed: " + gloo;
  if (mentionsTimeout(gloo)) {
    return std::make_exception_ptr(CollectiveTimeoutError(message));
  }
  return std::make_exception_ptr(CollectiveError(message));
}

void CpuTransport::start(std::shared_ptr<Collective> op, OnDone onDone) const {
  OpName name{op, "", ""};
  startNamed(std::move(op), std::move(name), std::move(onDone));
}

void CpuTransport::startNamed(
    std::shared_ptr<Collective> op,
    OpName name,
    OnDone onDone) const {
  std::vector<Issued> issued;
  std::exception_ptr issueError;
  bool released = false;
  {
    // This thread is often a gloo worker (the lane starts an op from the
    // completion of the one before). Its reference to the communicator ends
    // with this block, before any callback runs, and release() waits for
    // the block to end: gloo's last reference is then never dropped here,
    // where ~ProcessGroupGloo would join this very thread and abort the
    // process ("Resource deadlock avoided").
    CommInUse guard(*this);
    if (!guard.comm) {
      released = true;
    } else {
      try {
        issued = issue(*guard.comm, *op, rank_);
      } catch (...) {
        // Some of the op's parts may be in flight; they finish on their own.
        issueError = std::current_exception();
      }
    }
  }
  if (released) {
    onDone(std::make_exception_ptr(PoolClosedError(
        label_ + ": " + name.text() +
        " was issued after the communicator was released")));
    return;
  }
  if (issueError) {
    onDone(describedError(name, issueError));
    return;
  }
  // The closures below die on a gloo worker after the op completed. They
  // hold no reference to `comm` (dropping gloo's last one there would make
  // it join itself) and none to the op's tensors past its completion: the
  // caller holds those through its Work, and a tensor Python also holds,
  // dropped on a gloo worker, would take the GIL there.
  auto completion = std::make_shared<Completion>(
      issued.size(),
      [this, name = std::move(name), onDone = std::move(onDone)](std::exception_ptr error) {
        onDone(error ? describedError(name, error) : nullptr);
      });
  for (auto& part : issued) {
    whenDone(
        part.work,
        op->kind,
        [completion, finish = std::move(part.finish)](std::exception_ptr error) mutable {
          if (!error && finish) {
            try {
              finish();
            } catch (...) {
              error = std::current_exception();
            }
          }
          finish = nullptr;
          completion->finishOne(error);
        });
  }
}

void CpuTransport::whenDone(
    const c10::intrusive_ptr<c10d::Work>& work,
    CollectiveKind kind,
    std::function<void(std::exception_ptr)> onEnd) const {
  const uint32_t bit = 1u << static_cast<uint32_t>(kind);
  if (!(kindsWithoutFuture_.load() & bit)) {
    c10::intrusive_ptr<c10::ivalue::Future> future;
    try {
      future = work->getFuture();
    } catch (const std::exception&) {
      kindsWithoutFuture_.fetch_or(bit);
    }
    if (future) {
      future->addCallback([onEnd = std::move(onEnd)](c10::ivalue::Future& f) {
        onEnd(f.hasError() ? f.exception_ptr() : nullptr);
      });
      return;
    }
  }
  Waiter* waiter = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (isPointToPoint(kind)) {
      for (const auto& candidate : pointToPointWaiters_) {
        if (candidate->idle()) {
          waiter = candidate.get(); // the lane issues one op at a time: nobody else takes it
          break;
        }
      }
      if (waiter == nullptr) {
        pointToPointWaiters_.push_back(std::make_unique<Waiter>("pycomm-p2p"));
        waiter = pointToPointWaiters_.back().get();
      }
    } else {
      if (!waiter_) {
        waiter_ = std::make_unique<Waiter>("pycomm-wait");
      }
      waiter = waiter_.get();
    }
  }
  waiter->watch(work, std::move(onEnd));
}

void CpuTransport::startChecked(
    std::shared_ptr<Collective> op,
    uint64_t seq,
    OnDone onDone) const {
  checkOrder(op, seq, [this, op, onDone](std::exception_ptr error) {
    if (error) {
      onDone(error);
      return;
    }
    start(op, onDone);
  });
}

void CpuTransport::checkOrder(
    std::shared_ptr<Collective> op,
    uint64_t seq,
    OnDone onDone) const {
  auto exchange = std::make_shared<Collective>();
  exchange->kind = CollectiveKind::AllGather;
  exchange->inputs = {orderFields(*op, seq)};
  exchange->outputs = {at::empty({size_ * kFieldCount}, at::kLong)};
  startNamed(
      exchange,
      OpName{op, "the order check of ", " (op #" + std::to_string(seq) + ")"},
      [this, exchange, op, onDone](std::exception_ptr error) {
    if (error) {
      onDone(error);
      return;
    }
    const auto* mine = exchange->inputs.front().data_ptr<int64_t>();
    const auto* everyone = exchange->outputs.front().data_ptr<int64_t>();
    for (int64_t r = 0; r < size_; ++r) {
      const int64_t* theirs = everyone + r * kFieldCount;
      if (theirs[kSeq] != mine[kSeq] ||
          theirs[kFingerprint] != mine[kFingerprint]) {
        onDone(std::make_exception_ptr(OrderMismatchError(
            label_ + ": ranks issued different ops at the same place of the "
            "lane: this rank (group rank " + std::to_string(rank_) +
            ") issued op #" + std::to_string(mine[kSeq]) + " " +
            describeFields(mine) + ", group rank " + std::to_string(r) +
            " issued op #" + std::to_string(theirs[kSeq]) + " " +
            describeFields(theirs) +
            ". Every rank must issue the same ops in the same order on each "
            "pooled group")));
        return;
      }
    }
    onDone(nullptr);
  });
}

} // namespace pycomm
