#pragma once
// A simulated multi-GPU machine behind the CudaApi interface, for running the
// NCCL lane without a GPU. Test code only: no CUDA runtime is touched.
//
// Each device has streams whose queued work runs asynchronously, in FIFO
// order, on a host thread of the stream's own ("kernels" are host functions;
// host memory stands for device memory). Events complete when their stream
// reaches them; a stream can wait on another's event; priorities are
// recorded (the range is H100/H200's: 0 least, -5 greatest). Contexts are
// accounted as CUDA makes them: setDevice() creates the device's primary
// context if it has none, and so does creating a stream or an event on a
// thread's current device. Torch's view of the current device is modelled
// beside CUDA's: getDevice() answers torch's target device when a guard left
// one (restoreDevice() to a device without a context), as c10 does.
//
// Where CUDA is strict, so is this (each model cites its source beside the
// code): the null stream is the legacy stream of the calling thread's
// *current* device; stream capture forbids unsafe calls by mode; device
// memory comes from a caching allocator that hands a freed block to the next
// allocation on its stream at once, with its bytes poisoned; calls that hang
// on sick GPUs can be made to hang; the collective kernels running at once
// on a device can be bounded.
//
// Thread-safety: every method may be called from any thread.
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "call_gate.h"
#include "cuda_api.h"

namespace pycomm::sim {

struct SimStream;
struct SimEvent;

// What a stream capture made (cudaGraph_t, instantiated): the work queued on
// the capture's streams, in the order it was queued, which respects every
// dependency the capture recorded (a wait only ever follows its record).
struct SimGraph {
  struct Node {
    // Makes the work of one launch of the graph, at cudaGraphLaunch: a
    // communicator's kernel takes its place among its communicator's
    // kernels then, as each replay is a new collective.
    std::function<std::function<void()>()> arm;
    std::string label;
    uint64_t comm = 0;
    int device = 0;
    cudaStream_t stream = nullptr; // where it was captured
  };
  std::vector<Node> nodes;
};

// One kernel (a collective or a launched host function) as it ran.
struct KernelInterval {
  std::string label; // e.g. "allgather" or what launch() was given
  int device = 0;
  cudaStream_t stream = nullptr;
  uint64_t comm = 0; // the communicator's id for collectives, 0 otherwise
  int64_t startUs = 0; // steady clock
  int64_t endUs = 0;
};

class SimGpu : public CudaApi, public std::enable_shared_from_this<SimGpu> {
 public:
  static constexpr int kLeastPriority = 0;
  static constexpr int kGreatestPriority = -5;

  explicit SimGpu(int deviceCount = 8);
  // Waits for every stream's queued work, then stops their threads.
  ~SimGpu() override;
  SimGpu(const SimGpu&) = delete;
  SimGpu& operator=(const SimGpu&) = delete;

  // CudaApi
  cudaError_t getDevice(int* device) override;
  cudaError_t setDevice(int device) override;
  cudaError_t restoreDevice(int device) override;
  bool hasPrimaryContext(int device) override;
  cudaError_t deviceGetStreamPriorityRange(int* least, int* greatest) override;
  cudaError_t deviceGetAttribute(int* value, cudaDeviceAttr attr, int device) override;
  // Free memory: kDeviceBytes less what allocate() took on the device.
  cudaError_t memGetInfo(size_t* free, size_t* total) override;
  cudaError_t streamCreateWithPriority(
      cudaStream_t* stream, unsigned int flags, int priority) override;
  cudaError_t streamDestroy(cudaStream_t stream) override;
  cudaError_t streamGetPriority(cudaStream_t stream, int* priority) override;
  cudaError_t streamIsCapturing(
      cudaStream_t stream, cudaStreamCaptureStatus* status) override;
  cudaError_t streamWaitEvent(
      cudaStream_t stream, cudaEvent_t event, unsigned int flags) override;
  cudaError_t threadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) override;
  cudaError_t eventCreateWithFlags(cudaEvent_t* event, unsigned int flags) override;
  cudaError_t eventDestroy(cudaEvent_t event) override;
  cudaError_t eventRecord(cudaEvent_t event, cudaStream_t stream) override;
  cudaError_t eventQuery(cudaEvent_t event) override;
  cudaError_t eventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) override;
  const char* getErrorName(cudaError_t error) override;
  const char* getErrorString(cudaError_t error) override;
  // torch's current stream: the one set with setCurrentStream(), else the
  // default stream, whose handle is the null stream (nullptr), as
  // at::cuda::getCurrentCUDAStream(device).stream() is.
  cudaStream_t currentStream(int device) override;

  // --- test controls ---
  int deviceCount() const;
  // The compute capability's major number deviceGetAttribute reports
  // (default 9, a Hopper GPU).
  void setComputeCapabilityMajor(int device, int major);
  // A stream on `device` (made current for the call; the thread's current
  // device is restored), as a test's "compute stream".
  cudaStream_t createStream(int device, int priority = 0);
  // torch's current stream of the calling thread on `device`; nullptr goes
  // back to the default (null) stream.
  void setCurrentStream(int device, cudaStream_t stream);
  // The legacy default stream of `device` as a handle of its own, for tests
  // that must name it whatever device is current (CUDA code cannot: it says
  // nullptr, which means the current device's).
  cudaStream_t legacyStreamOf(int device);
  // Queues `kernel` on `stream`: it runs on the stream's thread after all
  // work queued before it, and the stream moves on when it returns. The
  // interval is added to the timeline under `label`.
  void launch(cudaStream_t stream, std::function<void()> kernel, std::string label = "kernel");
  // At most `bound` collective kernels run at once on each device (0, the
  // default: no bound). A GPU runs a bounded number of kernels at once, and
  // an NCCL kernel holds its SMs while it waits for its peers, so one whose
  // peer's kernel cannot start because another waiting kernel fills that
  // device deadlocks (NCCL user guide, "Using multiple NCCL communicators
  // concurrently"; NVIDIA/nccl#195). A kernel waits for a slot when it
  // reaches the head of its stream; slots go in the order kernels ask.
  void setConcurrentCollectives(int bound);
  // Waits until everything queued on `stream` so far has run; false on timeout.
  bool synchronize(cudaStream_t stream, std::chrono::milliseconds timeout);
  // cudaStreamBeginCapture(stream, mode) on the calling thread: the stream
  // captures (streamIsCapturing reports Active) until endCapture().
  cudaError_t beginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
  // cudaStreamEndCapture on the capture's origin stream:
  // cudaErrorStreamCaptureInvalidated when an unsafe call invalidated the
  // capture meanwhile, cudaErrorStreamCaptureUnjoined when a stream that
  // joined it has work the origin never waited for, cudaErrorStreamCaptureUnmatched
  // on a stream that joined but did not begin it; else cudaSuccess and, if
  // `graph` is given, the graph. Every stream of the capture leaves it.
  //
  // While a stream captures (CUDA Programming Guide, "Stream Capture"):
  // work queued on it (launch, launchCollective) is recorded, not run; an
  // event recorded on it is a captured event, and a stream that waits on a
  // captured event joins the capture (a fork); a capturing stream may not
  // wait on an event recorded outside its capture, nor on one of another
  // capture ("It is invalid to wait on a non-captured event from a stream
  // which is being captured without specifying the cudaEventWaitExternal
  // flag"; "... to merge two separate capture graphs"):
  // cudaErrorStreamCaptureIsolation, and the capture is invalidated; a
  // captured event may not be queried while its capture runs ("It is
  // invalid to synchronize or query the execution status of ... a captured
  // event"): cudaErrorStreamCaptureUnsupported, and the capture is
  // invalidated. A captured record leaves the event's own state as it was.
  cudaError_t endCapture(cudaStream_t stream, std::shared_ptr<const SimGraph>* graph = nullptr);
  // cudaGraphLaunch: the graph's work runs on `stream`, after what was
  // queued there before, node after node in capture order (a launch is one
  // item of the stream: what follows waits for all of it).
  // cudaErrorStreamCaptureUnsupported on a capturing stream (not modelled).
  cudaError_t graphLaunch(const std::shared_ptr<const SimGraph>& graph, cudaStream_t stream);
  // The device a stream belongs to; -1 for an unknown handle.
  int deviceOf(cudaStream_t stream) const;
  // The priority recorded at creation (after clamping to the range).
  int priorityOf(cudaStream_t stream) const;

  // --- accounting ---
  int liveStreams() const; // created by the API and not destroyed (default streams excluded)
  int liveEvents() const;
  int streamThreads() const; // host threads running stream work now
  std::set<int> devicesWithContext() const;
  // (thread, device) for each primary context created, in order.
  std::vector<std::pair<std::thread::id, int>> contextCreations() const;
  std::vector<KernelInterval> timeline() const;
  void clearTimeline();

  // --- calls that hang on sick GPUs ---
  enum class Call { EventQuery, EventDestroy };
  // Each later `call` blocks this long (CallGate::kForever: until
  // releaseBlockedCalls()) before it does anything.
  void blockCalls(Call call, std::chrono::milliseconds howLong);
  void releaseBlockedCalls();
  int blockedCalls() const;

  // --- device memory, as torch's caching allocator hands it out ---
  // Cached: cudaMalloc'd blocks; Vmm: CUDA's virtual memory API (cuMem*),
  // what ncclMemAlloc and symmetric registration need.
  enum class MemoryKind { Cached, Vmm };
  // The byte a freed block is filled with.
  static constexpr unsigned char kFreedByte = 0xDB;
  // A block of at least `bytes` on `stream`'s device, for use on `stream`.
  // A block freed on the same stream (same rounded size and kind) is handed
  // out again at once, as the caching allocator does.
  void* allocateBlock(cudaStream_t stream, size_t bytes, MemoryKind kind = MemoryKind::Cached);
  // Poisons the block and makes it the next one allocateBlock() gives on
  // the stream it was allocated for.
  void freeBlock(void* block);
  // Whether [address, address + bytes) lies in one live block of `kind`.
  bool inBlock(const void* address, size_t bytes, MemoryKind kind) const;
  int liveBlocks() const;

  // --- memory (no bytes behind it: what memGetInfo reports) ---
  static constexpr size_t kDeviceBytes = size_t{80} << 30;
  // Takes or gives back `bytes` of `device`'s memory, as an allocation by
  // NCCL or another library would.
  void allocate(int device, int64_t bytes);
  void deallocate(int device, int64_t bytes);

  // --- for SimNccl ---
  // The calling thread's current device as CUDA sees it (no context is
  // created), whatever torch's target is.
  int currentDevice() const;
  // Queues a kernel of a communicator (see launch()); `comm` is its id.
  // `inLaunchOrder`: the kernel starts only after the kernel launched in
  // launch order before it on the same device has started, whatever their
  // streams, as NCCL_LAUNCH_ORDER_IMPLICIT makes NCCL's launches (the
  // launch stream waits on the device's launch-order stream, which the
  // previous launch's launch-completion event advances: NCCL 2.30.7
  // src/enqueue.cc, getImplicitOrder / ncclLaunchPrepare). Kernels still
  // overlap; only their start order is fixed.
  // `rearm`: on a capturing stream, what a graph launch runs instead of
  // `kernel` (see SimGraph::Node::arm); without it the graph runs a copy
  // of `kernel`.
  void launchCollective(
      cudaStream_t stream,
      std::function<void()> kernel,
      std::string label,
      uint64_t comm,
      bool inLaunchOrder = false,
      std::function<std::function<void()>()> rearm = {});
  // Whether `stream` is a live handle; resolves nullptr to the current
  // device's default stream.
  SimStream* resolve(cudaStream_t stream) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace pycomm::sim
