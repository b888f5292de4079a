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
    pycomm::validate(op, groupSize);
  } catch (const TensorMismatchError& e) {
    return e.what();
  }
  ADD_FAILURE() << "validate() raised no TensorMismatchError";
  return "";
}
} // namespace

TEST(Collective, AcceptsMatchingAllGather) {
  auto op = gather(at::empty({8}), at::empty({4}));
  EXPECT_NO_THROW(pycomm::validate(op, 2));
  EXPECT_EQ(op.bytes(), 8 * 4); // the gathered size, as nccl-tests counts
}

TEST(Collective, NamesSizeMismatch) {
  const auto message = mismatchMessage(gather(at::empty({7}), at::empty({4})), 2);
  EXPECT_NE(message.find("expected input size 4 x group size 2 = 8"), std::string::npos) << message;
}

TEST(Collective, RejectsDtypeMismatchAndNonContiguous) {
  EXPECT_THROW(pycomm::validate(gather(at::empty({8}, at::kLong), at::empty({4})), 2),
               TensorMismatchError);
  auto strided = at::empty({4, 2}).t();
  EXPECT_THROW(pycomm::validate(gather(at::empty({16}), strided), 2),
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
    EXPECT_NO_THROW(pycomm::validate(op, 2));
  }
  op.reduceOp = c10d::ReduceOp::BXOR;
  EXPECT_THROW(pycomm::validate(op, 2), UnsupportedOpError);
  op.reduceOp = c10d::ReduceOp::AVG;
  op.inputs = {at::empty({8}, at::kLong)};
  op.outputs = {at::empty({4}, at::kLong)};
  EXPECT_THROW(pycomm::validate(op, 2), UnsupportedOpError);
}

TEST(Collective, CoalescedNeedsOneOutputPerInput) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = {at::empty({2}), at::empty({3})};
  op.outputs = {at::empty({4})};
  EXPECT_THROW(pycomm::validate(op, 2), TensorMismatchError);
  op.outputs.push_back(at::empty({6}));
  EXPECT_NO_THROW(pycomm::validate(op, 2));
}

TEST(Collective, BroadcastRootMustBeInTheGroup) {
  Collective op;
  op.kind = CollectiveKind::Broadcast;
  op.inputs = {at::empty({2})};
  op.root = 2;
  EXPECT_THROW(pycomm::validate(op, 2), TensorMismatchError);
  op.root = 1;
  EXPECT_NO_THROW(pycomm::validate(op, 2));
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
  EXPECT_NE(message.find("devices differ"), std::string::npos) << message;
}

TEST(Collective, AvgTakesComplexTensors) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.reduceOp = c10d::ReduceOp::AVG;
  op.inputs = {at::empty({8}, at::kComplexFloat)};
  op.outputs = {at::empty({4}, at::kComplexFloat)};
  EXPECT_NO_THROW(pycomm::validate(op, 2));
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
  EXPECT_NO_THROW(pycomm::validate(op, 2));
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
