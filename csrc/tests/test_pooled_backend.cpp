// PooledBackend over a one-rank loopback communicator: the lane, Work and
// lifecycle semantics, without processes (the multi-rank behaviour is tested
// from Python on real gloo worlds).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "comm_pool.h"
#include "cpu_transport.h"
#include "errors.h"
#include "pooled_backend.h"

using namespace std::chrono_literals;

namespace {

// A Work that completes through its future, as gloo's do.
class GatedWork : public c10d::Work {
 public:
  GatedWork()
      : future_(c10::make_intrusive<c10::ivalue::Future>(c10::NoneType::get())) {}
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
    return future_;
  }
  void complete() {
    future_->markCompleted();
  }

 private:
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

// A one-rank communicator whose ops complete only while its gate is open
// (ops issued while it is closed complete when it opens), like a peer that
// is slow to arrive.
// With `size` > 1 it plays one rank of a group whose every rank holds the
// same data: an all-reduce (SUM) multiplies by `size`.
class LoopbackBackend : public c10d::Backend {
 public:
  explicit LoopbackBackend(int rank = 0, int size = 1) : c10d::Backend(rank, size) {}
  const std::string getBackendName() const override {
    return "loopback";
  }
  c10::intrusive_ptr<c10d::Work> _allgather_base(
      at::Tensor& out, at::Tensor& in, const c10d::AllgatherOptions&) override {
    out.copy_(in);
    return issued();
  }
  c10::intrusive_ptr<c10d::Work> allreduce(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions&) override {
    for (auto& t : tensors) {
      t.mul_(getSize());
    }
    return issued();
  }
  // gloo's reduce-scatter Work has no future: the transport must not use it.
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor&, at::Tensor&, const c10d::ReduceScatterOptions&) override {
    ADD_FAILURE() << "reduce-scatter must be issued as an all-reduce";
    return issued();
  }
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions&) override {
    return issued();
  }
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = false;
  }
  void open() {
    std::vector<c10::intrusive_ptr<GatedWork>> held;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = true;
      held.swap(held_);
    }
    for (auto& w : held) {
      w->complete(); // ends the op; the lane may start the next one here
    }
  }
  std::atomic<int> entered{0};

 private:
  c10::intrusive_ptr<c10d::Work> issued() {
    entered += 1;
    auto work = c10::make_intrusive<GatedWork>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!open_) {
        held_.push_back(work);
        return work;
      }
    }
    work->complete();
    return work;
  }
  std::mutex mutex_;
  bool open_ = true;
  std::vector<c10::intrusive_ptr<GatedWork>> held_;
};

// A loopback communicator that notes the thread its destructor ran on:
// gloo's joins its workers there, which aborts the process when that thread
// is one of them.
class DestroyedOnBackend : public LoopbackBackend {
 public:
  explicit DestroyedOnBackend(std::promise<std::thread::id>& destroyedOn)
      : destroyedOn_(destroyedOn) {}
  ~DestroyedOnBackend() override {
    destroyedOn_.set_value(std::this_thread::get_id());
  }

 private:
  std::promise<std::thread::id>& destroyedOn_;
};

pycomm::PooledGroupSpec specFor(
    const std::string& role,
    int timeoutMs = 2000,
    int rank = 0,
    int size = 1) {
  pycomm::PooledGroupSpec spec;
  spec.name = "test";
  spec.baseGroupName = "base";
  spec.role = role;
  for (int r = 0; r < size; ++r) {
    spec.globalRanks.push_back(r);
  }
  spec.rank = rank;
  spec.timeout = std::chrono::milliseconds(timeoutMs);
  return spec;
}

} // namespace

TEST(PooledBackend, RunsOpsAndCountsThem) {
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto backend = c10::make_intrusive<pycomm::PooledBackend>(specFor("ag"), comm);
  auto in = at::arange(4, at::kFloat);
  auto out = at::zeros({4});
  auto work = backend->_allgather_base(out, in, c10d::AllgatherOptions());
  EXPECT_TRUE(work->wait());
  EXPECT_TRUE(at::equal(out, in));
  EXPECT_TRUE(work->getFuture()->completed());
  auto stats = backend->stats();
  EXPECT_EQ(stats.ops, 1);
  EXPECT_EQ(stats.bytes, 16);
  EXPECT_EQ(backend->trace().size(), 1u);
}

TEST(PooledBackend, OpsCompleteInIssueOrder) {
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto backend = c10::make_intrusive<pycomm::PooledBackend>(specFor("ag"), comm);
  comm->close();
  auto in = at::ones({2});
  std::vector<at::Tensor> outs;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (int i = 0; i < 5; ++i) {
    outs.push_back(at::zeros({2}));
    works.push_back(backend->_allgather_base(outs.back(), in, {}));
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(comm->entered.load(), 1); // one op at a time on a lane
  for (auto& w : works) {
    EXPECT_FALSE(w->isCompleted());
  }
  comm->open();
  works.back()->wait(); // out-of-order wait: the last one implies the rest
  for (auto& w : works) {
    EXPECT_TRUE(w->isCompleted());
  }
}

TEST(PooledBackend, ReduceScatterCompletesThroughTheAllReduceFuture) {
  // Rank 1 of 2: its slice is the second half of the reduced input.
  auto comm = c10::make_intrusive<LoopbackBackend>(1, 2);
  auto backend =
      c10::make_intrusive<pycomm::PooledBackend>(specFor("rs", 2000, 1, 2), comm);
  comm->close();
  auto in = at::arange(6, at::kFloat);
  auto out = at::zeros({3});
  auto work = backend->_reduce_scatter_base(out, in, {});
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(work->isCompleted());
  comm->open(); // the all-reduce's future completes the op on this thread
  EXPECT_TRUE(work->isCompleted());
  EXPECT_TRUE(work->wait());
  EXPECT_TRUE(at::equal(out, at::arange(3, 6, at::kFloat) * 2));
  EXPECT_TRUE(at::equal(in, at::arange(6, at::kFloat))); // reduced a copy

  std::vector<at::Tensor> ins = {at::ones({4}), at::full({2}, 3.0)};
  std::vector<at::Tensor> outs = {at::zeros({2}), at::zeros({1})};
  backend->reduce_scatter_tensor_coalesced(outs, ins, {})->wait();
  EXPECT_TRUE(at::equal(outs[0], at::full({2}, 2.0)));
  EXPECT_TRUE(at::equal(outs[1], at::full({1}, 6.0)));
}

TEST(PooledBackend, WaitTimesOutWithANamedError) {
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto backend = c10::make_intrusive<pycomm::PooledBackend>(specFor("rs", 200), comm);
  comm->close();
  auto work = backend->barrier({});
  EXPECT_THROW(work->wait(), pycomm::CollectiveTimeoutError);
  EXPECT_THROW(work->wait(50ms), pycomm::CollectiveTimeoutError);
  comm->open();
}

TEST(PooledBackend, AbortFailsUnfinishedOpsWithoutWaiting) {
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto backend = c10::make_intrusive<pycomm::PooledBackend>(specFor("ag", 60000), comm);
  comm->close();
  auto running = backend->barrier({});
  auto queued = backend->barrier({});
  auto begin = std::chrono::steady_clock::now();
  backend->abort();
  backend->abort(); // idempotent
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 1s);
  EXPECT_THROW(running->wait(), pycomm::PoolClosedError);
  EXPECT_THROW(queued->wait(), pycomm::PoolClosedError);
  EXPECT_THROW(backend->barrier({}), pycomm::PoolClosedError);
  backend.reset(); // the detached lane still owns what its running op needs
  comm->open();
}

TEST(PooledBackend, CloseDrainsThenRefuses) {
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto backend = c10::make_intrusive<pycomm::PooledBackend>(specFor("ag"), comm);
  auto in = at::ones({3});
  auto out = at::zeros({3});
  auto work = backend->_allgather_base(out, in, {});
  backend->close();
  EXPECT_TRUE(work->isCompleted());
  EXPECT_TRUE(at::equal(out, in));
  EXPECT_THROW(backend->_allgather_base(out, in, {}), pycomm::PoolClosedError);
  EXPECT_FALSE(backend->isOpen());
}

TEST(CommPool, RolesAndLifecycle) {
  EXPECT_THROW(pycomm::CommPool::checkRole("xx"), pycomm::UnknownRoleError);
  pycomm::CommPool pool;
  auto comm = c10::make_intrusive<LoopbackBackend>();
  auto ag = c10::make_intrusive<pycomm::PooledBackend>(specFor("ag"), comm);
  pool.add(ag);
  EXPECT_THROW(pool.add(ag), pycomm::PycommError);
  EXPECT_EQ(pool.find("base", "ag").get(), ag.get());
  EXPECT_FALSE(pool.find("base", "rs"));
  pool.destroy();
  pool.destroy();
  EXPECT_FALSE(ag->isOpen());
  EXPECT_EQ(pool.closedReason(), "destroyed");
  auto rs = c10::make_intrusive<pycomm::PooledBackend>(specFor("rs"), comm);
  EXPECT_THROW(pool.add(rs), pycomm::PoolClosedError);
}

// The lane starts an op from the completion of the one before, on a gloo
// worker; the user may see that op end and release the pool while the
// worker is still inside start(). The transport's reference there must be
// gone by then, or the worker drops gloo's last one and gloo joins itself.
TEST(CpuTransport, ReleaseHandsBackTheLastReferenceWhileAnotherThreadIsStartingAnOp) {
  std::promise<std::thread::id> destroyedOn;
  auto destroyed = destroyedOn.get_future();
  pycomm::CpuTransport transport(
      c10::make_intrusive<DestroyedOnBackend>(destroyedOn), "test", 0, 1);
  auto op = std::make_shared<pycomm::Collective>();
  op->kind = pycomm::CollectiveKind::Barrier;

  std::promise<void> opEnded;
  std::promise<void> released;
  auto releasedFuture = released.get_future().share();
  std::thread worker([&] {
    transport.start(op, [&](std::exception_ptr error) {
      EXPECT_FALSE(error);
      opEnded.set_value();
      // Still inside start() on this thread: the user releases meanwhile.
      EXPECT_EQ(releasedFuture.wait_for(5s), std::future_status::ready);
    });
  });
  opEnded.get_future().wait();
  transport.release(); // the returned reference is dropped on this thread
  released.set_value();
  worker.join();
  ASSERT_EQ(destroyed.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(destroyed.get(), std::this_thread::get_id())
      << "the communicator was destroyed on the thread that started the op";
}
