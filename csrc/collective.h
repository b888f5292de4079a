#pragma once
// One collective as the pool sees it: what it is, on which tensors, and the
// checks every transport needs before it can run it.
//
// Thread-safety: a Collective is a value; validate() and the accessors are
// pure functions of it.
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace pycomm {

enum class CollectiveKind : uint8_t {
  AllGather = 0, // outputs[i] = concat over ranks of inputs[i]
  ReduceScatter = 1, // outputs[i] = this rank's slice of reduce(inputs[i])
  AllReduce = 2, // in place on inputs
  Broadcast = 3, // in place on inputs, from `root`
  Barrier = 4,
  // The rest of c10d's ops. Tensors, by kind ("list": one per group rank,
  // in group-rank order):
  AllGatherList = 5, // inputs {t}, outputs the list
  ReduceScatterList = 6, // inputs the list, outputs {t}
  Reduce = 7, // in place on inputs {t}; the result on `root` only
  Gather = 8, // inputs {t}; outputs the list on `root`, none elsewhere
  Scatter = 9, // inputs the list on `root`, none elsewhere; outputs {t}
  AllToAll = 10, // inputs {in}, outputs {out}, split by the splits (none: evenly)
  AllToAllList = 11, // inputs the list sent, outputs the list received
  Send = 12, // inputs {t} to group rank `peer`, matched by `tag`
  Recv = 13, // inputs {t}, written from group rank `peer`
  // The sends and recvs torch issued between startCoalescing and
  // endCoalescing (batch_isend_irecv): inputs[i] does what parts[i] says,
  // and all of them progress together, as one NCCL group.
  SendRecvBatch = 14,
};
constexpr size_t kCollectiveKindCount = 15;

const char* kindName(CollectiveKind kind);
// Send, Recv and SendRecvBatch: a lane issues them and goes on, as torch's
// backends do, so that two ranks' isend/irecv pairs meet whatever order
// each issued them in; their ranks issue different ops at the same place.
bool isPointToPoint(CollectiveKind kind);
// Send and Recv: one tensor, to or from `peer`.
bool isLonePointToPoint(CollectiveKind kind);
// Whether the kind takes a reduce op.
bool isReducing(CollectiveKind kind);
const char* reduceOpName(c10d::ReduceOp::RedOpType op);

// One send or recv of a SendRecvBatch.
struct PointToPointPart {
  bool send = true;
  int64_t peer = -1; // a group rank
  int64_t tag = 0;
};

struct Collective {
  CollectiveKind kind = CollectiveKind::Barrier;
  // AllGather/ReduceScatter: one output per input (several = the coalesced
  // form, run as one unit). AllReduce/Broadcast: in place, outputs empty.
  std::vector<at::Tensor> inputs;
  std::vector<at::Tensor> outputs;
  c10d::ReduceOp::RedOpType reduceOp = c10d::ReduceOp::SUM;
  // PREMUL_SUM's factor: each rank's input is multiplied by it, then the
  // products are summed (NCCL's ncclRedOpCreatePreMulSum). A number, or a
  // one-element tensor of the inputs' type on their device, read when the
  // op runs (NCCL's ncclScalarDevice).
  double premulScalar = 1.0;
  at::Tensor premulTensor;
  int64_t root = 0;
  // Send and Recv: the other rank (a group rank) and the tag both sides give.
  int64_t peer = -1;
  int64_t tag = 0;
  // SendRecvBatch: one per input.
  std::vector<PointToPointPart> parts;
  // AllToAll: dim-0 rows sent to / received from each rank; empty: evenly.
  std::vector<int64_t> inputSplits;
  std::vector<int64_t> outputSplits;
  // The name torch's NCCL backend gives the span of the entry point the
  // user called ("_reduce_scatter_base"), set only while a profiler
  // listens: the op's Work then spans it as "<transport>:<name>"
  // ("nccl:_reduce_scatter_base", the names HTA and Chakra's converter
  // know). A string literal.
  const char* spanName = nullptr;

  // Bytes the op moves as nccl-tests counts them: the full gathered size for
  // all-gather, the full input size for reduce-scatter, the buffer size for
  // all-reduce and broadcast.
  int64_t bytes() const;
  // "all_gather(2 x float32[1024] -> [4096])", for errors and traces.
  std::string describe() const;
  // What the op's Work returns: the outputs of a kind that has them, the
  // (in-place) inputs otherwise.
  const std::vector<at::Tensor>& results() const;
  // The tensors whose count, types and sizes every rank gives alike (a
  // scatter's root alone has inputs), for the order check.
  const std::vector<at::Tensor>& matchedTensors() const;
  // Whether no dense tensor of the op needs staging (stageNonContiguous).
  bool allContiguous() const;
  // The device type every tensor is on (CPU for a barrier).
  c10::DeviceType deviceType() const;
  // The first tensor of the op (a scatter's non-root ranks have only an
  // output); undefined for a barrier.
  const at::Tensor& firstTensor() const;
  // A number equal on all ranks exactly when they issue the same op with the
  // same shapes and dtypes, for the order check.
  uint64_t fingerprint() const;
  // "<transport>:<spanName>", the title of the op's profiler span.
  std::string profilingTitle(const char* transport) const;
};

// Sets `op`'s reduce op from torch's, with PREMUL_SUM's factor (torch's
// PreMulSumSupplement); UnsupportedOpError for a PREMUL_SUM without one.
void setReduceOp(Collective& op, const c10d::ReduceOp& reduceOp);

// A tensor of the caller's that an op runs on a contiguous copy of: the copy
// is written back to it when the op succeeds.
struct StagedTensor {
  at::Tensor callers;
  at::Tensor copy;
};

// Replaces each non-contiguous tensor of `op` by a contiguous copy (gloo
// groups take non-contiguous tensors; the lanes' transports do not); returns
// those the op writes, to be copied back. Sparse or undefined tensors stay
// for validate() to name.
std::vector<StagedTensor> stageNonContiguous(Collective& op);

// Throws TensorMismatchError or UnsupportedOpError, naming what was wrong and
// what is allowed. `groupSize` is the number of ranks in the group, `rank`
// this process's among them (a gather's or scatter's root has the list).
void validate(const Collective& op, int64_t groupSize, int64_t rank);

} // namespace pycomm
