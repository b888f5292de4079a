// The NCCL lane on 2, 4 and 8 simulated ranks: results of every op, dtype and
// reduce op it supports against a reference, on a lane made from a unique id
// and on one split from it; ordering against the caller's stream; overlap
// across lanes and none within one.
#include <algorithm>
#include <cstring>
#include <future>
#include <mutex>

#include <ATen/record_function.h>

#include "errors.h"
#include "mem_pool_hooks.h"
#include "sim_world.h"

using namespace std::chrono_literals;

namespace pycomm::sim {
namespace {

constexpr int64_t kCount = 24; // elements per rank

const std::vector<at::ScalarType> kTypes = {
    at::kFloat, at::kBFloat16, at::kHalf, at::kLong, at::kByte};

// Rank-dependent small integers: sums, products (at most 3^8) and averages
// are exact in every type, so results compare bit for bit.
at::Tensor rankData(int rank, int64_t count, at::ScalarType type) {
  auto base = at::arange(count, at::kLong);
  return ((base + rank) % 3 + 1).to(type);
}

at::Tensor reduceReference(
    const std::vector<at::Tensor>& inputs, c10d::ReduceOp::RedOpType op, at::ScalarType type) {
  // In float (or int64) first, rounded once, as NCCL's reductions of half
  // types are.
  const bool integral = !at::isFloatingType(type);
  std::vector<at::Tensor> wide;
  for (const auto& t : inputs) {
    wide.push_back(t.to(integral ? at::kLong : at::kFloat));
  }
  auto stacked = at::stack(wide);
  at::Tensor out;
  switch (op) {
    case c10d::ReduceOp::SUM:
      out = stacked.sum(0);
      break;
    case c10d::ReduceOp::PRODUCT:
      out = stacked.prod(0);
      break;
    case c10d::ReduceOp::MAX:
      out = std::get<0>(stacked.max(0));
      break;
    case c10d::ReduceOp::MIN:
      out = std::get<0>(stacked.min(0));
      break;
    case c10d::ReduceOp::AVG:
      out = stacked.sum(0) / static_cast<double>(inputs.size());
      break;
    default:
      ADD_FAILURE() << "no reference for reduce op " << static_cast<int>(op);
  }
  return out.to(type);
}

std::vector<c10d::ReduceOp::RedOpType> reduceOpsFor(at::ScalarType type) {
  std::vector<c10d::ReduceOp::RedOpType> ops = {
      c10d::ReduceOp::SUM, c10d::ReduceOp::PRODUCT, c10d::ReduceOp::MAX,
      c10d::ReduceOp::MIN};
  if (at::isFloatingType(type)) {
    ops.push_back(c10d::ReduceOp::AVG);
  }
  return ops;
}

void expectEqual(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  EXPECT_TRUE(at::equal(actual, expected))
      << what << "\nactual:   " << actual.to(at::kDouble) << "\nexpected: "
      << expected.to(at::kDouble);
}

// Runs `op(rank)` on every rank of `lanes`, waits (host) for each work and
// returns nothing: the checks are in `op`'s closure.
void runOnLanes(
    const std::vector<std::shared_ptr<NcclLane>>& lanes,
    const std::function<Collective(int)>& make,
    const std::function<void(int, const Collective&)>& check) {
  onRanks(static_cast<int>(lanes.size()), [&](int r) {
    Collective op = make(r);
    auto work = issue(*lanes[r], op);
    ASSERT_TRUE(work->wait(5000ms));
    check(r, op);
  });
}

// Gather, scatter and the all-to-alls: sends and recvs in one NCCL group.
// Roots other than 0 and uneven splits, so a send to the wrong peer or at
// the wrong offset shows.
void checkPointToPointCollectives(
    const std::vector<std::shared_ptr<NcclLane>>& lanes, at::ScalarType type, const std::string& where) {
  const int n = static_cast<int>(lanes.size());
  const int gatherRoot = n - 1;
  const int scatterRoot = 1 % n;
  runOnLanes(
      lanes,
      [&](int r) {
        Collective op;
        op.kind = CollectiveKind::Gather;
        op.root = gatherRoot;
        op.inputs = {rankData(r, kCount, type)};
        for (int q = 0; r == gatherRoot && q < n; ++q) {
          op.outputs.push_back(at::zeros({kCount}, type));
        }
        return op;
      },
      [&](int r, const Collective& op) {
        for (int q = 0; r == gatherRoot && q < n; ++q) {
          expectEqual(op.outputs[q], rankData(q, kCount, type), "gather from rank " + std::to_string(q) + " " + where);
        }
      });
  runOnLanes(
      lanes,
      [&](int r) {
        Collective op;
        op.kind = CollectiveKind::Scatter;
        op.root = scatterRoot;
        for (int q = 0; r == scatterRoot && q < n; ++q) {
          op.inputs.push_back(rankData(10 + q, kCount, type));
        }
        op.outputs = {at::zeros({kCount}, type)};
        return op;
      },
      [&](int r, const Collective& op) {
        expectEqual(op.outputs[0], rankData(10 + r, kCount, type), "scatter " + where);
      });
  // Rank r sends (r + q) % 3 + 1 rows of 2 elements to rank q: uneven, and
  // rank q's output splits are what each rank sends it.
  auto rows = [](int from, int to) { return int64_t{(from + to) % 3 + 1}; };
  auto block = [&](int from, int to) {
    return (rankData(from, rows(from, to) * 2, type) + to % 2).to(type).view({rows(from, to), 2});
  };
  for (bool even : {true, false}) {
    runOnLanes(
        lanes,
        [&](int r) {
          Collective op;
          op.kind = CollectiveKind::AllToAll;
          if (even) {
            op.inputs = {rankData(r, 2 * n * 3, type).view({n * 3, 2})};
            op.outputs = {at::zeros({n * 3, 2}, type)};
            return op;
          }
          std::vector<at::Tensor> sent;
          int64_t received = 0;
          for (int q = 0; q < n; ++q) {
            sent.push_back(block(r, q));
            op.inputSplits.push_back(rows(r, q));
            op.outputSplits.push_back(rows(q, r));
            received += rows(q, r);
          }
          op.inputs = {at::cat(sent)};
          op.outputs = {at::zeros({received, 2}, type)};
          return op;
        },
        [&](int r, const Collective& op) {
          std::vector<at::Tensor> expected;
          for (int q = 0; q < n; ++q) {
            expected.push_back(
                even ? rankData(q, 2 * n * 3, type).view({n * 3, 2}).narrow(0, r * 3, 3) : block(q, r));
          }
          expectEqual(op.outputs[0], at::cat(expected), std::string("all_to_all_single ") +
                          (even ? "even " : "uneven ") + where);
        });
  }
  runOnLanes(
      lanes,
      [&](int r) {
        Collective op;
        op.kind = CollectiveKind::AllToAllList;
        for (int q = 0; q < n; ++q) {
          op.inputs.push_back(block(r, q));
          op.outputs.push_back(at::zeros({rows(q, r), 2}, type));
        }
        return op;
      },
      [&](int r, const Collective& op) {
        for (int q = 0; q < n; ++q) {
          expectEqual(op.outputs[q], block(q, r), "all_to_all from rank " + std::to_string(q) + " " + where);
        }
      });
}

void checkEveryOp(const std::vector<std::shared_ptr<NcclLane>>& lanes, const std::string& path) {
  const int n = static_cast<int>(lanes.size());
  for (at::ScalarType type : kTypes) {
    const std::string where = path + " " + c10::toString(type) + " on " +
        std::to_string(n) + " ranks";
    std::vector<at::Tensor> shards(n);
    std::vector<at::Tensor> fulls(n);
    for (int r = 0; r < n; ++r) {
      shards[r] = rankData(r, kCount, type);
      fulls[r] = rankData(r, kCount * n, type);
    }

    const auto gathered = at::cat(shards);
    checkPointToPointCollectives(lanes, type, where);
    runOnLanes(
        lanes,
        [&](int r) { return allGather(shards[r].clone(), at::empty({kCount * n}, type)); },
        [&](int, const Collective& op) {
          expectEqual(op.outputs[0], gathered, "all_gather " + where);
        });

    for (auto reduce : reduceOpsFor(type)) {
      const auto reduced = reduceReference(fulls, reduce, type);
      runOnLanes(
          lanes,
          [&](int r) {
            return reduceScatter(fulls[r].clone(), at::empty({kCount}, type), reduce);
          },
          [&](int r, const Collective& op) {
            expectEqual(
                op.outputs[0], reduced.narrow(0, r * kCount, kCount),
                std::string("reduce_scatter ") + reduceOpName(reduce) + " " + where);
          });
      runOnLanes(
          lanes,
          [&](int r) {
            Collective op;
            op.kind = CollectiveKind::AllReduce;
            op.inputs = {shards[r].clone()};
            op.reduceOp = reduce;
            return op;
          },
          [&](int, const Collective& op) {
            expectEqual(
                op.inputs[0], reduceReference(shards, reduce, type),
                std::string("all_reduce ") + reduceOpName(reduce) + " " + where);
          });
      // The coalesced form (_coalescing_manager's allreduce_coalesced):
      // tensors of two sizes, each reduced across the ranks on its own.
      runOnLanes(
          lanes,
          [&](int r) {
            Collective op;
            op.kind = CollectiveKind::AllReduce;
            op.inputs = {shards[r].clone(), fulls[r].clone()};
            op.reduceOp = reduce;
            return op;
          },
          [&](int, const Collective& op) {
            expectEqual(
                op.inputs[0], reduceReference(shards, reduce, type),
                std::string("all_reduce coalesced ") + reduceOpName(reduce) + " " + where);
            expectEqual(
                op.inputs[1], reduceReference(fulls, reduce, type),
                std::string("all_reduce coalesced ") + reduceOpName(reduce) + " " + where);
          });
    }

    const int root = n - 1;
    runOnLanes(
        lanes,
        [&](int r) {
          Collective op;
          op.kind = CollectiveKind::Broadcast;
          op.inputs = {shards[r].clone()};
          op.root = root;
          return op;
        },
        [&](int, const Collective& op) {
          expectEqual(op.inputs[0], shards[root], "broadcast " + where);
        });

    // The list forms and reduce, as torch's list all_gather, list
    // reduce_scatter and reduce give them.
    runOnLanes(
        lanes,
        [&](int r) {
          Collective op;
          op.kind = CollectiveKind::AllGatherList;
          op.inputs = {shards[r].clone()};
          for (int q = 0; q < n; ++q) {
            op.outputs.push_back(at::empty({kCount}, type));
          }
          return op;
        },
        [&](int, const Collective& op) {
          for (int q = 0; q < n; ++q) {
            expectEqual(op.outputs[q], shards[q], "all_gather list, from rank " + std::to_string(q) + " " + where);
          }
        });
    for (auto reduce : reduceOpsFor(type)) {
      const auto reduced = reduceReference(fulls, reduce, type);
      runOnLanes(
          lanes,
          [&](int r) {
            Collective op;
            op.kind = CollectiveKind::ReduceScatterList;
            op.reduceOp = reduce;
            for (int q = 0; q < n; ++q) {
              op.inputs.push_back(fulls[r].narrow(0, q * kCount, kCount).clone());
            }
            op.outputs = {at::empty({kCount}, type)};
            return op;
          },
          [&](int r, const Collective& op) {
            expectEqual(
                op.outputs[0], reduced.narrow(0, r * kCount, kCount),
                std::string("reduce_scatter list ") + reduceOpName(reduce) + " " + where);
          });
      runOnLanes(
          lanes,
          [&](int r) {
            Collective op;
            op.kind = CollectiveKind::Reduce;
            op.reduceOp = reduce;
            op.root = root;
            op.inputs = {shards[r].clone()};
            return op;
          },
          [&](int r, const Collective& op) {
            // The root holds the result; the others keep their input, as
            // NCCL writes the output on the root only.
            expectEqual(
                op.inputs[0], r == root ? reduceReference(shards, reduce, type) : shards[r],
                std::string("reduce ") + reduceOpName(reduce) + " " + where);
          });
    }
  }

  // The coalesced forms: several tensor pairs, of several types, as one unit.
  const std::vector<std::pair<int64_t, at::ScalarType>> parts = {
      {3, at::kFloat}, {40, at::kBFloat16}, {7, at::kLong}};
  runOnLanes(
      lanes,
      [&](int r) {
        Collective op;
        op.kind = CollectiveKind::AllGather;
        for (auto [count, type] : parts) {
          op.inputs.push_back(rankData(r, count, type));
          op.outputs.push_back(at::empty({count * n}, type));
        }
        return op;
      },
      [&](int, const Collective& op) {
        for (size_t i = 0; i < parts.size(); ++i) {
          std::vector<at::Tensor> shards;
          for (int q = 0; q < n; ++q) {
            shards.push_back(rankData(q, parts[i].first, parts[i].second));
          }
          expectEqual(op.outputs[i], at::cat(shards), path + " coalesced all_gather part " + std::to_string(i));
        }
      });
  runOnLanes(
      lanes,
      [&](int r) {
        Collective op;
        op.kind = CollectiveKind::ReduceScatter;
        op.reduceOp = c10d::ReduceOp::SUM;
        for (auto [count, type] : parts) {
          op.inputs.push_back(rankData(r, count * n, type));
          op.outputs.push_back(at::empty({count}, type));
        }
        return op;
      },
      [&](int r, const Collective& op) {
        for (size_t i = 0; i < parts.size(); ++i) {
          const auto [count, type] = parts[i];
          std::vector<at::Tensor> fulls;
          for (int q = 0; q < n; ++q) {
            fulls.push_back(rankData(q, count * n, type));
          }
          expectEqual(
              op.outputs[i],
              reduceReference(fulls, c10d::ReduceOp::SUM, type).narrow(0, r * count, count),
              path + " coalesced reduce_scatter part " + std::to_string(i));
        }
      });
}

class LaneResults : public ::testing::TestWithParam<int> {};

TEST_P(LaneResults, EveryOpTypeAndReduceOpOnInitAndSplitLanes) {
  const int n = GetParam();
  {
    SimWorld world(n);
    auto ag = makeLanes(world, "ag");
    auto rs = makeLanes(world, "rs", ag);
    for (int r = 0; r < n; ++r) {
      EXPECT_FALSE(ag[r]->createdBySplit());
      EXPECT_TRUE(rs[r]->createdBySplit());
    }
    checkEveryOp(ag, "init");
    checkEveryOp(rs, "split");
    closeAll(rs);
    closeAll(ag);
    EXPECT_EQ(world.nccl->liveComms(), 0);
    EXPECT_EQ(world.nccl->overlapViolations(), 0);
  }
  EXPECT_EQ(NcclComm::liveCount(), 0);
}

// A lone send and its recv run on their two ranks alone, as NCCL runs them
// (the third rank issues nothing, not even a first collective), for every
// type; the lane's collectives are unaffected.
TEST(LanePointToPoint, ALoneSendAndItsRecvNeedOnlyTheirTwoRanks) {
  {
    const int n = 3;
    SimWorld world(n);
    auto lanes = makeLanes(world, "ag");
    for (auto type : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble, at::kLong, at::kInt, at::kByte,
                      at::kChar, at::kFloat8_e4m3fn}) {
      const at::Tensor sent = rankData(0, kCount, at::kFloat).to(type);
      at::Tensor got = at::zeros({kCount}, type);
      onRanks(n, [&](int r) {
        if (r == 1) {
          return;
        }
        Collective op;
        op.kind = r == 0 ? CollectiveKind::Send : CollectiveKind::Recv;
        op.inputs = {r == 0 ? sent : got};
        op.peer = r == 0 ? 2 : 0;
        ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms)) << c10::toString(type);
      });
      expectEqual(got, sent, std::string("send to rank 2 of ") + c10::toString(type));
    }
    runOnLanes(
        lanes,
        [&](int r) { return allGather(rankData(r, 4, at::kFloat), at::empty({4 * n})); },
        [&](int, const Collective& op) {
          expectEqual(
              op.outputs[0], at::cat({rankData(0, 4, at::kFloat), rankData(1, 4, at::kFloat), rankData(2, 4, at::kFloat)}),
              "all_gather after the sends");
        });
    closeAll(lanes);
    EXPECT_EQ(world.nccl->overlapViolations(), 0);
  }
  EXPECT_EQ(NcclComm::liveCount(), 0);
}

// batch_isend_irecv's ring: each rank sends to the next and receives from
// the previous, tensors of several types, in one NCCL group (as lone ops on
// one communicator each send would wait for a recv queued behind the
// peer's own send).
TEST(LanePointToPoint, ABatchRunsARingAsOneGroup) {
  for (const int n : {2, 4}) {
    SimWorld world(n);
    auto lanes = makeLanes(world, "ag");
    const std::vector<at::ScalarType> types = {at::kFloat, at::kBFloat16, at::kLong};
    std::vector<std::vector<at::Tensor>> received(n);
    onRanks(n, [&](int r) {
      Collective op;
      op.kind = CollectiveKind::SendRecvBatch;
      for (auto type : types) {
        op.inputs.push_back(rankData(r, kCount, type));
        op.parts.push_back(PointToPointPart{true, (r + 1) % n, 0});
      }
      for (auto type : types) {
        op.inputs.push_back(at::zeros({kCount}, type));
        op.parts.push_back(PointToPointPart{false, (r + n - 1) % n, 0});
        received[r].push_back(op.inputs.back());
      }
      ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms)) << "rank " << r;
    });
    for (int r = 0; r < n; ++r) {
      for (size_t i = 0; i < types.size(); ++i) {
        expectEqual(
            received[r][i], rankData((r + n - 1) % n, kCount, types[i]),
            "rank " + std::to_string(r) + " of " + std::to_string(n) + ", " + c10::toString(types[i]));
      }
    }
    closeAll(lanes);
  }
  EXPECT_EQ(NcclComm::liveCount(), 0);
}

// Raw values of `T` as a tensor of `type` (ATen has few kernels for the
// unsigned types; bytes are what the checks compare).
template <typename T>
at::Tensor rawTensor(const std::vector<T>& values, at::ScalarType type) {
  auto t = at::empty({static_cast<int64_t>(values.size())}, type);
  std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(T));
  return t;
}

template <typename T>
std::vector<T> rawValues(const at::Tensor& t) {
  std::vector<T> out(t.numel());
  std::memcpy(out.data(), t.data_ptr(), out.size() * sizeof(T));
  return out;
}

// MAX and MIN of values whose order differs between the signed and the
// unsigned reading of the same bits: a type mapped to NCCL's type of the
// other signedness gives the other answer.
template <typename T>
void expectSignedness(const std::vector<std::shared_ptr<NcclLane>>& lanes, at::ScalarType type, T a, T b) {
  for (auto reduce : {c10d::ReduceOp::MAX, c10d::ReduceOp::MIN}) {
    std::vector<std::vector<T>> got(2);
    onRanks(2, [&](int r) {
      const T mine = r == 0 ? a : b;
      auto op = reduceScatter(rawTensor<T>({mine, mine}, type), rawTensor<T>({T{}}, type), reduce);
      ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms));
      got[r] = rawValues<T>(op.outputs[0]);
    });
    const T expected = reduce == c10d::ReduceOp::MAX ? std::max(a, b) : std::min(a, b);
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(got[r], std::vector<T>{expected})
          << c10::toString(type) << (reduce == c10d::ReduceOp::MAX ? " MAX" : " MIN");
    }
  }
}

// PREMUL_SUM as ProcessGroupNCCL runs it: each rank's input times the
// factor (a number, or a one-element tensor the kernel reads), then a sum;
// the reduce op made for each call is destroyed after it.
TEST(LaneResults, PreMulSumScalesEachRanksInputThenSums) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "rs");
  for (at::ScalarType type : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<at::Tensor> fulls = {rankData(0, kCount * 2, type), rankData(1, kCount * 2, type)};
    // Small integers times 0.5 and 0.25 are exact in every type.
    const auto halved = reduceReference({fulls[0] * 0.5, fulls[1] * 0.5}, c10d::ReduceOp::SUM, type);
    const auto quartered = reduceReference({fulls[0] * 0.25, fulls[1] * 0.25}, c10d::ReduceOp::SUM, type);
    const std::string where = std::string(" ") + c10::toString(type);
    runOnLanes(
        lanes,
        [&](int r) {
          auto op = reduceScatter(fulls[r].clone(), at::empty({kCount}, type), c10d::ReduceOp::PREMUL_SUM);
          op.premulScalar = 0.5;
          return op;
        },
        [&](int r, const Collective& op) {
          expectEqual(op.outputs[0], halved.narrow(0, r * kCount, kCount), "reduce_scatter PREMUL_SUM(0.5)" + where);
          expectEqual(op.inputs[0], fulls[r], "the input of reduce_scatter PREMUL_SUM" + where);
        });
    runOnLanes(
        lanes,
        [&](int r) {
          Collective op;
          op.kind = CollectiveKind::AllReduce;
          op.inputs = {fulls[r].clone()};
          op.reduceOp = c10d::ReduceOp::PREMUL_SUM;
          op.premulTensor = at::full({1}, 0.25, type);
          return op;
        },
        [&](int, const Collective& op) {
          expectEqual(op.inputs[0], quartered, "all_reduce PREMUL_SUM(tensor 0.25)" + where);
        });
  }
  EXPECT_EQ(world.nccl->liveReduceOps(), 0);
  closeAll(lanes);
}

TEST(LaneTypes, SignedAndUnsignedTypesReduceByTheirOwnSign) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "rs");
  expectSignedness<int8_t>(lanes, at::kChar, -1, 1);
  expectSignedness<uint8_t>(lanes, at::kByte, 200, 100);
  expectSignedness<int32_t>(lanes, at::kInt, -5, 3);
  expectSignedness<uint32_t>(lanes, at::kUInt32, 0x80000000u, 1u);
  expectSignedness<int64_t>(lanes, at::kLong, -7, 2);
  expectSignedness<uint64_t>(lanes, at::kUInt64, uint64_t{1} << 63, 5u);
  closeAll(lanes);
}

TEST(LaneMemory, TensorsTheCallerDroppedAreHeldUntilTheOpEnded) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  std::vector<at::Tensor> gathered(2);
  std::vector<c10::intrusive_ptr<c10d::Work>> works(2);
  onRanks(2, [&](int r) {
    const int device = SimWorld::deviceOf(r);
    cudaStream_t compute = world.gpu->createStream(device);
    world.gpu->setCurrentStream(device, compute);
    if (r == 1) {
      std::this_thread::sleep_for(100ms); // rank 0's op waits for this one
    }
    {
      auto shard = deviceTensor(world.gpu, compute, {64});
      shard.fill_(float(r + 1));
      gathered[r] = at::zeros({128});
      works[r] = issue(*lanes[r], allGather(shard, gathered[r]));
      // The caller keeps no reference to its input: torch's caching
      // allocator gives the block to the next allocation on `compute` at
      // once, unless the lane still holds the tensor.
    }
    if (r == 0) {
      auto reused = deviceTensor(world.gpu, compute, {64});
      reused.fill_(99.0f);
      ASSERT_TRUE(works[r]->wait(5000ms));
    } else {
      ASSERT_TRUE(works[r]->wait(5000ms));
    }
    world.gpu->setCurrentStream(device, nullptr);
    ASSERT_TRUE(world.gpu->synchronize(compute, 5000ms));
    ASSERT_EQ(world.gpu->streamDestroy(compute), cudaSuccess);
  });
  const auto expected = at::cat({at::full({64}, 1.0f), at::full({64}, 2.0f)});
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::equal(gathered[r], expected)) << "rank " << r << ": " << gathered[r];
  }
  closeAll(lanes);
  EXPECT_EQ(world.gpu->liveBlocks(), 0) << "the lane let go of every tensor";
}

INSTANTIATE_TEST_SUITE_P(Ranks, LaneResults, ::testing::Values(2, 4, 8));

TEST(LaneOrder, OpRunsAfterWorkQueuedOnTheCallersStream) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  onRanks(2, [&](int r) {
    const int device = SimWorld::deviceOf(r);
    cudaStream_t compute = world.gpu->createStream(device);
    world.gpu->setCurrentStream(device, compute);
    for (float value : {1.0f, 2.0f, 3.0f}) {
      auto shard = at::zeros({16}, at::kFloat);
      // A slow kernel writes the input: the op must not read it before.
      world.gpu->launch(compute, [shard, value] {
        std::this_thread::sleep_for(30ms);
        shard.fill_(value);
      });
      auto op = allGather(shard, at::empty({32}, at::kFloat));
      ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms));
      EXPECT_TRUE(at::equal(op.outputs[0], at::full({32}, value, at::kFloat)))
          << op.outputs[0];
    }
    world.gpu->setCurrentStream(device, nullptr);
    ASSERT_TRUE(world.gpu->synchronize(compute, 5000ms));
    ASSERT_EQ(world.gpu->streamDestroy(compute), cudaSuccess);
  });
  closeAll(lanes);
}

TEST(LaneOrder, WaitOrdersTheCallersStreamWithoutBlockingTheHost) {
  SimWorld world(2);
  world.nccl->setCollectiveDuration(150ms);
  auto lanes = makeLanes(world, "ag");
  onRanks(2, [&](int r) {
    const int device = SimWorld::deviceOf(r);
    cudaStream_t compute = world.gpu->createStream(device);
    world.gpu->setCurrentStream(device, compute);
    auto op = allGather(at::full({8}, float(r + 1)), at::zeros({16}, at::kFloat));
    auto work = issue(*lanes[r], op);
    const int64_t before = nowUs();
    ASSERT_TRUE(work->wait()); // no timeout: the stream waits, not the host
    EXPECT_LT(nowUs() - before, 50'000) << "wait() blocked the host";
    EXPECT_FALSE(work->isCompleted());
    // A consumer queued after wait() sees the whole result.
    auto seen = at::empty({16}, at::kFloat);
    auto output = op.outputs[0];
    world.gpu->launch(compute, [seen, output]() mutable { seen.copy_(output); }, "consumer");
    ASSERT_TRUE(world.gpu->synchronize(compute, 5000ms));
    auto expected = at::cat({at::full({8}, 1.0f), at::full({8}, 2.0f)});
    EXPECT_TRUE(at::equal(seen, expected)) << seen;
    world.gpu->setCurrentStream(device, nullptr);
    ASSERT_EQ(world.gpu->streamDestroy(compute), cudaSuccess);
  });
  closeAll(lanes);
}

TEST(LaneOrder, WaitQueuesOnTheOpsDeviceWhateverDeviceIsCurrent) {
  SimWorld world(2);
  world.nccl->setCollectiveDuration(150ms);
  auto lanes = makeLanes(world, "ag");
  onRanks(2, [&](int r) {
    const int device = SimWorld::deviceOf(r);
    auto op = allGather(at::full({8}, float(r + 1)), at::zeros({16}, at::kFloat));
    auto work = issue(*lanes[r], op);
    // The caller has another device current (device 0, which no rank
    // uses), and torch's current stream of this device is the null stream:
    // wait() must still order this device's stream, not the current
    // device's.
    ASSERT_EQ(world.gpu->setDevice(0), cudaSuccess);
    ASSERT_TRUE(work->wait());
    auto seen = at::empty({16}, at::kFloat);
    auto output = op.outputs[0];
    cudaStream_t legacy = world.gpu->legacyStreamOf(device);
    world.gpu->launch(legacy, [seen, output]() mutable { seen.copy_(output); }, "consumer");
    ASSERT_TRUE(world.gpu->synchronize(legacy, 5000ms));
    auto expected = at::cat({at::full({8}, 1.0f), at::full({8}, 2.0f)});
    EXPECT_TRUE(at::equal(seen, expected)) << "the consumer ran before the op: " << seen;
  });
  closeAll(lanes);
}

TEST(LaneBlocking, OpsOnBlockingCommunicatorsRunCorrectly) {
  // The variant bench_issue_cost measures side by side: a blocking
  // communicator launches on the calling thread.
  SimWorld world(2);
  auto lanes = makeLanesWith(world, "ag", [](int, NcclLaneSpec& spec) { spec.comm.blocking = true; });
  onRanks(2, [&](int r) {
    for (int i = 0; i < 3; ++i) {
      auto gather = allGather(at::full({8}, float(r + 1 + i)), at::zeros({16}));
      auto reduce = reduceScatter(at::full({16}, float(r + 1)), at::zeros({8}));
      auto gathered = issue(*lanes[r], gather);
      auto reduced = issue(*lanes[r], reduce);
      ASSERT_TRUE(gathered->wait());
      ASSERT_TRUE(reduced->wait());
      ASSERT_TRUE(world.gpu->synchronize(world.gpu->legacyStreamOf(SimWorld::deviceOf(r)), 5000ms));
      EXPECT_TRUE(at::equal(
          gather.outputs[0], at::cat({at::full({8}, float(1 + i)), at::full({8}, float(2 + i))})));
      EXPECT_TRUE(at::equal(reduce.outputs[0], at::full({8}, 3.0f)));
    }
  });
  closeAll(lanes);
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneDevice, IssueAndWaitLeaveTheCallersCurrentDeviceAsTorchSees) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  onRanks(2, [&](int r) {
    // A fresh thread has device 0 current and no context there: torch's
    // guards leave it so (0 stays torch's target, no context is made), and
    // so must the lane, or the caller's next tensor lands on the lane's
    // device.
    std::thread([&] {
      auto op = allGather(at::full({8}, float(r + 1)), at::zeros({16}, at::kFloat));
      auto work = issue(*lanes[r], op);
      int device = -1;
      ASSERT_EQ(world.gpu->getDevice(&device), cudaSuccess);
      EXPECT_EQ(device, 0) << "issue() left device " << device << " current";
      ASSERT_TRUE(work->wait());
      ASSERT_EQ(world.gpu->getDevice(&device), cudaSuccess);
      EXPECT_EQ(device, 0) << "wait() left device " << device << " current";
    }).join();
  });
  EXPECT_FALSE(world.gpu->hasPrimaryContext(0)) << "a context was made on device 0";
  onRanks(2, [&](int r) {
    // A device with a context is switched back to for real.
    ASSERT_EQ(world.gpu->setDevice(0), cudaSuccess);
    auto op = allGather(at::full({8}, float(r + 1)), at::zeros({16}, at::kFloat));
    ASSERT_TRUE(issue(*lanes[r], op)->wait());
    EXPECT_EQ(world.gpu->currentDevice(), 0);
  });
  closeAll(lanes);
}

// The kernels of `comm` on `device`, in the order they ran.
std::vector<KernelInterval> kernelsOf(const SimWorld& world, uint64_t comm) {
  std::vector<KernelInterval> out;
  for (const auto& k : world.gpu->timeline()) {
    if (k.comm == comm) {
      out.push_back(k);
    }
  }
  return out;
}

TEST(LaneOverlap, AgAndRsLanesRunTogetherAndOneLaneNeverOverlapsItself) {
  SimWorld world(2);
  world.nccl->setCollectiveDuration(60ms);
  auto ag = makeLanes(world, "ag");
  auto rs = makeLanes(world, "rs", ag);
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> ids(2);
  onRanks(2, [&](int r) {
    // Two all-gathers on the AG lane, one reduce-scatter on the RS lane,
    // issued back to back.
    auto ag1 = allGather(at::ones({64}), at::empty({128}));
    auto ag2 = allGather(at::ones({64}), at::empty({128}));
    auto rs1 = reduceScatter(at::ones({128}), at::empty({64}));
    auto w1 = issue(*ag[r], ag1);
    auto w2 = issue(*ag[r], ag2);
    auto w3 = issue(*rs[r], rs1);
    for (auto& w : {w1, w2, w3}) {
      ASSERT_TRUE(w->wait(5000ms));
    }
  });
  const auto timeline = world.gpu->timeline();
  for (int r = 0; r < 2; ++r) {
    const int device = SimWorld::deviceOf(r);
    std::vector<KernelInterval> agKernels, rsKernels;
    for (const auto& k : timeline) {
      if (k.device != device || k.comm == 0) {
        continue;
      }
      (k.label.rfind("allgather", 0) == 0 ? agKernels : rsKernels).push_back(k);
    }
    ASSERT_EQ(agKernels.size(), 2u);
    ASSERT_EQ(rsKernels.size(), 1u);
    // Within the AG lane: in issue order, one after the other.
    EXPECT_LE(agKernels[0].endUs, agKernels[1].startUs);
    // Across lanes: the reduce-scatter ran while the first all-gather did.
    const auto& a = agKernels[0];
    const auto& b = rsKernels[0];
    EXPECT_LT(std::max(a.startUs, b.startUs), std::min(a.endUs, b.endUs))
        << "AG [" << a.startUs << ", " << a.endUs << "] RS [" << b.startUs << ", "
        << b.endUs << "] did not overlap";
    EXPECT_NE(a.stream, b.stream);
  }
  EXPECT_EQ(world.nccl->overlapViolations(), 0);
  closeAll(rs);
  closeAll(ag);
}

TEST(LaneOverlap, OpsOnOneLaneRunInIssueOrder) {
  SimWorld world(2);
  world.nccl->setCollectiveDuration(5ms);
  auto lanes = makeLanes(world, "ag");
  onRanks(2, [&](int r) {
    std::vector<Collective> ops;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < 6; ++i) {
      ops.push_back(allGather(at::full({4}, float(i)), at::empty({8})));
      works.push_back(issue(*lanes[r], ops.back()));
    }
    for (int i = 0; i < 6; ++i) {
      ASSERT_TRUE(works[i]->wait(5000ms));
      EXPECT_TRUE(at::equal(ops[i].outputs[0], at::full({8}, float(i))));
    }
  });
  int64_t previousEnd = 0;
  int kernels = 0;
  for (const auto& k : world.gpu->timeline()) {
    if (k.device == SimWorld::deviceOf(0) && k.comm != 0) {
      EXPECT_GE(k.startUs, previousEnd);
      previousEnd = k.endUs;
      ++kernels;
    }
  }
  EXPECT_EQ(kernels, 6);
  closeAll(lanes);
}

// Work._get_duration() under TORCH_NCCL_ENABLE_TIMING: the time between
// the op's start and end events on the lane's stream, which hold its kernel.
TEST(LaneTiming, DurationSpansTheOpsKernelWhenTimingIsOn) {
  ScopedEnv timing("TORCH_NCCL_ENABLE_TIMING", "1");
  SimWorld world(2);
  world.nccl->setCollectiveDuration(40ms);
  auto lanes = makeLanes(world, "ag");
  connectLanes(world, lanes); // a first op waits in issue() for every peer's
  std::vector<float> durations(2, -1.0f);
  std::promise<void> rank0Asked;
  auto asked = rank0Asked.get_future();
  onRanks(2, [&](int r) {
    if (r == 1) {
      // The op cannot end before rank 1 issues it.
      ASSERT_EQ(asked.wait_for(10s), std::future_status::ready);
    }
    auto op = allGather(at::ones({64}), at::empty({128}));
    auto work = issue(*lanes[r], op);
    if (r == 0) {
      EXPECT_NE(
          thrownText<PycommError>([&] { work->getDuration(); }).find("known once the op ended"),
          std::string::npos);
      rank0Asked.set_value();
    }
    ASSERT_TRUE(eventually([&] { return work->isCompleted(); }, 10s));
    durations[r] = work->getDuration();
  });
  const auto timeline = world.gpu->timeline();
  for (int r = 0; r < 2; ++r) {
    const KernelInterval* kernel = nullptr;
    for (const auto& k : timeline) {
      if (k.device == SimWorld::deviceOf(r) && k.comm != 0) {
        kernel = &k;
      }
    }
    ASSERT_NE(kernel, nullptr);
    const float kernelMs = static_cast<float>(kernel->endUs - kernel->startUs) / 1000.0f;
    EXPECT_GE(kernelMs, 40.0f);
    EXPECT_GE(durations[r], kernelMs - 0.5f) << "rank " << r;
    EXPECT_LT(durations[r], kernelMs + 5000.0f) << "rank " << r;
  }
  closeAll(lanes);
}

// Launches left to NCCL's thread (NCCL_LAUNCH_ORDER_IMPLICIT=0): the op
// before may not be on the stream yet when the next op is issued; its
// kernels must not land between the next op's start event and its own.
TEST(LaneTiming, AnOpsDurationLeavesOutTheOpBeforeItWhenNcclsThreadLaunches) {
  ScopedEnv timing("TORCH_NCCL_ENABLE_TIMING", "1");
  SimWorld world(2);
  std::vector<std::shared_ptr<NcclLane>> lanes(2);
  const std::string id = world.uniqueId();
  onRanks(2, [&](int r) {
    auto spec = world.spec(r, "ag", std::chrono::seconds(10));
    spec.comm.launchInProgramOrder = false;
    lanes[r] = NcclLane::create(spec, id, nullptr);
  });
  connectLanes(world, lanes);
  world.nccl->setCollectiveDuration(100ms);
  world.nccl->setGroupEndDelay(20ms); // the first op's launch is still pending at the second issue
  std::vector<float> second(2, -1.0f);
  onRanks(2, [&](int r) {
    auto op1 = allGather(at::ones({4}), at::empty({8}));
    auto op2 = allGather(at::ones({4}), at::empty({8}));
    auto w1 = issue(*lanes[r], op1);
    auto w2 = issue(*lanes[r], op2);
    ASSERT_TRUE(eventually([&] { return w1->isCompleted() && w2->isCompleted(); }, 10s));
    second[r] = w2->getDuration();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_GE(second[r], 99.0f) << "rank " << r;
    // Counting the first op too would give about 200 ms.
    EXPECT_LT(second[r], 170.0f) << "rank " << r << ": the first op's kernels were timed";
  }
  closeAll(lanes);
}

TEST(LaneTiming, DurationNeedsTimingOnWhenTheLaneIsMade) {
  ScopedEnv timing("TORCH_NCCL_ENABLE_TIMING", "0");
  SimWorld world(2);
  auto lanes = makeLanes(world, "rs");
  onRanks(2, [&](int r) {
    auto op = allGather(at::ones({4}), at::empty({8}));
    auto work = issue(*lanes[r], op);
    ASSERT_TRUE(eventually([&] { return work->isCompleted(); }, 10s));
    EXPECT_NE(
        thrownText<ConfigError>([&] { work->getDuration(); }).find("TORCH_NCCL_ENABLE_TIMING=1"),
        std::string::npos);
  });
  closeAll(lanes);
}

// What torch.profiler's RecordFunction callbacks see of the lane's ops.
std::mutex gSpansMutex;
std::vector<std::string> gSpanEvents; // "begin <name> <inputs>" / "end <name>"

TEST(LaneProfiling, EachOpIsSpannedAsTorchsNcclBackendNamesItUntilItEnds) {
  auto callback = at::addGlobalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
            const std::string name = fn.name();
            if (name.rfind("nccl:", 0) == 0) {
              std::lock_guard<std::mutex> lock(gSpansMutex);
              gSpanEvents.push_back("begin " + name + " " + std::to_string(fn.inputs().size()));
            }
            return nullptr;
          },
          [](const at::RecordFunction& fn, at::ObserverContext*) {
            const std::string name = fn.name();
            if (name.rfind("nccl:", 0) == 0) {
              std::lock_guard<std::mutex> lock(gSpansMutex);
              gSpanEvents.push_back("end " + name);
            }
          })
          .needsInputs(true));
  SimWorld world(2);
  auto lanes = makeLanes(world, "rs");
  connectLanes(world, lanes); // unnamed: no span
  {
    std::lock_guard<std::mutex> lock(gSpansMutex);
    EXPECT_TRUE(gSpanEvents.empty());
  }
  onRanks(2, [&](int r) {
    auto op = reduceScatter(at::ones({8}), at::empty({4}));
    op.spanName = "_reduce_scatter_base";
    auto work = issue(*lanes[r], op);
    ASSERT_TRUE(eventually([&] { return work->isCompleted(); }, 10s));
  });
  at::removeCallback(callback);
  std::lock_guard<std::mutex> lock(gSpansMutex);
  std::vector<std::string> events = gSpanEvents;
  std::sort(events.begin(), events.end());
  EXPECT_EQ(
      events,
      (std::vector<std::string>{
          "begin nccl:_reduce_scatter_base 1", "begin nccl:_reduce_scatter_base 1",
          "end nccl:_reduce_scatter_base", "end nccl:_reduce_scatter_base"}));
  closeAll(lanes);
}

TEST(LaneStreams, PrioritiesFollowTheRoleAndTheSpec) {
  SimWorld world(2);
  auto ag = makeLanes(world, "ag");
  auto rs = makeLanes(world, "rs", ag);
  EXPECT_EQ(ag[0]->streamPriority(), SimGpu::kGreatestPriority);
  EXPECT_EQ(rs[0]->streamPriority(), SimGpu::kLeastPriority);
  auto spec = world.spec(0, "ag");
  spec.streamPriority = -2;
  EXPECT_EQ(NcclLane::resolvePriority(spec), -2);
  spec.streamPriority = 3;
  EXPECT_THROW(NcclLane::resolvePriority(spec), ConfigError);
  closeAll(rs);
  closeAll(ag);
}

} // namespace
} // namespace pycomm::sim

namespace pycomm::sim {
namespace {

TEST(LaneMemory, TensorsInNcclMemoryServeOpsAndWindowsAndAreFreedWithTheirLastReference) {
  // ProcessGroupNCCL's allocate_tensor / mem_allocator, which FSDP2's
  // set_allocate_memory_from_process_group_for_comm takes its buffers from.
  SimWorld world(2);
  auto lanes = makeLanesWith(world, "ag", [](int r, NcclLaneSpec& spec) {
    spec.memory = std::make_shared<SimCommMemory>(spec.comm.apis, SimWorld::deviceOf(r));
  });
  std::vector<at::Tensor> shards(2), gathered(2);
  onRanks(2, [&](int r) {
    ASSERT_TRUE(lanes[r]->memAllocator());
    shards[r] = lanes[r]->allocateTensor(256, at::TensorOptions().dtype(at::kBFloat16));
    gathered[r] = lanes[r]->allocateTensor(512, at::TensorOptions().dtype(at::kBFloat16));
    EXPECT_EQ(shards[r].numel(), 256);
    EXPECT_EQ(shards[r].scalar_type(), at::kBFloat16);
    // ncclMemAlloc's memory: what a symmetric window takes (CUDA's virtual
    // memory API), on this rank's device.
    EXPECT_TRUE(world.gpu->inBlock(gathered[r].data_ptr(), 512 * 2, SimGpu::MemoryKind::Vmm));
    shards[r].fill_(float(r + 1));
    lanes[r]->registerMemory(gathered[r].data_ptr(), 512 * 2, /*symmetric=*/true);
    // torch's allocator of the same memory.
    auto block = lanes[r]->memAllocator()->allocate(64);
    EXPECT_TRUE(world.gpu->inBlock(block.get(), 64, SimGpu::MemoryKind::Vmm));
  });
  EXPECT_EQ(world.nccl->liveMemAllocs(), 4) << "the allocator's blocks went back with their DataPtr";
  onRanks(2, [&](int r) {
    ASSERT_TRUE(issue(*lanes[r], allGather(shards[r], gathered[r]))->wait(5000ms));
    EXPECT_TRUE(at::equal(
        gathered[r], at::cat({at::ones({256}, at::kBFloat16), at::full({256}, 2.0, at::kBFloat16)})));
  });
  closeAll(lanes);
  shards.clear();
  gathered.clear();
  EXPECT_EQ(world.nccl->liveMemAllocs(), 0) << "ncclMemFree'd with the tensors";
  // A lane without NCCL's memory (an NCCL before 2.19) says so by name.
  auto plain = makeLanes(world, "rs");
  EXPECT_FALSE(plain[0]->memAllocator());
  EXPECT_NE(
      thrownText<UnsupportedOpError>([&] { plain[0]->allocateTensor(4, at::TensorOptions()); })
          .find("allocate_tensor needs ncclMemAlloc (NCCL 2.19 or newer)"),
      std::string::npos);
  closeAll(plain);
}

TEST(LaneMemory, AWatchedPoolsLaterSegmentsAreRegisteredAndItsFreedOnesDeregistered) {
  // register_mem_pool watches the pool: torch's caching allocator reports
  // each segment it maps or frees (TraceEntry, as its trace trackers get
  // them; the allocator itself needs a real CUDA runtime), and the lane
  // registers what a watched pool gains and deregisters what it frees.
  using Action = c10::CachingDeviceAllocator::TraceEntry::Action;
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  const c10::MempoolId_t pool{0, 7};
  const c10::MempoolId_t otherPool{0, 8};
  auto& hooks = MemPoolHooks::instance();
  std::vector<at::Tensor> segments(2), unwatched(2), gathered(2);
  auto event = [](Action action, int device, const at::Tensor& t, c10::MempoolId_t id) {
    return c10::CachingDeviceAllocator::TraceEntry(
        action, static_cast<c10::DeviceIndex>(device), reinterpret_cast<size_t>(t.data_ptr()),
        static_cast<size_t>(t.nbytes()), nullptr, id, c10::approx_time_t{});
  };
  onRanks(2, [&](int r) {
    hooks.watch(lanes[r], pool, /*symmetric=*/false);
    segments[r] = at::full({256}, float(r + 1));
    unwatched[r] = at::zeros({256});
    gathered[r] = at::zeros({512});
  });
  EXPECT_EQ(hooks.watched(), 2u);
  for (int r = 0; r < 2; ++r) {
    const int device = SimWorld::deviceOf(r);
    hooks.onTrace(event(Action::SEGMENT_ALLOC, device, segments[r], pool));
    hooks.onTrace(event(Action::SEGMENT_MAP, device, gathered[r], pool)); // an expandable segment grew
    hooks.onTrace(event(Action::SEGMENT_ALLOC, device, unwatched[r], otherPool)); // another pool
    hooks.onTrace(event(Action::SEGMENT_ALLOC, 0, unwatched[r], pool)); // a device no lane serves
    hooks.onTrace(event(Action::ALLOC, device, unwatched[r], pool)); // a block, not a segment
  }
  EXPECT_EQ(world.nccl->liveRegistrations(), 4);
  EXPECT_TRUE(lanes[0]->isRegistered(segments[0].data_ptr()));
  EXPECT_FALSE(lanes[0]->isRegistered(unwatched[0].data_ptr()));
  onRanks(2, [&](int r) {
    ASSERT_TRUE(issue(*lanes[r], allGather(segments[r], gathered[r]))->wait(5000ms));
    EXPECT_TRUE(at::equal(gathered[r], at::cat({at::ones({256}), at::full({256}, 2.0f)})));
  });
  for (int r = 0; r < 2; ++r) {
    hooks.onTrace(event(Action::SEGMENT_FREE, SimWorld::deviceOf(r), segments[r], pool));
  }
  EXPECT_EQ(world.nccl->liveRegistrations(), 2);
  EXPECT_FALSE(lanes[1]->isRegistered(segments[1].data_ptr()));
  // Unwatched: the pool's later segments are left alone.
  for (int r = 0; r < 2; ++r) {
    hooks.unwatch(lanes[r].get(), pool);
    hooks.onTrace(event(Action::SEGMENT_ALLOC, SimWorld::deviceOf(r), segments[r], pool));
  }
  EXPECT_EQ(world.nccl->liveRegistrations(), 2);
  // A symmetric pool's new segments wait for the next register_mem_pool
  // (a window is collective); its watch ends with its lane.
  hooks.watch(lanes[0], pool, /*symmetric=*/true);
  hooks.onTrace(event(Action::SEGMENT_ALLOC, SimWorld::deviceOf(0), segments[0], pool));
  EXPECT_EQ(world.nccl->liveRegistrations(), 2);
  closeAll(lanes);
  lanes.clear();
  EXPECT_EQ(hooks.watched(), 0u);
  EXPECT_EQ(world.nccl->liveRegistrations(), 0);
}

TEST(LaneMemory, RegistrationsReachTheCommunicatorAndEndWithIt) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  std::vector<at::Tensor> shards(2), gathered(2);
  onRanks(2, [&](int r) {
    // A symmetric window needs memory of CUDA's virtual memory API.
    ASSERT_EQ(world.gpu->setDevice(SimWorld::deviceOf(r)), cudaSuccess);
    shards[r] = deviceTensor(world.gpu, nullptr, {256}, at::kFloat, SimGpu::MemoryKind::Vmm);
    shards[r].fill_(float(r));
    gathered[r] = at::empty({512});
    const size_t bytes = 512 * sizeof(float);
    lanes[r]->registerMemory(gathered[r].data_ptr(), bytes, /*symmetric=*/false);
    lanes[r]->registerMemory(gathered[r].data_ptr(), bytes, false); // again: nothing new
    lanes[r]->registerMemory(shards[r].data_ptr(), 256 * sizeof(float), /*symmetric=*/true);
  });
  EXPECT_EQ(world.nccl->liveRegistrations(), 4);
  EXPECT_EQ(lanes[0]->registeredMemory(), 2u);
  onRanks(2, [&](int r) {
    // Collectives on registered buffers run as on any other.
    auto op = allGather(shards[r], gathered[r]);
    ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms));
    EXPECT_TRUE(at::equal(gathered[r], at::cat({at::zeros({256}), at::ones({256})})));
    lanes[r]->deregisterMemory(shards[r].data_ptr());
    lanes[r]->deregisterMemory(shards[r].data_ptr()); // not registered any more: ignored
  });
  EXPECT_EQ(world.nccl->liveRegistrations(), 2);
  // close() deregisters what is left before it frees the communicator.
  onRanks(2, [&](int r) { lanes[r]->close(); });
  EXPECT_EQ(world.nccl->liveRegistrations(), 0);
  EXPECT_EQ(lanes[0]->registeredMemory(), 0u);
  EXPECT_THROW(lanes[0]->registerMemory(shards[0].data_ptr(), 16, false), PoolClosedError);
}

TEST(LaneMemory, ABufferNcclDeclinesToRegisterIsTakenAsProcessGroupNcclTakesIt) {
  // NCCL_LOCAL_REGISTER=0, or P2P through cudaMemcpy: ncclCommRegister
  // answers success with a null handle. Megatron-FSDP's register_mem_pool
  // then goes on without zero-copy, as on ProcessGroupNCCL, not with an error.
  SimWorld world(2);
  world.nccl->setLocalRegistration(false);
  auto lanes = makeLanes(world, "ag");
  std::vector<at::Tensor> shards(2), gathered(2);
  onRanks(2, [&](int r) {
    ASSERT_EQ(world.gpu->setDevice(SimWorld::deviceOf(r)), cudaSuccess);
    shards[r] = at::full({256}, float(r));
    gathered[r] = at::empty({512});
    lanes[r]->registerMemory(gathered[r].data_ptr(), 512 * sizeof(float), /*symmetric=*/false);
  });
  EXPECT_EQ(world.nccl->liveRegistrations(), 0); // NCCL registered nothing
  EXPECT_EQ(lanes[0]->registeredMemory(), 1u); // the lane remembers the buffer
  onRanks(2, [&](int r) {
    auto op = allGather(shards[r], gathered[r]);
    ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms));
    EXPECT_TRUE(at::equal(gathered[r], at::cat({at::zeros({256}), at::ones({256})})));
    lanes[r]->deregisterMemory(gathered[r].data_ptr()); // hands NCCL its null handle back
  });
  EXPECT_EQ(lanes[0]->registeredMemory(), 0u);
  onRanks(2, [&](int r) { lanes[r]->close(); });
}

size_t freeOn(SimGpu& gpu, int device) {
  const int previous = gpu.currentDevice();
  EXPECT_EQ(gpu.setDevice(device), cudaSuccess);
  size_t free = 0;
  size_t total = 0;
  EXPECT_EQ(gpu.memGetInfo(&free, &total), cudaSuccess);
  EXPECT_EQ(gpu.setDevice(previous), cudaSuccess);
  return free;
}

TEST(LaneMemory, EachLaneReportsWhatItsCommunicatorTook) {
  SimWorld world(2);
  auto ag = makeLanes(world, "ag");
  auto rs = makeLanes(world, "rs", ag); // split from the AG lanes
  for (const auto& lanes : {ag, rs}) {
    for (const auto& lane : lanes) {
      const auto use = lane->memoryUse();
      EXPECT_EQ(use.creationBytes, SimNccl::kCommBytes);
      EXPECT_FALSE(use.firstUseBytes.has_value()) << "no op has run yet";
    }
  }
  onRanks(2, [&](int r) {
    auto op = allGather(at::full({64}, float(r)), at::empty({128}));
    ASSERT_TRUE(issue(*ag[r], op)->wait(5000ms));
    // Measured before the op's Work completes, so visible right after it.
    EXPECT_EQ(ag[r]->memoryUse().firstUseBytes, std::optional<int64_t>(SimNccl::kFirstUseBytes));
    ASSERT_TRUE(issue(*ag[r], op)->wait(5000ms));
    EXPECT_EQ(ag[r]->memoryUse().firstUseBytes, std::optional<int64_t>(SimNccl::kFirstUseBytes))
        << "only the first op is measured";
    EXPECT_FALSE(rs[r]->memoryUse().firstUseBytes.has_value());
  });
  onRanks(2, [&](int r) {
    rs[r]->close();
    ag[r]->close();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(freeOn(*world.gpu, SimWorld::deviceOf(r)), SimGpu::kDeviceBytes)
        << "closed lanes gave their memory back";
  }
}

} // namespace
} // namespace pycomm::sim
