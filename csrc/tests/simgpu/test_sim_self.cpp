// Tests of the simulated GPU and NCCL themselves, through the CudaApi and
// NcclApi interfaces and the test controls only. The lane's tests rely on
// what is pinned here: stream order and concurrency, events, context
// accounting, the bytes the collectives move, and NCCL's failure modes.
#include <gtest/gtest.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <deque>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include "sim_gpu.h"
#include "sim_nccl.h"

namespace {

using namespace std::chrono_literals;
using pycomm::sim::KernelInterval;
using pycomm::sim::SimGraph;
using Gpu = pycomm::sim::SimGpu;
using Nccl = pycomm::sim::SimNccl;

// SimNccl goes first: it aborts its communicators, which ends their kernels,
// so SimGpu can then drain its streams.
struct World {
  explicit World(int devices = 8)
      : gpu(std::make_shared<Gpu>(devices)), nccl(std::make_unique<Nccl>(gpu)) {}
  ~World() {
    nccl.reset();
  }
  std::shared_ptr<Gpu> gpu;
  std::unique_ptr<Nccl> nccl;
};

bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) {
      return false;
    }
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

void onRanks(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back(fn, r);
  }
  for (auto& t : threads) {
    t.join();
  }
}

// A host-side gate a stream item can block on.
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // False when it was not opened within the timeout.
  bool wait(std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

ncclResult_t pollState(Nccl& nccl, ncclComm_t comm, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = nccl.commGetAsyncError(comm, &state);
    if (result != ncclSuccess) {
      return result;
    }
    if (state != ncclInProgress || std::chrono::steady_clock::now() > deadline) {
      return state;
    }
    std::this_thread::sleep_for(200us);
  }
}

ncclConfig_t configOf(bool blocking) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking ? 1 : 0;
  return config;
}

// One communicator per rank (rank r on device r), made collectively.
std::vector<ncclComm_t> makeComms(World& w, int n, bool blocking = true) {
  ncclUniqueId id;
  EXPECT_EQ(w.nccl->getUniqueId(&id), ncclSuccess);
  std::vector<ncclComm_t> comms(n, nullptr);
  onRanks(n, [&](int r) {
    EXPECT_EQ(w.gpu->setDevice(r), cudaSuccess);
    ncclConfig_t config = configOf(blocking);
    const ncclResult_t result = w.nccl->commInitRankConfig(&comms[r], n, id, r, &config);
    if (blocking) {
      EXPECT_EQ(result, ncclSuccess);
    } else {
      EXPECT_EQ(result, ncclInProgress);
      EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
    }
  });
  return comms;
}

std::vector<cudaStream_t> makeStreams(World& w, int n) {
  std::vector<cudaStream_t> streams;
  for (int r = 0; r < n; ++r) {
    streams.push_back(w.gpu->createStream(r));
  }
  return streams;
}

// Runs one all-reduce on every rank at once, so the communicators' peers are
// connected (NCCL connects them at the first group end, which waits for all)
// and a test can then issue from one thread, rank after rank; the timeline
// forgets it.
void connect(World& w, const std::vector<ncclComm_t>& comms, const std::vector<cudaStream_t>& streams) {
  std::vector<int32_t> values(comms.size(), 1);
  onRanks(static_cast<int>(comms.size()), [&](int r) {
    EXPECT_EQ(w.gpu->setDevice(w.gpu->deviceOf(streams[r])), cudaSuccess);
    const ncclResult_t result =
        w.nccl->allReduce(&values[r], &values[r], 1, ncclInt32, ncclSum, comms[r], streams[r]);
    EXPECT_TRUE(result == ncclSuccess || result == ncclInProgress);
    if (result == ncclInProgress) {
      EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
    }
    EXPECT_TRUE(w.gpu->synchronize(streams[r], std::chrono::milliseconds(5000)));
  });
  w.gpu->clearTimeline();
}

// Frees everything and checks that the accounting returns to zero.
void tearDown(World& w, const std::vector<ncclComm_t>& comms, const std::vector<cudaStream_t>& streams) {
  for (auto c : comms) {
    if (c != nullptr) {
      EXPECT_EQ(w.nccl->commDestroy(c), ncclSuccess);
    }
  }
  for (auto s : streams) {
    EXPECT_EQ(w.gpu->streamDestroy(s), cudaSuccess);
  }
  EXPECT_EQ(w.nccl->liveComms(), 0);
  EXPECT_EQ(w.nccl->liveRegistrations(), 0);
  EXPECT_EQ(w.nccl->overlapViolations(), 0);
  EXPECT_EQ(w.gpu->liveStreams(), 0);
  EXPECT_EQ(w.gpu->liveEvents(), 0);
  EXPECT_TRUE(eventually([&] { return w.gpu->streamThreads() == 0; }))
      << w.gpu->streamThreads() << " stream threads left";
}

// Every rank's stream stays blocked and nothing is reported (as NCCL hangs
// on mismatched calls) until the communicators are aborted; then each
// stream moves on.
void expectHungWithoutAWordUntilAborted(
    World& w, const std::vector<ncclComm_t>& comms, const std::vector<cudaStream_t>& streams) {
  for (size_t r = 0; r < comms.size(); ++r) {
    EXPECT_FALSE(w.gpu->synchronize(streams[r], 200ms)) << "rank " << r << " finished";
    ncclResult_t state = ncclInternalError;
    EXPECT_EQ(w.nccl->commGetAsyncError(comms[r], &state), ncclSuccess);
    EXPECT_EQ(state, ncclSuccess) << "nothing is reported";
  }
  for (auto c : comms) {
    EXPECT_EQ(w.nccl->commAbort(c), ncclSuccess);
  }
  for (auto s : streams) {
    EXPECT_TRUE(w.gpu->synchronize(s, 10s));
  }
}

std::vector<KernelInterval> kernelsOf(const Gpu& gpu, uint64_t comm) {
  std::vector<KernelInterval> out;
  for (const auto& k : gpu.timeline()) {
    if (k.comm == comm) {
      out.push_back(k);
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.startUs < b.startUs; });
  return out;
}

// ---------------------------------------------------------------- SimGpu

TEST(SimGpu, FifoOrderOnOneStream) {
  World w;
  cudaStream_t s = w.gpu->createStream(0);
  std::vector<int> order; // written by the stream's thread only, read after synchronize
  std::thread::id worker;
  for (int i = 0; i < 200; ++i) {
    w.gpu->launch(s, [&order, &worker, i] {
      if (i % 50 == 0) {
        std::this_thread::sleep_for(1ms); // a slow item must not let later ones pass
      }
      order.push_back(i);
      worker = std::this_thread::get_id();
    });
  }
  ASSERT_TRUE(w.gpu->synchronize(s, 10s));
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(order[i], i);
  }
  EXPECT_NE(worker, std::this_thread::get_id());
  EXPECT_EQ(w.gpu->timeline().size(), 200u);
  tearDown(w, {}, {s});
}

TEST(SimGpu, StreamsRunConcurrently) {
  World w;
  cudaStream_t a = w.gpu->createStream(0);
  cudaStream_t b = w.gpu->createStream(0);
  Gate gate;
  std::atomic<bool> aSawB{false};
  // a's item can only finish in time if b's item runs while it waits.
  w.gpu->launch(a, [&] { aSawB = gate.wait(10s); }, "waiter");
  w.gpu->launch(b, [&] { gate.open(); }, "opener");
  ASSERT_TRUE(w.gpu->synchronize(a, 20s));
  ASSERT_TRUE(w.gpu->synchronize(b, 20s));
  EXPECT_TRUE(aSawB.load());
  const auto timeline = w.gpu->timeline();
  ASSERT_EQ(timeline.size(), 2u);
  for (const auto& k : timeline) {
    EXPECT_EQ(k.device, 0);
    EXPECT_EQ(k.comm, 0u);
    EXPECT_LE(k.startUs, k.endUs);
    EXPECT_EQ(k.stream, k.label == "waiter" ? a : b);
  }
  w.gpu->clearTimeline();
  EXPECT_TRUE(w.gpu->timeline().empty());
  tearDown(w, {}, {a, b});
}

TEST(SimGpu, EventsAndCrossStreamWaits) {
  World w;
  cudaStream_t a = w.gpu->createStream(0);
  cudaStream_t b = w.gpu->createStream(0);
  cudaEvent_t e = nullptr;
  ASSERT_EQ(w.gpu->setDevice(0), cudaSuccess);
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&e, 0), cudaSuccess);
  EXPECT_EQ(w.gpu->eventQuery(e), cudaSuccess); // never recorded

  // Waiting on a never-recorded event waits for nothing.
  EXPECT_EQ(w.gpu->streamWaitEvent(b, e, 0), cudaSuccess);

  Gate gate;
  std::atomic<int> step{0};
  std::atomic<int> bSawStep{-1};
  w.gpu->launch(a, [&] {
    gate.wait();
    step = 1;
  });
  ASSERT_EQ(w.gpu->eventRecord(e, a), cudaSuccess);
  EXPECT_EQ(w.gpu->eventQuery(e), cudaErrorNotReady);
  ASSERT_EQ(w.gpu->streamWaitEvent(b, e, 0), cudaSuccess);
  w.gpu->launch(b, [&] { bSawStep = step.load(); });

  // Re-recording e on an idle stream moves it, not b's wait.
  cudaStream_t c = w.gpu->createStream(0);
  ASSERT_EQ(w.gpu->eventRecord(e, c), cudaSuccess);
  EXPECT_TRUE(eventually([&] { return w.gpu->eventQuery(e) == cudaSuccess; }));

  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(bSawStep.load(), -1) << "b ran past its wait";
  gate.open();
  ASSERT_TRUE(w.gpu->synchronize(b, 10s));
  EXPECT_EQ(bSawStep.load(), 1);

  // An event of device 0 cannot be recorded on a stream of device 1.
  cudaStream_t other = w.gpu->createStream(1);
  EXPECT_EQ(w.gpu->eventRecord(e, other), cudaErrorInvalidResourceHandle);
  // nullptr is the current device's default stream.
  EXPECT_EQ(w.gpu->eventRecord(e, nullptr), cudaSuccess);
  EXPECT_TRUE(eventually([&] { return w.gpu->eventQuery(e) == cudaSuccess; }));

  EXPECT_EQ(w.gpu->eventDestroy(e), cudaSuccess);
  tearDown(w, {}, {a, b, c, other});
}

// cudaEventElapsedTime as the CUDA runtime documents it: both events timed,
// recorded and passed, else InvalidResourceHandle / NotReady.
TEST(SimGpu, ElapsedTimeNeedsTwoTimedEventsThatPassed) {
  World w;
  ASSERT_EQ(w.gpu->setDevice(0), cudaSuccess);
  cudaStream_t s = w.gpu->createStream(0);
  cudaEvent_t start = nullptr, end = nullptr, untimed = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&start, cudaEventDefault), cudaSuccess);
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&end, cudaEventDefault), cudaSuccess);
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&untimed, cudaEventDisableTiming), cudaSuccess);
  float ms = -1.0f;
  EXPECT_EQ(w.gpu->eventElapsedTime(&ms, start, end), cudaErrorInvalidResourceHandle); // never recorded

  Gate gate;
  ASSERT_EQ(w.gpu->eventRecord(start, s), cudaSuccess);
  w.gpu->launch(s, [&] {
    gate.wait();
    std::this_thread::sleep_for(20ms);
  });
  ASSERT_EQ(w.gpu->eventRecord(end, s), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(untimed, s), cudaSuccess);
  EXPECT_EQ(w.gpu->eventElapsedTime(&ms, start, end), cudaErrorNotReady);
  gate.open();
  ASSERT_TRUE(w.gpu->synchronize(s, 10s));
  ASSERT_EQ(w.gpu->eventElapsedTime(&ms, start, end), cudaSuccess);
  EXPECT_GE(ms, 20.0f);
  EXPECT_LT(ms, 5000.0f);
  EXPECT_EQ(w.gpu->eventElapsedTime(&ms, start, untimed), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventElapsedTime(nullptr, start, end), cudaErrorInvalidValue);

  for (cudaEvent_t e : {start, end, untimed}) {
    EXPECT_EQ(w.gpu->eventDestroy(e), cudaSuccess);
  }
  tearDown(w, {}, {s});
}

TEST(SimGpu, ContextAccounting) {
  World w;
  EXPECT_TRUE(w.gpu->devicesWithContext().empty());

  std::thread::id setter;
  std::thread([&] {
    setter = std::this_thread::get_id();
    int d = -1;
    EXPECT_EQ(w.gpu->getDevice(&d), cudaSuccess); // no context made
    EXPECT_EQ(d, 0);
    EXPECT_FALSE(w.gpu->hasPrimaryContext(0));
    EXPECT_EQ(w.gpu->setDevice(3), cudaSuccess);
    EXPECT_EQ(w.gpu->setDevice(3), cudaSuccess);
    EXPECT_EQ(w.gpu->getDevice(&d), cudaSuccess);
    EXPECT_EQ(d, 3);
    EXPECT_EQ(w.gpu->currentDevice(), 3);
  }).join();
  auto creations = w.gpu->contextCreations();
  ASSERT_EQ(creations.size(), 1u);
  EXPECT_EQ(creations[0], std::make_pair(setter, 3));
  EXPECT_EQ(w.gpu->devicesWithContext(), std::set<int>{3});
  EXPECT_TRUE(w.gpu->hasPrimaryContext(3));
  EXPECT_FALSE(w.gpu->hasPrimaryContext(0));

  // A fresh thread is on device 0: its first stream makes that context.
  std::thread::id creator;
  cudaStream_t s = nullptr;
  std::thread([&] {
    creator = std::this_thread::get_id();
    EXPECT_EQ(w.gpu->streamCreateWithPriority(&s, 0, 0), cudaSuccess);
  }).join();
  EXPECT_EQ(w.gpu->deviceOf(s), 0);
  creations = w.gpu->contextCreations();
  ASSERT_EQ(creations.size(), 2u);
  EXPECT_EQ(creations[1], std::make_pair(creator, 0));

  // createStream restores the thread's device without a context on it.
  std::thread([&] {
    cudaStream_t t = w.gpu->createStream(5);
    EXPECT_EQ(w.gpu->currentDevice(), 0);
    EXPECT_EQ(w.gpu->deviceOf(t), 5);
    EXPECT_EQ(w.gpu->streamDestroy(t), cudaSuccess);
    // An event also makes the current device's context.
    EXPECT_EQ(w.gpu->setDevice(6), cudaSuccess);
    cudaEvent_t e = nullptr;
    EXPECT_EQ(w.gpu->eventCreateWithFlags(&e, 0), cudaSuccess);
    EXPECT_EQ(w.gpu->eventDestroy(e), cudaSuccess);
  }).join();
  EXPECT_EQ(w.gpu->devicesWithContext(), (std::set<int>{0, 3, 5, 6}));
  EXPECT_EQ(w.gpu->contextCreations().size(), 4u);

  EXPECT_EQ(w.gpu->setDevice(8), cudaErrorInvalidDevice);
  EXPECT_EQ(w.gpu->setDevice(-1), cudaErrorInvalidDevice);
  tearDown(w, {}, {s});
}

TEST(SimGpu, PriorityClamping) {
  World w;
  int least = 1;
  int greatest = 1;
  ASSERT_EQ(w.gpu->deviceGetStreamPriorityRange(&least, &greatest), cudaSuccess);
  EXPECT_EQ(least, 0);
  EXPECT_EQ(greatest, -5);
  std::vector<cudaStream_t> streams;
  for (auto [asked, expected] : std::vector<std::pair<int, int>>{{-10, -5}, {-5, -5}, {-2, -2}, {0, 0}, {3, 0}}) {
    cudaStream_t s = nullptr;
    ASSERT_EQ(w.gpu->streamCreateWithPriority(&s, 0, asked), cudaSuccess);
    int priority = 99;
    EXPECT_EQ(w.gpu->streamGetPriority(s, &priority), cudaSuccess);
    EXPECT_EQ(priority, expected) << "asked " << asked;
    EXPECT_EQ(w.gpu->priorityOf(s), expected);
    streams.push_back(s);
  }
  EXPECT_EQ(w.gpu->liveStreams(), 5);

  int major = 0;
  EXPECT_EQ(w.gpu->deviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 2), cudaSuccess);
  EXPECT_EQ(major, 9);
  w.gpu->setComputeCapabilityMajor(2, 8);
  EXPECT_EQ(w.gpu->deviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 2), cudaSuccess);
  EXPECT_EQ(major, 8);
  EXPECT_EQ(w.gpu->deviceGetAttribute(&major, cudaDevAttrComputeCapabilityMinor, 2), cudaErrorInvalidValue);
  EXPECT_EQ(w.gpu->deviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 8), cudaErrorInvalidDevice);
  tearDown(w, {}, streams);
}

TEST(SimGpu, InvalidHandlesReturnErrors) {
  World w;
  int notAStream = 0;
  auto bogusStream = reinterpret_cast<cudaStream_t>(&notAStream);
  auto bogusEvent = reinterpret_cast<cudaEvent_t>(&notAStream);
  int priority = 0;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  EXPECT_EQ(w.gpu->streamDestroy(bogusStream), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamDestroy(nullptr), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamGetPriority(bogusStream, &priority), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamIsCapturing(bogusStream, &status), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventQuery(bogusEvent), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventDestroy(bogusEvent), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventRecord(bogusEvent, nullptr), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamWaitEvent(nullptr, bogusEvent, 0), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->deviceOf(bogusStream), -1);
  EXPECT_EQ(w.gpu->resolve(bogusStream), nullptr);
  EXPECT_THROW(w.gpu->launch(bogusStream, [] {}), std::invalid_argument);

  // Destroyed handles are invalid at once.
  cudaStream_t s = w.gpu->createStream(0);
  cudaEvent_t e = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&e, 0), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(e, s), cudaSuccess);
  ASSERT_EQ(w.gpu->streamDestroy(s), cudaSuccess);
  EXPECT_EQ(w.gpu->streamDestroy(s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamGetPriority(s, &priority), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventRecord(e, s), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->streamWaitEvent(s, e, 0), cudaErrorInvalidResourceHandle);
  EXPECT_FALSE(w.gpu->synchronize(s, 1ms));
  // The event keeps the stream's record: it still completes.
  EXPECT_TRUE(eventually([&] { return w.gpu->eventQuery(e) == cudaSuccess; }));
  ASSERT_EQ(w.gpu->eventDestroy(e), cudaSuccess);
  EXPECT_EQ(w.gpu->eventDestroy(e), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(w.gpu->eventQuery(e), cudaErrorInvalidResourceHandle);

  EXPECT_STREQ(w.gpu->getErrorName(cudaErrorNotReady), "cudaErrorNotReady");
  EXPECT_STREQ(w.gpu->getErrorName(cudaErrorInvalidResourceHandle), "cudaErrorInvalidResourceHandle");
  EXPECT_STREQ(w.gpu->getErrorString(cudaErrorInvalidDevice), "invalid device ordinal");
  tearDown(w, {}, {});
}

TEST(SimGpu, DestroyedStreamStillRunsItsWork) {
  World w;
  cudaStream_t s = w.gpu->createStream(0);
  Gate gate;
  std::atomic<int> ran{0};
  w.gpu->launch(s, [&] { gate.wait(); ++ran; });
  w.gpu->launch(s, [&] { ++ran; });
  const auto before = std::chrono::steady_clock::now();
  ASSERT_EQ(w.gpu->streamDestroy(s), cudaSuccess); // returns at once
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  EXPECT_EQ(w.gpu->liveStreams(), 0);
  EXPECT_EQ(w.gpu->streamThreads(), 1);
  gate.open();
  EXPECT_TRUE(eventually([&] { return ran.load() == 2 && w.gpu->streamThreads() == 0; }));
  tearDown(w, {}, {});
}

TEST(SimGpu, CaptureModeAndCurrentStream) {
  World w;
  cudaStream_t s = w.gpu->createStream(2);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusActive;
  EXPECT_EQ(w.gpu->streamIsCapturing(s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusNone);
  EXPECT_EQ(w.gpu->beginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(w.gpu->streamIsCapturing(s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusActive);
  EXPECT_EQ(w.gpu->beginCapture(s, cudaStreamCaptureModeGlobal), cudaErrorIllegalState);
  EXPECT_EQ(w.gpu->endCapture(s), cudaSuccess);
  EXPECT_EQ(w.gpu->streamIsCapturing(s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusNone);
  EXPECT_EQ(w.gpu->endCapture(s), cudaErrorIllegalState);

  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  EXPECT_EQ(w.gpu->threadExchangeStreamCaptureMode(&mode), cudaSuccess);
  EXPECT_EQ(mode, cudaStreamCaptureModeGlobal);
  std::thread([&] {
    cudaStreamCaptureMode other = cudaStreamCaptureModeThreadLocal;
    EXPECT_EQ(w.gpu->threadExchangeStreamCaptureMode(&other), cudaSuccess);
    EXPECT_EQ(other, cudaStreamCaptureModeGlobal); // per thread
  }).join();
  EXPECT_EQ(w.gpu->threadExchangeStreamCaptureMode(&mode), cudaSuccess);
  EXPECT_EQ(mode, cudaStreamCaptureModeRelaxed);

  // torch's current stream is per thread and device; by default the null
  // stream, which CUDA resolves against the current device at each call.
  EXPECT_EQ(w.gpu->currentStream(2), nullptr);
  w.gpu->setCurrentStream(2, s);
  EXPECT_EQ(w.gpu->currentStream(2), s);
  EXPECT_EQ(w.gpu->currentStream(1), nullptr);
  std::thread([&] { EXPECT_EQ(w.gpu->currentStream(2), nullptr); }).join();
  w.gpu->setCurrentStream(2, nullptr);
  EXPECT_EQ(w.gpu->currentStream(2), nullptr);
  EXPECT_EQ(w.gpu->liveStreams(), 1); // default streams are not counted

  // A default stream runs work like any other, and its thread ends when idle.
  std::atomic<bool> ran{false};
  const cudaStream_t legacy2 = w.gpu->legacyStreamOf(2);
  w.gpu->launch(legacy2, [&] { ran = true; });
  EXPECT_TRUE(w.gpu->synchronize(legacy2, 10s));
  EXPECT_TRUE(ran.load());
  tearDown(w, {}, {s});
}

TEST(SimGpu, NullStreamIsTheCurrentDevicesLegacyStream) {
  World w;
  // Stream 0 means the current device's legacy stream: a wait queued on it
  // with device 1 current holds device 1's, never device 2's.
  cudaEvent_t never = nullptr;
  ASSERT_EQ(w.gpu->setDevice(3), cudaSuccess);
  cudaStream_t blocked = w.gpu->createStream(3);
  Gate gate;
  w.gpu->launch(blocked, [&] { gate.wait(); });
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&never, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(never, blocked), cudaSuccess);
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  ASSERT_EQ(w.gpu->streamWaitEvent(nullptr, never, 0), cudaSuccess);
  EXPECT_EQ(w.gpu->deviceOf(nullptr), 1);
  EXPECT_FALSE(w.gpu->synchronize(w.gpu->legacyStreamOf(1), 50ms)) << "device 1's waits";
  EXPECT_TRUE(w.gpu->synchronize(w.gpu->legacyStreamOf(2), 1s)) << "device 2's does not";
  // An event of device 3 cannot be recorded on device 1's null stream.
  EXPECT_EQ(w.gpu->eventRecord(never, nullptr), cudaErrorInvalidResourceHandle);
  gate.open();
  EXPECT_TRUE(w.gpu->synchronize(w.gpu->legacyStreamOf(1), 10s));
  ASSERT_EQ(w.gpu->eventDestroy(never), cudaSuccess);
  tearDown(w, {}, {blocked});
}

TEST(SimGpu, CaptureForbidsUnsafeCallsByMode) {
  World w;
  cudaStream_t captured = w.gpu->createStream(1);
  cudaStream_t other = w.gpu->createStream(1);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(event, other), cudaSuccess);
  ASSERT_TRUE(w.gpu->synchronize(other, 10s));
  // Queries from another thread in each mode while this thread captures
  // in `captureMode`; the result, and whether the capture survived.
  auto queryDuring = [&](cudaStreamCaptureMode captureMode, cudaStreamCaptureMode queryMode) {
    EXPECT_EQ(w.gpu->beginCapture(captured, captureMode), cudaSuccess);
    cudaError_t result = cudaSuccess;
    std::thread([&] {
      cudaStreamCaptureMode mode = queryMode;
      EXPECT_EQ(w.gpu->threadExchangeStreamCaptureMode(&mode), cudaSuccess);
      result = w.gpu->eventQuery(event);
    }).join();
    return std::make_pair(result, w.gpu->endCapture(captured));
  };
  EXPECT_EQ(
      queryDuring(cudaStreamCaptureModeGlobal, cudaStreamCaptureModeGlobal),
      std::make_pair(cudaErrorStreamCaptureUnsupported, cudaErrorStreamCaptureInvalidated));
  EXPECT_EQ(
      queryDuring(cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal),
      std::make_pair(cudaSuccess, cudaSuccess));
  EXPECT_EQ(
      queryDuring(cudaStreamCaptureModeGlobal, cudaStreamCaptureModeRelaxed),
      std::make_pair(cudaSuccess, cudaSuccess));
  EXPECT_EQ(
      queryDuring(cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeGlobal),
      std::make_pair(cudaSuccess, cudaSuccess));
  // The capturing thread itself, unless its capture is relaxed.
  EXPECT_EQ(w.gpu->beginCapture(captured, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(w.gpu->eventQuery(event), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(w.gpu->endCapture(captured), cudaErrorStreamCaptureInvalidated);
  EXPECT_EQ(w.gpu->beginCapture(captured, cudaStreamCaptureModeRelaxed), cudaSuccess);
  EXPECT_EQ(w.gpu->eventQuery(event), cudaSuccess);
  EXPECT_EQ(w.gpu->endCapture(captured), cudaSuccess);
  // Nothing captures: every mode may query.
  EXPECT_EQ(w.gpu->eventQuery(event), cudaSuccess);
  ASSERT_EQ(w.gpu->eventDestroy(event), cudaSuccess);
  tearDown(w, {}, {captured, other});
}

TEST(SimGpu, CaptureRecordsForkedStreamsAndEachLaunchRunsTheGraph) {
  World w;
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  cudaStream_t origin = w.gpu->createStream(1);
  cudaStream_t side = w.gpu->createStream(1);
  cudaEvent_t fork = nullptr;
  cudaEvent_t join = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&fork, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&join, cudaEventDisableTiming), cudaSuccess);
  std::atomic<int> runs{0};
  std::vector<int> order;
  std::mutex orderMu;
  auto step = [&](int id) {
    return [&, id] {
      std::lock_guard<std::mutex> lock(orderMu);
      order.push_back(id);
      ++runs;
    };
  };
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  ASSERT_EQ(w.gpu->beginCapture(origin, cudaStreamCaptureModeGlobal), cudaSuccess);
  w.gpu->launch(origin, step(1));
  ASSERT_EQ(w.gpu->eventRecord(fork, origin), cudaSuccess);
  ASSERT_EQ(w.gpu->streamWaitEvent(side, fork, 0), cudaSuccess);
  ASSERT_EQ(w.gpu->streamIsCapturing(side, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusActive) << "a wait on a captured event forks the stream in";
  w.gpu->launch(side, step(2));
  ASSERT_EQ(w.gpu->eventRecord(join, side), cudaSuccess);
  // Only the stream that began a capture ends it.
  EXPECT_EQ(w.gpu->endCapture(side), cudaErrorStreamCaptureUnmatched);
  ASSERT_EQ(w.gpu->streamWaitEvent(origin, join, 0), cudaSuccess);
  w.gpu->launch(origin, step(3));
  std::shared_ptr<const SimGraph> graph;
  ASSERT_EQ(w.gpu->endCapture(origin, &graph), cudaSuccess);
  ASSERT_EQ(w.gpu->streamIsCapturing(side, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusNone) << "the forked stream left with the capture";
  EXPECT_EQ(runs.load(), 0) << "a capture runs nothing";
  ASSERT_EQ(graph->nodes.size(), 3u);
  for (int launch = 0; launch < 2; ++launch) {
    ASSERT_EQ(w.gpu->graphLaunch(graph, origin), cudaSuccess);
  }
  ASSERT_TRUE(w.gpu->synchronize(origin, 10s));
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 1, 2, 3}));
  // Work queued on the streams after the capture runs as usual.
  w.gpu->launch(side, step(4));
  ASSERT_TRUE(w.gpu->synchronize(side, 10s));
  EXPECT_EQ(runs.load(), 7);
  graph.reset();
  ASSERT_EQ(w.gpu->eventDestroy(fork), cudaSuccess);
  ASSERT_EQ(w.gpu->eventDestroy(join), cudaSuccess);
  tearDown(w, {}, {origin, side});
}

TEST(SimGpu, CaptureRefusesUnjoinedForksOutsideEventsAndQueriesOfCapturedEvents) {
  World w;
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  cudaStream_t origin = w.gpu->createStream(1);
  cudaStream_t side = w.gpu->createStream(1);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  std::atomic<int> runs{0};
  // A fork with work the origin never waited for.
  ASSERT_EQ(w.gpu->beginCapture(origin, cudaStreamCaptureModeRelaxed), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(event, origin), cudaSuccess);
  ASSERT_EQ(w.gpu->streamWaitEvent(side, event, 0), cudaSuccess);
  w.gpu->launch(side, [&] { ++runs; });
  std::shared_ptr<const SimGraph> graph;
  EXPECT_EQ(w.gpu->endCapture(origin, &graph), cudaErrorStreamCaptureUnjoined);
  EXPECT_FALSE(graph);
  // A wait on an event recorded outside the capture (no
  // cudaEventWaitExternal): refused, and the capture is invalidated.
  ASSERT_EQ(w.gpu->eventRecord(event, side), cudaSuccess);
  ASSERT_EQ(w.gpu->beginCapture(origin, cudaStreamCaptureModeRelaxed), cudaSuccess);
  EXPECT_EQ(w.gpu->streamWaitEvent(origin, event, 0), cudaErrorStreamCaptureIsolation);
  EXPECT_EQ(w.gpu->endCapture(origin), cudaErrorStreamCaptureInvalidated);
  // A captured event queried while its capture runs, even by a relaxed
  // capture: refused and invalidating. After the capture it is the event
  // of its last real record again.
  ASSERT_EQ(w.gpu->beginCapture(origin, cudaStreamCaptureModeRelaxed), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(event, origin), cudaSuccess);
  EXPECT_EQ(w.gpu->eventQuery(event), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(w.gpu->endCapture(origin), cudaErrorStreamCaptureInvalidated);
  ASSERT_TRUE(w.gpu->synchronize(side, 10s));
  EXPECT_EQ(w.gpu->eventQuery(event), cudaSuccess);
  EXPECT_EQ(runs.load(), 0) << "nothing captured ever ran";
  ASSERT_EQ(w.gpu->eventDestroy(event), cudaSuccess);
  tearDown(w, {}, {origin, side});
}

TEST(SimGpu, FreedBlockGoesPoisonedToTheNextAllocationOnItsStream) {
  World w;
  cudaStream_t a = w.gpu->createStream(1);
  cudaStream_t b = w.gpu->createStream(1);
  void* first = w.gpu->allocateBlock(a, 1000);
  std::memset(first, 7, 1000);
  EXPECT_TRUE(w.gpu->inBlock(first, 1024, Gpu::MemoryKind::Cached)) << "rounded up to 512";
  EXPECT_FALSE(w.gpu->inBlock(first, 1025, Gpu::MemoryKind::Cached));
  EXPECT_FALSE(w.gpu->inBlock(first, 16, Gpu::MemoryKind::Vmm));
  w.gpu->freeBlock(first);
  EXPECT_EQ(static_cast<unsigned char*>(first)[10], Gpu::kFreedByte) << "poisoned";
  EXPECT_FALSE(w.gpu->inBlock(first, 16, Gpu::MemoryKind::Cached)) << "freed";
  // Another stream never gets it; the same stream at once.
  void* onB = w.gpu->allocateBlock(b, 1000);
  EXPECT_NE(onB, first);
  void* again = w.gpu->allocateBlock(a, 600);
  EXPECT_EQ(again, first);
  EXPECT_EQ(w.gpu->liveBlocks(), 2);
  void* vmm = w.gpu->allocateBlock(a, 1000, Gpu::MemoryKind::Vmm);
  EXPECT_TRUE(w.gpu->inBlock(static_cast<char*>(vmm) + 8, 64, Gpu::MemoryKind::Vmm));
  EXPECT_THROW(w.gpu->freeBlock(static_cast<char*>(vmm) + 8), std::invalid_argument);
  for (void* block : {onB, again, vmm}) {
    w.gpu->freeBlock(block);
  }
  EXPECT_THROW(w.gpu->freeBlock(vmm), std::invalid_argument) << "freed twice";
  EXPECT_EQ(w.gpu->liveBlocks(), 0);
  tearDown(w, {}, {a, b});
}

TEST(SimGpu, CallsCanHangForATimeOrUntilReleased) {
  World w;
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  w.gpu->blockCalls(Gpu::Call::EventQuery, 100ms);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(w.gpu->eventQuery(event), cudaSuccess);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);
  w.gpu->blockCalls(Gpu::Call::EventDestroy, pycomm::sim::CallGate::kForever);
  std::atomic<bool> destroyed{false};
  std::thread hung([&] {
    EXPECT_EQ(w.gpu->eventDestroy(event), cudaSuccess);
    destroyed = true;
  });
  EXPECT_TRUE(eventually([&] { return w.gpu->blockedCalls() == 1; }));
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(destroyed.load());
  w.gpu->releaseBlockedCalls();
  hung.join();
  EXPECT_TRUE(destroyed.load());
  tearDown(w, {}, {});
}

// ---------------------------------------------------------------- SimNccl

// Types under test: how NCCL names them and how they are reduced.
template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr ncclDataType_t type = ncclFloat32;
  using Acc = float;
};
template <>
struct Traits<c10::BFloat16> {
  static constexpr ncclDataType_t type = ncclBfloat16;
  using Acc = float;
};
template <>
struct Traits<c10::Half> {
  static constexpr ncclDataType_t type = ncclFloat16;
  using Acc = float;
};
template <>
struct Traits<int64_t> {
  static constexpr ncclDataType_t type = ncclInt64;
  using Acc = int64_t;
};
template <>
struct Traits<uint8_t> {
  static constexpr ncclDataType_t type = ncclUint8;
  using Acc = uint8_t;
};

// Exact in every type under test; uint8 sums of 8 ranks wrap.
template <typename T>
T valueOf(int rank, size_t i) {
  const int v = static_cast<int>((rank * 7 + i * 3) % 17);
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(v * 3 + 1);
  } else {
    return static_cast<T>(static_cast<float>(v) * 0.25f + 0.5f);
  }
}

template <typename T>
T scalarOf(int rank) {
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(rank + 2);
  } else {
    return static_cast<T>(0.5f * static_cast<float>(rank + 1));
  }
}

constexpr ncclRedOp_t kPreMul = ncclNumOps; // stands for "a premul-sum op" in the reference

template <typename A>
A refAdd(A a, A b) {
  if constexpr (std::is_integral_v<A>) {
    using U = std::make_unsigned_t<A>;
    return static_cast<A>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
  } else {
    return a + b;
  }
}

template <typename A>
A refMul(A a, A b) {
  if constexpr (std::is_integral_v<A>) {
    using U = std::conditional_t<(sizeof(A) < sizeof(unsigned)), unsigned, std::make_unsigned_t<A>>;
    return static_cast<A>(static_cast<U>(static_cast<U>(a) * static_cast<U>(b)));
  } else {
    return a * b;
  }
}

// NCCL's result of reducing element `i` of every rank's input: in rank
// order, in float for half types, rounded once; integer sums wrap.
template <typename T>
T reference(int n, size_t i, ncclRedOp_t op) {
  using A = typename Traits<T>::Acc;
  A acc{};
  for (int r = 0; r < n; ++r) {
    A v = static_cast<A>(valueOf<T>(r, i));
    if (op == kPreMul) {
      v = refMul<A>(static_cast<A>(scalarOf<T>(r)), v);
    }
    if (r == 0) {
      acc = v;
    } else if (op == ncclProd) {
      acc = refMul<A>(acc, v);
    } else if (op == ncclMax) {
      acc = std::max(acc, v);
    } else if (op == ncclMin) {
      acc = std::min(acc, v);
    } else {
      acc = refAdd<A>(acc, v);
    }
  }
  if (op == ncclAvg) {
    acc = static_cast<A>(acc / static_cast<A>(n));
  }
  return static_cast<T>(acc);
}

template <typename T>
double asNumber(T v) {
  return static_cast<double>(static_cast<typename Traits<T>::Acc>(v));
}

// Every collective on rank r for type T, checked against the reference.
template <typename T>
void checkType(Nccl& nccl, Gpu& gpu, ncclComm_t comm, cudaStream_t s, int r, int n) {
  constexpr ncclDataType_t type = Traits<T>::type;
  const size_t count = 7;
  const char* name = typeid(T).name();

  {
    std::vector<T> in(count);
    std::vector<T> out(count * n, static_cast<T>(0));
    for (size_t i = 0; i < count; ++i) {
      in[i] = valueOf<T>(r, i);
    }
    ASSERT_EQ(nccl.allGather(in.data(), out.data(), count, type, comm, s), ncclSuccess);
    ASSERT_TRUE(gpu.synchronize(s, 20s));
    for (int j = 0; j < n; ++j) {
      for (size_t i = 0; i < count; ++i) {
        ASSERT_EQ(asNumber(out[j * count + i]), asNumber(valueOf<T>(j, i)))
            << name << " allgather rank " << r << " from " << j << " [" << i << "]";
      }
    }
  }

  for (ncclRedOp_t op : {ncclSum, ncclAvg, ncclMax, ncclMin, ncclProd, kPreMul}) {
    ncclRedOp_t red = op;
    if (op == kPreMul) {
      T scalar = scalarOf<T>(r);
      ASSERT_EQ(nccl.redOpCreatePreMulSum(&red, &scalar, type, ncclScalarHostImmediate, comm), ncclSuccess);
      EXPECT_GE(static_cast<int>(red), static_cast<int>(ncclNumOps));
      scalar = static_cast<T>(0); // read at the call
    }

    // reduce-scatter: this rank's slice of the reduction
    std::vector<T> in(count * n);
    std::vector<T> out(count, static_cast<T>(0));
    for (size_t i = 0; i < count * n; ++i) {
      in[i] = valueOf<T>(r, i);
    }
    ASSERT_EQ(nccl.reduceScatter(in.data(), out.data(), count, type, red, comm, s), ncclSuccess);
    ASSERT_TRUE(gpu.synchronize(s, 20s));
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(asNumber(out[i]), asNumber(reference<T>(n, r * count + i, op)))
          << name << " reducescatter op " << op << " rank " << r << " [" << i << "]";
    }

    // all-reduce in place
    std::vector<T> buf(count);
    for (size_t i = 0; i < count; ++i) {
      buf[i] = valueOf<T>(r, i);
    }
    ASSERT_EQ(nccl.allReduce(buf.data(), buf.data(), count, type, red, comm, s), ncclSuccess);
    ASSERT_TRUE(gpu.synchronize(s, 20s));
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(asNumber(buf[i]), asNumber(reference<T>(n, i, op)))
          << name << " allreduce op " << op << " rank " << r << " [" << i << "]";
    }

    if (op == kPreMul) {
      EXPECT_EQ(nccl.redOpDestroy(red, comm), ncclSuccess);
      EXPECT_EQ(nccl.redOpDestroy(red, comm), ncclInvalidArgument);
    }
  }

  {
    const int root = n - 1;
    std::vector<T> in(count);
    std::vector<T> out(count, static_cast<T>(0));
    for (size_t i = 0; i < count; ++i) {
      in[i] = valueOf<T>(r, i);
    }
    ASSERT_EQ(nccl.broadcast(in.data(), out.data(), count, type, root, comm, s), ncclSuccess);
    ASSERT_TRUE(gpu.synchronize(s, 20s));
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(asNumber(out[i]), asNumber(valueOf<T>(root, i)))
          << name << " broadcast rank " << r << " [" << i << "]";
    }
  }
}

void checkResults(int n) {
  World w;
  auto comms = makeComms(w, n);
  auto streams = makeStreams(w, n);
  onRanks(n, [&](int r) {
    // Each rank runs the same sequence, as NCCL requires. A rank that
    // stops at a failed ASSERT leaves its peers to their synchronize
    // timeouts; ~World then aborts the communicators.
    checkType<float>(*w.nccl, *w.gpu, comms[r], streams[r], r, n);
    checkType<c10::BFloat16>(*w.nccl, *w.gpu, comms[r], streams[r], r, n);
    checkType<c10::Half>(*w.nccl, *w.gpu, comms[r], streams[r], r, n);
    checkType<int64_t>(*w.nccl, *w.gpu, comms[r], streams[r], r, n);
    checkType<uint8_t>(*w.nccl, *w.gpu, comms[r], streams[r], r, n);
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(w.nccl->deviceOf(comms[r]), r);
    int count = 0;
    int rank = -1;
    EXPECT_EQ(w.nccl->commCount(comms[r], &count), ncclSuccess);
    EXPECT_EQ(w.nccl->commUserRank(comms[r], &rank), ncclSuccess);
    EXPECT_EQ(count, n);
    EXPECT_EQ(rank, r);
    EXPECT_TRUE(w.nccl->isBlocking(comms[r]));
    EXPECT_EQ(w.nccl->commsOn(r), std::vector<ncclComm_t>{comms[r]});
    // Every kernel ran on this rank's device and stream.
    for (const auto& k : kernelsOf(*w.gpu, w.nccl->idOf(comms[r]))) {
      EXPECT_EQ(k.device, r);
      EXPECT_EQ(k.stream, streams[r]);
    }
  }
  tearDown(w, comms, streams);
}

TEST(SimNccl, ResultsOn2Ranks) {
  checkResults(2);
}

TEST(SimNccl, ResultsOn4Ranks) {
  checkResults(4);
}

TEST(SimNccl, ResultsOn8Ranks) {
  checkResults(8);
}

TEST(SimNccl, Fp8ReductionsNeedComputeCapability9) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  onRanks(2, [&](int r) {
    c10::Float8_e4m3fn in(static_cast<float>(r + 1));
    c10::Float8_e4m3fn out(0.0f);
    ASSERT_EQ(w.nccl->allReduce(&in, &out, 1, ncclFloat8e4m3, ncclSum, comms[r], streams[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    EXPECT_EQ(static_cast<float>(out), 3.0f);
  });
  // NCCL checks the lowest compute capability of the communicator's ranks:
  // rank 0's Hopper does not help when rank 1's GPU is older.
  w.gpu->setComputeCapabilityMajor(1, 8);
  auto mixed = makeComms(w, 2);
  uint8_t in = 0;
  uint8_t out[2] = {};
  EXPECT_EQ(w.nccl->allReduce(&in, out, 1, ncclFloat8e5m2, ncclSum, mixed[0], streams[0]), ncclInvalidArgument);
  EXPECT_NE(std::string(w.nccl->getLastError(mixed[0])).find("lowest compute capability"), std::string::npos);
  // Moving fp8 bytes needs no arithmetic: all-gather works on any device.
  onRanks(2, [&](int r) {
    uint8_t mine = static_cast<uint8_t>(0x30 + r);
    uint8_t all[2] = {};
    ASSERT_EQ(w.nccl->allGather(&mine, all, 1, ncclFloat8e5m2, mixed[r], streams[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    EXPECT_EQ(all[0], 0x30);
    EXPECT_EQ(all[1], 0x31);
  });
  comms.insert(comms.end(), mixed.begin(), mixed.end());
  tearDown(w, comms, streams);
}

TEST(SimNccl, PreMulSumScalarResidence) {
  World w;
  auto comms = makeComms(w, 1);
  cudaStream_t s = w.gpu->createStream(0);
  double hostScalar = 2.0;
  double deviceScalar = 2.0;
  ncclRedOp_t immediate;
  ncclRedOp_t device;
  ASSERT_EQ(w.nccl->redOpCreatePreMulSum(&immediate, &hostScalar, ncclFloat64, ncclScalarHostImmediate, comms[0]), ncclSuccess);
  ASSERT_EQ(w.nccl->redOpCreatePreMulSum(&device, &deviceScalar, ncclFloat64, ncclScalarDevice, comms[0]), ncclSuccess);
  EXPECT_NE(immediate, device);
  // Host-immediate scalars are read at creation, device ones by the kernel.
  hostScalar = 5.0;
  deviceScalar = 3.0;
  double in = 1.5;
  double a = 0.0;
  double b = 0.0;
  ASSERT_EQ(w.nccl->allReduce(&in, &a, 1, ncclFloat64, immediate, comms[0], s), ncclSuccess);
  ASSERT_EQ(w.nccl->allReduce(&in, &b, 1, ncclFloat64, device, comms[0], s), ncclSuccess);
  ASSERT_TRUE(w.gpu->synchronize(s, 20s));
  EXPECT_EQ(a, 3.0);
  EXPECT_EQ(b, 4.5);
  EXPECT_EQ(w.nccl->redOpDestroy(immediate, comms[0]), ncclSuccess);
  EXPECT_EQ(w.nccl->redOpDestroy(device, comms[0]), ncclSuccess);
  tearDown(w, comms, {s});
}

TEST(SimNccl, CoalescedGroupOfThreeAllGathers) {
  World w;
  const int n = 4;
  auto comms = makeComms(w, n);
  auto streams = makeStreams(w, n);
  onRanks(n, [&](int r) {
    std::vector<std::vector<int32_t>> in(3), out(3);
    for (int k = 0; k < 3; ++k) {
      in[k].assign(k + 2, 100 * k + r);
      out[k].assign((k + 2) * n, -1);
    }
    ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
    for (int k = 0; k < 3; ++k) {
      ASSERT_EQ(w.nccl->allGather(in[k].data(), out[k].data(), k + 2, ncclInt32, comms[r], streams[r]), ncclSuccess);
    }
    EXPECT_EQ(w.gpu->timeline().size(), 0u); // nothing runs before the group ends
    ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    for (int k = 0; k < 3; ++k) {
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < k + 2; ++i) {
          EXPECT_EQ(out[k][j * (k + 2) + i], 100 * k + j);
        }
      }
    }
  });
  for (int r = 0; r < n; ++r) {
    const auto kernels = kernelsOf(*w.gpu, w.nccl->idOf(comms[r]));
    ASSERT_EQ(kernels.size(), 1u) << "one kernel per group and communicator";
    EXPECT_EQ(kernels[0].label, "allgather x3");
  }
  tearDown(w, comms, streams);
}

TEST(SimNccl, NonblockingInitAndGroupEndComplete) {
  World w;
  w.nccl->setInitDelay(20ms);
  w.nccl->setGroupEndDelay(20ms);
  const int n = 2;
  ncclUniqueId id;
  ASSERT_EQ(w.nccl->getUniqueId(&id), ncclSuccess);
  std::vector<ncclComm_t> comms(n, nullptr);
  auto streams = makeStreams(w, n);
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    ncclConfig_t config = configOf(false);
    ASSERT_EQ(w.nccl->commInitRankConfig(&comms[r], n, id, r, &config), ncclInProgress);
    ASSERT_NE(comms[r], nullptr); // written at once
    ncclResult_t state = ncclSuccess;
    EXPECT_EQ(w.nccl->commGetAsyncError(comms[r], &state), ncclSuccess);
    EXPECT_EQ(state, ncclInProgress); // the delay has not passed yet
    int count = 0;
    EXPECT_EQ(w.nccl->commCount(comms[r], &count), ncclInvalidArgument); // ncclCommEnsureReady
    EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
    EXPECT_FALSE(w.nccl->isBlocking(comms[r]));
    EXPECT_EQ(w.nccl->commCount(comms[r], &count), ncclSuccess);
    EXPECT_EQ(count, n);

    int64_t in = 10 + r;
    int64_t out[2] = {0, 0};
    ASSERT_EQ(w.nccl->allGather(&in, out, 1, ncclInt64, comms[r], streams[r]), ncclInProgress);
    EXPECT_EQ(w.nccl->commGetAsyncError(comms[r], &state), ncclSuccess);
    EXPECT_EQ(state, ncclInProgress);
    EXPECT_EQ(w.nccl->allGather(&in, out, 1, ncclInt64, comms[r], streams[r]), ncclInvalidArgument);
    EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    EXPECT_EQ(out[0], 10);
    EXPECT_EQ(out[1], 11);

    // Finalize: in progress until the communicator's kernels ran.
    EXPECT_EQ(w.nccl->commFinalize(comms[r]), ncclInProgress);
    EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
  });
  // Exactly one kernel per rank: the refused call enqueued nothing.
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(kernelsOf(*w.gpu, w.nccl->idOf(comms[r])).size(), 1u);
  }
  tearDown(w, comms, streams);
}

TEST(SimNccl, EveryNonblockingGroupEndIsInProgressOnAThreadOfItsOwn) {
  // Not only a communicator's first: NCCL hands every nonblocking group end
  // that carries work to a thread it starts (src/group.cc).
  World w;
  const int n = 2;
  auto comms = makeComms(w, n, /*blocking=*/false);
  auto streams = makeStreams(w, n);
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    for (int i = 0; i < 20; ++i) {
      int64_t in = 10 * i + r;
      int64_t out[2] = {0, 0};
      ASSERT_EQ(w.nccl->allGather(&in, out, 1, ncclInt64, comms[r], streams[r]), ncclInProgress) << i;
      EXPECT_EQ(pollState(*w.nccl, comms[r]), ncclSuccess);
      ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
      EXPECT_EQ(out[0], 10 * i);
      EXPECT_EQ(out[1], 10 * i + 1);
    }
  });
  tearDown(w, comms, streams);
}

TEST(SimNccl, NonblockingGroupEndEnqueuesOnlyAfterTheDelay) {
  World w;
  auto comms = makeComms(w, 1, /*blocking=*/false);
  cudaStream_t s = w.gpu->createStream(0);
  w.nccl->setGroupEndDelay(comms[0], 100ms);
  Gate gate;
  float in = 1.5f;
  float out = 0.0f;
  ASSERT_EQ(w.nccl->allReduce(&in, &out, 1, ncclFloat32, ncclSum, comms[0], s), ncclInProgress);
  // Not on the stream yet: a host item launched now runs first.
  std::atomic<bool> kernelBefore{false};
  w.gpu->launch(s, [&] { kernelBefore = !w.gpu->timeline().empty(); }, "probe");
  ASSERT_TRUE(w.gpu->synchronize(s, 20s));
  EXPECT_FALSE(kernelBefore.load());
  EXPECT_EQ(pollState(*w.nccl, comms[0]), ncclSuccess);
  // Success is reported only once the kernel is on the stream.
  ASSERT_TRUE(w.gpu->synchronize(s, 20s));
  EXPECT_EQ(out, 1.5f);
  EXPECT_EQ(kernelsOf(*w.gpu, w.nccl->idOf(comms[0])).size(), 1u);
  tearDown(w, comms, {s});
}

TEST(SimNccl, MixedBlockingGroupIsRefused) {
  World w;
  auto blocking = makeComms(w, 1, true);
  auto nonblocking = makeComms(w, 1, false);
  cudaStream_t s = w.gpu->createStream(0);
  float in = 1.0f;
  float a = -1.0f;
  float b = -1.0f;
  ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
  ASSERT_EQ(w.nccl->allGather(&in, &a, 1, ncclFloat32, blocking[0], s), ncclSuccess);
  ASSERT_EQ(w.nccl->allGather(&in, &b, 1, ncclFloat32, nonblocking[0], s), ncclSuccess);
  EXPECT_EQ(w.nccl->groupEnd(), ncclInvalidUsage);
  EXPECT_NE(std::string(w.nccl->getLastError(nullptr)).find("mixed"), std::string::npos);
  ASSERT_TRUE(w.gpu->synchronize(s, 20s));
  EXPECT_TRUE(w.gpu->timeline().empty()); // nothing ran
  EXPECT_EQ(a, -1.0f);
  EXPECT_EQ(b, -1.0f);
  // The thread is out of the group: a later call runs alone.
  ASSERT_EQ(w.nccl->allGather(&in, &a, 1, ncclFloat32, blocking[0], s), ncclSuccess);
  ASSERT_TRUE(w.gpu->synchronize(s, 20s));
  EXPECT_EQ(a, 1.0f);
  EXPECT_EQ(w.nccl->groupEnd(), ncclInvalidUsage); // no group open
  tearDown(w, {blocking[0], nonblocking[0]}, {s});
}

TEST(SimNccl, TheFirstGroupEndConnectsThePeersAndWaitsForThem) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  int32_t in[2] = {1, 2};
  std::vector<std::vector<int32_t>> outs(2, std::vector<int32_t>(2, -1));
  std::atomic<int64_t> waitedUs{0};
  onRanks(2, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    if (r == 1) {
      std::this_thread::sleep_for(150ms);
    }
    const auto start = std::chrono::steady_clock::now();
    ASSERT_EQ(w.nccl->allGather(&in[r], outs[r].data(), 1, ncclInt32, comms[r], streams[r]), ncclSuccess);
    if (r == 0) {
      waitedUs = std::chrono::duration_cast<std::chrono::microseconds>(
          std::chrono::steady_clock::now() - start).count();
    }
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 5000ms));
  });
  EXPECT_GE(waitedUs.load(), 100'000) << "a blocking first group end returned before the peer came";
  EXPECT_EQ(outs[0], (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(outs[1], (std::vector<int32_t>{1, 2}));

  // Without the peer it waits until the communicator is aborted.
  auto lonely = makeComms(w, 2);
  ncclResult_t result = ncclSuccess;
  std::thread caller([&] {
    EXPECT_EQ(w.gpu->setDevice(0), cudaSuccess);
    result = w.nccl->allGather(&in[0], outs[0].data(), 1, ncclInt32, lonely[0], streams[0]);
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(w.nccl->commAbort(lonely[0]), ncclSuccess);
  caller.join();
  EXPECT_EQ(result, ncclSystemError);
  EXPECT_EQ(w.nccl->commDestroy(lonely[1]), ncclSuccess);
  tearDown(w, comms, streams);
}

// Two connected communicators, a and b, over 2 ranks, each on streams of
// its own. launch() issues a's all-gather, then b's, on both ranks, with a
// gate holding b's stream on device 0 and a's on device 1 for 50 ms: device
// 0 has a's kernel ready first, device 1 b's.
struct CrossedLaunches {
  explicit CrossedLaunches(World& world)
      : w(world), a(makeComms(w, 2)), b(makeComms(w, 2)), sa(makeStreams(w, 2)), sb(makeStreams(w, 2)) {
    connect(w, a, sa);
    connect(w, b, sb);
  }

  // Fills outs (a's on ranks 0 and 1, then b's); whether the kernels on
  // both devices finished within `within` each.
  bool launch(std::vector<std::vector<int32_t>>& outs, std::chrono::milliseconds within) {
    outs.assign(4, std::vector<int32_t>(2, -1));
    Gate& gate = gates.emplace_back();
    w.gpu->launch(sb[0], [&gate] { gate.wait(); }, "gate");
    w.gpu->launch(sa[1], [&gate] { gate.wait(); }, "gate");
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(w.gpu->setDevice(r), cudaSuccess);
      EXPECT_EQ(w.nccl->allGather(&in[r], outs[r].data(), 1, ncclInt32, a[r], sa[r]), ncclSuccess);
      EXPECT_EQ(w.nccl->allGather(&in[r], outs[2 + r].data(), 1, ncclInt32, b[r], sb[r]), ncclSuccess);
    }
    std::this_thread::sleep_for(50ms);
    gate.open();
    return w.gpu->synchronize(sa[0], within) && w.gpu->synchronize(sb[1], within);
  }

  // Aborts a (the only end of a deadlock: a's kernels return, b's meet),
  // waits for every stream.
  void abortA() {
    EXPECT_EQ(w.nccl->commAbort(a[0]), ncclSuccess);
    EXPECT_EQ(w.nccl->commAbort(a[1]), ncclSuccess);
    a = {nullptr, nullptr};
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(w.gpu->synchronize(sb[r], 5000ms));
      EXPECT_TRUE(w.gpu->synchronize(sa[r], 5000ms));
    }
  }

  void tearDownAll() {
    w.gpu->setConcurrentCollectives(0);
    std::vector<ncclComm_t> comms = b;
    comms.insert(comms.end(), a.begin(), a.end());
    tearDown(w, comms, {sa[0], sa[1], sb[0], sb[1]});
  }

  World& w;
  std::vector<ncclComm_t> a, b;
  std::vector<cudaStream_t> sa, sb;
  std::deque<Gate> gates; // a gate lives as long as the kernels waiting on it
  int32_t in[2] = {1, 2};
};

TEST(SimNccl, BoundedConcurrencyDeadlocksCommunicatorsStartedInDifferentOrders) {
  World w;
  CrossedLaunches crossed(w);
  const std::vector<int32_t> gathered{1, 2};
  std::vector<std::vector<int32_t>> outs;
  w.gpu->setConcurrentCollectives(2);
  EXPECT_TRUE(crossed.launch(outs, 300ms)) << "two kernels per device fit: no deadlock";
  // launch() waited for a's kernel on device 0 and b's on device 1 only; the
  // other two still write `outs`, which the next launch() refills.
  EXPECT_TRUE(w.gpu->synchronize(crossed.sb[0], 1000ms) && w.gpu->synchronize(crossed.sa[1], 1000ms));
  EXPECT_EQ(outs[0], gathered);
  EXPECT_EQ(outs[3], gathered);

  w.gpu->setConcurrentCollectives(1);
  EXPECT_FALSE(crossed.launch(outs, 300ms)) << "one kernel per device, started in different orders: a deadlock";
  crossed.abortA();
  EXPECT_EQ(outs[2], gathered);
  EXPECT_EQ(outs[3], gathered);
  crossed.tearDownAll();
}

TEST(SimNccl, ImplicitLaunchOrderStartsKernelsInLaunchOrderSoNoneDeadlocks) {
  // The launches of the test above, one kernel per device, but under
  // NCCL_LAUNCH_ORDER_IMPLICIT: b's kernel on device 1 is ready first, yet
  // waits for a's (launched before it) to start, so both devices start a
  // before b and nothing deadlocks.
  World w;
  CrossedLaunches crossed(w);
  w.gpu->clearTimeline();
  w.nccl->setLaunchOrderImplicit(true);
  w.gpu->setConcurrentCollectives(1);
  std::vector<std::vector<int32_t>> outs;
  const uint64_t a0 = w.nccl->idOf(crossed.a[0]);
  const uint64_t a1 = w.nccl->idOf(crossed.a[1]);
  const uint64_t b0 = w.nccl->idOf(crossed.b[0]);
  const uint64_t b1 = w.nccl->idOf(crossed.b[1]);
  const bool finished = crossed.launch(outs, 2000ms);
  EXPECT_TRUE(finished) << "kernels started out of launch order and deadlocked";
  if (!finished) {
    crossed.abortA();
  }
  for (int r = 0; r < 2; ++r) { // launch() waited for two of the four streams
    EXPECT_TRUE(w.gpu->synchronize(crossed.sa[r], 5000ms));
    EXPECT_TRUE(w.gpu->synchronize(crossed.sb[r], 5000ms));
  }
  for (const auto& out : outs) {
    EXPECT_EQ(out, (std::vector<int32_t>{1, 2}));
  }
  const std::vector<std::vector<uint64_t>> launchOrder{{a0, b0}, {a1, b1}};
  auto timeline = w.gpu->timeline(); // in the order kernels ended
  std::stable_sort(timeline.begin(), timeline.end(), [](const auto& x, const auto& y) {
    return x.startUs < y.startUs;
  });
  for (int device = 0; device < 2; ++device) {
    std::vector<uint64_t> started;
    for (const auto& k : timeline) {
      if (k.device == device && k.comm != 0) {
        started.push_back(k.comm);
      }
    }
    EXPECT_EQ(started, launchOrder[device]) << "device " << device;
  }
  w.nccl->setLaunchOrderImplicit(false);
  crossed.tearDownAll();
}

TEST(SimNccl, KernelWithoutPeerRunsUntilAbort) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  connect(w, comms, streams);
  int32_t in = 7;
  int32_t out[2] = {-1, -1};
  ASSERT_EQ(w.nccl->allGather(&in, out, 1, ncclInt32, comms[0], streams[0]), ncclSuccess);
  ASSERT_EQ(w.gpu->setDevice(0), cudaSuccess);
  cudaEvent_t done = nullptr;
  ASSERT_EQ(w.gpu->eventCreateWithFlags(&done, 0), cudaSuccess);
  ASSERT_EQ(w.gpu->eventRecord(done, streams[0]), cudaSuccess);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(w.gpu->eventQuery(done), cudaErrorNotReady) << "the kernel ended without its peer";
  ncclResult_t state = ncclInProgress;
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclSuccess);
  EXPECT_EQ(state, ncclSuccess); // a hang is not an error

  EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclSuccess);
  // The abort returned after the kernel left the stream.
  const auto kernels = w.gpu->timeline();
  ASSERT_EQ(kernels.size(), 1u);
  EXPECT_EQ(kernels[0].label, "allgather");
  EXPECT_TRUE(eventually([&] { return w.gpu->eventQuery(done) == cudaSuccess; }));
  EXPECT_EQ(out[0], -1); // outputs left as they were
  EXPECT_EQ(out[1], -1);

  // The handle is gone: every call with it fails, none crashes.
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commDestroy(comms[0]), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allGather(&in, out, 1, ncclInt32, comms[0], streams[0]), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->idOf(comms[0]), 0u);

  EXPECT_EQ(w.nccl->commAbort(comms[1]), ncclSuccess);
  EXPECT_EQ(w.gpu->eventDestroy(done), cudaSuccess);
  tearDown(w, {}, streams);
}

TEST(SimNccl, AbortWaitsForKernelQueuedBehindBlockedItem) {
  World w;
  auto comms = makeComms(w, 1);
  cudaStream_t s = w.gpu->createStream(0);
  Gate gate;
  w.gpu->launch(s, [&] { gate.wait(); }, "blocker");
  float in = 2.0f;
  float out = -1.0f;
  ASSERT_EQ(w.nccl->allReduce(&in, &out, 1, ncclFloat32, ncclSum, comms[0], s), ncclSuccess);
  std::atomic<bool> returned{false};
  std::thread aborter([&] {
    EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclSuccess);
    returned = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(returned.load()) << "commAbort did not wait for its queued kernel";
  EXPECT_EQ(w.nccl->liveComms(), 0); // the handle is invalid already
  gate.open();
  aborter.join();
  EXPECT_TRUE(returned.load());
  const auto kernels = kernelsOf(*w.gpu, 0);
  ASSERT_EQ(kernels.size(), 1u); // the blocker; the collective ran after it...
  EXPECT_EQ(kernels[0].label, "blocker");
  EXPECT_EQ(w.gpu->timeline().size(), 2u); // ...as an aborted kernel
  EXPECT_EQ(out, -1.0f);
  tearDown(w, {}, {s});
}

TEST(SimNccl, SplitOfBlockingParent) {
  World w;
  const int n = 4;
  auto parents = makeComms(w, n);
  auto streams = makeStreams(w, n);
  std::vector<ncclComm_t> children(n, nullptr);
  // Rank 3 opts out; colors 0 {0, 2} and 1 {1}; keys reverse the order.
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    const int color = r == 3 ? NCCL_SPLIT_NOCOLOR : r % 2;
    ncclConfig_t config = configOf(false);
    children[r] = reinterpret_cast<ncclComm_t>(&config); // must be overwritten
    ASSERT_EQ(w.nccl->commSplit(parents[r], color, 10 - r, &children[r], &config), ncclSuccess);
  });
  EXPECT_EQ(children[3], nullptr);
  const std::vector<int> sizes = {2, 1, 2};
  for (int r = 0; r < 3; ++r) {
    ASSERT_NE(children[r], nullptr);
    int rank = -1;
    int count = 0;
    EXPECT_EQ(w.nccl->commUserRank(children[r], &rank), ncclSuccess);
    EXPECT_EQ(w.nccl->commCount(children[r], &count), ncclSuccess);
    EXPECT_EQ(rank, r == 0 ? 1 : 0) << "parent rank " << r;
    EXPECT_EQ(count, sizes[r]);
    EXPECT_FALSE(w.nccl->isBlocking(children[r])); // from the split's config
    EXPECT_EQ(w.nccl->deviceOf(children[r]), r);
    EXPECT_NE(w.nccl->idOf(children[r]), w.nccl->idOf(parents[r]));
  }
  // The children of color 0 work together, in child-rank order.
  onRanks(n, [&](int r) {
    if (r != 0 && r != 2) {
      return;
    }
    int32_t in = 100 + r;
    int32_t out[2] = {};
    ASSERT_EQ(w.nccl->allGather(&in, out, 1, ncclInt32, children[r], streams[r]), ncclInProgress);
    ASSERT_EQ(pollState(*w.nccl, children[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    EXPECT_EQ(out[0], 102);
    EXPECT_EQ(out[1], 100);
  });
  std::vector<ncclComm_t> all = parents;
  all.insert(all.end(), children.begin(), children.begin() + 3);
  tearDown(w, all, streams);
}

TEST(SimNccl, SplitOfNonblockingParent) {
  World w;
  const int n = 3;
  auto parents = makeComms(w, n, /*blocking=*/false);
  w.nccl->setInitDelay(30ms);
  // Slots on the heap: written when the split completes, after the call.
  std::vector<std::unique_ptr<ncclComm_t>> slots;
  for (int r = 0; r < n; ++r) {
    slots.push_back(std::make_unique<ncclComm_t>(nullptr));
  }
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    // Equal keys: the parent's rank order decides.
    // As NCCL: success while the split runs, the child null until it is done.
    ASSERT_EQ(w.nccl->commSplit(parents[r], 0, 5, slots[r].get(), nullptr), ncclSuccess);
    EXPECT_EQ(__atomic_load_n(slots[r].get(), __ATOMIC_ACQUIRE), nullptr);
    int count = 0;
    EXPECT_EQ(w.nccl->commCount(parents[r], &count), ncclInvalidArgument);
    EXPECT_EQ(pollState(*w.nccl, parents[r]), ncclSuccess);
  });
  for (int r = 0; r < n; ++r) {
    ncclComm_t child = *slots[r];
    ASSERT_NE(child, nullptr);
    int rank = -1;
    EXPECT_EQ(w.nccl->commUserRank(child, &rank), ncclSuccess);
    EXPECT_EQ(rank, r);
    EXPECT_TRUE(w.nccl->isBlocking(child)); // null config: blocking
  }
  // A second split: the background thread completes it without a poll.
  // liveComms() takes the simulator's lock, under which the slots are
  // written, so once it counts the children they can be read.
  const int before = w.nccl->liveComms();
  std::vector<ncclComm_t> children2(n, nullptr);
  w.nccl->setInitDelay(0ms);
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    ncclConfig_t config = configOf(false);
    ASSERT_EQ(w.nccl->commSplit(parents[r], r == 1 ? NCCL_SPLIT_NOCOLOR : 0, -r, &children2[r], &config),
              ncclSuccess);
  });
  EXPECT_TRUE(eventually([&] { return w.nccl->liveComms() == before + 2; }));
  EXPECT_NE(children2[0], nullptr);
  EXPECT_EQ(children2[1], nullptr);
  EXPECT_NE(children2[2], nullptr);
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(pollState(*w.nccl, parents[r]), ncclSuccess);
  }
  int rank = -1;
  EXPECT_EQ(w.nccl->commUserRank(children2[2], &rank), ncclSuccess);
  EXPECT_EQ(rank, 0); // key -2 sorts before key 0
  EXPECT_FALSE(w.nccl->isBlocking(children2[2]));

  std::vector<ncclComm_t> all = parents;
  for (auto& slot : slots) {
    all.push_back(*slot);
  }
  all.push_back(children2[0]);
  all.push_back(children2[2]);
  tearDown(w, all, {});
}

TEST(SimNccl, InjectedAsyncErrorBlocksUntilAbort) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  connect(w, comms, streams);
  w.nccl->injectAsyncError(comms[0], ncclRemoteError, "peer 1 closed the connection");
  ncclResult_t state = ncclSuccess;
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclSuccess);
  EXPECT_EQ(state, ncclRemoteError);
  EXPECT_STREQ(w.nccl->getLastError(comms[0]), "peer 1 closed the connection");
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[1], &state), ncclSuccess);
  EXPECT_EQ(state, ncclSuccess);

  // A communicator in error refuses collectives with its error
  // (ncclCommEnsureReady); its peer's kernel waits for it forever.
  std::vector<cudaEvent_t> done(2);
  std::vector<int32_t> out(4, -1);
  int32_t in[2] = {1, 2};
  ASSERT_EQ(w.gpu->setDevice(0), cudaSuccess);
  EXPECT_EQ(w.nccl->allGather(&in[0], &out[0], 1, ncclInt32, comms[0], streams[0]), ncclRemoteError);
  EXPECT_NE(std::string(w.nccl->getLastError(comms[0])).find("peer 1 closed the connection"), std::string::npos);
  ASSERT_EQ(w.gpu->setDevice(1), cudaSuccess);
  ASSERT_EQ(w.nccl->allGather(&in[1], &out[2], 1, ncclInt32, comms[1], streams[1]), ncclSuccess);
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    ASSERT_EQ(w.gpu->eventCreateWithFlags(&done[r], 0), cudaSuccess);
    ASSERT_EQ(w.gpu->eventRecord(done[r], streams[r]), cudaSuccess);
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(w.gpu->eventQuery(done[1]), cudaErrorNotReady); // its peer never came
  EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclSuccess);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(w.gpu->eventQuery(done[1]), cudaErrorNotReady); // peers keep waiting
  EXPECT_EQ(w.nccl->commAbort(comms[1]), ncclSuccess);
  EXPECT_TRUE(eventually([&] { return w.gpu->eventQuery(done[1]) == cudaSuccess; }));
  EXPECT_EQ(out, std::vector<int32_t>(4, -1));
  for (auto e : done) {
    EXPECT_EQ(w.gpu->eventDestroy(e), cudaSuccess);
  }
  tearDown(w, {}, streams);
}

TEST(SimNccl, CollectiveMismatchHangsWithoutAWord) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  std::vector<std::vector<float>> outs(2, std::vector<float>(8, -1.0f));
  std::vector<float> in(4, 1.0f);
  onRanks(2, [&](int r) {
    // Rank 1 sends a different count: NCCL compares nothing, and hangs.
    ASSERT_EQ(w.nccl->allGather(in.data(), outs[r].data(), r == 0 ? 4 : 3, ncclFloat32, comms[r], streams[r]), ncclSuccess);
  });
  expectHungWithoutAWordUntilAborted(w, comms, streams);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(outs[r], std::vector<float>(8, -1.0f)) << "nothing was moved";
  }
  tearDown(w, {}, streams);
}

TEST(SimNccl, SendsPairWithRecvsByPeerAndOrderWithinAGroup) {
  World w;
  const int n = 3;
  auto comms = makeComms(w, n);
  auto streams = makeStreams(w, n);
  onRanks(n, [&](int r) {
    // Each rank sends two messages to every rank (itself included), in
    // order; the recvs are posted in the reverse peer order: pairing is by
    // peer and by order per peer, not by the place in the group.
    std::vector<std::vector<int32_t>> in(2 * n), out(2 * n, std::vector<int32_t>(3, -1));
    for (int q = 0; q < n; ++q) {
      in[2 * q].assign(3, 100 * r + 10 * q);
      in[2 * q + 1].assign(3, 100 * r + 10 * q + 1);
    }
    ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
    for (int q = 0; q < n; ++q) {
      for (int k = 0; k < 2; ++k) {
        ASSERT_EQ(w.nccl->send(in[2 * q + k].data(), 3, ncclInt32, q, comms[r], streams[r]), ncclSuccess);
      }
    }
    for (int q = n - 1; q >= 0; --q) {
      for (int k = 0; k < 2; ++k) {
        ASSERT_EQ(w.nccl->recv(out[2 * q + k].data(), 3, ncclInt32, q, comms[r], streams[r]), ncclSuccess);
      }
    }
    ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 20s));
    for (int q = 0; q < n; ++q) {
      EXPECT_EQ(out[2 * q], std::vector<int32_t>(3, 100 * q + 10 * r)) << "rank " << r << " from " << q;
      EXPECT_EQ(out[2 * q + 1], std::vector<int32_t>(3, 100 * q + 10 * r + 1)) << "rank " << r << " from " << q;
    }
  });
  // An invalid peer is refused at the call.
  int32_t one = 0;
  EXPECT_EQ(w.nccl->send(&one, 1, ncclInt32, n, comms[0], streams[0]), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->recv(&one, 1, ncclInt32, -1, comms[0], streams[0]), ncclInvalidArgument);
  tearDown(w, comms, streams);
}

TEST(SimNccl, UnpairedOrMismatchedSendsHangWithoutAWord) {
  for (const bool countsDiffer : {true, false}) {
    World w;
    auto comms = makeComms(w, 2);
    auto streams = makeStreams(w, 2);
    std::vector<float> in(4, 1.0f);
    std::vector<std::vector<float>> outs(2, std::vector<float>(4, -1.0f));
    onRanks(2, [&](int r) {
      ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
      if (r == 0) {
        ASSERT_EQ(w.nccl->send(in.data(), 4, ncclFloat32, 1, comms[r], streams[r]), ncclSuccess);
      } else if (countsDiffer) {
        ASSERT_EQ(w.nccl->recv(outs[r].data(), 3, ncclFloat32, 0, comms[r], streams[r]), ncclSuccess);
      } else {
        // A recv from the wrong peer (itself, with no send to match).
        ASSERT_EQ(w.nccl->recv(outs[r].data(), 4, ncclFloat32, 1, comms[r], streams[r]), ncclSuccess);
      }
      ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
    });
    expectHungWithoutAWordUntilAborted(w, comms, streams);
    EXPECT_EQ(outs[1], std::vector<float>(4, -1.0f)) << "nothing was moved";
    tearDown(w, {}, streams);
  }
}

TEST(SimNccl, ARefusedCallPutsANonblockingCommunicatorInErrorForGood) {
  for (const bool blocking : {true, false}) {
    World w;
    auto comms = makeComms(w, 1, blocking);
    auto streams = makeStreams(w, 1);
    std::vector<float> buffer(4, 1.0f);
    // An invalid root: refused at the call on both.
    EXPECT_EQ(w.nccl->broadcast(buffer.data(), buffer.data(), 4, ncclFloat32, 3, comms[0], streams[0]), ncclInvalidArgument);
    ncclResult_t state = ncclInternalError;
    ASSERT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclSuccess);
    const ncclResult_t valid =
        w.nccl->allReduce(buffer.data(), buffer.data(), 4, ncclFloat32, ncclSum, comms[0], streams[0]);
    if (blocking) {
      EXPECT_EQ(state, ncclSuccess) << "a blocking communicator stays usable";
      EXPECT_EQ(valid, ncclSuccess);
      ASSERT_TRUE(w.gpu->synchronize(streams[0], 5s));
      tearDown(w, comms, streams);
    } else {
      EXPECT_EQ(state, ncclInvalidArgument) << "the refusal is the communicator's state now";
      EXPECT_EQ(valid, ncclInvalidArgument) << "and every later call meets it";
      EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclSuccess);
      tearDown(w, {}, streams);
    }
  }
}

TEST(SimNccl, ALoneSendAndItsRecvRunOnTheirTwoRanksAlone) {
  World w;
  const int n = 3;
  auto comms = makeComms(w, n);
  auto streams = makeStreams(w, n);
  // Rank 1 takes no part, not even by a first collective: a send and its
  // recv need only their two ranks, each in a group of its own.
  std::vector<int32_t> sent{7, 8, 9};
  std::vector<int32_t> got(3, -1);
  onRanks(n, [&](int r) {
    if (r == 0) {
      ASSERT_EQ(w.nccl->send(sent.data(), 3, ncclInt32, 2, comms[r], streams[r]), ncclSuccess);
    } else if (r == 2) {
      ASSERT_EQ(w.nccl->recv(got.data(), 3, ncclInt32, 0, comms[r], streams[r]), ncclSuccess);
    }
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 5s)) << "rank " << r;
  });
  EXPECT_EQ(got, sent);
  // Sends and recvs took no place among the collectives: the ranks' first
  // all-reduce meets every rank's first.
  std::vector<std::vector<float>> sums(n);
  onRanks(n, [&](int r) {
    sums[r].assign(2, float(r + 1));
    ASSERT_EQ(w.nccl->allReduce(sums[r].data(), sums[r].data(), 2, ncclFloat32, ncclSum, comms[r], streams[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 5s)) << "rank " << r;
    EXPECT_EQ(sums[r], std::vector<float>(2, 6.0f));
  });
  tearDown(w, comms, streams);
}

TEST(SimNccl, SendsPairWithRecvsByPeerAndOrderAcrossGroups) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  std::vector<int32_t> a{1, 2}, b{3, 4};
  std::vector<std::vector<int32_t>> got(2, std::vector<int32_t>(2, -1));
  std::vector<std::vector<float>> sums(2);
  onRanks(2, [&](int r) {
    sums[r].assign(4, float(r + 1));
    if (r == 0) {
      // Two groups: a send, then a send beside an all-reduce.
      ASSERT_EQ(w.nccl->send(a.data(), 2, ncclInt32, 1, comms[r], streams[r]), ncclSuccess);
      ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
      ASSERT_EQ(w.nccl->send(b.data(), 2, ncclInt32, 1, comms[r], streams[r]), ncclSuccess);
      ASSERT_EQ(w.nccl->allReduce(sums[r].data(), sums[r].data(), 4, ncclFloat32, ncclSum, comms[r], streams[r]), ncclSuccess);
      ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
    } else {
      // One group, the all-reduce first: the k-th recv from rank 0 takes
      // rank 0's k-th send to it, and the all-reduces meet.
      ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
      ASSERT_EQ(w.nccl->allReduce(sums[r].data(), sums[r].data(), 4, ncclFloat32, ncclSum, comms[r], streams[r]), ncclSuccess);
      for (auto& out : got) {
        ASSERT_EQ(w.nccl->recv(out.data(), 2, ncclInt32, 0, comms[r], streams[r]), ncclSuccess);
      }
      ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
    }
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 5s)) << "rank " << r;
    EXPECT_EQ(sums[r], std::vector<float>(4, 3.0f)) << "rank " << r;
  });
  EXPECT_EQ(got[0], a);
  EXPECT_EQ(got[1], b);
  tearDown(w, comms, streams);
}

TEST(SimNccl, ASendHoldsItsStreamUntilItsRecvRuns) {
  // Each rank sends, then receives, in groups of their own on one stream:
  // each send waits for a recv queued behind the peer's own send ("blocking
  // for the GPU"), so neither ends. In one group they do.
  for (const bool oneGroup : {false, true}) {
    World w;
    auto comms = makeComms(w, 2);
    auto streams = makeStreams(w, 2);
    std::vector<std::vector<float>> ins{{1, 1}, {2, 2}};
    std::vector<std::vector<float>> outs(2, std::vector<float>(2, -1.0f));
    onRanks(2, [&](int r) {
      if (oneGroup) {
        ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
      }
      ASSERT_EQ(w.nccl->send(ins[r].data(), 2, ncclFloat32, 1 - r, comms[r], streams[r]), ncclSuccess);
      ASSERT_EQ(w.nccl->recv(outs[r].data(), 2, ncclFloat32, 1 - r, comms[r], streams[r]), ncclSuccess);
      if (oneGroup) {
        ASSERT_EQ(w.nccl->groupEnd(), ncclSuccess);
      }
    });
    if (oneGroup) {
      for (int r = 0; r < 2; ++r) {
        ASSERT_TRUE(w.gpu->synchronize(streams[r], 5s)) << "rank " << r;
        EXPECT_EQ(outs[r], ins[1 - r]);
      }
      tearDown(w, comms, streams);
    } else {
      expectHungWithoutAWordUntilAborted(w, comms, streams);
      EXPECT_EQ(outs[0], std::vector<float>(2, -1.0f)) << "nothing was moved";
      tearDown(w, {}, streams);
    }
  }
}

TEST(SimNccl, EachLaunchOfACapturedCollectiveIsACollectiveOfItsOwn) {
  World w;
  const int n = 2;
  auto comms = makeComms(w, n);
  auto streams = makeStreams(w, n);
  std::vector<std::vector<float>> ins(n, std::vector<float>(2)), outs(n, std::vector<float>(2 * n, -1.0f));
  std::vector<std::shared_ptr<const SimGraph>> graphs(n);
  // A first group captured would connect the peers inside the capture:
  // not modelled, refused.
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->beginCapture(streams[r], cudaStreamCaptureModeThreadLocal), cudaSuccess);
    EXPECT_EQ(w.nccl->allGather(ins[r].data(), outs[r].data(), 2, ncclFloat32, comms[r], streams[r]), ncclInvalidUsage);
    EXPECT_EQ(w.gpu->endCapture(streams[r]), cudaSuccess);
  });
  connect(w, comms, streams);
  onRanks(n, [&](int r) {
    ASSERT_EQ(w.gpu->beginCapture(streams[r], cudaStreamCaptureModeThreadLocal), cudaSuccess);
    ASSERT_EQ(w.nccl->allGather(ins[r].data(), outs[r].data(), 2, ncclFloat32, comms[r], streams[r]), ncclSuccess);
    ASSERT_EQ(w.gpu->endCapture(streams[r], &graphs[r]), cudaSuccess);
  });
  EXPECT_EQ(outs[0], std::vector<float>(2 * n, -1.0f)) << "the capture moved nothing";
  for (float launch : {1.0f, 2.0f}) {
    onRanks(n, [&](int r) {
      ins[r].assign(2, launch * 10 + r);
      ASSERT_EQ(w.gpu->graphLaunch(graphs[r], streams[r]), cudaSuccess);
      ASSERT_TRUE(w.gpu->synchronize(streams[r], 10s));
      for (int q = 0; q < n; ++q) {
        EXPECT_EQ(outs[r][2 * q], launch * 10 + q) << "launch " << launch << " rank " << r;
      }
    });
  }
  // An eager collective after the launches meets its peers.
  connect(w, comms, streams);
  graphs.clear();
  tearDown(w, comms, streams);
}

TEST(SimNccl, MemAllocGivesVmmMemoryOfTheCurrentDeviceAndFreesOnlyItsOwn) {
  World w;
  ASSERT_EQ(w.gpu->setDevice(3), cudaSuccess);
  void* block = nullptr;
  ASSERT_EQ(w.nccl->memAlloc(&block, 1000), ncclSuccess);
  EXPECT_TRUE(w.gpu->inBlock(block, 1000, Gpu::MemoryKind::Vmm));
  EXPECT_EQ(w.nccl->liveMemAllocs(), 1);
  EXPECT_EQ(w.nccl->memAlloc(nullptr, 8), ncclInvalidArgument);
  char own[8];
  EXPECT_EQ(w.nccl->memFree(own), ncclInvalidArgument) << "not ncclMemAlloc's";
  EXPECT_EQ(w.nccl->memFree(nullptr), ncclSuccess);
  EXPECT_EQ(w.nccl->memFree(block), ncclSuccess);
  EXPECT_EQ(w.nccl->memFree(block), ncclInvalidArgument) << "freed twice";
  EXPECT_EQ(w.nccl->liveMemAllocs(), 0);
}

TEST(SimNccl, CommAbortAndDestroyCanHang) {
  World w;
  auto comms = makeComms(w, 2);
  w.nccl->blockCalls(Nccl::Call::CommAbort, 100ms);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(w.nccl->commAbort(comms[0]), ncclSuccess);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);
  w.nccl->blockCalls(Nccl::Call::CommDestroy, pycomm::sim::CallGate::kForever);
  std::atomic<bool> destroyed{false};
  std::thread hung([&] {
    EXPECT_EQ(w.nccl->commDestroy(comms[1]), ncclSuccess);
    destroyed = true;
  });
  EXPECT_TRUE(eventually([&] { return w.nccl->blockedCalls() == 1; }));
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(destroyed.load());
  EXPECT_EQ(w.nccl->liveComms(), 1) << "a hung destroy frees nothing";
  w.nccl->releaseBlockedCalls();
  hung.join();
  tearDown(w, {}, {});
}

TEST(SimNccl, WindowRegistrationIsCollectiveVmmOnlyAndWrittenLater) {
  World w;
  const int n = 2;
  auto comms = makeComms(w, n, /*blocking=*/false);
  auto streams = makeStreams(w, n);
  std::vector<void*> vmm(n);
  std::vector<void*> cached(n);
  for (int r = 0; r < n; ++r) {
    vmm[r] = w.gpu->allocateBlock(streams[r], 4096, Gpu::MemoryKind::Vmm);
    cached[r] = w.gpu->allocateBlock(streams[r], 4096);
  }
  // Rank 0 alone: the call returns ncclSuccess, the communicator stays in
  // progress and the window is not written until rank 1 registers too.
  auto window0 = std::make_unique<void*>(nullptr);
  ASSERT_EQ(w.gpu->setDevice(0), cudaSuccess);
  EXPECT_EQ(w.nccl->commWindowRegister(comms[0], vmm[0], 4096, window0.get(), 1), ncclSuccess);
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(*window0, nullptr);
  ncclResult_t state = ncclSuccess;
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclSuccess);
  EXPECT_EQ(state, ncclInProgress);
  EXPECT_EQ(w.nccl->allGather(vmm[0], vmm[0], 1, ncclFloat32, comms[0], streams[0]), ncclInvalidArgument)
      << "no call while the registration is in progress";
  auto window1 = std::make_unique<void*>(nullptr);
  EXPECT_EQ(w.nccl->commWindowRegister(comms[1], vmm[1], 4096, window1.get(), 1), ncclSuccess);
  // NCCL's thread writes both windows; a caller may read its window once
  // the communicator's state says the registration is done (reading it
  // earlier races with that thread).
  EXPECT_EQ(pollState(*w.nccl, comms[0]), ncclSuccess);
  EXPECT_EQ(pollState(*w.nccl, comms[1]), ncclSuccess);
  EXPECT_NE(*window0, nullptr);
  EXPECT_NE(*window1, nullptr);
  EXPECT_EQ(w.nccl->stackSlotWindows(), 0);
  EXPECT_EQ(w.nccl->commWindowDeregister(comms[0], *window0), ncclSuccess);
  EXPECT_EQ(w.nccl->commWindowDeregister(comms[1], *window1), ncclSuccess);
  // A window slot on the caller's stack is counted: NCCL writes it later.
  void* onStack = nullptr;
  EXPECT_EQ(w.nccl->commWindowRegister(comms[0], vmm[0], 4096, &onStack, 1), ncclSuccess);
  EXPECT_EQ(w.nccl->stackSlotWindows(), 1);
  // Memory that is not cuMem's fails, and leaves the communicator in error.
  EXPECT_EQ(w.nccl->commWindowRegister(comms[1], cached[1], 4096, window1.get(), 1), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[1], &state), ncclSuccess);
  EXPECT_EQ(state, ncclInvalidArgument);
  EXPECT_NE(std::string(w.nccl->getLastError(comms[1])).find("virtual memory"), std::string::npos);
  for (auto c : comms) {
    EXPECT_EQ(w.nccl->commAbort(c), ncclSuccess);
  }
  for (int r = 0; r < n; ++r) {
    w.gpu->freeBlock(vmm[r]);
    w.gpu->freeBlock(cached[r]);
  }
  tearDown(w, {}, streams);
}

TEST(SimNccl, OutputIsWrittenWhenTheKernelEnds) {
  // On a GPU the output fills while the kernel runs: a reader that does not
  // wait for the op's end sees what was there before.
  World w;
  w.nccl->setCollectiveDuration(150ms);
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  connect(w, comms, streams);
  std::vector<std::vector<int32_t>> outs(2, std::vector<int32_t>(2, -1));
  int32_t in[2] = {1, 2};
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(w.gpu->setDevice(r), cudaSuccess);
    ASSERT_EQ(w.nccl->allGather(&in[r], outs[r].data(), 1, ncclInt32, comms[r], streams[r]), ncclSuccess);
  }
  std::this_thread::sleep_for(50ms); // the ranks met; their kernels run
  EXPECT_EQ(outs[0], (std::vector<int32_t>{-1, -1})) << "written before the kernel ended";
  EXPECT_EQ(outs[1], (std::vector<int32_t>{-1, -1})) << "written before the kernel ended";
  // Taking the simulator's lock orders these reads before the kernels'
  // writes, which come after their duration, under the same lock.
  ncclResult_t state = ncclSuccess;
  EXPECT_EQ(w.nccl->commGetAsyncError(comms[0], &state), ncclSuccess);
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(w.gpu->synchronize(streams[r], 10s));
    EXPECT_EQ(outs[r], (std::vector<int32_t>{1, 2}));
  }
  tearDown(w, comms, streams);
}

TEST(SimNccl, CommMemoryComesBackWithTheLastLocalRank) {
  World w;
  const int64_t creation = int64_t{10} << 20;
  w.nccl->setCommMemory(creation, int64_t{20} << 20);
  auto freeOn = [&](int device) {
    EXPECT_EQ(w.gpu->setDevice(device), cudaSuccess);
    size_t free = 0;
    size_t total = 0;
    EXPECT_EQ(w.gpu->memGetInfo(&free, &total), cudaSuccess);
    return static_cast<int64_t>(total - free);
  };
  auto comms = makeComms(w, 2);
  EXPECT_EQ(freeOn(0), creation);
  EXPECT_EQ(freeOn(1), creation);
  EXPECT_EQ(w.nccl->commDestroy(comms[0]), ncclSuccess);
  EXPECT_EQ(freeOn(0), creation) << "held while another rank of this process lives";
  EXPECT_EQ(w.nccl->commAbort(comms[1]), ncclSuccess);
  EXPECT_EQ(freeOn(0), 0);
  EXPECT_EQ(freeOn(1), 0);
  tearDown(w, {}, {});
}

TEST(SimNccl, OverlapAccounting) {
  World w;
  w.nccl->setCollectiveDuration(20ms);
  const int n = 2;
  auto a = makeComms(w, n);
  auto b = makeComms(w, n);
  auto sa = makeStreams(w, n);
  auto sb = makeStreams(w, n);
  connect(w, a, sa);
  connect(w, b, sb);
  const int32_t ranks[2] = {0, 1};
  // Every stream's worker waits at a gate, so the kernels start together
  // even when threads are slow to start.
  Gate gate;
  for (int r = 0; r < n; ++r) {
    w.gpu->launch(sa[r], [&] { gate.wait(); }, "gate");
    w.gpu->launch(sb[r], [&] { gate.wait(); }, "gate");
  }
  std::vector<std::array<int32_t, 6>> outs(n);
  for (int r = 0; r < n; ++r) {
    int32_t* out = outs[r].data();
    const int32_t* in = &ranks[r];
    ASSERT_EQ(w.nccl->allGather(in, out, 1, ncclInt32, a[r], sa[r]), ncclSuccess);
    ASSERT_EQ(w.nccl->allGather(in, out + 2, 1, ncclInt32, b[r], sb[r]), ncclSuccess);
    ASSERT_EQ(w.nccl->allGather(in, out + 4, 1, ncclInt32, a[r], sa[r]), ncclSuccess);
  }
  gate.open();
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(w.gpu->synchronize(sa[r], 20s));
    ASSERT_TRUE(w.gpu->synchronize(sb[r], 20s));
    EXPECT_EQ(outs[r], (std::array<int32_t, 6>{0, 1, 0, 1, 0, 1}));
  }
  for (int r = 0; r < n; ++r) {
    const auto ka = kernelsOf(*w.gpu, w.nccl->idOf(a[r]));
    const auto kb = kernelsOf(*w.gpu, w.nccl->idOf(b[r]));
    ASSERT_EQ(ka.size(), 2u);
    ASSERT_EQ(kb.size(), 1u);
    EXPECT_LE(ka[0].endUs, ka[1].startUs) << "kernels of one communicator overlapped";
    EXPECT_GE(ka[0].endUs - ka[0].startUs, 20000) << "shorter than the collective duration";
    EXPECT_LT(ka[0].startUs, kb[0].endUs);
    EXPECT_LT(kb[0].startUs, ka[0].endUs) << "kernels of two communicators did not overlap";
  }
  EXPECT_EQ(w.nccl->overlapViolations(), 0);

  // One communicator on two streams: its kernels run at once, which NCCL
  // forbids and the simulator counts.
  w.nccl->setCollectiveDuration(200ms);
  auto extra = makeStreams(w, n);
  onRanks(n, [&](int r) {
    int32_t in = r;
    int32_t out1[2], out2[2];
    ASSERT_EQ(w.nccl->allGather(&in, out1, 1, ncclInt32, a[r], sa[r]), ncclSuccess);
    ASSERT_EQ(w.nccl->allGather(&in, out2, 1, ncclInt32, a[r], extra[r]), ncclSuccess);
    ASSERT_TRUE(w.gpu->synchronize(sa[r], 20s));
    ASSERT_TRUE(w.gpu->synchronize(extra[r], 20s));
  });
  EXPECT_GE(w.nccl->overlapViolations(), 1);
  for (auto c : a) {
    EXPECT_EQ(w.nccl->commDestroy(c), ncclSuccess);
  }
  for (auto c : b) {
    EXPECT_EQ(w.nccl->commDestroy(c), ncclSuccess);
  }
  for (auto s : extra) {
    EXPECT_EQ(w.gpu->streamDestroy(s), cudaSuccess);
  }
  for (auto s : sb) {
    EXPECT_EQ(w.gpu->streamDestroy(s), cudaSuccess);
  }
  for (auto s : sa) {
    EXPECT_EQ(w.gpu->streamDestroy(s), cudaSuccess);
  }
  EXPECT_EQ(w.nccl->liveComms(), 0);
  EXPECT_TRUE(eventually([&] { return w.gpu->streamThreads() == 0; }));
}

TEST(SimNccl, InvalidArgumentsAndHandles) {
  World w;
  auto comms = makeComms(w, 2);
  auto streams = makeStreams(w, 2);
  ncclComm_t c = comms[0];
  cudaStream_t s = streams[0];
  float buf[4] = {};
  int notAComm = 0;
  auto bogus = reinterpret_cast<ncclComm_t>(&notAComm);

  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclFloat32, nullptr, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclFloat32, bogus, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclNumTypes, c, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allReduce(buf, buf, 1, ncclFloat32, static_cast<ncclRedOp_t>(42), c, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->broadcast(buf, buf, 1, ncclFloat32, 2, c, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allGather(nullptr, buf, 1, ncclFloat32, c, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclFloat32, c, streams[1]), ncclInvalidUsage); // stream of device 1
  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclFloat32, c, reinterpret_cast<cudaStream_t>(&notAComm)),
            ncclUnhandledCudaError);
  EXPECT_FALSE(std::string(w.nccl->getLastError(nullptr)).empty());

  // A failed call inside a group fails the group, which runs nothing.
  ASSERT_EQ(w.nccl->groupStart(), ncclSuccess);
  EXPECT_EQ(w.nccl->allGather(buf, buf, 1, ncclNumTypes, c, s), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->groupEnd(), ncclInvalidArgument);
  EXPECT_TRUE(w.gpu->timeline().empty());

  ncclRedOp_t op;
  float scalar = 2.0f;
  EXPECT_EQ(w.nccl->redOpDestroy(ncclSum, c), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->redOpCreatePreMulSum(&op, &scalar, ncclFloat32, ncclScalarHostImmediate, bogus), ncclInvalidArgument);
  ASSERT_EQ(w.nccl->redOpCreatePreMulSum(&op, &scalar, ncclFloat32, ncclScalarHostImmediate, c), ncclSuccess);
  EXPECT_EQ(w.nccl->allReduce(buf, buf, 1, ncclFloat16, op, c, s), ncclInvalidArgument); // made for float32
  EXPECT_EQ(w.nccl->redOpDestroy(op, comms[1]), ncclInvalidArgument); // another communicator's op
  EXPECT_EQ(w.nccl->redOpDestroy(op, c), ncclSuccess);

  void* handle = nullptr;
  EXPECT_EQ(w.nccl->commRegister(c, buf, sizeof(buf), &handle), ncclSuccess);
  EXPECT_EQ(w.nccl->liveRegistrations(), 1);
  EXPECT_EQ(w.nccl->commDeregister(comms[1], handle), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commDeregister(c, &notAComm), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commDeregister(c, handle), ncclSuccess);
  EXPECT_EQ(w.nccl->commDeregister(c, handle), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->liveRegistrations(), 0);

  // Creation: bad arguments and a rank taken twice.
  ncclUniqueId id;
  ASSERT_EQ(w.nccl->getUniqueId(&id), ncclSuccess);
  ncclUniqueId other;
  ASSERT_EQ(w.nccl->getUniqueId(&other), ncclSuccess);
  EXPECT_NE(std::memcmp(&id, &other, sizeof(id)), 0);
  ncclComm_t made = nullptr;
  ncclConfig_t nonblocking = configOf(false);
  EXPECT_EQ(w.nccl->commInitRankConfig(&made, 0, id, 0, nullptr), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commInitRankConfig(&made, 2, id, 2, nullptr), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commInitRankConfig(&made, 2, id, 0, &nonblocking), ncclInProgress);
  ncclComm_t twice = nullptr;
  EXPECT_EQ(w.nccl->commInitRankConfig(&twice, 2, id, 0, &nonblocking), ncclInvalidArgument);
  EXPECT_EQ(w.nccl->commDestroy(made), ncclInvalidArgument); // still in progress
  EXPECT_EQ(w.nccl->commAbort(made), ncclSuccess); // abort is always allowed

  int version = 0;
  EXPECT_EQ(w.nccl->getVersion(&version), ncclSuccess);
  EXPECT_EQ(version, 23007);
  EXPECT_STREQ(w.nccl->getErrorString(ncclInProgress), "NCCL operation in progress");
  EXPECT_NE(std::string(w.nccl->getErrorString(ncclSystemError)).find("unhandled system error"), std::string::npos);
  EXPECT_NE(std::string(w.nccl->getErrorString(ncclInvalidUsage)).find("invalid usage"), std::string::npos);

  // Blocking finalize waits for the kernels, then destroy frees.
  onRanks(2, [&](int r) {
    float in = 1.0f;
    float out[2];
    ASSERT_EQ(w.nccl->allGather(&in, out, 1, ncclFloat32, comms[r], streams[r]), ncclSuccess);
    EXPECT_EQ(w.nccl->commFinalize(comms[r]), ncclSuccess);
    EXPECT_EQ(out[0], 1.0f); // the kernel ran before finalize returned
    EXPECT_EQ(w.nccl->allGather(&in, out, 1, ncclFloat32, comms[r], streams[r]), ncclInvalidUsage);
  });
  tearDown(w, comms, streams);
}

} // namespace
