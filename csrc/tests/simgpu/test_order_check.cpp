// PYCOMM_DEBUG=order on NCCL lanes: pooled backends of 2 simulated ranks,
// each with its CPU side on an in-process communicator and its device side
// on a simulated NCCL lane. Ranks that issue device ops in different orders
// get OrderMismatchError naming both ops before anything reaches NCCL; the
// lane stays usable.
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>

#include "errors.h"
#include "pooled_backend.h"
#include "sim_world.h"

using namespace std::chrono_literals;

namespace pycomm::sim {
namespace {

// A Work already finished, with a future, as gloo's all-gather Work has.
c10::intrusive_ptr<c10d::Work> finishedWork() {
  class Finished : public c10d::Work {
   public:
    Finished() : future_(c10::make_intrusive<c10::ivalue::Future>(c10::NoneType::get())) {
      future_->markCompleted();
    }
    c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
      return future_;
    }

   private:
    c10::intrusive_ptr<c10::ivalue::Future> future_;
  };
  return c10::make_intrusive<Finished>();
}

// The ranks of one in-process CPU communicator: the k-th all-gather of every
// rank meets the k-th of the others (what the order check sends).
class MemoryWorld {
 public:
  explicit MemoryWorld(int size) : size_(size) {}

  class Rank : public c10d::Backend {
   public:
    Rank(MemoryWorld& world, int rank) : c10d::Backend(rank, world.size_), world_(world) {}
    const std::string getBackendName() const override {
      return "memory";
    }
    c10::intrusive_ptr<c10d::Work> _allgather_base(
        at::Tensor& out, at::Tensor& in, const c10d::AllgatherOptions&) override {
      world_.allGather(rank_, out, in);
      return finishedWork();
    }

   private:
    MemoryWorld& world_;
  };

  c10::intrusive_ptr<c10d::Backend> rank(int r) {
    return c10::make_intrusive<Rank>(*this, r);
  }

 private:
  struct Round {
    std::vector<at::Tensor> inputs;
    std::vector<at::Tensor> outputs;
    int arrived = 0;
    bool done = false;
  };

  // Blocks until every rank brought its part of this round (each rank's
  // lane issues its order checks on a thread of its own).
  void allGather(int rank, at::Tensor& out, at::Tensor& in) {
    std::unique_lock<std::mutex> lock(mutex_);
    const size_t index = nextRound_[rank]++;
    if (rounds_.size() <= index) {
      rounds_.resize(index + 1);
    }
    Round& round = rounds_[index];
    round.inputs.resize(size_);
    round.outputs.resize(size_);
    round.inputs[rank] = in;
    round.outputs[rank] = out;
    if (++round.arrived == size_) {
      auto all = at::cat(round.inputs);
      for (auto& o : round.outputs) {
        o.copy_(all);
      }
      round.done = true;
      cv_.notify_all();
    }
    ASSERT_TRUE(cv_.wait_for(lock, 10s, [&] { return rounds_[index].done; }));
  }

  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Round> rounds_;
  std::map<int, size_t> nextRound_;
};

// Serves CPU tensors with a simulated NCCL lane (whose bytes live in host
// memory), so a pooled backend routes CPU ops to it as it routes CUDA ops to
// a real lane.
class CpuTensorLane : public DeviceLane {
 public:
  explicit CpuTensorLane(std::shared_ptr<NcclLane> lane) : lane_(std::move(lane)) {}
  c10::Device device() const override {
    return c10::Device(c10::DeviceType::CPU);
  }
  c10::intrusive_ptr<c10d::Work> issue(
      const Collective& op, c10d::OpType type, uint64_t seq, std::string description) override {
    issued += 1;
    return lane_->issue(op, type, seq, std::move(description));
  }
  void setTimeout(std::chrono::milliseconds timeout) override {
    lane_->setTimeout(timeout);
  }
  void bindStats(std::shared_ptr<LaneStats> stats) override {
    lane_->bindStats(std::move(stats));
  }
  size_t pending() const override {
    return lane_->pending();
  }
  void close() override {
    lane_->close();
  }
  void release() override {
    lane_->release();
  }
  void abort() override {
    lane_->abort();
  }
  void registerMemory(void* buffer, size_t bytes, bool symmetric) override {
    lane_->registerMemory(buffer, bytes, symmetric);
  }
  void deregisterMemory(void* buffer) override {
    lane_->deregisterMemory(buffer);
  }
  bool isRegistered(void* buffer) const override {
    return lane_->isRegistered(buffer);
  }
  std::shared_ptr<c10::Allocator> memAllocator() override {
    return lane_->memAllocator();
  }
  at::Tensor allocateTensor(int64_t numel, const at::TensorOptions& options) override {
    return lane_->allocateTensor(numel, options);
  }
  std::atomic<int> issued{0};

 private:
  std::shared_ptr<NcclLane> lane_;
};

struct CheckedRanks {
  explicit CheckedRanks(int size) : world(size), cpu(size) {
    auto lanes = makeLanes(world, "ag");
    for (int r = 0; r < size; ++r) {
      PooledGroupSpec spec;
      spec.name = "checked";
      spec.baseGroupName = "base";
      spec.role = "ag";
      for (int64_t g = 0; g < size; ++g) {
        spec.globalRanks.push_back(g);
      }
      spec.rank = r;
      spec.timeout = 10s;
      spec.checkOrder = true;
      backends.push_back(c10::make_intrusive<PooledBackend>(spec, cpu.rank(r)));
      deviceLanes.push_back(std::make_shared<CpuTensorLane>(lanes[r]));
      backends.back()->attachDeviceLane(deviceLanes.back());
    }
  }
  ~CheckedRanks() {
    for (auto& b : backends) {
      b->close();
    }
  }
  SimWorld world;
  MemoryWorld cpu;
  std::vector<c10::intrusive_ptr<PooledBackend>> backends;
  std::vector<std::shared_ptr<CpuTensorLane>> deviceLanes;
};

constexpr int64_t kCount = 8;

c10::intrusive_ptr<c10d::Work> allGatherOn(PooledBackend& b, int rank, at::Tensor& out) {
  auto in = at::full({kCount}, static_cast<float>(rank + 1));
  return b._allgather_base(out, in, {});
}

c10::intrusive_ptr<c10d::Work> reduceScatterOn(PooledBackend& b, at::Tensor& out) {
  auto in = at::ones({kCount * 2});
  return b._reduce_scatter_base(out, in, {});
}

TEST(OrderCheckOnNcclLanes, DifferentOrdersAreNamedBeforeReachingNccl) {
  CheckedRanks ranks(2);
  std::vector<std::string> errors(2);
  onRanks(2, [&](int r) {
    auto& backend = *ranks.backends[r];
    auto gathered = at::zeros({kCount * 2});
    auto reduced = at::zeros({kCount});
    // Rank 0: all-gather first; rank 1: reduce-scatter first. On NCCL this
    // pair waits forever; here the first op of each fails by name.
    errors[r] = thrownText<OrderMismatchError>([&] {
      if (r == 0) {
        allGatherOn(backend, r, gathered);
      } else {
        reduceScatterOn(backend, reduced);
      }
    });
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("op #0 all_gather(1 x Float, 8 elements)"), std::string::npos) << e;
    EXPECT_NE(e.find("op #0 reduce_scatter(1 x Float, 16 elements, SUM)"), std::string::npos) << e;
  }
  for (const auto& lane : ranks.deviceLanes) {
    EXPECT_EQ(lane->issued.load(), 0) << "a mismatched op reached NCCL";
  }

  // The same op on every rank then runs on the NCCL lane, correctly.
  onRanks(2, [&](int r) {
    auto gathered = at::zeros({kCount * 2});
    auto work = allGatherOn(*ranks.backends[r], r, gathered);
    ASSERT_TRUE(work->wait(5000ms));
    auto expected = at::cat({at::full({kCount}, 1.0f), at::full({kCount}, 2.0f)});
    EXPECT_TRUE(at::equal(gathered, expected)) << gathered;
  });
  for (const auto& lane : ranks.deviceLanes) {
    EXPECT_EQ(lane->issued.load(), 1);
  }
}

TEST(OrderCheckOnNcclLanes, DeviceAndCpuOpsShareOneOrder) {
  CheckedRanks ranks(2);
  std::vector<std::string> errors(2);
  onRanks(2, [&](int r) {
    auto& backend = *ranks.backends[r];
    errors[r] = thrownText<OrderMismatchError>([&] {
      if (r == 0) {
        auto gathered = at::zeros({kCount * 2});
        allGatherOn(backend, r, gathered); // device lane
      } else {
        backend.barrier(c10d::BarrierOptions())->wait(5000ms); // CPU lane
      }
    });
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("all_gather"), std::string::npos) << e;
    EXPECT_NE(e.find("barrier"), std::string::npos) << e;
  }
}

// A segment of cuMem memory on `rank`'s device, as a pool's snapshot lists it.
struct HeldSegment {
  at::Tensor memory;
  PooledBackend::Segments::value_type segment() const {
    return {reinterpret_cast<uintptr_t>(memory.data_ptr()), static_cast<size_t>(memory.nbytes())};
  }
};

HeldSegment vmmSegment(const SimWorld& world, int rank, int64_t floats) {
  const cudaStream_t stream = world.gpu->legacyStreamOf(SimWorld::deviceOf(rank));
  return HeldSegment{deviceTensor(world.gpu, stream, {floats}, at::kFloat, SimGpu::MemoryKind::Vmm)};
}

TEST(SymmetricRegistration, MembersHoldingDifferentSegmentsAreNamedBeforeNccl) {
  CheckedRanks ranks(2);
  // Rank 0 holds two segments, rank 1 one: one window call per segment would
  // leave rank 0's second call waiting in NCCL for a call that never comes.
  std::vector<std::vector<HeldSegment>> held(2);
  held[0] = {vmmSegment(ranks.world, 0, 256), vmmSegment(ranks.world, 0, 256)};
  held[1] = {vmmSegment(ranks.world, 1, 256)};
  std::vector<std::string> errors(2);
  const auto start = std::chrono::steady_clock::now();
  onRanks(2, [&](int r) {
    PooledBackend::Segments segments;
    for (const auto& h : held[r]) {
      segments.push_back(h.segment());
    }
    errors[r] = thrownText<TensorMismatchError>([&] { ranks.backends[r]->registerMemory(segments, /*symmetric=*/true); });
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "named only after the lane's timeout";
  for (const auto& e : errors) {
    EXPECT_NE(e.find("counts by group rank [2, 1]"), std::string::npos) << e;
  }
  for (int r = 0; r < 2; ++r) {
    for (const auto& h : held[r]) {
      EXPECT_FALSE(ranks.deviceLanes[r]->isRegistered(h.memory.data_ptr())) << "rank " << r;
    }
  }

  // Different sizes, same count: named too.
  held[1].push_back(vmmSegment(ranks.world, 1, 512));
  onRanks(2, [&](int r) {
    PooledBackend::Segments segments{held[r][0].segment(), held[r][1].segment()};
    errors[r] = thrownText<TensorMismatchError>([&] { ranks.backends[r]->registerMemory(segments, /*symmetric=*/true); });
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("rank 0 [1024, 1024], rank 1 [1024, 2048]"), std::string::npos) << e;
  }

  // The same layout registers; a segment registered already is left out of
  // the agreement, so a member that registered more before still agrees.
  onRanks(2, [&](int r) {
    ranks.backends[r]->registerMemory({held[r][0].segment()}, /*symmetric=*/true);
  });
  held[1][1] = vmmSegment(ranks.world, 1, 256);
  onRanks(2, [&](int r) {
    ranks.backends[r]->registerMemory({held[r][0].segment(), held[r][1].segment()}, /*symmetric=*/true);
    for (const auto& h : held[r]) {
      EXPECT_TRUE(ranks.deviceLanes[r]->isRegistered(h.memory.data_ptr())) << "rank " << r;
    }
  });
  // The lane took no harm: an op still runs.
  onRanks(2, [&](int r) {
    auto gathered = at::zeros({kCount * 2});
    ASSERT_TRUE(allGatherOn(*ranks.backends[r], r, gathered)->wait(5000ms));
  });
}

} // namespace
} // namespace pycomm::sim
