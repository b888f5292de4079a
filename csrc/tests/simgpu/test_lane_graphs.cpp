// CUDA graph capture of NCCL lane ops on the simulated GPU: the capture
// records the ops (nothing runs, nothing is queried), each replay runs them
// again with the buffers' values of that moment, and a capture that would
// break on a GPU breaks here too (SimGpu's capture rules, sim_gpu.h).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "sim_world.h"

namespace pycomm::sim {
namespace {

using namespace std::chrono_literals;

// What one rank captures: an all-gather on the AG lane and a reduce-scatter
// on the RS lane, from and into buffers that stay for every replay.
struct RankGraph {
  at::Tensor shard = at::zeros({8});
  at::Tensor gathered;
  at::Tensor grads;
  at::Tensor reduced = at::zeros({8});
  std::shared_ptr<const SimGraph> graph;
  cudaStream_t stream = nullptr;
};

// Captures `ops` on rank `r`'s own stream in `mode`, with the works waited
// for (or not) before the capture ends; returns endCapture's answer.
cudaError_t captureOn(
    SimWorld& world, int r, RankGraph& g, cudaStreamCaptureMode mode, bool wait,
    const std::vector<std::pair<NcclLane*, Collective>>& ops) {
  const int device = SimWorld::deviceOf(r);
  EXPECT_EQ(world.gpu->setDevice(device), cudaSuccess);
  g.stream = world.gpu->createStream(device);
  world.gpu->setCurrentStream(device, g.stream);
  EXPECT_EQ(world.gpu->beginCapture(g.stream, mode), cudaSuccess);
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (const auto& [lane, op] : ops) {
    works.push_back(issue(*lane, op));
  }
  for (auto& work : works) {
    EXPECT_TRUE(work->isCompleted()) << "a captured op is not watched";
    if (wait) {
      work->wait();
    }
  }
  const cudaError_t ended = world.gpu->endCapture(g.stream, &g.graph);
  world.gpu->setCurrentStream(device, nullptr);
  return ended;
}

void expectReplayResults(RankGraph& g, int r, int n, float step) {
  std::vector<at::Tensor> shards;
  at::Tensor sum = at::zeros({8});
  for (int q = 0; q < n; ++q) {
    shards.push_back(at::full({8}, step * 10 + q));
    sum += at::arange(8 * n, at::kFloat).narrow(0, r * 8, 8) * (q + 1) * step;
  }
  EXPECT_TRUE(at::equal(g.gathered, at::cat(shards))) << "replay " << step << " rank " << r << "\n" << g.gathered;
  EXPECT_TRUE(at::equal(g.reduced, sum)) << "replay " << step << " rank " << r << "\n" << g.reduced;
}

class LaneGraphs : public ::testing::TestWithParam<bool> {};

// GetParam(): whether the lanes launch in program order (the default) or
// leave launches to NCCL's thread (NCCL_LAUNCH_ORDER_IMPLICIT=0).
TEST_P(LaneGraphs, CaptureRecordsOpsAndEachReplayRunsThemAgain) {
  const int n = 2;
  SimWorld world(n);
  const bool inProgramOrder = GetParam();
  auto inOrder = [&](int, NcclLaneSpec& spec) { spec.comm.launchInProgramOrder = inProgramOrder; };
  auto ag = makeLanesWith(world, "ag", inOrder);
  auto rs = makeLanesWith(world, "rs", inOrder);
  // The warm-up: each lane's first op connects its peers.
  connectLanes(world, ag);
  connectLanes(world, rs);

  std::vector<RankGraph> graphs(n);
  onRanks(n, [&](int r) {
    RankGraph& g = graphs[r];
    g.gathered = at::zeros({8 * n});
    g.grads = at::zeros({8 * n});
    // Global mode, torch.cuda.graph's default: any query of an event by
    // this thread, or by another thread in Global mode, breaks the capture.
    ASSERT_EQ(
        captureOn(world, r, g, cudaStreamCaptureModeGlobal, /*wait=*/true,
                  {{ag[r].get(), allGather(g.shard, g.gathered)}, {rs[r].get(), reduceScatter(g.grads, g.reduced)}}),
        cudaSuccess);
    ASSERT_TRUE(g.graph);
    ASSERT_EQ(g.graph->nodes.size(), 2u) << "one kernel per op, nothing else";
  });
  // Nothing ran during the capture.
  for (const auto& g : graphs) {
    EXPECT_TRUE(at::equal(g.gathered, at::zeros({8 * n})));
    EXPECT_TRUE(at::equal(g.reduced, at::zeros({8})));
  }
  for (float step : {1.0f, 2.0f}) {
    onRanks(n, [&](int r) {
      RankGraph& g = graphs[r];
      g.shard.fill_(step * 10 + r);
      g.grads.copy_(at::arange(8 * n, at::kFloat) * (r + 1) * step);
      ASSERT_EQ(world.gpu->graphLaunch(g.graph, g.stream), cudaSuccess);
      ASSERT_TRUE(world.gpu->synchronize(g.stream, 10s));
      expectReplayResults(g, r, n, step);
    });
  }
  // Eager ops after the replays meet their peers: each replay took its
  // places among the communicators' kernels on every rank alike.
  onRanks(n, [&](int r) {
    auto out = at::zeros({2});
    ASSERT_TRUE(issue(*ag[r], allGather(at::full({1}, float(r)), out))->wait(5000ms));
    EXPECT_TRUE(at::equal(out, at::arange(2, at::kFloat)));
  });
  closeAll(rs);
  closeAll(ag);
  for (auto& g : graphs) {
    g.graph.reset();
    ASSERT_EQ(world.gpu->streamDestroy(g.stream), cudaSuccess);
  }
  EXPECT_EQ(world.nccl->overlapViolations(), 0);
}

INSTANTIATE_TEST_SUITE_P(LaunchOrder, LaneGraphs, ::testing::Values(true, false));

TEST(LaneGraphCapture, AnOpNotWaitedForLeavesTheCaptureUnjoined) {
  // torch.cuda.graph ends its capture on the capturing stream: an op whose
  // Work was never waited for inside it forked the lane's stream into the
  // capture and never joined it back, which CUDA refuses.
  const int n = 2;
  SimWorld world(n);
  auto ag = makeLanes(world, "ag");
  connectLanes(world, ag);
  std::vector<RankGraph> graphs(n);
  onRanks(n, [&](int r) {
    RankGraph& g = graphs[r];
    g.gathered = at::zeros({8 * n});
    EXPECT_EQ(
        captureOn(world, r, g, cudaStreamCaptureModeThreadLocal, /*wait=*/false,
                  {{ag[r].get(), allGather(g.shard, g.gathered)}}),
        cudaErrorStreamCaptureUnjoined);
    EXPECT_FALSE(g.graph);
  });
  // The lane is as usable as before: nothing of the capture ran.
  onRanks(n, [&](int r) {
    auto out = at::zeros({2});
    ASSERT_TRUE(issue(*ag[r], allGather(at::full({1}, float(r)), out))->wait(5000ms));
    EXPECT_TRUE(at::equal(out, at::arange(2, at::kFloat)));
  });
  closeAll(ag);
  for (auto& g : graphs) {
    ASSERT_EQ(world.gpu->streamDestroy(g.stream), cudaSuccess);
  }
}

TEST(LaneGraphCapture, TheFirstOpOfALaneIsRefusedByName) {
  // NCCL connects the peers at a communicator's first op: a capture cannot
  // hold that, so the lane refuses it before anything reaches NCCL.
  SimWorld world(2);
  auto ag = makeLanes(world, "ag");
  const int device = SimWorld::deviceOf(0);
  ASSERT_EQ(world.gpu->setDevice(device), cudaSuccess);
  cudaStream_t capturing = world.gpu->createStream(device);
  world.gpu->setCurrentStream(device, capturing);
  ASSERT_EQ(world.gpu->beginCapture(capturing, cudaStreamCaptureModeGlobal), cudaSuccess);
  const std::string message = thrownText<UnsupportedOpError>(
      [&] { issue(*ag[0], allGather(at::ones({4}), at::empty({8}))); });
  EXPECT_NE(message.find("run one op on the group before capturing"), std::string::npos) << message;
  std::shared_ptr<const SimGraph> graph;
  EXPECT_EQ(world.gpu->endCapture(capturing, &graph), cudaSuccess);
  EXPECT_TRUE(graph->nodes.empty()) << "nothing was recorded";
  world.gpu->setCurrentStream(device, nullptr);
  ASSERT_EQ(world.gpu->streamDestroy(capturing), cudaSuccess);
  // The refusal left the lanes connectable and usable.
  connectLanes(world, ag);
  closeAll(ag);
}

} // namespace
} // namespace pycomm::sim
