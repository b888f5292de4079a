#pragma once
// A world of simulated ranks for the NCCL lane's tests: one SimGpu, one
// SimNccl, rank r on device r + 1 (so a context made on device 0 is always a
// mistake), and helpers that run a function on every rank at once, as the
// collective creation of lanes needs.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "comm_memory.h"
#include "nccl_calls.h"
#include "nccl_lane.h"
#include "sim_gpu.h"
#include "sim_nccl.h"

namespace pycomm::sim {

struct SimWorld {
  explicit SimWorld(int ranks)
      : size(ranks),
        gpu(std::make_shared<SimGpu>(ranks + 1)),
        nccl(std::make_shared<SimNccl>(gpu)) {}

  int size;
  std::shared_ptr<SimGpu> gpu;
  std::shared_ptr<SimNccl> nccl;

  static int deviceOf(int rank) {
    return rank + 1;
  }

  NcclLaneSpec spec(
      int rank,
      const std::string& role,
      std::chrono::milliseconds timeout = std::chrono::seconds(10)) const {
    NcclLaneSpec s;
    s.comm.apis = GpuApis{gpu, nccl};
    s.comm.device = deviceOf(rank);
    s.comm.rank = rank;
    s.comm.size = size;
    s.comm.timeout = timeout;
    s.comm.label = "role '" + role + "' of group 'sim' (rank " + std::to_string(rank) + ")";
    s.role = role;
    // A test that wants the teardown sets its own hook.
    s.tearDownOnError = false;
    return s;
  }

  std::string uniqueId() const {
    return nccl::newUniqueId(*nccl);
  }
};

// CommMemory of the simulated GPU: every tensor and block its own
// ncclMemAlloc (the extension's caches them in torch's caching allocator,
// which needs a real CUDA runtime), host memory standing for the device's
// as in every test here.
class SimCommMemory final : public CommMemory {
 public:
  SimCommMemory(GpuApis apis, int device)
      : apis_(std::move(apis)), device_(device), allocator_(std::make_shared<Allocator>(apis_, device)) {}
  std::shared_ptr<c10::Allocator> allocator() override {
    return allocator_;
  }
  at::Tensor allocate(int64_t numel, const at::TensorOptions& options) override {
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    void* block = nccl::allocateMemory(apis_, device_, bytes, "sim allocate_tensor");
    return at::from_blob(
        block, {numel}, [apis = apis_, device = device_](void* freed) { nccl::freeMemory(apis, device, freed); },
        options.device(c10::DeviceType::CPU));
  }

 private:
  class Allocator final : public c10::Allocator {
   public:
    Allocator(GpuApis apis, int device) : apis_(std::move(apis)), device_(device) {}
    c10::DataPtr allocate(size_t bytes) override {
      void* block = nccl::allocateMemory(apis_, device_, bytes, "sim mem_allocator");
      return {block, new Owned{apis_, device_, block}, &Allocator::free, c10::Device(c10::DeviceType::CPU)};
    }
    void copy_data(void* dest, const void* src, std::size_t count) const override {
      std::memcpy(dest, src, count);
    }

   private:
    struct Owned {
      GpuApis apis;
      int device;
      void* block;
    };
    static void free(void* context) {
      std::unique_ptr<Owned> owned(static_cast<Owned*>(context));
      nccl::freeMemory(owned->apis, owned->device, owned->block);
    }
    GpuApis apis_;
    int device_;
  };
  GpuApis apis_;
  int device_;
  std::shared_ptr<Allocator> allocator_;
};

// Runs fn(rank) on one thread per rank and waits for all; the first
// exception is rethrown here.
inline void onRanks(int ranks, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  for (auto& e : errors) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

// Waits until `done()` or `timeout`; whether it came true.
inline bool eventually(
    const std::function<bool()>& done,
    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  for (auto deadline = std::chrono::steady_clock::now() + timeout;
       std::chrono::steady_clock::now() < deadline;
       std::this_thread::sleep_for(std::chrono::milliseconds(2))) {
    if (done()) {
      return true;
    }
  }
  return done();
}

// Sets an environment variable for one test and puts it back after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      old_ = old;
    }
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// The lanes of one role on every rank, made collectively: from a unique id,
// or split from `parents` (one per rank) when given; each rank's spec
// changed by `adjust` first.
inline std::vector<std::shared_ptr<NcclLane>> makeLanesAdjusted(
    SimWorld& world,
    const std::string& role,
    const std::vector<std::shared_ptr<NcclLane>>& parents,
    std::chrono::milliseconds timeout,
    const std::function<void(int, NcclLaneSpec&)>& adjust) {
  std::vector<std::shared_ptr<NcclLane>> lanes(world.size);
  const std::string id = parents.empty() ? world.uniqueId() : "";
  onRanks(world.size, [&](int r) {
    auto spec = world.spec(r, role, timeout);
    adjust(r, spec);
    lanes[r] = NcclLane::create(spec, id, parents.empty() ? nullptr : parents[r]);
  });
  return lanes;
}

inline std::vector<std::shared_ptr<NcclLane>> makeLanes(
    SimWorld& world,
    const std::string& role,
    const std::vector<std::shared_ptr<NcclLane>>& parents = {},
    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  return makeLanesAdjusted(world, role, parents, timeout, [](int, NcclLaneSpec&) {});
}

// makeLanes from a unique id, each rank's spec changed by `adjust` first.
inline std::vector<std::shared_ptr<NcclLane>> makeLanesWith(
    SimWorld& world, const std::string& role, const std::function<void(int, NcclLaneSpec&)>& adjust) {
  return makeLanesAdjusted(world, role, {}, std::chrono::seconds(10), adjust);
}

// Runs one all-gather on every lane at once and waits for its end, so the
// communicators' peers are connected (NCCL connects them at the first op,
// which waits for every peer's) and a test's next ops meet a connected
// communicator.
inline void connectLanes(SimWorld& world, const std::vector<std::shared_ptr<NcclLane>>& lanes) {
  onRanks(static_cast<int>(lanes.size()), [&](int r) {
    Collective op;
    op.kind = CollectiveKind::AllGather;
    op.inputs = {at::ones({1})};
    op.outputs = {at::empty({static_cast<int64_t>(lanes.size())})};
    auto work = lanes[r]->issue(op, c10d::OpType::UNKNOWN, 0, lanes[r]->label() + ": connect");
    ASSERT_TRUE(work->wait());
    ASSERT_TRUE(world.gpu->synchronize(world.gpu->legacyStreamOf(SimWorld::deviceOf(r)), std::chrono::seconds(10)));
  });
  world.gpu->clearTimeline();
}

// The text of the `Error` that `call` throws; a test failure (and "") when
// it throws another error or none.
template <typename Error>
std::string thrownText(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong error: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

inline void closeAll(const std::vector<std::shared_ptr<NcclLane>>& lanes) {
  onRanks(static_cast<int>(lanes.size()), [&](int r) { lanes[r]->close(); });
}

inline Collective allGather(at::Tensor in, at::Tensor out) {
  Collective op;
  op.kind = CollectiveKind::AllGather;
  op.inputs = {std::move(in)};
  op.outputs = {std::move(out)};
  return op;
}

inline Collective reduceScatter(
    at::Tensor in, at::Tensor out, c10d::ReduceOp::RedOpType reduce = c10d::ReduceOp::SUM) {
  Collective op;
  op.kind = CollectiveKind::ReduceScatter;
  op.inputs = {std::move(in)};
  op.outputs = {std::move(out)};
  op.reduceOp = reduce;
  return op;
}

inline c10::intrusive_ptr<c10d::Work> issue(NcclLane& lane, const Collective& op) {
  return lane.issue(op, c10d::OpType::UNKNOWN, 0, lane.label() + ": " + op.describe());
}

// A tensor in simulated device memory, allocated for `stream` (nullptr: the
// calling thread's current device's legacy stream) as torch's caching
// allocator gives it: when its last reference goes, the block is poisoned
// and handed to the next allocation on the same stream at once.
inline at::Tensor deviceTensor(
    const std::shared_ptr<SimGpu>& gpu,
    cudaStream_t stream,
    at::IntArrayRef sizes,
    at::ScalarType type = at::kFloat,
    SimGpu::MemoryKind kind = SimGpu::MemoryKind::Cached) {
  int64_t elements = 1;
  for (int64_t size : sizes) {
    elements *= size;
  }
  void* block = gpu->allocateBlock(
      stream, static_cast<size_t>(elements) * c10::elementSize(type), kind);
  return at::from_blob(
      block, sizes, [gpu](void* freed) { gpu->freeBlock(freed); },
      at::TensorOptions().dtype(type));
}

inline int64_t nowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

} // namespace pycomm::sim
