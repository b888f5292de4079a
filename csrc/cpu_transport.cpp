#include "cpu_transport.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>

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

void CpuTransport::runOne(c10d::Backend& comm, Collective& op) const {
  switch (op.kind) {
    case CollectiveKind::AllGather:
      for (size_t i = 0; i < op.inputs.size(); ++i) {
        comm._allgather_base(op.outputs[i], op.inputs[i])->wait();
      }
      return;
    case CollectiveKind::ReduceScatter: {
      c10d::ReduceScatterOptions opts;
      opts.reduceOp = c10d::ReduceOp(op.reduceOp);
      for (size_t i = 0; i < op.inputs.size(); ++i) {
        comm._reduce_scatter_base(op.outputs[i], op.inputs[i], opts)->wait();
      }
      return;
    }
    case CollectiveKind::AllReduce: {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp(op.reduceOp);
      comm.allreduce(op.inputs, opts)->wait();
      return;
    }
    case CollectiveKind::Broadcast: {
      c10d::BroadcastOptions opts;
      opts.rootRank = op.root;
      comm.broadcast(op.inputs, opts)->wait();
      return;
    }
    case CollectiveKind::Barrier:
      comm.barrier(c10d::BarrierOptions())->wait();
      return;
  }
}

void CpuTransport::release() {
  std::lock_guard<std::mutex> lock(mutex_);
  comm_.reset();
}

void CpuTransport::run(Collective& op) const {
  c10::intrusive_ptr<c10d::Backend> comm;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    comm = comm_;
  }
  if (!comm) {
    throw PoolClosedError(label_ + ": " + op.describe() +
        " was issued after the communicator was released");
  }
  try {
    runOne(*comm, op);
  } catch (const PycommError&) {
    throw;
  } catch (const std::exception& e) {
    const std::string message =
        label_ + ": " + op.describe() + " failed: " + e.what();
    if (mentionsTimeout(e.what())) {
      throw CollectiveTimeoutError(message);
    }
    throw CollectiveError(message);
  }
}

void CpuTransport::checkOrder(const Collective& op, uint64_t seq) const {
  auto mine = at::zeros({kFieldCount}, at::kLong);
  auto* f = mine.data_ptr<int64_t>();
  f[kSeq] = static_cast<int64_t>(seq);
  f[kFingerprint] = static_cast<int64_t>(op.fingerprint());
  f[kKind] = static_cast<int64_t>(op.kind);
  f[kReduceOp] = static_cast<int64_t>(op.reduceOp);
  f[kDtype] = op.inputs.empty()
      ? -1
      : static_cast<int64_t>(op.inputs.front().scalar_type());
  int64_t numel = 0;
  for (const auto& t : op.inputs) {
    numel += t.numel();
  }
  f[kNumel] = numel;
  f[kTensorCount] = static_cast<int64_t>(op.inputs.size());
  if (op.inputs.empty()) {
    f[kDtype] = static_cast<int64_t>(at::kLong);
  }

  auto all = at::empty({size_ * kFieldCount}, at::kLong);
  Collective exchange;
  exchange.kind = CollectiveKind::AllGather;
  exchange.inputs = {mine};
  exchange.outputs = {all};
  run(exchange);

  const auto* everyone = all.data_ptr<int64_t>();
  for (int64_t r = 0; r < size_; ++r) {
    const int64_t* theirs = everyone + r * kFieldCount;
    if (theirs[kSeq] != f[kSeq] || theirs[kFingerprint] != f[kFingerprint]) {
      throw OrderMismatchError(
          label_ + ": ranks issued different ops at the same place of the "
          "lane: this rank (group rank " + std::to_string(rank_) +
          ") issued op #" + std::to_string(f[kSeq]) + " " + describeFields(f) +
          ", group rank " + std::to_string(r) + " issued op #" +
          std::to_string(theirs[kSeq]) + " " + describeFields(theirs) +
          ". Every rank must issue the same ops in the same order on each "
          "pooled group");
    }
  }
}

} // namespace pycomm
