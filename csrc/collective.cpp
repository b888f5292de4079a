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
  }
  return "unknown";
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

bool isReducing(CollectiveKind kind) {
  return kind == CollectiveKind::ReduceScatter ||
      kind == CollectiveKind::AllReduce;
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

const std::vector<at::Tensor>& Collective::results() const {
  return kind == CollectiveKind::AllGather || kind == CollectiveKind::ReduceScatter
      ? outputs
      : inputs;
}

int64_t Collective::bytes() const {
  int64_t total = 0;
  const auto& counted =
      kind == CollectiveKind::AllGather ? outputs : inputs;
  for (const auto& t : counted) {
    total += t.numel() * t.element_size();
  }
  return total;
}

std::string Collective::describe() const {
  std::ostringstream out;
  out << kindName(kind) << "(";
  for (size_t i = 0; i < inputs.size(); ++i) {
    out << (i ? ", " : "") << shapeOf(inputs[i]);
    if (i < outputs.size()) {
      out << "->[" << outputs[i].numel() << "]";
    }
  }
  if (isReducing(kind)) {
    out << (inputs.empty() ? "" : ", ") << reduceOpName(reduceOp);
  }
  if (kind == CollectiveKind::Broadcast) {
    out << ", root=" << root;
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
  return inputs.empty() ? c10::DeviceType::CPU : inputs.front().device().type();
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
  for (const auto& t : inputs) {
    mix(static_cast<uint64_t>(t.scalar_type()));
    mix(static_cast<uint64_t>(t.numel()));
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
  const bool inPlace = op.kind == CollectiveKind::AllReduce ||
      op.kind == CollectiveKind::Broadcast;
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

void validate(const Collective& op, int64_t groupSize) {
  if (op.kind == CollectiveKind::Barrier) {
    return;
  }
  if (op.inputs.empty()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + " needs at least one tensor");
  }
  const bool gathersOrScatters = op.kind == CollectiveKind::AllGather ||
      op.kind == CollectiveKind::ReduceScatter;
  if (gathersOrScatters && op.inputs.size() != op.outputs.size()) {
    throw TensorMismatchError(
        std::string(kindName(op.kind)) + " got " +
        std::to_string(op.inputs.size()) + " inputs and " +
        std::to_string(op.outputs.size()) +
        " outputs; the coalesced form needs one output per input");
  }
  const auto device = op.inputs.front().device();
  for (size_t i = 0; i < op.inputs.size(); ++i) {
    const auto& in = op.inputs[i];
    checkTensor(op, in, "input");
    if (in.device() != device) {
      throw TensorMismatchError(
          std::string(kindName(op.kind)) + ": tensors on " + device.str() +
          " and " + in.device().str() + "; one op takes one device");
    }
    if (!gathersOrScatters) {
      continue;
    }
    const auto& out = op.outputs[i];
    checkTensor(op, out, "output");
    checkSameKind(op, in, out);
    const bool gather = op.kind == CollectiveKind::AllGather;
    const int64_t expectedOut = gather ? in.numel() * groupSize : -1;
    if (gather && out.numel() != expectedOut) {
      throw TensorMismatchError(
          "all_gather: output has " + std::to_string(out.numel()) +
          " elements, expected input size " + std::to_string(in.numel()) +
          " x group size " + std::to_string(groupSize) + " = " +
          std::to_string(expectedOut));
    }
    if (!gather && in.numel() != out.numel() * groupSize) {
      throw TensorMismatchError(
          "reduce_scatter: input has " + std::to_string(in.numel()) +
          " elements, expected output size " + std::to_string(out.numel()) +
          " x group size " + std::to_string(groupSize) + " = " +
          std::to_string(out.numel() * groupSize));
    }
  }
  if (isReducing(op.kind)) {
    checkReduceOp(op);
  }
  if (op.kind == CollectiveKind::Broadcast &&
      (op.root < 0 || op.root >= groupSize)) {
    throw TensorMismatchError(
        "broadcast: root " + std::to_string(op.root) +
        " is not a rank of this group (0.." + std::to_string(groupSize - 1) +
        ")");
  }
}

void setReduceOp(Collective& op, const c10d::ReduceOp& reduceOp) {
  op.reduceOp = reduceOp.op_;
  if (reduceOp.op_ != c10d::ReduceOp::PREMUL_SUM) {
    return;
  }
  const auto* factor =
      dynamic_cast<const c10d::PreMulSumSupplement*>(reduceOp.supplement_.get());
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
