// How long NcclLane::issue() blocks its caller per collective, on the
// simulated GPU: the lane's own host cost (events, the NCCL group, waiting
// for a nonblocking communicator to take the group), median and 90th
// percentile of 1,000 all-gathers per rank on 2 ranks. A benchmark, not a
// test: it prints a table and writes JSON.
//
// As in NCCL, every nonblocking group end starts a thread that launches the
// group and answers ncclInProgress; issue() waits for that thread to put the
// kernels on the stream, which keeps the device's launches in program order
// (NcclCommSpec::launchInProgramOrder). --any-order leaves the launch to
// that thread (the end event is recorded by whoever sees NCCL take the op),
// the lanes' mode under NCCL_LAUNCH_ORDER_IMPLICIT=0. --group-end-us D makes
// that thread take D microseconds more (a busy host). --blocking runs the
// lanes on blocking communicators instead, whose group end launches on the
// calling thread. Side by side, the figures the lane's design is chosen from.
// --bare times the simulated NCCL alone, without a lane: a nonblocking
// group end polled until NCCL took it (what any caller of NCCL that needs
// its launches in program order pays at least).
//
//   bench_issue_cost [--ops N] [--group-end-us D] [--blocking | --any-order | --bare] [--json PATH]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "sim_world.h"

using namespace std::chrono_literals;
using pycomm::sim::SimWorld;

namespace {
double percentile(std::vector<int64_t> values, double q) {
  std::sort(values.begin(), values.end());
  return static_cast<double>(values[static_cast<size_t>(q * (values.size() - 1))]);
}

void timeLaneIssues(
    SimWorld& world, int ops, bool blocking, bool anyOrder, std::vector<std::vector<int64_t>>& issueUs);
void timeBareGroupEnds(SimWorld& world, int ops, std::vector<std::vector<int64_t>>& issueUs);
} // namespace

int main(int argc, char** argv) {
  int ops = 1000;
  int groupEndUs = 0;
  std::string json;
  bool blocking = false;
  bool anyOrder = false;
  bool bare = false;
  for (int i = 1; i < argc; ++i) {
    const bool hasValue = i + 1 < argc;
    if (!std::strcmp(argv[i], "--blocking")) {
      blocking = true;
    } else if (!std::strcmp(argv[i], "--any-order")) {
      anyOrder = true;
    } else if (!std::strcmp(argv[i], "--bare")) {
      bare = true;
    } else if (hasValue && !std::strcmp(argv[i], "--ops")) {
      ops = std::stoi(argv[++i]);
    } else if (hasValue && !std::strcmp(argv[i], "--group-end-us")) {
      groupEndUs = std::stoi(argv[++i]);
    } else if (hasValue && !std::strcmp(argv[i], "--json")) {
      json = argv[++i];
    }
  }
  SimWorld world(2);
  world.nccl->setGroupEndDelay(std::chrono::microseconds(groupEndUs));
  std::vector<std::vector<int64_t>> issueUs(2);
  if (bare) {
    timeBareGroupEnds(world, ops, issueUs);
  } else {
    timeLaneIssues(world, ops, blocking, anyOrder, issueUs);
  }
  std::vector<int64_t> all = issueUs[0];
  all.insert(all.end(), issueUs[1].begin(), issueUs[1].end());
  const double p50 = percentile(all, 0.5);
  const double p90 = percentile(all, 0.9);
  std::printf("%s host time on the simulated GPU (2 ranks, 64 KiB all-gather)\n",
              bare ? "NCCL group end, polled until taken," : "NcclLane::issue()");
  const std::string groupEnd = blocking ? "blocking" : "thread +" + std::to_string(groupEndUs) + " us";
  const char* launch =
      bare ? "bare NCCL" : blocking ? "calling thread" : anyOrder ? "any order" : "program order";
  std::printf("%-8s %-16s %-16s %-12s %-12s\n", "ops", "group end", "launch", "median us", "p90 us");
  std::printf("%-8d %-16s %-16s %-12.1f %-12.1f\n", ops * 2, groupEnd.c_str(), launch, p50, p90);
  if (!json.empty()) {
    std::ofstream(json) << "{\"ops\": " << ops * 2 << ", \"communicator\": \""
                        << (blocking ? "blocking" : "nonblocking") << "\", \"group_end_us\": "
                        << groupEndUs << ", \"launch\": \"" << launch << "\""
                        << ", \"median_us\": " << p50 << ", \"p90_us\": " << p90 << "}\n";
  }
  return 0;
}

namespace {
void timeLaneIssues(
    SimWorld& world, int ops, bool blocking, bool anyOrder, std::vector<std::vector<int64_t>>& issueUs) {
  std::vector<std::shared_ptr<pycomm::NcclLane>> lanes(2);
  const std::string id = world.uniqueId();
  pycomm::sim::onRanks(2, [&](int r) {
    auto spec = world.spec(r, "ag");
    spec.comm.blocking = blocking;
    spec.comm.launchInProgramOrder = !anyOrder;
    lanes[r] = pycomm::NcclLane::create(spec, id, nullptr);
  });
  pycomm::sim::onRanks(2, [&](int r) {
    auto in = at::ones({16 * 1024}); // 64 KiB
    auto out = at::empty({32 * 1024});
    auto op = pycomm::sim::allGather(in, out);
    for (int i = 0; i < ops; ++i) {
      const int64_t start = pycomm::sim::nowUs();
      auto work = pycomm::sim::issue(*lanes[r], op);
      issueUs[r].push_back(pycomm::sim::nowUs() - start);
      work->wait(10s); // one op in flight at a time, as a layer-by-layer FSDP step
    }
  });
  for (auto& lane : lanes) {
    lane->close();
  }
}

void timeBareGroupEnds(SimWorld& world, int ops, std::vector<std::vector<int64_t>>& issueUs) {
  auto& nccl = *world.nccl;
  ncclUniqueId id;
  nccl.getUniqueId(&id);
  std::vector<ncclComm_t> comms(2, nullptr);
  std::vector<cudaStream_t> streams(2, nullptr);
  auto settle = [&](ncclComm_t comm) {
    ncclResult_t state = ncclInProgress;
    while (nccl.commGetAsyncError(comm, &state) == ncclSuccess && state == ncclInProgress) {
      std::this_thread::yield();
    }
    return state;
  };
  pycomm::sim::onRanks(2, [&](int r) {
    const int device = SimWorld::deviceOf(r);
    world.gpu->setDevice(device);
    streams[r] = world.gpu->createStream(device);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    nccl.commInitRankConfig(&comms[r], 2, id, r, &config);
    settle(comms[r]);
    auto in = at::ones({16 * 1024}); // 64 KiB
    auto out = at::empty({32 * 1024});
    for (int i = 0; i < ops; ++i) {
      const int64_t start = pycomm::sim::nowUs();
      nccl.groupStart();
      nccl.allGather(in.data_ptr(), out.data_ptr(), in.numel(), ncclFloat32, comms[r], streams[r]);
      nccl.groupEnd();
      settle(comms[r]);
      issueUs[r].push_back(pycomm::sim::nowUs() - start);
      world.gpu->synchronize(streams[r], 10s);
    }
  });
  for (int r = 0; r < 2; ++r) {
    nccl.commDestroy(comms[r]);
    world.gpu->streamDestroy(streams[r]);
  }
}
} // namespace
