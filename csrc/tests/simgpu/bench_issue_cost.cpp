// How long NcclLane::issue() blocks its caller per collective, on the
// simulated GPU: the lane's own host cost (events, the NCCL group, waiting
// for a nonblocking communicator to take the group), median and 90th
// percentile of 1,000 all-gathers per rank on 2 ranks. A benchmark, not a
// test: it prints a table and writes JSON.
//
// As in NCCL, every nonblocking group end starts a thread that launches the
// group and answers ncclInProgress; issue() does not wait for it (the end
// event is recorded by whoever sees NCCL take the op). --group-end-us D
// makes that thread take D microseconds more (a busy host). --blocking runs
// the lanes on blocking communicators instead, whose group end launches on
// the calling thread: the figure the lane's design is chosen from.
//
//   bench_issue_cost [--ops N] [--group-end-us D] [--blocking] [--json PATH]
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
} // namespace

int main(int argc, char** argv) {
  int ops = 1000;
  int groupEndUs = 0;
  std::string json;
  bool blocking = false;
  for (int i = 1; i < argc; ++i) {
    const bool hasValue = i + 1 < argc;
    if (!std::strcmp(argv[i], "--blocking")) {
      blocking = true;
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
  std::vector<std::shared_ptr<pycomm::NcclLane>> lanes(2);
  const std::string id = world.uniqueId();
  pycomm::sim::onRanks(2, [&](int r) {
    auto spec = world.spec(r, "ag");
    spec.comm.blocking = blocking;
    lanes[r] = pycomm::NcclLane::create(spec, id, nullptr);
  });
  std::vector<std::vector<int64_t>> issueUs(2);
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
  std::vector<int64_t> all = issueUs[0];
  all.insert(all.end(), issueUs[1].begin(), issueUs[1].end());
  const double p50 = percentile(all, 0.5);
  const double p90 = percentile(all, 0.9);
  std::printf("NcclLane::issue() host time on the simulated GPU (2 ranks, 64 KiB all-gather)\n");
  const std::string groupEnd = blocking ? "blocking" : "thread +" + std::to_string(groupEndUs) + " us";
  std::printf("%-8s %-16s %-12s %-12s\n", "ops", "group end", "median us", "p90 us");
  std::printf("%-8d %-16s %-12.1f %-12.1f\n", ops * 2, groupEnd.c_str(), p50, p90);
  if (!json.empty()) {
    std::ofstream(json) << "{\"ops\": " << ops * 2 << ", \"communicator\": \""
                        << (blocking ? "blocking" : "nonblocking") << "\", \"group_end_us\": "
                        << groupEndUs
                        << ", \"median_us\": " << p50 << ", \"p90_us\": " << p90 << "}\n";
  }
  return 0;
}
