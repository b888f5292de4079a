#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "collective.h"
#include "errors.h"

using pycomm::Collective;
using pycomm::CollectiveKind;
using pycomm::TensorMismatchError;
using pycomm::UnsupportedOpError;

namespace {
Collective gather(at::Tensor out, at::Tensor in) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = {std::move(in)};
  op.outputs = {std::move(out)};
  return op;
}

// What validate() says of `op`: a TensorMismatchError's message (a failure
// where it throws none).
std::string mismatchMessage(const Collective& op, int64_t groupSize) {
  try {
    pycomm::validate(op, groupSize, 0);
  } catch (const TensorMismatchError& e) {
    return e.what();
  }
  ADD_FAILURE() << "validate() raised no TensorMismatchError";
  return "";
}
} // namespace

TEST(Collective, AcceptsMatchingAllGather) {
  auto op = gather(at::empty({8}), at::empty({4}));
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  EXPECT_EQ(op.bytes(), 8 * 4); // the gathered size, as nccl-tests counts
}

TEST(Collective, NamesSizeMismatch) {
  const auto message = mismatchMessage(gather(at::empty({7}), at::empty({4})), 2);
  EXPECT_NE(message.find("expected input size 4 x group size 2 = 8"), std::string::npos) << message;
}

TEST(Collective, RejectsDtypeMismatchAndNonContiguous) {
  EXPECT_THROW(pycomm::validate(gather(at::empty({8}, at::kLong), at::empty({4})), 2, 0),
               TensorMismatchError);
  auto strided = at::empty({4, 2}).t();
  EXPECT_THROW(pycomm::validate(gather(at::empty({16}), strided), 2, 0),
               TensorMismatchError);
}

TEST(Collective, ReduceOps) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.inputs = {at::empty({8})};
  op.outputs = {at::empty({4})};
  for (auto ok : {c10d::ReduceOp::SUM, c10d::ReduceOp::AVG, c10d::ReduceOp::MIN,
                  c10d::ReduceOp::MAX, c10d::ReduceOp::PRODUCT}) {
    op.reduceOp = ok;
    EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  }
  op.reduceOp = c10d::ReduceOp::BXOR;
  EXPECT_THROW(pycomm::validate(op, 2, 0), UnsupportedOpError);
  op.reduceOp = c10d::ReduceOp::AVG;
  op.inputs = {at::empty({8}, at::kLong)};
  op.outputs = {at::empty({4}, at::kLong)};
  EXPECT_THROW(pycomm::validate(op, 2, 0), UnsupportedOpError);
}

TEST(Collective, CoalescedNeedsOneOutputPerInput) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = {at::empty({2}), at::empty({3})};
  op.outputs = {at::empty({4})};
  EXPECT_THROW(pycomm::validate(op, 2, 0), TensorMismatchError);
  op.outputs.push_back(at::empty({6}));
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
}

TEST(Collective, BroadcastRootMustBeInTheGroup) {
  Collective op;
  op.kind = CollectiveKind::Broadcast;
  op.inputs = {at::empty({2})};
  op.root = 2;
  EXPECT_THROW(pycomm::validate(op, 2, 0), TensorMismatchError);
  op.root = 1;
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
}

TEST(Collective, FingerprintSeesKindSizeAndDtype) {
  auto a = gather(at::empty({8}), at::empty({4}));
  auto b = gather(at::empty({8}), at::empty({4}));
  EXPECT_EQ(a.fingerprint(), b.fingerprint());
  auto c = gather(at::empty({10}), at::empty({5}));
  EXPECT_NE(a.fingerprint(), c.fingerprint());
  auto d = gather(at::empty({8}, at::kDouble), at::empty({4}, at::kDouble));
  EXPECT_NE(a.fingerprint(), d.fingerprint());
  b.kind = CollectiveKind::ReduceScatter;
  EXPECT_NE(a.fingerprint(), b.fingerprint());
}

TEST(Collective, NamesDeviceMismatch) {
  const auto message =
      mismatchMessage(gather(at::empty({8}, at::TensorOptions().device(at::kMeta)), at::empty({4})), 2);
  EXPECT_NE(message.find("tensors on cpu and meta; one op takes one device"), std::string::npos) << message;
}

TEST(Collective, AvgTakesComplexTensors) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.reduceOp = c10d::ReduceOp::AVG;
  op.inputs = {at::empty({8}, at::kComplexFloat)};
  op.outputs = {at::empty({4}, at::kComplexFloat)};
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
}

TEST(Collective, SparseTensorsAreNamedNotCrashedOn) {
  auto sparse = at::ones({4, 2}).to_sparse();
  Collective op;
  op.kind = CollectiveKind::AllReduce;
  op.inputs = {sparse};
  EXPECT_TRUE(pycomm::stageNonContiguous(op).empty());
  const auto message = mismatchMessage(op, 2);
  EXPECT_NE(message.find("sparse"), std::string::npos) << message;
}

TEST(Collective, NonContiguousTensorsRunOnCopiesWrittenBack) {
  auto strided = at::arange(8, at::kFloat).reshape({4, 2}).t(); // [2, 4], not contiguous
  auto input = strided[0];
  Collective op = gather(at::zeros({8}).reshape({2, 4}).t(), input);
  const auto callersOutput = op.outputs.front();
  auto writeBack = pycomm::stageNonContiguous(op);
  EXPECT_TRUE(op.inputs.front().is_contiguous());
  EXPECT_TRUE(op.outputs.front().is_contiguous());
  EXPECT_TRUE(at::equal(op.inputs.front(), input));
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  // Only what the op writes goes back: the all-gather's output, not its input.
  ASSERT_EQ(writeBack.size(), 1u);
  EXPECT_TRUE(writeBack.front().callers.is_same(callersOutput));
  EXPECT_TRUE(writeBack.front().copy.is_same(op.outputs.front()));

  Collective inPlace;
  inPlace.kind = CollectiveKind::AllReduce;
  inPlace.inputs = {strided};
  auto back = pycomm::stageNonContiguous(inPlace);
  ASSERT_EQ(back.size(), 1u); // all-reduce writes its input
  EXPECT_TRUE(back.front().callers.is_same(strided));
}

namespace {
Collective rooted(CollectiveKind kind, std::vector<at::Tensor> inputs, std::vector<at::Tensor> outputs) {
  Collective op;
  op.kind = kind;
  op.inputs = std::move(inputs);
  op.outputs = std::move(outputs);
  op.root = 1;
  return op;
}
} // namespace

TEST(Collective, OnlyTheRootOfAGatherOrScatterHoldsTheList) {
  const auto list = std::vector<at::Tensor>{at::empty({3}), at::empty({3})};
  const auto gatherOp = rooted(CollectiveKind::Gather, {at::empty({3})}, list);
  EXPECT_NO_THROW(pycomm::validate(gatherOp, 2, 1)); // the root
  auto message = mismatchMessage(gatherOp, 2); // rank 0 holds a list it must not
  EXPECT_NE(message.find("gather takes 0 output (not the root) tensors here, got 2"), std::string::npos) << message;
  const auto scatterOp = rooted(CollectiveKind::Scatter, {}, {at::empty({3})});
  EXPECT_NO_THROW(pycomm::validate(scatterOp, 2, 0));
  EXPECT_EQ(scatterOp.deviceType(), c10::DeviceType::CPU);
  try {
    pycomm::validate(scatterOp, 2, 1); // the root without its list
    ADD_FAILURE() << "the root's missing list was taken";
  } catch (const TensorMismatchError& e) {
    EXPECT_NE(std::string(e.what()).find("scatter takes 2 input tensors here, got 0"), std::string::npos) << e.what();
  }
  // Root and non-root agree on the order check's fingerprint.
  auto atRoot = rooted(CollectiveKind::Scatter, list, {at::empty({3})});
  EXPECT_EQ(atRoot.fingerprint(), scatterOp.fingerprint());
}

TEST(Collective, AllToAllSplitsCoverTheRowsAndRanksMayDifferInSize) {
  Collective op;
  op.kind = CollectiveKind::AllToAll;
  op.inputs = {at::empty({3, 2})};
  op.outputs = {at::empty({1, 2})};
  op.inputSplits = {1, 2};
  op.outputSplits = {1, 0};
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  Collective other = op; // another rank: other sizes, the same op
  other.inputs = {at::empty({1, 2})};
  other.inputSplits = {0, 1};
  EXPECT_EQ(op.fingerprint(), other.fingerprint());
  op.inputSplits = {1, 1};
  auto message = mismatchMessage(op, 2);
  EXPECT_NE(message.find("split sizes summing to 2, expected 2 summing to the input's 3 rows"), std::string::npos)
      << message;
  op.inputSplits = {};
  message = mismatchMessage(op, 2);
  EXPECT_NE(message.find("3 rows, which the 2 ranks cannot share evenly"), std::string::npos) << message;
}

TEST(Collective, BitwiseReductionsTakeIntegersOnly) {
  Collective op;
  op.kind = CollectiveKind::AllReduce;
  op.reduceOp = c10d::ReduceOp::BXOR;
  op.inputs = {at::empty({4}, at::kLong)};
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  op.inputs = {at::empty({4}, at::kBool)};
  EXPECT_NO_THROW(pycomm::validate(op, 2, 0));
  op.inputs = {at::empty({4})};
  EXPECT_THROW(pycomm::validate(op, 2, 0), UnsupportedOpError);
}

TEST(Collective, PointToPointNamesItsPeer) {
  Collective op;
  op.kind = CollectiveKind::Send;
  op.inputs = {at::empty({2})};
  op.peer = 2;
  op.tag = 5;
  const auto message = mismatchMessage(op, 2);
  EXPECT_NE(message.find("send: destination 2 is not a rank of this group (0..1)"), std::string::npos) << message;
  op.peer = 1;
  EXPECT_NE(op.describe().find("to=1, tag=5"), std::string::npos) << op.describe();
  EXPECT_TRUE(pycomm::isPointToPoint(op.kind));
}
