#include "collective.h"

#include <sstream>

#include "errors.h"

namespace pycomm {

const char* kindName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::AllGather:
      return "all_gather";
    case CollectiveKind::ReduceScatter:
      return "reduce_scatter";
    case CollectiveKind::AllReduce:
      return "all_reduce";
    case CollectiveKind::Broadcast:
      return "broadcast";
    case CollectiveKind::Barrier:
      return "barrier";
    case CollectiveKind::AllGatherList:
      return "all_gather_list";
    case CollectiveKind::ReduceScatterList:
      return "reduce_scatter_list";
    case CollectiveKind::Reduce:
      return "reduce";
    case CollectiveKind::Gather:
      return "gather";
    case CollectiveKind::Scatter:
      return "scatter";
    case CollectiveKind::AllToAll:
      return "all_to_all_single";
    case CollectiveKind::AllToAllList:
      return "all_to_all";
    case CollectiveKind::Send:
      return "send";
    case CollectiveKind::Recv:
      return "recv";
    case CollectiveKind::SendRecvBatch:
      return "batch_isend_irecv";
  }
  return "unknown";
}

bool isPointToPoint(CollectiveKind kind) {
  return isLonePointToPoint(kind) || kind == CollectiveKind::SendRecvBatch;
}

bool isLonePointToPoint(CollectiveKind kind) {
  return kind == CollectiveKind::Send || kind == CollectiveKind::Recv;
}

bool isReducing(CollectiveKind kind) {
  return kind == CollectiveKind::ReduceScatter || kind == CollectiveKind::AllReduce ||
      kind == CollectiveKind::ReduceScatterList || kind == CollectiveKind::Reduce;
}

const char* reduceOpName(c10d::ReduceOp::RedOpType op) {
  switch (op) {
    case c10d::ReduceOp::SUM:
      return "SUM";
    case c10d::ReduceOp::AVG:
      return "AVG";
    case c10d::ReduceOp::PRODUCT:
      return "PRODUCT";
    case c10d::ReduceOp::MIN:
      return "MIN";
    case c10d::ReduceOp::MAX:
      return "MAX";
    case c10d::ReduceOp::BAND:
      return "BAND";
    case c10d::ReduceOp::BOR:
      return "BOR";
    case c10d::ReduceOp::BXOR:
      return "BXOR";
    case c10d::ReduceOp::PREMUL_SUM:
      return "PREMUL_SUM";
    default:
      return "UNKNOWN";
  }
}

namespace {

std::string shapeOf(const at::Tensor& t) {
  std::ostringstream out;
  out << c10::toString(t.scalar_type()) << "[" << t.numel() << "]";
  return out.str();
}

void checkReduceOp(const Collective& op) {
  switch (op.reduceOp) {
    case c10d::ReduceOp::SUM:
      return;
    case c10d::ReduceOp::PRODUCT:
    case c10d::ReduceOp::MIN:
    case c10d::ReduceOp::MAX:
      // Complex numbers have no order, and torch refuses their products
      // too (distributed_c10d.supports_complex denies MAX, MIN, PRODUCT
      // and the bitwise ops, for every backend).
      for (const auto& t : op.inputs) {
        if (at::isComplexType(t.scalar_type())) {
          throw UnsupportedOpError(
              std::string(kindName(op.kind)) + " with " +
              reduceOpName(op.reduceOp) + " does not support complex tensors, got " +
              shapeOf(t) + "; only SUM and AVG reduce complex numbers");
        }
      }
      return;
    case c10d::ReduceOp::PREMUL_SUM:
      // The types ProcessGroupNCCL takes a PREMUL_SUM for (getNcclReduceOp:
      // "PreMulSum Data type must be half, float, bfloat16 or double").
      for (const auto& t : op.inputs) {
        const auto type = t.scalar_type();
        if (type != at::kHalf && type != at::kFloat && type != at::kBFloat16 &&
            type != at::kDouble) {
          throw UnsupportedOpError(
              std::string(kindName(op.kind)) + " with PREMUL_SUM needs a half, "
              "float, bfloat16 or double tensor, got " + shapeOf(t));
        }
        const at::Tensor& factor = op.premulTensor;
        if (factor.defined() &&
            (factor.numel() != 1 || factor.scalar_type() != type ||
             factor.device() != t.device())) {
          throw UnsupportedOpError(
              std::string(kindName(op.kind)) + " with PREMUL_SUM: its factor "
              "tensor must have one element of the input's type on its device, "
              "got " + shapeOf(factor) + " on " + factor.device().str() + " for " +
              shapeOf(t) + " on " + t.device().str());
        }
      }
      return;
    case c10d::ReduceOp::BAND:
    case c10d::ReduceOp::BOR:
    case c10d::ReduceOp::BXOR:
      // gloo's bitwise reductions exist for integer types only (and bool);
      // NCCL has none, and the NCCL lane names that.
      for (const auto& t : op.inputs) {
        if (!at::isIntegralType(t.scalar_type(), /*includeBool=*/true)) {
          throw UnsupportedOpError(
              std::string(kindName(op.kind)) + " with " + reduceOpName(op.reduceOp) +
              " needs an integer or bool tensor, got " + shapeOf(t));
        }
      }
      return;
    case c10d::ReduceOp::AVG:
      for (const auto& t : op.inputs) {
        // An integer average would need a rounding rule torch does not
        // define; complex numbers average part by part, as gloo does.
        if (!at::isFloatingType(t.scalar_type()) &&
            !at::isComplexType(t.scalar_type())) {
          throw UnsupportedOpError(
              std::string(kindName(op.kind)) + " with AVG needs a floating "
              "point or complex tensor, got " + shapeOf(t) +
              "; use SUM and divide for integer tensors");
        }
      }
      return;
    default:
      throw UnsupportedOpError(
          std::string(kindName(op.kind)) + " does not support reduce op " +
          reduceOpName(op.reduceOp) +
          "; supported: SUM, AVG, PRODUCT, MIN, MAX, PREMUL_SUM");
  }
}

void checkTensor(const Collective& op, const at::Tensor& t, const char* what) {
  if (!t.defined()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + ": " + what + " tensor is undefined");
  }
  if (t.is_sparse()) { // before is_contiguous(), which sparse tensors lack
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + ": " + what +
        " tensor is sparse; only dense tensors are supported");
  }
  if (!t.is_contiguous()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + ": " + what + " tensor " +
        shapeOf(t) + " is not contiguous; pass a contiguous tensor "
        "(tensor.contiguous())");
  }
}

void checkSameKind(const Collective& op, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + ": dtypes differ, input " +
        shapeOf(a) + " vs output " + shapeOf(b) +
        "; input and output must have the same dtype");
  }
  if (a.device() != b.device()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + ": devices differ, input on " +
        a.device().str() + " vs output on " + b.device().str() +
        "; input and output must be on the same device");
  }
}

} // namespace

namespace {
bool hasOutputs(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::AllGather:
    case CollectiveKind::ReduceScatter:
    case CollectiveKind::AllGatherList:
    case CollectiveKind::ReduceScatterList:
    case CollectiveKind::Gather:
    case CollectiveKind::Scatter:
    case CollectiveKind::AllToAll:
    case CollectiveKind::AllToAllList:
      return true;
    default:
      return false;
  }
}

bool hasRoot(CollectiveKind kind) {
  return kind == CollectiveKind::Broadcast || kind == CollectiveKind::Reduce ||
      kind == CollectiveKind::Gather || kind == CollectiveKind::Scatter;
}
} // namespace

const std::vector<at::Tensor>& Collective::results() const {
  return hasOutputs(kind) ? outputs : inputs;
}

const std::vector<at::Tensor>& Collective::matchedTensors() const {
  return kind == CollectiveKind::Scatter ? outputs : inputs;
}

const at::Tensor& Collective::firstTensor() const {
  static const at::Tensor kNone;
  if (!inputs.empty()) {
    return inputs.front();
  }
  return outputs.empty() ? kNone : outputs.front();
}

int64_t Collective::bytes() const {
  int64_t total = 0;
  const bool countsOutputs = kind == CollectiveKind::AllGather ||
      kind == CollectiveKind::AllGatherList || kind == CollectiveKind::Scatter;
  for (const auto& t : countsOutputs ? outputs : inputs) {
    total += t.numel() * t.element_size();
  }
  return total;
}

std::string Collective::describe() const {
  std::ostringstream out;
  out << kindName(kind) << "(";
  const bool pairs = kind == CollectiveKind::AllGather || kind == CollectiveKind::ReduceScatter;
  for (size_t i = 0; i < inputs.size(); ++i) {
    out << (i ? ", " : "") << shapeOf(inputs[i]);
    if (pairs && i < outputs.size()) {
      out << "->[" << outputs[i].numel() << "]";
    }
  }
  if (!pairs && !outputs.empty()) {
    out << (inputs.empty() ? "-> " : " -> ");
    for (size_t i = 0; i < outputs.size(); ++i) {
      out << (i ? ", " : "") << shapeOf(outputs[i]);
    }
  }
  if (isReducing(kind)) {
    out << ", " << reduceOpName(reduceOp);
  }
  if (hasRoot(kind)) {
    out << ", root=" << root;
  }
  if (isLonePointToPoint(kind)) {
    out << (kind == CollectiveKind::Send ? ", to=" : ", from=") << peer << ", tag=" << tag;
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    out << (i ? " " : ": ") << (parts[i].send ? "to=" : "from=") << parts[i].peer;
  }
  out << ")";
  return out.str();
}

namespace {
// Sparse or undefined tensors are left for validate() to name.
bool needsStaging(const at::Tensor& t) {
  return t.defined() && !t.is_sparse() && !t.is_contiguous();
}
} // namespace

bool Collective::allContiguous() const {
  for (const auto* tensors : {&inputs, &outputs}) {
    for (const auto& t : *tensors) {
      if (needsStaging(t)) {
        return false;
      }
    }
  }
  return true;
}

c10::DeviceType Collective::deviceType() const {
  const at::Tensor& first = firstTensor();
  return first.defined() ? first.device().type() : c10::DeviceType::CPU;
}

uint64_t Collective::fingerprint() const {
  // FNV-1a over the fields that must agree across ranks.
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xff;
      h *= 1099511628211ULL;
    }
  };
  mix(static_cast<uint64_t>(kind));
  mix(static_cast<uint64_t>(reduceOp));
  mix(static_cast<uint64_t>(root));
  // An all-to-all's sizes differ by rank when its splits do.
  const bool sizesAgree = kind != CollectiveKind::AllToAll && kind != CollectiveKind::AllToAllList;
  for (const auto& t : matchedTensors()) {
    mix(static_cast<uint64_t>(t.scalar_type()));
    mix(static_cast<uint64_t>(sizesAgree ? t.numel() : 0));
  }
  return h;
}

std::vector<StagedTensor> stageNonContiguous(Collective& op) {
  std::vector<StagedTensor> writeBack;
  auto stage = [](at::Tensor& t) {
    if (needsStaging(t)) {
      t = t.contiguous();
      return true;
    }
    return false;
  };
  const bool inPlace = !hasOutputs(op.kind);
  for (auto& t : op.inputs) {
    at::Tensor callers = t;
    if (stage(t) && inPlace) {
      writeBack.push_back({callers, t});
    }
  }
  for (auto& t : op.outputs) {
    at::Tensor callers = t;
    if (stage(t)) {
      writeBack.push_back({callers, t});
    }
  }
  return writeBack;
}

namespace {

std::string opName(const Collective& op) {
  return kindName(op.kind);
}

void expectCount(const Collective& op, const std::vector<at::Tensor>& tensors, size_t count, const char* what) {
  if (tensors.size() != count) {
    throw TensorMismatchError(
        opName(op) + " takes " + std::to_string(count) + " " + what + " tensor" +
        (count == 1 ? "" : "s") + " here, got " + std::to_string(tensors.size()));
  }
}

// Every tensor of `list` has `model`'s type and element count.
void expectLike(const Collective& op, const std::vector<at::Tensor>& list, const at::Tensor& model, const char* what) {
  for (size_t i = 0; i < list.size(); ++i) {
    checkSameKind(op, model, list[i]);
    if (list[i].numel() != model.numel()) {
      throw TensorMismatchError(
          opName(op) + ": " + what + " " + std::to_string(i) + " has " +
          std::to_string(list[i].numel()) + " elements, expected " +
          std::to_string(model.numel()) + "; every tensor of the list has the size of the other side's");
    }
  }
}

void checkRank(const Collective& op, int64_t value, int64_t groupSize, const char* what) {
  if (value < 0 || value >= groupSize) {
    throw TensorMismatchError(
        opName(op) + ": " + what + " " + std::to_string(value) +
        " is not a rank of this group (0.." + std::to_string(groupSize - 1) + ")");
  }
}

void checkSplits(const Collective& op, const std::vector<int64_t>& splits, const at::Tensor& t, int64_t groupSize, const char* what) {
  const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
  if (splits.empty()) {
    if (rows % groupSize != 0) {
      throw TensorMismatchError(
          opName(op) + ": the " + what + " has " + std::to_string(rows) +
          " rows, which the " + std::to_string(groupSize) +
          " ranks cannot share evenly; give split sizes");
    }
    return;
  }
  int64_t total = 0;
  for (int64_t rowsOfRank : splits) {
    if (rowsOfRank < 0) {
      throw TensorMismatchError(opName(op) + ": a " + what + " split size is negative");
    }
    total += rowsOfRank;
  }
  if (static_cast<int64_t>(splits.size()) != groupSize || total != rows) {
    throw TensorMismatchError(
        opName(op) + ": " + std::to_string(splits.size()) + " " + what +
        " split sizes summing to " + std::to_string(total) + ", expected " +
        std::to_string(groupSize) + " summing to the " + what + "'s " +
        std::to_string(rows) + " rows");
  }
}

// A gather's or scatter's sides: `one` tensor on every rank, and `list`,
// which only the root holds (`listCount` tensors here).
void checkRootedList(
    const Collective& op,
    const std::vector<at::Tensor>& one,
    const char* oneName,
    const std::vector<at::Tensor>& list,
    const char* listName,
    size_t listCount,
    int64_t groupSize) {
  expectCount(op, one, 1, oneName);
  checkRank(op, op.root, groupSize, "root");
  const std::string what = std::string(listName) + (listCount == 0 ? " (not the root)" : "");
  expectCount(op, list, listCount, what.c_str());
  expectLike(op, list, one[0], listName);
}

void checkPairs(const Collective& op, int64_t groupSize) {
  if (op.inputs.size() != op.outputs.size()) {
    throw TensorMismatchError(
        opName(op) + " got " + std::to_string(op.inputs.size()) + " inputs and " +
        std::to_string(op.outputs.size()) +
        " outputs; the coalesced form needs one output per input");
  }
  for (size_t i = 0; i < op.inputs.size(); ++i) {
    const auto& in = op.inputs[i];
    const auto& out = op.outputs[i];
    checkSameKind(op, in, out);
    if (op.kind == CollectiveKind::AllGather && out.numel() != in.numel() * groupSize) {
      throw TensorMismatchError(
          "all_gather: output has " + std::to_string(out.numel()) +
          " elements, expected input size " + std::to_string(in.numel()) +
          " x group size " + std::to_string(groupSize) + " = " +
          std::to_string(in.numel() * groupSize));
    }
    if (op.kind == CollectiveKind::ReduceScatter && in.numel() != out.numel() * groupSize) {
      throw TensorMismatchError(
          "reduce_scatter: input has " + std::to_string(in.numel()) +
          " elements, expected output size " + std::to_string(out.numel()) +
          " x group size " + std::to_string(groupSize) + " = " +
          std::to_string(out.numel() * groupSize));
    }
  }
}

} // namespace

void validate(const Collective& op, int64_t groupSize, int64_t rank) {
  if (op.kind == CollectiveKind::Barrier) {
    return;
  }
  const at::Tensor& first = op.firstTensor();
  if (!first.defined() && op.inputs.empty() && op.outputs.empty()) {
    throw TensorMismatchError(opName(op) + " needs at least one tensor");
  }
  for (const auto* tensors : {&op.inputs, &op.outputs}) {
    const char* what = tensors == &op.inputs ? "input" : "output";
    for (const auto& t : *tensors) {
      checkTensor(op, t, what);
      if (t.device() != first.device()) {
        throw TensorMismatchError(
            opName(op) + ": tensors on " + first.device().str() + " and " +
            t.device().str() + "; one op takes one device");
      }
    }
  }
  const bool isRoot = op.root == rank;
  const size_t ranks = static_cast<size_t>(groupSize);
  switch (op.kind) {
    case CollectiveKind::AllGather:
    case CollectiveKind::ReduceScatter:
      checkPairs(op, groupSize);
      break;
    case CollectiveKind::AllReduce:
    case CollectiveKind::Broadcast:
      expectCount(op, op.outputs, 0, "output");
      break;
    case CollectiveKind::Reduce:
    case CollectiveKind::Send:
    case CollectiveKind::Recv:
      expectCount(op, op.inputs, 1, "input");
      expectCount(op, op.outputs, 0, "output");
      break;
    case CollectiveKind::SendRecvBatch:
      expectCount(op, op.inputs, op.parts.size(), "input");
      expectCount(op, op.outputs, 0, "output");
      for (const PointToPointPart& part : op.parts) {
        checkRank(op, part.peer, groupSize, part.send ? "destination" : "source");
      }
      break;
    case CollectiveKind::AllGatherList:
      expectCount(op, op.inputs, 1, "input");
      expectCount(op, op.outputs, ranks, "output");
      expectLike(op, op.outputs, op.inputs[0], "output");
      break;
    case CollectiveKind::ReduceScatterList:
      expectCount(op, op.outputs, 1, "output");
      expectCount(op, op.inputs, ranks, "input");
      expectLike(op, op.inputs, op.outputs[0], "input");
      break;
    case CollectiveKind::Gather:
      checkRootedList(op, op.inputs, "input", op.outputs, "output", isRoot ? ranks : 0, groupSize);
      break;
    case CollectiveKind::Scatter:
      checkRootedList(op, op.outputs, "output", op.inputs, "input", isRoot ? ranks : 0, groupSize);
      break;
    case CollectiveKind::AllToAll:
      expectCount(op, op.inputs, 1, "input");
      expectCount(op, op.outputs, 1, "output");
      checkSameKind(op, op.inputs[0], op.outputs[0]);
      checkSplits(op, op.inputSplits, op.inputs[0], groupSize, "input");
      checkSplits(op, op.outputSplits, op.outputs[0], groupSize, "output");
      break;
    case CollectiveKind::AllToAllList:
      expectCount(op, op.inputs, ranks, "input");
      expectCount(op, op.outputs, ranks, "output");
      for (size_t i = 0; i < ranks; ++i) {
        checkSameKind(op, op.inputs[0], op.inputs[i]);
        checkSameKind(op, op.inputs[0], op.outputs[i]);
      }
      break;
    case CollectiveKind::Barrier:
      break;
  }
  if (hasRoot(op.kind)) {
    checkRank(op, op.root, groupSize, "root");
  }
  if (isLonePointToPoint(op.kind)) {
    checkRank(op, op.peer, groupSize, op.kind == CollectiveKind::Send ? "destination" : "source");
  }
  if (isReducing(op.kind)) {
    checkReduceOp(op);
  }
}

void setReduceOp(Collective& op, const c10d::ReduceOp& reduceOp) {
  op.reduceOp = reduceOp.op_;
  if (reduceOp.op_ != c10d::ReduceOp::PREMUL_SUM) {
    return;
  }
  const auto* factor =
      dynamic_cast<const c10d::NCCLPreMulSumSupplement*>(reduceOp.supplement_.get());
  if (factor == nullptr) {
    throw UnsupportedOpError(
        std::string(kindName(op.kind)) + " with PREMUL_SUM needs its factor: "
        "make the op with torch.distributed._make_nccl_premul_sum(factor)");
  }
  if (factor->tensor_factor.defined()) {
    op.premulTensor = factor->tensor_factor;
  } else {
    op.premulScalar = factor->double_factor;
  }
}

std::string Collective::profilingTitle(const char* transport) const {
  return std::string(transport) + ":" + (spanName != nullptr ? spanName : "unknown");
}

} // namespace pycomm
