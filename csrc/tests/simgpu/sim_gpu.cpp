#include "sim_gpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace pycomm::sim {

namespace {

// A stream's worker stays this long after its queue ran dry before it ends,
// so a busy stream does not pay a thread start per item while an idle one
// holds no thread (streamThreads() goes back to 0 without destroying it).
constexpr auto kIdleLinger = std::chrono::milliseconds(20);

// Distinguishes SimGpu instances in the per-thread state: addresses of
// sequential instances can repeat, serials cannot.
std::atomic<uint64_t> nextInstanceSerial{1};
std::atomic<uint64_t> nextStreamSerial{1};

// torch's caching allocator rounds requests up to 512 bytes
// (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize); blocks of one rounded
// size are interchangeable.
constexpr size_t kBlockRounding = 512;

int64_t nowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

} // namespace

// One queued unit of stream work. `run` may block (a cross-stream wait, a
// collective waiting for its peers); whatever it captured is released before
// the item counts as completed.
struct StreamItem {
  std::function<void()> run;
};

struct SimStream;

// One stream capture, cudaStreamBeginCapture to cudaStreamEndCapture: its
// origin, the streams that joined it, the work recorded and how much of it
// each stream recorded. Guarded by SimGpu::Impl::mu.
struct SimCapture {
  std::shared_ptr<SimStream> origin;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;
  std::vector<std::shared_ptr<SimStream>> members; // the origin first
  std::vector<SimGraph::Node> nodes;
  std::map<const SimStream*, uint64_t> recorded; // nodes per stream
  bool invalidated = false;
  bool ended = false;
};

// Guarded by `mu`, except the immutable fields (device, priority, isDefault,
// handle). `cv` signals both new work (to the worker) and completions (to
// event waiters and synchronize()).
struct SimStream {
  int device = 0;
  int priority = 0;
  bool isDefault = false;
  // Names the stream in the allocator's free lists: a destroyed stream's
  // address may be reused by a new one, its serial never is.
  uint64_t serial = nextStreamSerial.fetch_add(1);

  // Capture state, guarded by SimGpu::Impl::mu (not `mu`).
  cudaStreamCaptureStatus captureStatus = cudaStreamCaptureStatusNone;
  cudaStreamCaptureMode captureMode = cudaStreamCaptureModeGlobal;
  std::thread::id captureThread;
  std::shared_ptr<SimCapture> capture; // the capture it belongs to now
  // How many nodes of each stream of its capture this stream waited for
  // (through captured events, directly or through other streams).
  std::map<const SimStream*, uint64_t> waitedFor;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<StreamItem> queue;
  uint64_t enqueued = 0; // items ever queued; an item's sequence number is this after its push
  uint64_t completed = 0; // items that ran to the end, in order
  bool destroyed = false; // no more work accepted; the worker ends when drained
  bool shutdown = false; // the SimGpu is going away: the worker ends when drained
  bool running = false; // a worker thread is in its loop
  std::thread worker; // the current or last worker; joined before it is replaced

  ~SimStream() {
    // Every path that ends a worker joins it before dropping the stream; a
    // joinable thread here would be a bug of this file, so fail loudly.
    if (worker.joinable()) {
      std::terminate();
    }
  }
};

// Guarded by SimGpu::Impl::mu.
struct SimEvent {
  int device = 0;
  bool timed = true; // created without cudaEventDisableTiming
  std::shared_ptr<SimStream> stream; // where it was last recorded; null if never
  uint64_t seq = 0; // completes when stream->completed reaches this
  // When its stream passed the last record (steady-clock ns), written by
  // the stream's worker before it counts the record completed; one per
  // record, so recording again never changes an earlier record's time.
  std::shared_ptr<std::atomic<int64_t>> passedAtNs;
  // Set by a record in a capture: the capture, and the nodes of each of
  // its streams the record follows (what a wait on it waits for).
  std::weak_ptr<SimCapture> capturedIn;
  std::map<const SimStream*, uint64_t> capturedCovers;
};

// A block of simulated device memory, owned by SimGpu::Impl until the SimGpu
// goes (a caching allocator keeps what it got from cudaMalloc).
struct SimBlock {
  unsigned char* base = nullptr;
  size_t size = 0; // rounded
  int device = 0;
  uint64_t stream = 0; // the serial of the stream it is for
  SimGpu::MemoryKind kind = SimGpu::MemoryKind::Cached;
  bool free = false;
};

struct SimGpu::Impl {
  struct ThreadState {
    int device = 0; // CUDA's current device
    // torch's target device, or -1: c10/cuda/CUDAFunctions.cpp keeps a
    // thread_local targetDeviceIndex that MaybeSetDevice() sets instead of
    // calling cudaSetDevice on a device without a primary context (CUDA 12
    // creates one there at once), and that GetDevice() answers first.
    int target = -1;
    cudaStreamCaptureMode captureMode = cudaStreamCaptureModeGlobal;
    std::map<int, cudaStream_t> currentStream;
  };

  explicit Impl(int count)
      : deviceCount(count), computeMajor(count, 9), defaults(count), allocated(count, 0) {}

  const int deviceCount;
  const uint64_t serial = nextInstanceSerial.fetch_add(1);
  std::atomic<int> threads{0};

  // Lock order: mu before any SimStream::mu; timelineMu is a leaf.
  mutable std::mutex mu;
  std::vector<int> computeMajor;
  std::vector<int64_t> allocated; // per device, bytes
  std::vector<std::shared_ptr<SimStream>> defaults; // per device, made on first use
  std::unordered_map<SimStream*, std::shared_ptr<SimStream>> streams; // live handles, defaults included
  std::vector<std::shared_ptr<SimStream>> all; // every stream whose worker may still need a join
  std::unordered_map<SimEvent*, std::shared_ptr<SimEvent>> events;
  std::set<int> contexts;
  std::vector<std::pair<std::thread::id, int>> contextCreations;

  mutable std::mutex timelineMu;
  std::vector<KernelInterval> timeline;

  CallGate gate; // calls that hang (SimGpu::Call)

  // Collective kernels running per device, and the bound (0: none). A leaf
  // lock: nothing else is taken under slotMu.
  std::mutex slotMu;
  std::condition_variable slotCv;
  int collectiveBound = 0;
  std::map<int, int> runningCollectives;
  std::map<int, std::deque<uint64_t>> slotQueue; // tickets in asking order, per device
  uint64_t nextTicket = 0;
  // Kernels launched in launch order, and how many of them started, per
  // device (launchCollective's inLaunchOrder).
  std::map<int, uint64_t> launchedInOrder;
  std::map<int, uint64_t> startedInOrder;

  // Places of kernels that were never queued (their stream was gone).
  std::map<int, std::set<uint64_t>> droppedInOrder;

  uint64_t nextInLaunchOrder(int device) {
    std::lock_guard<std::mutex> lock(slotMu);
    return launchedInOrder[device]++;
  }

  // Under slotMu: a dropped kernel counts as started, so none waits for it.
  void skipDroppedLocked(int device) {
    auto& dropped = droppedInOrder[device];
    while (dropped.erase(startedInOrder[device]) > 0) {
      ++startedInOrder[device];
    }
  }

  void dropInOrder(int device, uint64_t order) {
    std::lock_guard<std::mutex> lock(slotMu);
    droppedInOrder[device].insert(order);
    skipDroppedLocked(device);
    slotCv.notify_all();
  }

  // `order`: the kernel's place in its device's launch order, if it keeps
  // one; it asks for a slot only once the kernel before it started, as a
  // stream waiting on an event takes no place among the running kernels.
  void takeSlot(int device, std::optional<uint64_t> order) {
    std::unique_lock<std::mutex> lock(slotMu);
    if (order) {
      slotCv.wait(lock, [&] { return startedInOrder[device] == *order; });
    }
    const uint64_t ticket = nextTicket++;
    auto& queue = slotQueue[device];
    queue.push_back(ticket);
    slotCv.wait(lock, [&] {
      return queue.front() == ticket &&
          (collectiveBound == 0 || runningCollectives[device] < collectiveBound);
    });
    queue.pop_front();
    ++runningCollectives[device];
    if (order) {
      ++startedInOrder[device];
      skipDroppedLocked(device);
    }
    slotCv.notify_all();
  }

  void giveSlot(int device) {
    std::lock_guard<std::mutex> lock(slotMu);
    --runningCollectives[device];
    slotCv.notify_all();
  }

  // The origins of the captures running now (under mu).
  std::vector<std::shared_ptr<SimStream>> capturing;

  static void invalidateLocked(SimCapture& capture) {
    capture.invalidated = true;
    for (const auto& member : capture.members) {
      member->captureStatus = cudaStreamCaptureStatusInvalidated;
    }
  }

  // A captured event whose capture still runs.
  static std::shared_ptr<SimCapture> runningCaptureOf(const SimEvent& e) {
    auto capture = e.capturedIn.lock();
    return capture && !capture->ended ? capture : nullptr;
  }

  // Device memory (under mu): live blocks by base address; freed ones by
  // (stream, rounded size, kind), the last freed first.
  std::map<uintptr_t, SimBlock> blocks;
  std::map<std::tuple<uint64_t, size_t, int>, std::vector<unsigned char*>> freeBlocks;

  // Per thread and per instance, so it needs no lock; a thread_local map
  // keyed by the instance serial (not a map keyed by std::thread::id, whose
  // values the OS reuses for later threads that must start on device 0).
  ThreadState& self() const {
    thread_local std::unordered_map<uint64_t, ThreadState> states;
    return states[serial];
  }

  bool validDevice(int d) const {
    return d >= 0 && d < deviceCount;
  }

  void ensureContextLocked(int device) {
    if (contexts.insert(device).second) {
      contextCreations.emplace_back(std::this_thread::get_id(), device);
    }
  }

  std::shared_ptr<SimStream> defaultStreamLocked(int device) {
    auto& s = defaults[device];
    if (!s) {
      s = std::make_shared<SimStream>();
      s->device = device;
      s->isDefault = true;
      streams.emplace(s.get(), s);
      all.push_back(s);
    }
    return s;
  }

  // CUDA forbids "potentially unsafe API calls" during stream capture, by
  // the calling thread's mode (CUDA Runtime API,
  // cudaThreadExchangeStreamCaptureMode): in Global mode (every thread's
  // default) a thread may make none while it captures itself (unless its
  // capture began in Relaxed mode) or while any other thread captures in
  // Global mode; in ThreadLocal mode only its own captures count; in Relaxed
  // mode nothing does. The call fails with cudaErrorStreamCaptureUnsupported
  // ("operation not permitted when stream is capturing", what torch's NCCL
  // watchdog met querying events during another thread's capture) and
  // invalidates the captures it violated, whose cudaStreamEndCapture then
  // fails with cudaErrorStreamCaptureInvalidated.
  cudaError_t unsafeCallLocked() {
    const cudaStreamCaptureMode mode = self().captureMode;
    if (mode == cudaStreamCaptureModeRelaxed) {
      return cudaSuccess;
    }
    const auto me = std::this_thread::get_id();
    bool violated = false;
    for (const auto& s : capturing) {
      const bool own = s->captureThread == me;
      const bool forbids = own
          ? s->captureMode != cudaStreamCaptureModeRelaxed
          : mode == cudaStreamCaptureModeGlobal && s->captureMode == cudaStreamCaptureModeGlobal;
      if (forbids) {
        invalidateLocked(*s->capture);
        violated = true;
      }
    }
    return violated ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
  }

  // The null stream (handle 0) is the legacy default stream of the calling
  // thread's *current* device (CUDA Runtime API, "Stream synchronization
  // behavior": "The legacy default stream is an implicit stream which
  // synchronizes with all other blocking streams in the same CUcontext"; a
  // context is per device), so an event recorded or a wait queued on it
  // with the wrong device current lands on the wrong device.
  std::shared_ptr<SimStream> resolveLocked(cudaStream_t handle) {
    if (handle == nullptr) {
      return defaultStreamLocked(self().device);
    }
    auto it = streams.find(reinterpret_cast<SimStream*>(handle));
    return it == streams.end() ? nullptr : it->second;
  }

  // Joins and forgets the workers of destroyed streams that have drained.
  void pruneLocked() {
    std::vector<std::thread> finished;
    std::erase_if(all, [&](const std::shared_ptr<SimStream>& s) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->destroyed || s->running || !s->queue.empty()) {
        return false;
      }
      finished.push_back(std::move(s->worker));
      return true;
    });
    for (auto& t : finished) {
      if (t.joinable()) {
        t.join(); // it left its loop already: this returns at once
      }
    }
  }

  void workerLoop(SimStream* s) {
    std::unique_lock<std::mutex> lock(s->mu);
    while (true) {
      if (s->queue.empty()) {
        if (s->destroyed || s->shutdown) {
          break;
        }
        const bool woken = s->cv.wait_for(lock, kIdleLinger, [&] {
          return !s->queue.empty() || s->destroyed || s->shutdown;
        });
        if (!woken) {
          break;
        }
        continue;
      }
      StreamItem item = std::move(s->queue.front());
      s->queue.pop_front();
      lock.unlock();
      item.run();
      // Released before the completion counts, so that what the item held
      // (a collective's claim on its communicator) is gone when an event
      // behind it, or commAbort, sees the stream move on.
      item = StreamItem{};
      lock.lock();
      ++s->completed;
      s->cv.notify_all();
    }
    s->running = false;
    threads.fetch_sub(1);
    s->cv.notify_all();
  }

  // Queues `item` on `s` and returns its sequence number, or 0 when `s` was
  // destroyed (then `item` is left to the caller, to be dropped outside any
  // lock). Starts a worker if none runs.
  uint64_t enqueue(const std::shared_ptr<SimStream>& s, StreamItem& item) {
    std::thread previous;
    uint64_t seq = 0;
    {
      std::lock_guard<std::mutex> lock(s->mu);
      if (s->destroyed) {
        return 0;
      }
      s->queue.push_back(std::move(item));
      seq = ++s->enqueued;
      if (!s->running) {
        previous = std::move(s->worker);
        s->running = true;
        threads.fetch_add(1);
        s->worker = std::thread(&Impl::workerLoop, this, s.get());
      } else {
        s->cv.notify_all();
      }
    }
    if (previous.joinable()) {
      previous.join(); // it set running = false as its last act
    }
    return seq;
  }

  static bool reached(SimStream& s, uint64_t seq) {
    std::lock_guard<std::mutex> lock(s.mu);
    return s.completed >= seq;
  }

  // Runs `kernel` and adds its interval (start and end now) to the timeline.
  void runTimed(KernelInterval interval, const std::function<void()>& kernel) {
    interval.startUs = nowUs();
    kernel();
    interval.endUs = nowUs();
    std::lock_guard<std::mutex> lock(timelineMu);
    timeline.push_back(std::move(interval));
  }

  void launch(
      cudaStream_t handle,
      std::function<void()> kernel,
      std::string label,
      uint64_t comm,
      bool throwIfUnknown,
      bool inLaunchOrder = false,
      std::function<std::function<void()>()> rearm = {}) {
    std::shared_ptr<SimStream> s;
    bool captured = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      s = resolveLocked(handle);
      if (s && s->capture) {
        captured = true;
        // Recorded, not run; a launch into an invalidated capture is
        // refused (cudaErrorStreamCaptureInvalidated), so it is dropped.
        SimCapture& capture = *s->capture;
        if (!capture.invalidated) {
          if (!rearm) {
            rearm = [kernel] { return kernel; };
          }
          capture.nodes.push_back(SimGraph::Node{
              std::move(rearm), std::move(label), comm, s->device, reinterpret_cast<cudaStream_t>(s.get())});
          ++capture.recorded[s.get()];
        }
        s.reset();
      }
    }
    if (captured) {
      return; // the kernel is dropped here, outside every lock
    }
    if (!s) {
      if (throwIfUnknown) {
        throw std::invalid_argument("SimGpu::launch: unknown stream handle");
      }
      return; // `kernel` is dropped here, outside every lock
    }
    const auto resolved = reinterpret_cast<cudaStream_t>(s.get());
    std::optional<uint64_t> order;
    if (inLaunchOrder) {
      order = nextInLaunchOrder(s->device);
    }
    StreamItem item{[this, kernel = std::move(kernel), label = std::move(label),
                     device = s->device, resolved, comm, order] {
      if (comm != 0) {
        takeSlot(device, order);
      }
      runTimed(KernelInterval{label, device, resolved, comm}, kernel);
      if (comm != 0) {
        giveSlot(device);
      }
    }};
    if (enqueue(s, item) == 0) {
      if (order) {
        dropInOrder(s->device, *order);
      }
      if (throwIfUnknown) {
        throw std::invalid_argument("SimGpu::launch: stream was destroyed");
      }
    }
  }
};

SimGpu::SimGpu(int deviceCount) : impl_(std::make_unique<Impl>(std::max(deviceCount, 0))) {}

SimGpu::~SimGpu() {
  impl_->gate.releaseAll();
  impl_->gate.drain();
  std::vector<std::shared_ptr<SimStream>> all;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    all = impl_->all;
  }
  for (auto& s : all) {
    std::lock_guard<std::mutex> lock(s->mu);
    s->shutdown = true;
    s->cv.notify_all();
  }
  // Each worker drains its queue first. An item blocked forever would hang
  // here: SimNccl, destroyed before us, aborts its communicators, which ends
  // every collective kernel.
  for (auto& s : all) {
    std::thread worker;
    {
      std::unique_lock<std::mutex> lock(s->mu);
      s->cv.wait(lock, [&] { return !s->running; });
      worker = std::move(s->worker);
    }
    if (worker.joinable()) {
      worker.join();
    }
  }
  for (auto& [address, block] : impl_->blocks) {
    std::free(block.base);
  }
}

cudaError_t SimGpu::getDevice(int* device) {
  if (device == nullptr) {
    return cudaErrorInvalidValue;
  }
  const auto& self = impl_->self();
  *device = self.target >= 0 ? self.target : self.device; // c10::cuda::GetDevice
  return cudaSuccess;
}

cudaError_t SimGpu::setDevice(int device) {
  if (!impl_->validDevice(device)) {
    return cudaErrorInvalidDevice;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->self().target = -1; // c10::cuda::SetDevice clears it
  impl_->self().device = device;
  impl_->ensureContextLocked(device);
  return cudaSuccess;
}

cudaError_t SimGpu::restoreDevice(int device) {
  // c10::cuda::MaybeSetDevice: a real switch only where a context exists.
  if (hasPrimaryContext(device)) {
    return setDevice(device);
  }
  if (!impl_->validDevice(device)) {
    return cudaErrorInvalidDevice;
  }
  impl_->self().target = device;
  return cudaSuccess;
}

bool SimGpu::hasPrimaryContext(int device) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->contexts.count(device) != 0;
}

cudaError_t SimGpu::deviceGetStreamPriorityRange(int* least, int* greatest) {
  if (least != nullptr) {
    *least = kLeastPriority;
  }
  if (greatest != nullptr) {
    *greatest = kGreatestPriority;
  }
  return cudaSuccess;
}

cudaError_t SimGpu::deviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!impl_->validDevice(device)) {
    return cudaErrorInvalidDevice;
  }
  if (attr != cudaDevAttrComputeCapabilityMajor) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  *value = impl_->computeMajor[device];
  return cudaSuccess;
}

cudaError_t SimGpu::memGetInfo(size_t* free, size_t* total) {
  if (free == nullptr || total == nullptr) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  const int device = impl_->self().device;
  impl_->ensureContextLocked(device); // as CUDA's: it needs a context
  *total = kDeviceBytes;
  *free = kDeviceBytes - static_cast<size_t>(impl_->allocated[device]);
  return cudaSuccess;
}

void* SimGpu::allocateBlock(cudaStream_t stream, size_t bytes, MemoryKind kind) {
  const size_t size = std::max<size_t>(
      kBlockRounding, (bytes + kBlockRounding - 1) / kBlockRounding * kBlockRounding);
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  if (!s) {
    throw std::invalid_argument("SimGpu::allocateBlock: unknown stream handle");
  }
  // A block freed on this stream is safe for it at once: work queued on the
  // stream after the allocation runs after whatever used the block on it.
  // Any other stream still using it must have been declared with
  // recordStream, or the caller must hold the tensor
  // (c10/cuda/CUDACachingAllocator.cpp: free() puts a block back in its
  // stream's pool unless recordStream events are pending).
  auto& reusable = impl_->freeBlocks[{s->serial, size, static_cast<int>(kind)}];
  if (!reusable.empty()) {
    unsigned char* base = reusable.back();
    reusable.pop_back();
    impl_->blocks.at(reinterpret_cast<uintptr_t>(base)).free = false;
    return base;
  }
  auto* base = static_cast<unsigned char*>(std::aligned_alloc(kBlockRounding, size));
  if (base == nullptr) {
    throw std::bad_alloc();
  }
  std::memset(base, kFreedByte, size); // cudaMalloc gives no zeros either
  impl_->blocks.emplace(
      reinterpret_cast<uintptr_t>(base), SimBlock{base, size, s->device, s->serial, kind, false});
  impl_->allocated[s->device] += static_cast<int64_t>(size);
  return base;
}

void SimGpu::freeBlock(void* block) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->blocks.find(reinterpret_cast<uintptr_t>(block));
  if (it == impl_->blocks.end() || it->second.free) {
    throw std::invalid_argument("SimGpu::freeBlock: not a live block");
  }
  SimBlock& b = it->second;
  std::memset(b.base, kFreedByte, b.size);
  b.free = true;
  impl_->freeBlocks[{b.stream, b.size, static_cast<int>(b.kind)}].push_back(b.base);
}

bool SimGpu::inBlock(const void* address, size_t bytes, MemoryKind kind) const {
  const auto a = reinterpret_cast<uintptr_t>(address);
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->blocks.upper_bound(a);
  if (it == impl_->blocks.begin()) {
    return false;
  }
  const SimBlock& b = std::prev(it)->second;
  const auto base = reinterpret_cast<uintptr_t>(b.base);
  return !b.free && b.kind == kind && a >= base && a + bytes <= base + b.size;
}

int SimGpu::liveBlocks() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(std::count_if(
      impl_->blocks.begin(), impl_->blocks.end(),
      [](const auto& entry) { return !entry.second.free; }));
}

void SimGpu::blockCalls(Call call, std::chrono::milliseconds howLong) {
  impl_->gate.block(static_cast<int>(call), howLong);
}

void SimGpu::releaseBlockedCalls() {
  impl_->gate.releaseAll();
}

int SimGpu::blockedCalls() const {
  return impl_->gate.blocked();
}

void SimGpu::allocate(int device, int64_t bytes) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->allocated.at(device) += bytes;
}

void SimGpu::deallocate(int device, int64_t bytes) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->allocated.at(device) -= bytes;
}

cudaError_t SimGpu::streamCreateWithPriority(
    cudaStream_t* stream, unsigned int /*flags*/, int priority) {
  if (stream == nullptr) {
    return cudaErrorInvalidValue;
  }
  auto s = std::make_shared<SimStream>();
  // Lower numbers are greater priorities, so the range is [greatest, least].
  s->priority = std::clamp(priority, kGreatestPriority, kLeastPriority);
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->pruneLocked();
  s->device = impl_->self().device;
  impl_->ensureContextLocked(s->device);
  impl_->streams.emplace(s.get(), s);
  impl_->all.push_back(s);
  *stream = reinterpret_cast<cudaStream_t>(s.get());
  return cudaSuccess;
}

cudaError_t SimGpu::streamDestroy(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->streams.find(reinterpret_cast<SimStream*>(stream));
  if (stream == nullptr || it == impl_->streams.end() || it->second->isDefault) {
    return cudaErrorInvalidResourceHandle;
  }
  const std::shared_ptr<SimStream> s = it->second;
  impl_->streams.erase(it);
  // Queued work still runs; the worker ends when drained and is joined by
  // pruneLocked() or ~SimGpu.
  std::lock_guard<std::mutex> streamLock(s->mu);
  s->destroyed = true;
  s->cv.notify_all();
  return cudaSuccess;
}

cudaError_t SimGpu::streamGetPriority(cudaStream_t stream, int* priority) {
  if (priority == nullptr) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  if (!s) {
    return cudaErrorInvalidResourceHandle;
  }
  *priority = s->priority;
  return cudaSuccess;
}

cudaError_t SimGpu::streamIsCapturing(
    cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (status == nullptr) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  if (!s) {
    return cudaErrorInvalidResourceHandle;
  }
  *status = s->captureStatus;
  return cudaSuccess;
}

cudaError_t SimGpu::streamWaitEvent(
    cudaStream_t stream, cudaEvent_t event, unsigned int /*flags*/) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  auto e = impl_->events.find(reinterpret_cast<SimEvent*>(event));
  if (!s || e == impl_->events.end()) {
    return cudaErrorInvalidResourceHandle;
  }
  SimEvent& ev = *e->second;
  if (auto capture = Impl::runningCaptureOf(ev)) {
    if (!s->capture) { // a fork: the stream joins the event's capture
      s->capture = capture;
      s->captureStatus =
          capture->invalidated ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
      s->captureMode = capture->mode;
      s->captureThread = capture->thread;
      s->waitedFor.clear();
      capture->members.push_back(s);
    } else if (s->capture != capture) {
      Impl::invalidateLocked(*s->capture);
      Impl::invalidateLocked(*capture);
      return cudaErrorStreamCaptureIsolation;
    }
    for (const auto& [from, nodes] : ev.capturedCovers) {
      uint64_t& waited = s->waitedFor[from];
      waited = std::max(waited, nodes);
    }
    return cudaSuccess;
  }
  if (s->capture) {
    Impl::invalidateLocked(*s->capture);
    return cudaErrorStreamCaptureIsolation; // an event recorded outside the capture
  }
  // The event's record as of now: re-recording it later does not move what
  // this wait waits for, as in CUDA.
  std::shared_ptr<SimStream> target = ev.stream;
  const uint64_t seq = ev.seq;
  if (!target) {
    return cudaSuccess; // never recorded: nothing to wait for
  }
  StreamItem item{[target, seq] {
    std::unique_lock<std::mutex> targetLock(target->mu);
    target->cv.wait(targetLock, [&] { return target->completed >= seq; });
  }};
  if (impl_->enqueue(s, item) == 0) {
    return cudaErrorInvalidResourceHandle;
  }
  return cudaSuccess;
}

cudaError_t SimGpu::threadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  if (mode == nullptr) {
    return cudaErrorInvalidValue;
  }
  std::swap(*mode, impl_->self().captureMode);
  return cudaSuccess;
}

cudaError_t SimGpu::eventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  if (event == nullptr) {
    return cudaErrorInvalidValue;
  }
  auto e = std::make_shared<SimEvent>();
  e->timed = (flags & cudaEventDisableTiming) == 0;
  std::lock_guard<std::mutex> lock(impl_->mu);
  e->device = impl_->self().device;
  impl_->ensureContextLocked(e->device);
  impl_->events.emplace(e.get(), e);
  *event = reinterpret_cast<cudaEvent_t>(e.get());
  return cudaSuccess;
}

cudaError_t SimGpu::eventDestroy(cudaEvent_t event) {
  impl_->gate.pass(static_cast<int>(Call::EventDestroy));
  std::shared_ptr<SimEvent> doomed; // freed after the lock: it may hold the last stream reference
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->events.find(reinterpret_cast<SimEvent*>(event));
  if (it == impl_->events.end()) {
    return cudaErrorInvalidResourceHandle;
  }
  doomed = std::move(it->second);
  impl_->events.erase(it);
  return cudaSuccess;
}

cudaError_t SimGpu::eventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->events.find(reinterpret_cast<SimEvent*>(event));
  auto s = impl_->resolveLocked(stream);
  if (it == impl_->events.end() || !s) {
    return cudaErrorInvalidResourceHandle;
  }
  SimEvent& e = *it->second;
  if (s->device != e.device) {
    return cudaErrorInvalidResourceHandle; // as CUDA: the event belongs to another device
  }
  if (s->capture) {
    if (s->capture->invalidated) {
      return cudaErrorStreamCaptureInvalidated;
    }
    e.capturedIn = s->capture;
    e.capturedCovers = s->waitedFor;
    e.capturedCovers[s.get()] = s->capture->recorded[s.get()];
    return cudaSuccess;
  }
  e.capturedIn.reset();
  // A marker that notes when the worker passed it: the event completes then.
  auto passedAt = std::make_shared<std::atomic<int64_t>>(-1);
  StreamItem marker{[passedAt] {
    passedAt->store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now().time_since_epoch())
                        .count());
  }};
  const uint64_t seq = impl_->enqueue(s, marker);
  if (seq == 0) {
    return cudaErrorInvalidResourceHandle;
  }
  e.stream = s;
  e.seq = seq;
  e.passedAtNs = std::move(passedAt);
  return cudaSuccess;
}

cudaError_t SimGpu::eventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (ms == nullptr) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto first = impl_->events.find(reinterpret_cast<SimEvent*>(start));
  auto last = impl_->events.find(reinterpret_cast<SimEvent*>(end));
  if (first == impl_->events.end() || last == impl_->events.end()) {
    return cudaErrorInvalidResourceHandle;
  }
  const SimEvent& a = *first->second;
  const SimEvent& b = *last->second;
  // CUDA runtime API, cudaEventElapsedTime: "If cudaEventRecord() has not
  // been called on either event, then cudaErrorInvalidResourceHandle is
  // returned. If cudaEventRecord() has been called on both events but one
  // or both of them has not yet been completed ..., cudaErrorNotReady is
  // returned. If either event was created with the cudaEventDisableTiming
  // flag, then this function will return cudaErrorInvalidResourceHandle."
  if (!a.timed || !b.timed || !a.stream || !b.stream) {
    return cudaErrorInvalidResourceHandle;
  }
  if (!Impl::reached(*a.stream, a.seq) || !Impl::reached(*b.stream, b.seq)) {
    return cudaErrorNotReady;
  }
  *ms = static_cast<float>(b.passedAtNs->load() - a.passedAtNs->load()) / 1e6f;
  return cudaSuccess;
}

cudaError_t SimGpu::eventQuery(cudaEvent_t event) {
  impl_->gate.pass(static_cast<int>(Call::EventQuery));
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->events.find(reinterpret_cast<SimEvent*>(event));
  if (it == impl_->events.end()) {
    return cudaErrorInvalidResourceHandle;
  }
  if (const cudaError_t unsafe = impl_->unsafeCallLocked(); unsafe != cudaSuccess) {
    return unsafe;
  }
  const SimEvent& e = *it->second;
  if (auto capture = Impl::runningCaptureOf(e)) {
    Impl::invalidateLocked(*capture);
    return cudaErrorStreamCaptureUnsupported;
  }
  if (!e.stream) {
    return cudaSuccess;
  }
  return Impl::reached(*e.stream, e.seq) ? cudaSuccess : cudaErrorNotReady;
}

const char* SimGpu::getErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorUnknown: return "cudaErrorUnknown";
    default: return "cudaErrorUnknown";
  }
}

const char* SimGpu::getErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorIllegalState: return "the operation is not permitted in the current state";
    default: return "unknown error";
  }
}

cudaStream_t SimGpu::currentStream(int device) {
  // torch's default stream is the null stream: CUDAStream::stream() returns
  // nullptr for stream id 0 (c10/cuda/CUDAStream.cpp), which CUDA resolves
  // against the current device at each call.
  auto& current = impl_->self().currentStream;
  auto it = current.find(device);
  return it != current.end() ? it->second : nullptr;
}

cudaStream_t SimGpu::legacyStreamOf(int device) {
  if (!impl_->validDevice(device)) {
    throw std::out_of_range("SimGpu::legacyStreamOf: no such device");
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  return reinterpret_cast<cudaStream_t>(impl_->defaultStreamLocked(device).get());
}

int SimGpu::deviceCount() const {
  return impl_->deviceCount;
}

void SimGpu::setComputeCapabilityMajor(int device, int major) {
  if (!impl_->validDevice(device)) {
    throw std::out_of_range("SimGpu::setComputeCapabilityMajor: no such device");
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->computeMajor[device] = major;
}

cudaStream_t SimGpu::createStream(int device, int priority) {
  if (!impl_->validDevice(device)) {
    throw std::out_of_range("SimGpu::createStream: no such device");
  }
  const int previous = impl_->self().device;
  cudaStream_t stream = nullptr;
  (void)setDevice(device);
  const cudaError_t result = streamCreateWithPriority(&stream, 0, priority);
  impl_->self().device = previous; // restored without making a context on it
  if (result != cudaSuccess) {
    throw std::runtime_error("SimGpu::createStream failed");
  }
  return stream;
}

void SimGpu::setCurrentStream(int device, cudaStream_t stream) {
  auto& current = impl_->self().currentStream;
  if (stream == nullptr) {
    current.erase(device);
  } else {
    current[device] = stream;
  }
}

void SimGpu::launch(cudaStream_t stream, std::function<void()> kernel, std::string label) {
  impl_->launch(stream, std::move(kernel), std::move(label), 0, /*throwIfUnknown=*/true);
}

bool SimGpu::synchronize(cudaStream_t stream, std::chrono::milliseconds timeout) {
  std::shared_ptr<SimStream> s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    s = impl_->resolveLocked(stream);
  }
  if (!s) {
    return false;
  }
  std::unique_lock<std::mutex> lock(s->mu);
  const uint64_t target = s->enqueued;
  return s->cv.wait_for(lock, timeout, [&] { return s->completed >= target; });
}

cudaError_t SimGpu::beginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  // The legacy stream cannot be captured (cudaStreamBeginCapture:
  // "Capture may not be initiated if stream is cudaStreamLegacy").
  if (!s || s->isDefault) {
    return cudaErrorInvalidResourceHandle;
  }
  if (s->captureStatus != cudaStreamCaptureStatusNone) {
    return cudaErrorIllegalState;
  }
  s->captureStatus = cudaStreamCaptureStatusActive;
  s->captureMode = mode;
  s->captureThread = std::this_thread::get_id();
  auto capture = std::make_shared<SimCapture>();
  capture->origin = s;
  capture->mode = mode;
  capture->thread = s->captureThread;
  capture->members.push_back(s);
  s->capture = std::move(capture);
  s->waitedFor.clear();
  impl_->capturing.push_back(s);
  return cudaSuccess;
}

cudaError_t SimGpu::endCapture(cudaStream_t stream, std::shared_ptr<const SimGraph>* graph) {
  std::shared_ptr<SimCapture> capture; // freed after the lock: it may hold the last kernel references
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  if (!s || !s->capture) {
    return cudaErrorIllegalState;
  }
  if (s->capture->origin != s) {
    return cudaErrorStreamCaptureUnmatched; // "not initiated in this stream"
  }
  capture = s->capture;
  cudaError_t result = capture->invalidated ? cudaErrorStreamCaptureInvalidated : cudaSuccess;
  // CUDA Programming Guide, "Cross-stream Dependencies and Events": every
  // stream forked into a capture must be joined back into the origin
  // before the capture ends (cudaErrorStreamCaptureUnjoined otherwise).
  for (const auto& member : capture->members) {
    const auto recorded = capture->recorded.find(member.get());
    if (member != s && result == cudaSuccess && recorded != capture->recorded.end() &&
        recorded->second > s->waitedFor[member.get()]) {
      result = cudaErrorStreamCaptureUnjoined;
    }
  }
  for (const auto& member : capture->members) {
    member->capture.reset();
    member->captureStatus = cudaStreamCaptureStatusNone;
    member->waitedFor.clear();
  }
  capture->ended = true;
  std::erase(impl_->capturing, s);
  if (result == cudaSuccess && graph != nullptr) {
    auto made = std::make_shared<SimGraph>();
    made->nodes = std::move(capture->nodes);
    *graph = std::move(made);
  }
  return result;
}

cudaError_t SimGpu::graphLaunch(const std::shared_ptr<const SimGraph>& graph, cudaStream_t stream) {
  if (!graph) {
    return cudaErrorInvalidValue;
  }
  std::shared_ptr<SimStream> s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    s = impl_->resolveLocked(stream);
    if (!s) {
      return cudaErrorInvalidResourceHandle;
    }
    if (s->capture) {
      return cudaErrorStreamCaptureUnsupported;
    }
  }
  // Armed now, on the host, in the caller's order: a communicator's kernels
  // of this launch take their places among its kernels here.
  std::vector<std::function<void()>> work;
  for (const auto& node : graph->nodes) {
    work.push_back(node.arm());
  }
  StreamItem item{[this, graph, work = std::move(work)] {
    for (size_t i = 0; i < work.size(); ++i) {
      const SimGraph::Node& node = graph->nodes[i];
      impl_->runTimed(KernelInterval{node.label, node.device, node.stream, node.comm}, work[i]);
    }
  }};
  return impl_->enqueue(s, item) == 0 ? cudaErrorInvalidResourceHandle : cudaSuccess;
}

int SimGpu::deviceOf(cudaStream_t stream) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  return s ? s->device : -1;
}

int SimGpu::priorityOf(cudaStream_t stream) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto s = impl_->resolveLocked(stream);
  return s ? s->priority : 0;
}

int SimGpu::liveStreams() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(std::count_if(
      impl_->streams.begin(), impl_->streams.end(),
      [](const auto& entry) { return !entry.second->isDefault; }));
}

int SimGpu::liveEvents() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->events.size());
}

int SimGpu::streamThreads() const {
  return impl_->threads.load();
}

std::set<int> SimGpu::devicesWithContext() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->contexts;
}

std::vector<std::pair<std::thread::id, int>> SimGpu::contextCreations() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->contextCreations;
}

std::vector<KernelInterval> SimGpu::timeline() const {
  std::lock_guard<std::mutex> lock(impl_->timelineMu);
  return impl_->timeline;
}

void SimGpu::clearTimeline() {
  std::lock_guard<std::mutex> lock(impl_->timelineMu);
  impl_->timeline.clear();
}

int SimGpu::currentDevice() const {
  return impl_->self().device;
}

void SimGpu::launchCollective(
    cudaStream_t stream,
    std::function<void()> kernel,
    std::string label,
    uint64_t comm,
    bool inLaunchOrder,
    std::function<std::function<void()>()> rearm) {
  impl_->launch(
      stream, std::move(kernel), std::move(label), comm, /*throwIfUnknown=*/false, inLaunchOrder,
      std::move(rearm));
}

void SimGpu::setConcurrentCollectives(int bound) {
  std::lock_guard<std::mutex> lock(impl_->slotMu);
  impl_->collectiveBound = std::max(bound, 0);
  impl_->slotCv.notify_all();
}

SimStream* SimGpu::resolve(cudaStream_t stream) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->resolveLocked(stream).get();
}

} // namespace pycomm::sim
