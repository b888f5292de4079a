// The NCCL lane's failure paths on simulated ranks: a peer that never comes,
// an asynchronous NCCL error, abort with ops hung on both lanes, a wait after
// an abort, a member that fails during a split, slow group ends, refused ops,
// teardown, and create/use/destroy cycles that leave nothing behind.
#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <optional>
#include <thread>

#include "comm_pool.h"
#include "errors.h"
#include "pooled_backend.h"
#include "sim_world.h"

using namespace std::chrono_literals;

namespace pycomm::sim {
namespace {

// torch's flight recorder is on by default and a process dumps once, at its
// first failure: off here unless the caller's environment says otherwise,
// so that the failures these tests make on purpose leave no dumps and the
// test of the dump is the one to write it.
const bool kFlightRecorderOffByDefault = ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0) == 0;

int threadCount() {
  int n = 0;
  if (DIR* dir = opendir("/proc/self/task")) {
    while (dirent* entry = readdir(dir)) {
      n += entry->d_name[0] != '.';
    }
    closedir(dir);
  }
  return n;
}

template <typename Error>
std::string expectFailure(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds within) {
  return thrownText<Error>([&] { work->wait(within); });
}

// Records teardowns instead of ending the process.
struct TearDownRecorder {
  std::mutex mutex;
  std::vector<std::string> calls;
  void arm(NcclLaneSpec& spec) {
    spec.tearDownOnError = true;
    spec.tearDown = [this](const std::string& message) {
      std::lock_guard<std::mutex> lock(mutex);
      calls.push_back(message);
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return calls.size();
  }
};

// Lanes from a unique id whose teardowns `teardown` records (none when
// null); `adjust` changes each rank's spec first.
std::vector<std::shared_ptr<NcclLane>> armedLanes(
    SimWorld& world,
    const std::string& role,
    TearDownRecorder* teardown,
    std::chrono::milliseconds timeout = 10s,
    const std::function<void(NcclLaneSpec&)>& adjust = {}) {
  std::vector<std::shared_ptr<NcclLane>> lanes(world.size);
  const std::string id = world.uniqueId();
  onRanks(world.size, [&](int r) {
    auto spec = world.spec(r, role, timeout);
    if (adjust) {
      adjust(spec);
    }
    if (teardown != nullptr) {
      teardown->arm(spec);
    }
    lanes[r] = NcclLane::create(spec, id, nullptr);
  });
  return lanes;
}

TEST(LaneFaults, PeerThatNeverComesTimesOutByNameAndTearsDown) {
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "ag", &teardown, 300ms);
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  // Rank 1 never issues the all-gather.
  auto op = allGather(at::ones({16}), at::empty({32}));
  const int64_t start = nowUs();
  auto work = issue(*lanes[0], op);
  const std::string message = expectFailure<CollectiveTimeoutError>(work, 5000ms);
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  EXPECT_NE(message.find("role 'ag' of group 'sim'"), std::string::npos) << message;
  EXPECT_NE(message.find("all_gather"), std::string::npos) << message;
  EXPECT_NE(message.find("300 ms"), std::string::npos) << message;
  EXPECT_TRUE(work->isCompleted());
  // The future is completed right after the work (its callbacks may wait on it).
  work->getFuture()->wait();
  EXPECT_TRUE(work->getFuture()->hasError());
  ASSERT_TRUE(eventually([&] { return teardown.count() == 1; }));
  // The watchdog's timeout.
  EXPECT_NE(teardown.calls[0].find("300 ms"), std::string::npos) << teardown.calls[0];
  // The lane is failed for good, with the same error.
  EXPECT_THROW(issue(*lanes[0], op), CollectiveTimeoutError);
  EXPECT_EQ(teardown.count(), 1u) << "one teardown per lane";
  lanes[1]->close();
  lanes[0]->close();
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, SetTimeoutBoundsTheOpsIssuedAfterIt) {
  // torch's set_timeout on a pooled group: the lane made with 10 s gets
  // 300 ms, and an op issued after it that rank 1 never joins fails by then.
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "ag", &teardown, 10s);
  connectLanes(world, lanes);
  lanes[0]->setTimeout(300ms);
  const int64_t start = nowUs();
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  const std::string message = expectFailure<CollectiveTimeoutError>(work, 5000ms);
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  EXPECT_NE(message.find("300 ms"), std::string::npos) << message;
  auto result = work->getFutureResult();
  result->wait(); // completed right after the work
  EXPECT_EQ(result->value().toInt(), static_cast<int64_t>(c10d::WorkResult::TIMEOUT));
  lanes[1]->abort();
  lanes[0]->close();
}

TEST(LaneFaults, ALaneTimeoutWritesTorchsFlightRecorderDumpBeforeTheTeardown) {
  // As ProcessGroupNCCL's watchdog does with TORCH_FR_BUFFER_SIZE set: the
  // dump (torch's writer, TORCH_FR_DUMP_TEMP_FILE + the global rank) is on
  // disk when the teardown comes.
  const std::string prefix = "/tmp/pycomm_fr_lane_" + std::to_string(::getpid()) + "_";
  const std::string dump = prefix + "7";
  ASSERT_TRUE(kFlightRecorderOffByDefault);
  ScopedEnv entries("TORCH_FR_BUFFER_SIZE", "100");
  ScopedEnv where("TORCH_FR_DUMP_TEMP_FILE", prefix);
  std::remove(dump.c_str());
  SimWorld world(2);
  std::atomic<int> teardowns{0};
  std::atomic<bool> dumpedFirst{false};
  auto lanes = armedLanes(world, "ag", nullptr, 300ms, [&](NcclLaneSpec& spec) {
    spec.globalRank = 7 + spec.comm.rank;
    spec.tearDownOnError = true;
    spec.tearDown = [&](const std::string&) {
      dumpedFirst = std::ifstream(dump).good();
      ++teardowns;
    };
  });
  connectLanes(world, lanes);
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  expectFailure<CollectiveTimeoutError>(work, 5000ms);
  ASSERT_TRUE(eventually([&] { return teardowns.load() == 1; }));
  EXPECT_TRUE(dumpedFirst.load()) << "no dump at " << dump << " when the teardown came";
  std::ifstream in(dump, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(bytes.find("pg_config"), std::string::npos) << "not torch's dump";
  std::remove(dump.c_str());
  lanes[1]->abort();
  lanes[0]->close();
}

TEST(LaneFaults, MismatchedOpsAcrossRanksTimeOutByName) {
  // NCCL reports nothing when ranks issue different ops at one place: they
  // hang. pycomm's timeout is the answer (PYCOMM_DEBUG=order names both ops
  // instead: test_order_check.cpp).
  SimWorld world(2);
  auto lanes = armedLanes(world, "ag", nullptr, 300ms);
  std::vector<c10::intrusive_ptr<c10d::Work>> works(2);
  const int64_t start = nowUs();
  onRanks(2, [&](int r) {
    const int64_t count = r == 0 ? 16 : 8;
    works[r] = issue(*lanes[r], allGather(at::ones({count}), at::empty({2 * count})));
  });
  for (int r = 0; r < 2; ++r) {
    const std::string message = expectFailure<CollectiveTimeoutError>(works[r], 5000ms);
    EXPECT_NE(message.find("all_gather"), std::string::npos) << message;
    EXPECT_EQ(message.find("batch_isend_irecv"), std::string::npos) << "only sends and recvs name it";
  }
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  closeAll(lanes);
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, LoneSendsThatEachWaitBehindTheOthersTimeOutNamingTheWayOut) {
  // Both ranks send, then receive, each as a lone op on its lane: each send
  // waits for a recv queued behind the peer's own send. Bounded by the
  // timeout, whose error says why and names batch_isend_irecv.
  SimWorld world(2);
  auto lanes = armedLanes(world, "ag", nullptr, 300ms);
  std::vector<std::vector<c10::intrusive_ptr<c10d::Work>>> works(2);
  const int64_t start = nowUs();
  onRanks(2, [&](int r) {
    for (auto kind : {CollectiveKind::Send, CollectiveKind::Recv}) {
      Collective op;
      op.kind = kind;
      op.inputs = {at::ones({8})};
      op.peer = 1 - r;
      works[r].push_back(issue(*lanes[r], op));
    }
  });
  for (int r = 0; r < 2; ++r) {
    const std::string message = expectFailure<CollectiveTimeoutError>(works[r][0], 5000ms);
    EXPECT_NE(message.find("send("), std::string::npos) << message;
    EXPECT_NE(message.find("goes through batch_isend_irecv"), std::string::npos) << message;
    EXPECT_THROW(works[r][1]->wait(5000ms), CollectiveTimeoutError);
  }
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  closeAll(lanes);
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, AsyncErrorFailsOpsWithNcclsMessage) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "rs");
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  const auto comms = world.nccl->commsOn(SimWorld::deviceOf(0));
  ASSERT_EQ(comms.size(), 1u);
  // An op in flight (rank 1 is late), then NCCL meets an error: the
  // watchdog fails the op with NCCL's message.
  auto op = reduceScatter(at::ones({32}), at::empty({16}));
  auto work = issue(*lanes[0], op);
  const int64_t start = nowUs();
  world.nccl->injectAsyncError(comms[0], ncclRemoteError, "peer 1 closed the connection");
  const std::string message = expectFailure<CollectiveError>(work, 5000ms);
  EXPECT_LT(nowUs() - start, 500'000);
  EXPECT_NE(message.find("peer 1 closed the connection"), std::string::npos) << message;
  EXPECT_NE(message.find("reduce_scatter"), std::string::npos) << message;
  EXPECT_NE(message.find("remote process exited or there was a network error"), std::string::npos)
      << message;
  // Later ops raise the same error at once.
  try {
    issue(*lanes[0], op);
    ADD_FAILURE() << "issue() on a failed lane succeeded";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("peer 1 closed the connection"), std::string::npos);
  }
  lanes[1]->abort();
  lanes[0]->close();
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, AsyncErrorMetWhileIssuingFailsTheIssue) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  const auto comms = world.nccl->commsOn(SimWorld::deviceOf(0));
  ASSERT_EQ(comms.size(), 1u);
  world.nccl->injectAsyncError(comms[0], ncclSystemError, "socket closed");
  try {
    issue(*lanes[0], allGather(at::ones({4}), at::empty({8})));
    ADD_FAILURE() << "issue() succeeded on a communicator in error";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("socket closed"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(lanes[0]->splittable());
  lanes[1]->abort();
  lanes[0]->close();
}

// A c10d::Backend for the CPU side of a PooledBackend that these tests never use.
class UnusedCpuComm : public c10d::Backend {
 public:
  UnusedCpuComm() : c10d::Backend(0, 2) {}
  const std::string getBackendName() const override {
    return "unused";
  }
};

c10::intrusive_ptr<PooledBackend> pooled(
    const std::string& role, std::shared_ptr<NcclLane> lane) {
  PooledGroupSpec spec;
  spec.name = "pooled-" + role;
  spec.baseGroupName = "sim";
  spec.role = role;
  spec.globalRanks = {0, 1};
  spec.rank = 0;
  auto backend = c10::make_intrusive<PooledBackend>(spec, c10::make_intrusive<UnusedCpuComm>());
  backend->attachDeviceLane(std::move(lane));
  return backend;
}

TEST(LaneConnect, TheFirstOpWaitsForEveryPeersFirstOp) {
  // NCCL connects the peers at a communicator's first group end, on its own
  // thread for a nonblocking one, which stays in progress until every peer
  // came. issue() returns once NCCL took the launch (launchInProgramOrder),
  // so the first issue() waits for the late peer; left to NCCL's thread
  // (launchInProgramOrder off), the second issue() does, since NCCL refuses
  // a call while one is in progress. Both ops then run correctly.
  for (const bool inProgramOrder : {true, false}) {
    SCOPED_TRACE(inProgramOrder ? "program order" : "any order");
    SimWorld world(2);
    auto lanes = armedLanes(world, "ag", nullptr, 10s, [&](NcclLaneSpec& spec) {
      spec.comm.launchInProgramOrder = inProgramOrder;
    });
    std::atomic<int64_t> firstIssueUs{0};
    std::atomic<int64_t> secondIssueUs{0};
    onRanks(2, [&](int r) {
      if (r == 1) {
        std::this_thread::sleep_for(300ms);
      }
      auto first = allGather(at::full({8}, float(r + 1)), at::zeros({16}));
      int64_t start = nowUs();
      auto firstWork = issue(*lanes[r], first);
      if (r == 0) {
        firstIssueUs = nowUs() - start;
      }
      auto second = allGather(at::full({8}, float(10 * (r + 1))), at::zeros({16}));
      start = nowUs();
      auto secondWork = issue(*lanes[r], second);
      if (r == 0) {
        secondIssueUs = nowUs() - start;
      }
      ASSERT_TRUE(firstWork->wait());
      ASSERT_TRUE(secondWork->wait());
      ASSERT_TRUE(world.gpu->synchronize(world.gpu->legacyStreamOf(SimWorld::deviceOf(r)), 5000ms));
      EXPECT_TRUE(at::equal(first.outputs[0], at::cat({at::full({8}, 1.0f), at::full({8}, 2.0f)})));
      EXPECT_TRUE(at::equal(second.outputs[0], at::cat({at::full({8}, 10.0f), at::full({8}, 20.0f)})));
    });
    const int64_t waitedUs = inProgramOrder ? firstIssueUs.load() : secondIssueUs.load();
    EXPECT_GE(waitedUs, 200'000) << "the first op was launched before the peer connected";
    closeAll(lanes);
  }
}

TEST(LaneConnect, APeerThatNeverIssuesIsATimeoutForTheCallThatWaitsForIt) {
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "ag", &teardown, 300ms);
  // Rank 1 never issues: rank 0's first op cannot connect, and issue()
  // waits for NCCL to take it, bounded by the timeout.
  const int64_t start = nowUs();
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({16}), at::empty({32}))), CollectiveTimeoutError);
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  ASSERT_TRUE(eventually([&] { return teardown.count() == 1; }));
  EXPECT_EQ(world.nccl->liveComms(), 1) << "rank 0's communicator was aborted";
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({16}), at::empty({32}))), CollectiveTimeoutError);
  lanes[1]->abort();
}

// The AG lane, the RS lane and a blocking communicator standing for torch's
// (it launches on the calling thread, as ProcessGroupNCCL does) on each of
// 2 ranks, connected, one collective kernel per device at a time, under
// NCCL_LAUNCH_ORDER_IMPLICIT. Every rank issues AG, RS, then torch's
// all-reduce; NCCL's thread is slow to launch rank 0's all-gather and rank
// 1's reduce-scatter. Returns each device's kernels in the order they
// started, by label, and whether every op finished.
struct LaunchOrderRun {
  std::vector<std::vector<std::string>> started; // by rank
  bool finished = true;
};

LaunchOrderRun runAgRsTorchWithSlowLaunches(bool launchInProgramOrder) {
  SimWorld world(2);
  TearDownRecorder teardown;
  const auto timeout = 1500ms;
  auto inOrder = [&](NcclLaneSpec& spec) { spec.comm.launchInProgramOrder = launchInProgramOrder; };
  auto ag = armedLanes(world, "ag", &teardown, timeout, inOrder);
  auto rs = armedLanes(world, "rs", &teardown, timeout, inOrder);
  auto torch = armedLanes(world, "torch", &teardown, timeout, [](NcclLaneSpec& spec) {
    spec.comm.blocking = true;
  });
  for (const auto* lanes : {&ag, &rs, &torch}) {
    connectLanes(world, *lanes);
  }
  world.nccl->setLaunchOrderImplicit(true);
  world.gpu->setConcurrentCollectives(1);
  // commsOn lists the oldest first: AG, RS, torch.
  world.nccl->setGroupEndDelay(world.nccl->commsOn(SimWorld::deviceOf(0))[0], 100ms);
  world.nccl->setGroupEndDelay(world.nccl->commsOn(SimWorld::deviceOf(1))[1], 100ms);
  LaunchOrderRun run;
  std::atomic<bool> allFinished{true};
  onRanks(2, [&](int r) {
    auto gathered = allGather(at::full({4}, float(r + 1)), at::empty({8}));
    auto scattered = reduceScatter(at::full({8}, float(r + 1)), at::empty({4}));
    Collective reduced;
    reduced.kind = CollectiveKind::AllReduce;
    reduced.inputs = {at::full({4}, float(r + 1))};
    reduced.outputs = reduced.inputs;
    reduced.reduceOp = c10d::ReduceOp::SUM;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    try {
      works.push_back(issue(*ag[r], gathered));
      works.push_back(issue(*rs[r], scattered));
      works.push_back(issue(*torch[r], reduced));
      for (auto& work : works) {
        if (!work->wait(3000ms)) {
          allFinished = false;
        }
      }
    } catch (const CollectiveTimeoutError&) {
      allFinished = false;
      return;
    }
    EXPECT_TRUE(at::equal(gathered.outputs[0], at::cat({at::ones({4}), at::full({4}, 2.0f)})));
    EXPECT_TRUE(at::equal(scattered.outputs[0], at::full({4}, 3.0f)));
    EXPECT_TRUE(at::equal(reduced.outputs[0], at::full({4}, 3.0f)));
  });
  run.finished = allFinished.load();
  if (!run.finished) {
    EXPECT_TRUE(eventually([&] { return teardown.count() > 0; })) << "the deadlock was not named";
  }
  for (const auto* lanes : {&ag, &rs, &torch}) {
    for (auto& lane : *lanes) {
      lane->abort(); // ends a deadlock's kernels
    }
  }
  run.started.resize(2);
  auto timeline = world.gpu->timeline(); // in the order kernels ended
  std::stable_sort(timeline.begin(), timeline.end(), [](const auto& x, const auto& y) {
    return x.startUs < y.startUs;
  });
  for (const auto& k : timeline) {
    if (k.comm != 0) {
      run.started[k.device - 1].push_back(k.label);
    }
  }
  world.gpu->setConcurrentCollectives(0);
  return run;
}

TEST(LaneLaunchOrder, LanesAndTorchsCommunicatorStartInProgramOrderSoNoneDeadlocks) {
  // issue() returns once NCCL's thread took the launch, so each device's
  // NCCL launches, torch's on the calling thread included, are in program
  // order, which NCCL_LAUNCH_ORDER_IMPLICIT keeps on the device.
  const auto run = runAgRsTorchWithSlowLaunches(true);
  EXPECT_TRUE(run.finished) << "the lanes' kernels deadlocked";
  const std::vector<std::string> programOrder{"allgather", "reducescatter", "allreduce"};
  EXPECT_EQ(run.started[0], programOrder);
  EXPECT_EQ(run.started[1], programOrder);
}

TEST(LaneLaunchOrder, LaunchesLeftToNcclsThreadsRaceIntoADeadlockThatTheTimeoutNames) {
  // The lanes' mode under NCCL_LAUNCH_ORDER_IMPLICIT=0 (launchInProgramOrder
  // off), run here with the order implicit anyway to show why the two go
  // together: rank 0 launches its all-gather last, rank 1 its
  // reduce-scatter, and one kernel per device waits for a peer kernel that
  // cannot start. Only the timeout ends it.
  const auto run = runAgRsTorchWithSlowLaunches(false);
  EXPECT_FALSE(run.finished);
  ASSERT_FALSE(run.started[0].empty());
  ASSERT_FALSE(run.started[1].empty());
  EXPECT_NE(run.started[0].front(), "allgather") << "rank 0's all-gather was launched last";
  EXPECT_NE(run.started[1].front(), "reducescatter");
}

TEST(LaneFaults, PoolAbortWithOpsHungOnBothLanesReturnsWithinASecond) {
  SimWorld world(2);
  // Long timeouts: only the abort may end these ops.
  auto ag = makeLanes(world, "ag", {}, 20s);
  auto rs = makeLanes(world, "rs", ag, 20s);
  connectLanes(world, ag);
  connectLanes(world, rs);
  CommPool pool;
  pool.add(pooled("ag", ag[0]));
  pool.add(pooled("rs", rs[0]));

  // Rank 0: a reduce-scatter rank 1 never joins; the caller's stream waits
  // for it (Work.wait()), and an all-gather queued after that waits behind
  // it on the device.
  auto rsWork = issue(*rs[0], reduceScatter(at::ones({32}), at::empty({16})));
  ASSERT_TRUE(rsWork->wait());
  auto agWork = issue(*ag[0], allGather(at::ones({16}), at::empty({32})));
  // Rank 1 joins the all-gather only.
  auto peerWork = issue(*ag[1], allGather(at::ones({16}), at::empty({32})));
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(agWork->isCompleted());

  const int64_t start = nowUs();
  pool.abort();
  EXPECT_LT(nowUs() - start, 1'000'000) << "pool.abort() waited for a hung op";
  expectFailure<PoolClosedError>(rsWork, 1000ms);
  expectFailure<PoolClosedError>(agWork, 1000ms);
  // Rank 1's peer op ends at its own abort, or before it when rank 0's
  // all-gather started between the aborts of rank 0's two lanes (the RS
  // abort ends the kernel it waits behind, as on a GPU) and met it.
  ag[1]->abort();
  rs[1]->abort();
  ASSERT_TRUE(eventually([&] { return peerWork->isCompleted(); }));
  if (!peerWork->isSuccess()) {
    expectFailure<PoolClosedError>(peerWork, 1000ms);
  }
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, WaitAfterAbortReportsTheFailureInsteadOfTheOutput) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  lanes[0]->abort();
  EXPECT_THROW(work->wait(), PoolClosedError); // the stream-ordered form too
  EXPECT_THROW(work->synchronize(), PoolClosedError);
  EXPECT_TRUE(work->isCompleted());
  EXPECT_FALSE(work->isSuccess());
  work->getFuture()->wait();
  EXPECT_TRUE(work->getFuture()->hasError());
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({16}), at::empty({32}))), PoolClosedError);
  lanes[1]->abort();
}

TEST(LaneFaults, MemberThatFailsBeforeTheSplitLeavesNoPeerWaitingPastTheTimeout) {
  SimWorld world(3);
  auto ag = makeLanes(world, "ag");
  // Ranks 0 and 1 split for the RS lane; rank 2 failed after the vote.
  std::vector<std::string> errors(2);
  const int64_t start = nowUs();
  onRanks(2, [&](int r) {
    try {
      NcclLane::create(world.spec(r, "rs", 300ms), "", ag[r]);
      ADD_FAILURE() << "split without rank 2 succeeded";
    } catch (const CollectiveTimeoutError& e) {
      errors[r] = e.what();
    }
  });
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  for (const auto& e : errors) {
    EXPECT_NE(e.find("ncclCommSplit"), std::string::npos) << e;
  }
  // NCCL may still be splitting their parents: those lanes are failed too,
  // saying why, and rank 2's is unharmed.
  for (int r = 0; r < 2; ++r) {
    EXPECT_FALSE(ag[r]->splittable());
    try {
      issue(*ag[r], allGather(at::ones({4}), at::empty({12})));
      ADD_FAILURE() << "issue on an aborted parent succeeded";
    } catch (const PycommError& e) {
      EXPECT_NE(std::string(e.what()).find("ncclCommSplit"), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(ag[2]->splittable());
  for (auto& lane : ag) {
    lane->abort();
  }
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, AnAbortDuringASplitEndsItAtOnceByNameNotAsATimeout) {
  // Rank 1 never splits, so rank 0's split polls its parent until the
  // parent's lane is aborted from another thread.
  SimWorld world(2);
  auto ag = makeLanes(world, "ag");
  std::string error;
  bool closed = false;
  const int64_t start = nowUs();
  std::thread aborter([&] {
    std::this_thread::sleep_for(100ms);
    ag[0]->abort();
  });
  try {
    NcclLane::create(world.spec(0, "rs", 5000ms), "", ag[0]);
    ADD_FAILURE() << "split without rank 1 succeeded";
  } catch (const PycommError& e) {
    error = e.what();
    closed = dynamic_cast<const PoolClosedError*>(&e) != nullptr;
  }
  aborter.join();
  EXPECT_TRUE(closed) << "a PoolClosedError, not: " << error;
  EXPECT_LT(nowUs() - start, 2'000'000) << "the abort, not the 5 s timeout";
  EXPECT_NE(error.find("ncclCommSplit"), std::string::npos) << error;
  EXPECT_NE(error.find("was ended by an abort"), std::string::npos) << error;
  for (auto& lane : ag) {
    lane->abort();
  }
  EXPECT_EQ(world.nccl->liveComms(), 0); // the half-built child too
}

TEST(LaneFaults, MemberMissingAtCreationTimesOutByName) {
  SimWorld world(3);
  const std::string id = world.uniqueId();
  const int64_t start = nowUs();
  // Rank 2 never creates its communicator.
  onRanks(2, [&](int r) {
    try {
      NcclLane::create(world.spec(r, "ag", 300ms), id, nullptr);
      ADD_FAILURE() << "creation without rank 2 succeeded";
    } catch (const CollectiveTimeoutError& e) {
      EXPECT_NE(std::string(e.what()).find("ncclCommInitRankConfig (rank " + std::to_string(r) + " of 3)"),
                std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("every member must duplicate the group"),
                std::string::npos) << e.what();
    }
  });
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  // NCCL's abort runs on a helper thread bounded by the stall timeout.
  EXPECT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; }))
      << "the half-made communicators were not freed";
  EXPECT_EQ(NcclComm::liveCount(), 0);
}

// A pooled group's creation gives the communicator only what its own
// deadline has left, not the ops' timeout again: init and split both end
// within the creation's bound.
TEST(LaneFaults, CreationIsBoundedByTheCreationTimeoutNotTheOpTimeout) {
  SimWorld world(3);
  const std::string id = world.uniqueId();
  auto withCreationBound = [&](int r, const std::string& role) {
    NcclLaneSpec spec = world.spec(r, role, std::chrono::seconds(20));
    spec.comm.creationTimeout = 300ms;
    return spec;
  };
  std::vector<std::shared_ptr<NcclLane>> ag(3);
  onRanks(3, [&](int r) { ag[r] = NcclLane::create(world.spec(r, "ag"), id, nullptr); });
  for (const std::string role : {"init", "split"}) {
    const std::string rsId = world.uniqueId();
    std::vector<std::string> errors(2);
    const int64_t start = nowUs();
    // Rank 2 never creates its communicator.
    onRanks(2, [&](int r) {
      try {
        if (role == "init") {
          NcclLane::create(withCreationBound(r, "rs"), rsId, nullptr);
        } else {
          NcclLane::create(withCreationBound(r, "rs"), "", ag[r]);
        }
        ADD_FAILURE() << role << " without rank 2 succeeded";
      } catch (const CollectiveTimeoutError& e) {
        errors[r] = e.what();
      }
    });
    EXPECT_LT(nowUs() - start, 1'300'000) << role << ": creation bound + 1 s, not the 20 s op timeout";
    for (const auto& e : errors) {
      EXPECT_NE(e.find("did not complete within 300 ms"), std::string::npos) << e;
    }
  }
  for (auto& lane : ag) {
    lane->abort();
  }
}

TEST(LaneFaults, SlowGroupEndIsWaitedForOnlyInProgramOrderAndBoundedByTheTimeout) {
  for (const bool inProgramOrder : {true, false}) {
    SCOPED_TRACE(inProgramOrder ? "program order" : "any order");
    SimWorld world(2);
    auto lanes = armedLanes(world, "ag", nullptr, 400ms, [&](NcclLaneSpec& spec) {
      spec.comm.launchInProgramOrder = inProgramOrder;
    });
    const auto comms = world.nccl->commsOn(SimWorld::deviceOf(0));
    ASSERT_EQ(comms.size(), 1u);
    world.nccl->setGroupEndDelay(comms[0], 100ms);
    onRanks(2, [&](int r) {
      auto op = allGather(at::full({4}, float(r)), at::empty({8}));
      const int64_t start = nowUs();
      auto work = issue(*lanes[r], op);
      // NCCL's thread takes the op 100 ms later. In program order issue()
      // waits for it; otherwise wait() does (the caller's stream must wait
      // behind the op's kernels).
      if (r == 0 && inProgramOrder) {
        EXPECT_GE(nowUs() - start, 100'000) << "issue() returned before NCCL took the op";
      } else if (r == 0) {
        EXPECT_LT(nowUs() - start, 50'000) << "issue() waited for NCCL's thread";
      }
      ASSERT_TRUE(work->wait());
      if (r == 0) {
        EXPECT_GE(nowUs() - start, 100'000) << "wait() returned before NCCL took the op";
      }
      ASSERT_TRUE(work->wait(5000ms));
      EXPECT_TRUE(at::equal(op.outputs[0], at::cat({at::zeros({4}), at::ones({4})})));
    });
    // Longer than the timeout: a named error, not a hang.
    world.nccl->setGroupEndDelay(comms[0], 2000ms);
    const int64_t start = nowUs();
    if (inProgramOrder) {
      EXPECT_THROW(issue(*lanes[0], allGather(at::ones({4}), at::empty({8}))), CollectiveTimeoutError);
    } else {
      auto work = issue(*lanes[0], allGather(at::ones({4}), at::empty({8})));
      expectFailure<CollectiveTimeoutError>(work, 5000ms);
    }
    EXPECT_LT(nowUs() - start, 1'400'000) << "timeout + 1 s";
    EXPECT_THROW(issue(*lanes[0], allGather(at::ones({4}), at::empty({8}))), CollectiveTimeoutError);
    lanes[0]->abort();
    lanes[1]->abort();
  }
}

TEST(LaneFaults, RefusedOpsLeaveTheLaneUsable) {
  SimWorld world(2);
  world.gpu->setComputeCapabilityMajor(SimWorld::deviceOf(0), 8);
  world.gpu->setComputeCapabilityMajor(SimWorld::deviceOf(1), 8);
  auto lanes = makeLanes(world, "rs");
  // FP8 reductions need Hopper: refused up front on sm80, never handed to NCCL.
  auto fp8 = reduceScatter(
      at::ones({8}).to(at::kFloat8_e4m3fn), at::empty({4}, at::kFloat8_e4m3fn));
  try {
    issue(*lanes[0], fp8);
    ADD_FAILURE() << "fp8 reduce-scatter on sm80 was issued";
  } catch (const UnsupportedOpError& e) {
    EXPECT_NE(std::string(e.what()).find("compute capability 9.0"), std::string::npos);
  }
  // AVG on integers has no NCCL meaning in torch's sense.
  EXPECT_THROW(
      issue(*lanes[0], reduceScatter(at::ones({8}, at::kLong), at::empty({4}, at::kLong), c10d::ReduceOp::AVG)),
      UnsupportedOpError);
  // A lane's first op issued while the caller's stream captures a graph
  // (its communicator would connect inside the capture).
  const int device = SimWorld::deviceOf(0);
  cudaStream_t capturing = world.gpu->createStream(device);
  world.gpu->setCurrentStream(device, capturing);
  ASSERT_EQ(world.gpu->beginCapture(capturing, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({4}), at::empty({8}))), UnsupportedOpError);
  EXPECT_EQ(world.gpu->endCapture(capturing), cudaSuccess);
  world.gpu->setCurrentStream(device, nullptr);
  ASSERT_EQ(world.gpu->streamDestroy(capturing), cudaSuccess);
  // Inside an NCCL group torch opened on this thread: refused, nothing
  // handed to NCCL.
  ASSERT_EQ(world.nccl->groupStart(), ncclSuccess);
  try {
    issue(*lanes[0], allGather(at::ones({4}), at::empty({8})));
    ADD_FAILURE() << "op issued inside torch's NCCL group";
  } catch (const UnsupportedOpError& e) {
    EXPECT_NE(std::string(e.what()).find("_coalescing_manager"), std::string::npos) << e.what();
  }
  ASSERT_EQ(world.nccl->groupEnd(), ncclSuccess);
  // Bitwise reductions: NCCL has none (ncclRedOp_t), as torch's NCCL
  // backend says too.
  try {
    Collective band;
    band.kind = CollectiveKind::AllReduce;
    band.reduceOp = c10d::ReduceOp::BAND;
    band.inputs = {at::ones({4}, at::kLong)};
    issue(*lanes[0], band);
    ADD_FAILURE() << "BAND was handed to NCCL";
  } catch (const UnsupportedOpError& e) {
    EXPECT_NE(std::string(e.what()).find("BAND"), std::string::npos) << e.what();
  }
  // A barrier is the CPU lane's (PooledBackend never hands one over): named,
  // not launched.
  try {
    Collective barrier;
    barrier.kind = CollectiveKind::Barrier;
    barrier.inputs = {at::ones({4})};
    issue(*lanes[0], barrier);
    ADD_FAILURE() << "a barrier was handed to NCCL";
  } catch (const UnsupportedOpError& e) {
    EXPECT_NE(std::string(e.what()).find("barrier does not run on pooled NCCL lanes"), std::string::npos)
        << e.what();
  }
  // uint32/uint64 map to NCCL's own types, and the lane still works.
  onRanks(2, [&](int r) {
    auto op = reduceScatter(
        at::full({8}, r + 1, at::kLong).to(at::kUInt64), at::empty({4}, at::kUInt64));
    ASSERT_TRUE(issue(*lanes[r], op)->wait(5000ms));
    EXPECT_TRUE(at::equal(op.outputs[0].to(at::kLong), at::full({4}, 3, at::kLong)));
  });
  EXPECT_EQ(lanes[0]->pending(), 0u);
  lanes[0]->close();
  lanes[1]->close();
}

TEST(LaneFaultsDeathTest, ErrorsTearTheProcessDownByDefault) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        SimWorld world(2);
        std::vector<std::shared_ptr<NcclLane>> lanes(2);
        const std::string id = world.uniqueId();
        onRanks(2, [&](int r) {
          auto spec = world.spec(r, "ag", 100ms);
          spec.tearDownOnError = true; // and the default tearDown
          lanes[r] = NcclLane::create(spec, id, nullptr);
        });
        auto work = issue(*lanes[0], allGather(at::ones({4}), at::empty({8})));
        std::this_thread::sleep_for(5s);
      },
      "tearing the process down");
}

// One create/use/destroy cycle on 2 ranks: AG and RS lanes, one op each,
// closed (even cycles) or released as destructors do (odd ones); checks that
// nothing of the cycle is left.
void lifecycle(int cycle) {
  SimWorld world(2);
  auto ag = makeLanes(world, "ag");
  auto rs = makeLanes(world, "rs", ag);
  onRanks(2, [&](int r) {
    auto a = issue(*ag[r], allGather(at::full({8}, float(cycle)), at::empty({16})));
    auto b = issue(*rs[r], reduceScatter(at::ones({16}), at::empty({8})));
    ASSERT_TRUE(a->wait(5000ms));
    ASSERT_TRUE(b->wait(5000ms));
    if (cycle % 2 == 0) {
      rs[r]->close();
      ag[r]->close();
    } else {
      rs[r]->release();
      ag[r]->release();
    }
  });
  ASSERT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; })) << "cycle " << cycle;
  rs.clear();
  ag.clear();
  ASSERT_TRUE(eventually([&] {
    return world.gpu->liveStreams() == 0 && world.gpu->liveEvents() == 0;
  })) << "cycle " << cycle << ": " << world.gpu->liveStreams() << " streams, "
      << world.gpu->liveEvents() << " events";
  // No context on a device that is not a lane's (device 0 is nobody's).
  for (int device : world.gpu->devicesWithContext()) {
    EXPECT_NE(device, 0) << "cycle " << cycle;
  }
}

TEST(LaneLifecycle, TwoHundredCyclesLeaveNothingBehind) {
  // The first cycle starts what lives as long as the process (torch's
  // thread pool, a sanitizer's own thread): the baseline is taken after it.
  lifecycle(0);
  std::this_thread::sleep_for(200ms); // idle stream threads end after 20 ms
  const int threadsBefore = threadCount();
  const int64_t commsBefore = NcclComm::liveCount();
  for (int cycle = 1; cycle <= 200; ++cycle) {
    lifecycle(cycle);
    if (HasFatalFailure()) {
      return;
    }
  }
  EXPECT_EQ(NcclComm::liveCount(), commsBefore);
  EXPECT_TRUE(eventually([&] { return threadCount() == threadsBefore; }))
      << threadCount() << " threads, " << threadsBefore << " before";
}

TEST(LaneLifecycle, ReleaseFromAThreadWithoutADeviceMakesNoContextOnDeviceZero) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag");
  // A thread that never set a device drops the lanes (as a destructor run
  // by Python's garbage collector would).
  std::thread([&] {
    for (auto& lane : lanes) {
      lane->release();
    }
  }).join();
  ASSERT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; }));
  lanes.clear();
  for (const auto& [thread, device] : world.gpu->contextCreations()) {
    EXPECT_NE(device, 0) << "a context was created on device 0";
  }
  EXPECT_EQ(world.gpu->devicesWithContext(), (std::set<int>{1, 2}));
}

TEST(LaneFaults, Fp8ReductionsAreRefusedWhenAnyRankPredatesHopper) {
  SimWorld world(2);
  // Rank 0 has a Hopper GPU, rank 1 an Ampere one; the group knows it (the
  // members exchange it when they agree on the lane's plan).
  world.gpu->setComputeCapabilityMajor(SimWorld::deviceOf(1), 8);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "rs", &teardown, 10s, [](NcclLaneSpec& spec) {
    spec.groupReducesFp8 = false;
  });
  auto fp8 = reduceScatter(at::ones({8}).to(at::kFloat8_e4m3fn), at::empty({4}, at::kFloat8_e4m3fn));
  for (int r = 0; r < 2; ++r) {
    try {
      issue(*lanes[r], fp8);
      ADD_FAILURE() << "rank " << r << " handed an fp8 reduction to NCCL";
    } catch (const UnsupportedOpError& e) {
      EXPECT_NE(std::string(e.what()).find("every rank"), std::string::npos) << e.what();
    }
  }
  // Refused before NCCL: the lanes still work, nothing tore down.
  onRanks(2, [&](int r) {
    ASSERT_TRUE(issue(*lanes[r], allGather(at::ones({4}), at::empty({8})))->wait(5000ms));
  });
  EXPECT_EQ(teardown.count(), 0u);
  closeAll(lanes);
}

TEST(LaneFaults, WaitDuringAHungAbortRaisesInsteadOfOrderingTheStream) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag", {}, 20s);
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  // Rank 1 never joins; the abort of rank 0's communicator hangs a while.
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  world.nccl->blockCalls(SimNccl::Call::CommAbort, 400ms);
  std::thread aborter([&] { lanes[0]->abort(); });
  ASSERT_TRUE(eventually([&] { return world.nccl->blockedCalls() == 1; }));
  // Inside the window between abort() and NCCL's abort returning, the op
  // is already failed: wait() raises rather than letting the caller's
  // stream consume a half-written output.
  EXPECT_TRUE(work->isCompleted());
  try {
    work->wait();
    ADD_FAILURE() << "wait() ordered the caller's stream behind an aborted op";
  } catch (const PoolClosedError& e) {
    EXPECT_NE(std::string(e.what()).find("abort()"), std::string::npos) << e.what();
  }
  EXPECT_EQ(world.nccl->blockedCalls(), 1) << "the abort was still hung";
  aborter.join();
  lanes[1]->abort();
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, WatchdogQueriesEventsWhileAnotherThreadCapturesAGraph) {
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "ag", &teardown);
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  auto op = allGather(at::full({8}, 1.0f), at::zeros({16}));
  auto work = issue(*lanes[0], op);
  // While rank 0's op waits for rank 1 (its watchdog querying the end
  // event), this thread captures a graph in CUDA's default Global mode.
  const int device = SimWorld::deviceOf(0);
  cudaStream_t graphStream = world.gpu->createStream(device);
  ASSERT_EQ(world.gpu->beginCapture(graphStream, cudaStreamCaptureModeGlobal), cudaSuccess);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(world.gpu->endCapture(graphStream), cudaSuccess)
      << "an event query of the watchdog invalidated the capture";
  auto peer = issue(*lanes[1], allGather(at::full({8}, 2.0f), at::zeros({16})));
  ASSERT_TRUE(work->wait(5000ms));
  ASSERT_TRUE(peer->wait(5000ms));
  EXPECT_TRUE(at::equal(op.outputs[0], at::cat({at::full({8}, 1.0f), at::full({8}, 2.0f)})));
  EXPECT_EQ(teardown.count(), 0u);
  ASSERT_EQ(world.gpu->streamDestroy(graphStream), cudaSuccess);
  closeAll(lanes);
}

TEST(LaneFaults, WindowOfMemoryNotFromCuMemFailsTheLaneByName) {
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = armedLanes(world, "ag", &teardown);
  auto cached = deviceTensor(world.gpu, nullptr, {256});
  try {
    lanes[0]->registerMemory(cached.data_ptr(), 1024, /*symmetric=*/true);
    ADD_FAILURE() << "a window of cudaMalloc memory was registered";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("virtual memory"), std::string::npos) << e.what();
  }
  // The communicator is in error: the lane refuses ops with that error,
  // and nothing tore the process down (no op had consumed anything).
  try {
    issue(*lanes[0], allGather(at::ones({4}), at::empty({8})));
    ADD_FAILURE() << "the lane took an op after its registration failed";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("virtual memory"), std::string::npos) << e.what();
  }
  EXPECT_EQ(teardown.count(), 0u);
  EXPECT_FALSE(lanes[0]->splittable());
  lanes[1]->abort();
  lanes[0]->close();
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

TEST(LaneFaults, WindowRegistrationPeersNeverJoinTimesOutWithTheSlotKept) {
  SimWorld world(2);
  auto lanes = makeLanes(world, "ag", {}, 300ms);
  auto vmm = deviceTensor(world.gpu, nullptr, {256}, at::kFloat, SimGpu::MemoryKind::Vmm);
  const int64_t start = nowUs();
  // Rank 1 never registers: NCCL keeps the registration in progress and
  // would write the window later, from its own thread.
  EXPECT_THROW(lanes[0]->registerMemory(vmm.data_ptr(), 1024, /*symmetric=*/true), CollectiveTimeoutError);
  EXPECT_LT(nowUs() - start, 1'300'000) << "timeout + 1 s";
  EXPECT_EQ(world.nccl->stackSlotWindows(), 0) << "NCCL was given a slot on a stack frame";
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({4}), at::empty({8}))), CollectiveTimeoutError);
  EXPECT_EQ(lanes[0]->registeredMemory(), 0u);
  lanes[1]->abort();
  lanes[0]->close();
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

// Lanes whose ops only a stall (or an abort) can end: a long op timeout,
// a short stall bound.
std::vector<std::shared_ptr<NcclLane>> stallLanes(SimWorld& world, TearDownRecorder* teardown) {
  return armedLanes(world, "ag", teardown, 20s, [](NcclLaneSpec& spec) { spec.stallTimeout = 200ms; });
}

// Runs `fn` on a thread; whether it returned within `within`. The thread is
// joined either way (after `unblock`), so a test fails instead of hanging.
bool returnsWithin(std::chrono::milliseconds within, const std::function<void()>& fn, const std::function<void()>& unblock) {
  std::atomic<bool> returned{false};
  std::thread t([&] {
    fn();
    returned = true;
  });
  const auto deadline = std::chrono::steady_clock::now() + within;
  while (!returned && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(2ms);
  }
  const bool inTime = returned.load();
  unblock();
  t.join();
  return inTime;
}

TEST(LaneFaults, WatchdogStuckInACudaCallFailsTheOpsByNameWithinTheStallBound) {
  SimWorld world(2);
  TearDownRecorder teardown;
  auto lanes = stallLanes(world, &teardown);
  connectLanes(world, lanes);
  // Rank 1 never joins; the watchdog polls the op's end event, and then a
  // query hangs (a sick GPU).
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  std::this_thread::sleep_for(20ms);
  world.gpu->blockCalls(SimGpu::Call::EventQuery, CallGate::kForever);
  const int64_t start = nowUs();
  const std::string message = expectFailure<CollectiveTimeoutError>(work, 3000ms);
  EXPECT_LT(nowUs() - start, 800'000) << "1.25 stall bounds and scheduling";
  EXPECT_NE(message.find("watchdog has been blocked"), std::string::npos) << message;
  EXPECT_NE(message.find("querying the end event"), std::string::npos) << message;
  EXPECT_NE(message.find("role 'ag' of group 'sim'"), std::string::npos) << message;
  ASSERT_TRUE(eventually([&] { return teardown.count() == 1; }));
  EXPECT_NE(teardown.calls[0].find("querying the end event"), std::string::npos);
  EXPECT_THROW(issue(*lanes[0], allGather(at::ones({16}), at::empty({32}))), CollectiveTimeoutError);
  // close() does not wait for the stuck watchdog past the bound.
  EXPECT_TRUE(returnsWithin(800ms, [&] { lanes[0]->close(); }, [&] {
    world.gpu->releaseBlockedCalls();
  }));
  lanes[0]->abort();
  lanes[1]->abort();
  EXPECT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; }));
}

TEST(LaneFaults, AbortReturnsWithinTheStallBoundWhenNcclsAbortHangs) {
  SimWorld world(2);
  auto lanes = stallLanes(world, nullptr);
  connectLanes(world, lanes); // the op below hangs in its kernel, not in the connection
  auto work = issue(*lanes[0], allGather(at::ones({16}), at::empty({32})));
  world.nccl->blockCalls(SimNccl::Call::CommAbort, CallGate::kForever);
  EXPECT_TRUE(returnsWithin(800ms, [&] { lanes[0]->abort(); }, [&] {
    world.nccl->releaseBlockedCalls();
  })) << "abort() waited for NCCL's hung abort";
  expectFailure<PoolClosedError>(work, 1000ms);
  lanes[1]->abort();
  EXPECT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; }));
}

TEST(LaneFaults, CloseReturnsWithinTheStallBoundWhenNcclsDestroyHangs) {
  SimWorld world(2);
  auto lanes = stallLanes(world, nullptr);
  onRanks(2, [&](int r) {
    ASSERT_TRUE(issue(*lanes[r], allGather(at::ones({16}), at::empty({32})))->wait(5000ms));
  });
  world.nccl->blockCalls(SimNccl::Call::CommDestroy, CallGate::kForever);
  EXPECT_TRUE(returnsWithin(800ms, [&] { onRanks(2, [&](int r) { lanes[r]->close(); }); }, [&] {
    world.nccl->releaseBlockedCalls();
  })) << "close() waited for NCCL's hung destroy";
  EXPECT_TRUE(eventually([&] { return world.nccl->liveComms() == 0; }));
}

TEST(LaneFaults, ACallNcclRefusesFailsTheLaneForGoodInNcclsWords) {
  // A refused call leaves a nonblocking communicator in error for good (the
  // simulated NCCL does as NCCL does): the lane fails with NCCL's words,
  // once labelled, and every later op meets that error.
  SimWorld world(2);
  auto lanes = armedLanes(world, "ag", nullptr, 300ms);
  connectLanes(world, lanes);
  Collective toNowhere;
  toNowhere.kind = CollectiveKind::Send; // PooledBackend's validate() would name it first
  toNowhere.inputs = {at::ones({4})};
  toNowhere.peer = 5;
  const std::string refused = thrownText<CollectiveError>([&] { issue(*lanes[0], toNowhere); });
  EXPECT_NE(refused.find("ncclSend: invalid peer 5"), std::string::npos) << refused;
  const std::string label = "role 'ag' of group 'sim' (rank 0)";
  EXPECT_EQ(refused.find(label), 0u) << refused;
  EXPECT_EQ(refused.find(label, 1), std::string::npos) << "labelled once: " << refused;
  EXPECT_EQ(thrownText<CollectiveError>([&] { issue(*lanes[0], allGather(at::ones({4}), at::empty({8}))); }), refused);
  // Its peer's op finds no partner and ends at its timeout.
  auto alone = issue(*lanes[1], allGather(at::ones({4}), at::empty({8})));
  EXPECT_NE(expectFailure<CollectiveTimeoutError>(alone, 5000ms).find("300 ms"), std::string::npos);
  closeAll(lanes);
  EXPECT_EQ(world.nccl->liveComms(), 0);
}

} // namespace
} // namespace pycomm::sim
