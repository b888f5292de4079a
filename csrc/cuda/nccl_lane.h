#pragma once
// The CUDA lane of a pooled group: its own NCCL communicator and its own CUDA
// stream (of a chosen priority) on one device. Ops run FIFO on the stream;
// lanes of other roles have other streams and communicators, so an
// all-gather and a reduce-scatter run concurrently on the device.
//
// Ordering: issue() records an event on the caller's current stream and makes
// the lane's stream wait on it, so the op sees everything queued before it.
// NCCL's own thread launches the op; by default (launchInProgramOrder)
// issue() returns once NCCL has put its kernels on the stream, so the
// device's NCCL launches, the other lanes' and torch's, keep the program's
// order (nccl_comm.h). Without it, the end event is recorded behind the
// kernels by whoever first sees NCCL take them (the next issue, the
// watchdog, or wait()). Work.wait() makes the caller's stream wait on the
// op's end event.
//
// Memory: the lane holds references to every tensor of an op until its
// watchdog has seen the op's end event pass. That is the equivalent of
// recordStream without its cost in the caching allocator: a tensor the
// caller drops cannot be freed, so its memory cannot be handed to another
// stream while NCCL still reads or writes it.
//
// Errors: a watchdog thread (started with the first op) polls the end events
// and ncclCommGetAsyncError. An NCCL error, a failed issue, a communicator
// aborted under the lane (a failed split of it) or an op past its timeout
// aborts the communicator and fails every unfinished op with a named error;
// later ops raise that error at once. Then, by default, the process is torn
// down (NcclLaneSpec::tearDownOnError).
//
// Stalls: a CUDA or NCCL call can hang on a sick GPU. Every call of the
// watchdog that may block is watched (watchdog_monitor.h): one that lasts
// longer than NcclLaneSpec::stallTimeout fails every unfinished op with a
// CollectiveTimeoutError saying what the watchdog was doing, and tears the
// process down as an NCCL error would. abort() and close() wait for NCCL's
// abort or destroy at most that long.
//
// Lifetime: a lane is always owned by a shared_ptr. The watchdog holds one
// while it runs, so a completion callback that drops the last outside
// reference cannot destroy the lane under the watchdog's feet.
//
// CUDA graphs: an op issued while the caller's stream captures is recorded
// into the capture (the lane's stream joins it through the ready event; the
// caller's wait() joins it back) and runs at each replay; the watchdog never
// sees it, and the lane keeps its tensors. A lane's first op cannot be
// captured (NCCL connects the peers there): UnsupportedOpError.
//
// Thread-safety: every public method may be called from any thread. Lock
// order: issueMutex_, then mutex_; the communicator's own lock is never taken
// while mutex_ is held.
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "cuda_resources.h"
#include "comm_memory.h"
#include "device_lane.h"
#include "nccl_calls.h"
#include "nccl_comm.h"
#include "nccl_work.h"
#include "watchdog_monitor.h"

namespace pycomm {

struct NcclLaneSpec {
  NcclCommSpec comm;
  std::string role; // "ag" or "rs": picks the default stream priority
  std::optional<int> streamPriority; // unset: highest for "ag", lowest for "rs"
  // After an NCCL error or a timeout, tear the process down, as torch's NCCL
  // backend does by default (TORCH_NCCL_ASYNC_ERROR_HANDLING): a caller's
  // stream that already waits on a failed op would go on with its
  // half-written output. Off: the error is only reported, at wait(), the
  // future and later ops. abort() never tears down.
  bool tearDownOnError = true;
  // How to tear down, given the error's text; unset: print it to stderr and
  // std::abort().
  std::function<void(const std::string&)> tearDown;
  // How long one CUDA or NCCL call of the watchdog, or an abort or destroy
  // of the communicator, may block before the lane is given up: torch's
  // TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, 480 s by default.
  std::chrono::milliseconds stallTimeout{std::chrono::seconds(480)};
  // False when a rank of the group has a GPU older than Hopper: NCCL checks
  // FP8 reductions against the lowest compute capability of the
  // communicator's ranks (comm->minCompCap), not this rank's.
  bool groupReducesFp8 = true;
  // This process's rank in the world: the flight-recorder dump's file name.
  int globalRank = 0;
  // NCCL's memory for tensors of this device; null when the NCCL in use
  // has no ncclMemAlloc (before 2.19).
  std::shared_ptr<CommMemory> memory;
};

class NcclLane : public DeviceLane,
                 public std::enable_shared_from_this<NcclLane> {
 public:
  // Creates the communicator (split from `parent`'s when it is not null,
  // otherwise from `uniqueId`) and the stream. Collective over the group.
  static std::shared_ptr<NcclLane> create(
      const NcclLaneSpec& spec,
      const std::string& uniqueId,
      const std::shared_ptr<NcclLane>& parent);
  ~NcclLane() override;

  // The stream priority `spec` gives (unset: the device's highest for "ag",
  // its lowest for "rs"); ConfigError when it is outside the device's range. Checked before the collective creation, so one rank's
  // bad config cannot leave the others waiting in NCCL.
  static int resolvePriority(const NcclLaneSpec& spec);

  c10::Device device() const override;
  c10::intrusive_ptr<c10d::Work> issue(
      const Collective& op,
      c10d::OpType type,
      uint64_t seq,
      std::string description) override;
  void bindStats(std::shared_ptr<LaneStats> stats) override;
  size_t pending() const override;
  void close() override;
  void release() override;
  void abort() override;
  void registerMemory(void* buffer, size_t bytes, bool symmetric) override;
  void deregisterMemory(void* buffer) override;
  bool isRegistered(void* buffer) const override {
    return comm_->isRegistered(buffer);
  }
  // Ops issued from now on, and every wait for NCCL to take a call.
  void setTimeout(std::chrono::milliseconds timeout) override {
    comm_->setTimeout(timeout);
  }
  std::shared_ptr<c10::Allocator> memAllocator() override;
  at::Tensor allocateTensor(int64_t numel, const at::TensorOptions& options) override;
  size_t registeredMemory() const {
    return comm_->registeredBuffers();
  }

  // How errors name the lane's group and role.
  const std::string& label() const {
    return spec_.comm.label;
  }
  // The priority the stream has (CUDA may clamp what was asked).
  int streamPriority() const;
  bool createdBySplit() const {
    return createdBySplit_;
  }
  // Whether a new lane of the same members can be split from this one's
  // communicator now (open, not aborted).
  bool splittable() const;

  // The device memory the communicator took, as the device's free memory
  // fell: across its creation, and from the first op's issue to its end
  // (NCCL allocates its buffers when it first connects the peers; unset
  // until the first op ended). Anything else allocated on the device in
  // those intervals counts too.
  struct MemoryUse {
    int64_t creationBytes = 0;
    std::optional<int64_t> firstUseBytes;
  };
  MemoryUse memoryUse() const;

 private:
  NcclLane(
      const NcclLaneSpec& spec,
      const std::string& uniqueId,
      const std::shared_ptr<NcclLane>& parent);

  struct InFlight {
    c10::intrusive_ptr<NcclWork> work;
    std::vector<at::Tensor> tensors; // held until the end event passed
    CollectiveKind kind;
    int64_t bytes;
    int64_t issuedUs; // steady clock: deadlines must not move with the wall clock
    std::chrono::milliseconds timeout; // the lane's when it was issued
  };
  enum class State { Open, Closing, Closed, Failed };
  // NCCL's type and reduce op for each tensor pair of an op.
  struct NcclTypes {
    std::vector<ncclDataType_t> types;
    std::vector<ncclRedOp_t> reduces;
    // PREMUL_SUM's factor per input: the op itself belongs to the
    // communicator, so it is made (and destroyed) around each call.
    std::vector<nccl::PreMulFactor> premul;
  };

  CudaApi& cuda() const {
    return *spec_.comm.apis.cuda;
  }
  // What NCCL calls `op` needs; UnsupportedOpError before anything is issued.
  NcclTypes ncclTypesOf(const Collective& op, const std::string& what) const;
  // Hands the op to NCCL for the stream without waiting for NCCL's thread
  // to take it; `end` is recorded behind the op's kernels once it has. Any
  // error here leaves the communicator unusable.
  void launchCollective(
      const Collective& op,
      const NcclTypes& types,
      const std::string& what,
      const std::shared_ptr<EndEvent>& end);
  void watch();
  void watchUntilDone();
  // One look at the oldest op; false once the watchdog should stop.
  bool watchOnce(std::unique_lock<std::mutex>& lock, int64_t& previousEndUs);
  // Aborts the communicator and fails every unfinished op with `error`;
  // returns whether this call ended the lane (the first failure does).
  bool fail(std::exception_ptr error, State next);
  // The stall monitor's report: fails every unfinished op (no CUDA or NCCL
  // call: those may hang too) and tears down as the spec says.
  void onStall(const std::string& report);
  // Aborts the communicator: on the watchdog, watched by the stall monitor;
  // elsewhere waiting at most the stall timeout. Returns whether the abort
  // returned (if not, it goes on holding the lane).
  bool abortCommunicator(const std::string& reason);
  // Keeps `ops`' tensors for the life of the lane: a stuck CUDA or NCCL
  // call may still let NCCL's kernels use them.
  void abandon(std::deque<InFlight>& ops);
  // Fails each of `ops` with `error`, recording it in `stats`.
  static void completeFailed(
      std::deque<InFlight>& ops,
      const std::exception_ptr& error,
      const std::shared_ptr<LaneStats>& stats);
  // fail() for an NCCL error or a timeout: tears the process down as the
  // spec says.
  void failOnError(std::exception_ptr error);
  // Stops taking ops; returns whether the lane was open until now.
  bool stopTakingOps(bool freeWhenDrained);
  // The lane's failure, or PoolClosedError naming `what`, unless it is open.
  void throwUnlessOpen(const std::string& what) const;
  // Waits until NCCL took the last launched op (its end event recorded);
  // a failure there fails the lane (as any NCCL error does) and is thrown.
  void settleOrFail();
  // Starts the watchdog once; the caller holds issueMutex_.
  void ensureWatchdog();
  bool onWatchdogThread() const;
  void joinWatchdog();

  NcclLaneSpec spec_;
  c10::Device device_;
  bool createdBySplit_;
  int computeMajor_ = 0;
  int loadedVersion_ = 0;
  // The device's free memory, read with the device set (a context exists by
  // then: the lane's stream made it).
  int64_t freeDeviceMemory() const;
  int64_t creationBytes_ = 0;
  // Read when the first op is issued (under issueMutex_), then by the
  // watchdog when that op ended (after it took the op from inFlight_).
  std::atomic<int64_t> freeBeforeFirstUse_{-1};
  static constexpr int64_t kNotMeasured = -1; // the first op has not ended
  static constexpr int64_t kNotMeasurable = -2; // cudaMemGetInfo failed
  std::atomic<int64_t> firstUseBytes_{kNotMeasured};
  std::unique_ptr<NcclComm> comm_;
  std::unique_ptr<CudaStream> stream_;
  // Recorded on the caller's stream by each issue (under issueMutex_): a
  // wait takes the event's state when it is queued, so one event serves all.
  std::unique_ptr<CudaEvent> callerReady_;
  std::shared_ptr<EndEventPool> endEvents_;
  std::shared_ptr<EndEventPool> startEvents_; // only with timing (op_timing.h)

  std::mutex issueMutex_; // one issue at a time, in order; state changes too
  mutable std::mutex mutex_; // guards everything below
  std::condition_variable changed_;
  State state_ = State::Open;
  bool freeWhenDrained_ = false; // release(): the watchdog frees the comm
  std::exception_ptr failure_; // why the lane failed, for later ops
  std::exception_ptr endedBy_; // what failed or aborted it, for unfinished ops
  std::deque<InFlight> inFlight_;
  // The tensors of ops captured into CUDA graphs: each replay reads and
  // writes them, so they live as long as the lane.
  std::vector<std::vector<at::Tensor>> capturedTensors_;
  bool watchdogAsleep_ = false; // in its untimed wait: a new op must wake it
  std::shared_ptr<LaneStats> stats_;
  std::thread watchdog_;
  std::atomic<std::thread::id> watchdogId_{};
  bool watchdogRunning_ = false; // under mutex_: between its start and its last act
  std::mutex joinMutex_;
  std::shared_ptr<StallWatch> stallWatch_; // set by create()
  // Tensors of ops whose abort or watchdog hung: NCCL may still use them.
  std::deque<InFlight> abandoned_;
};

} // namespace pycomm
