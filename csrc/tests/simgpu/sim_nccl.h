#pragma once
// Simulated NCCL behind the NcclApi interface, on a SimGpu. Test code only:
// no libnccl is touched. It moves real bytes between the simulated ranks of
// one process and fails the way NCCL fails.
//
// - Communicators come from commInitRankConfig (one unique id) or commSplit
//   (collective over the parent's ranks; the split call blocks or not as
//   the PARENT does, the child is blocking or not as the config given says,
//   as in NCCL 2.30.7 src/init.cc ncclCommInitChildComm). A communicator
//   lives on the thread's current device.
// - Nonblocking communicators (config->blocking == 0) return ncclInProgress
//   from creation, groupEnd and finalize; a split of a nonblocking parent
//   returns ncclSuccess with the child null, written only when the split is
//   done (NCCL 2.28.9 and 2.30.7 ncclCommSplit); commGetAsyncError reports
//   ncclInProgress until the work is done (creation: every member arrived and
//   the init delay passed; groupEnd: a background thread enqueues the group's
//   kernels on the stream after the group-end delay; finalize: the
//   communicator's kernels have run). Any other call on a communicator in
//   that state returns ncclInvalidArgument, as ncclCommEnsureReady makes it.
//   A second finalize is ncclInvalidArgument too; plain (de)registration
//   makes no such check. Aborting a parent whose split is still running
//   writes a half-built child in error to the split's slot, as NCCL's job
//   does when the abort joins it; only commAbort frees that child. As in
//   NCCL (2.14 and later), every nonblocking group end that carries work
//   starts a thread of its own to launch it and answers ncclInProgress. A blocking split waits inside the
//   call until every member of the parent split (forever, as NCCL does).
// - A communicator's first group end connects its peers and launches only
//   once every peer made its own (NCCL_RUNTIME_CONNECT): a blocking one
//   waits in the call, a nonblocking one stays in progress.
// - Collectives (allGather, reduceScatter, allReduce, broadcast, reduce; every op of
//   one group on one communicator runs as one kernel, as NCCL coalesces them)
//   are kernels on the given stream. A kernel waits until every rank of the
//   communicator reached its kernel of the same sequence number, moves the
//   bytes, then lasts at least the collective duration. Kernels of one
//   communicator never overlap (NCCL serializes them; an overlap is recorded
//   as a violation); kernels of different communicators do.
// - Types: int8, uint8, int32, uint32, int64, uint64, float16, float32,
//   float64, bfloat16, fp8 e4m3/e5m2 (fp8 reductions need compute
//   capability 9: older devices get ncclInvalidArgument). Reduce ops: sum,
//   prod, max, min, avg, and premul-sum ops from redOpCreatePreMulSum.
//   Half types are reduced in float, in rank order.
// - A group mixing blocking and nonblocking communicators fails with
//   ncclInvalidUsage and runs nothing, as NCCL refuses it.
// - commAbort: the communicator's running kernels return early (outputs left
//   as they are); it then waits until its kernels queued on streams have
//   left them (NCCL's abort synchronizes its stream), and frees it. Peers
//   of an aborted rank keep waiting, as on a GPU.
// - Point-to-point (send, recv): the k-th send from A to B pairs with the
//   k-th recv on B from A, with the same count and type; a rank may send to
//   itself. They run inside a group's kernel like its collectives, so the
//   sim models them where every rank of the communicator makes a group at
//   that point (gather, scatter, all-to-all as pycomm issues them); a lone
//   send between two ranks of a larger communicator, which NCCL runs on
//   those two ranks alone, is not modeled (pycomm issues none).
// - Mismatched collectives (counts, types, ops differing across ranks) and
//   unpaired or mismatched sends and recvs hang without a word, as on NCCL:
//   no error is reported.
// - commWindowRegister is collective, takes only cuMem (VMM) memory, and on
//   a nonblocking communicator returns at once and writes the window later
//   (see the definition).
// - commAbort, commDestroy can be made to hang (blockCalls), as they do on
//   sick GPUs.
//
// Thread-safety: every method may be called from any thread; calls on one
// communicator are serialized by the caller, as NCCL requires (except
// commGetAsyncError and commAbort).
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nccl_api.h"
#include "sim_gpu.h"

namespace pycomm::sim {

class SimNccl : public NcclApi {
 public:
  explicit SimNccl(std::shared_ptr<SimGpu> gpu, int version = 23007);
  // Aborts communicators still alive (counted as leaked) and stops its thread.
  ~SimNccl() override;
  SimNccl(const SimNccl&) = delete;
  SimNccl& operator=(const SimNccl&) = delete;

  // NcclApi
  ncclResult_t getVersion(int* version) override;
  ncclResult_t getUniqueId(ncclUniqueId* id) override;
  const char* getErrorString(ncclResult_t result) override;
  const char* getLastError(ncclComm_t comm) override;
  ncclResult_t commInitRankConfig(
      ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
      ncclConfig_t* config) override;
  ncclResult_t commSplit(
      ncclComm_t parent, int color, int key, ncclComm_t* child,
      ncclConfig_t* config) override;
  ncclResult_t commFinalize(ncclComm_t comm) override;
  ncclResult_t commDestroy(ncclComm_t comm) override;
  ncclResult_t commAbort(ncclComm_t comm) override;
  ncclResult_t commGetAsyncError(ncclComm_t comm, ncclResult_t* state) override;
  ncclResult_t commCount(ncclComm_t comm, int* count) override;
  ncclResult_t commUserRank(ncclComm_t comm, int* rank) override;
  ncclResult_t commRegister(
      ncclComm_t comm, void* buffer, size_t size, void** handle) override;
  ncclResult_t commDeregister(ncclComm_t comm, void* handle) override;
  // Registrations like commRegister's, counted in liveRegistrations().
  ncclResult_t commWindowRegister(
      ncclComm_t comm, void* buffer, size_t size, void** window, int flags) override;
  ncclResult_t commWindowDeregister(ncclComm_t comm, void* window) override;
  ncclResult_t groupStart() override;
  ncclResult_t groupEnd() override;
  // The groups a test opened on this thread with groupStart(), standing for
  // torch's (the lane's own are closed whenever it returns).
  int torchGroupDepth() override;
  ncclResult_t allGather(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) override;
  ncclResult_t reduceScatter(
      const void* input, void* output, size_t countPerRank,
      ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm,
      cudaStream_t stream) override;
  ncclResult_t allReduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) override;
  ncclResult_t broadcast(
      const void* input, void* output, size_t count, ncclDataType_t type,
      int root, ncclComm_t comm, cudaStream_t stream) override;
  // Writes `output` on `root` only: "recvbuff may be NULL on all calls
  // except for root device" (NCCL API, ncclReduce).
  ncclResult_t reduce(
      const void* input, void* output, size_t count, ncclDataType_t type,
      ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) override;
  // Sends and recvs pair as NCCL pairs them (nccl_api.h); see the header
  // comment for what is modeled.
  ncclResult_t send(
      const void* input, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) override;
  ncclResult_t recv(
      void* output, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
      cudaStream_t stream) override;
  // A VMM block of the calling thread's current device (SimGpu::allocateBlock,
  // MemoryKind::Vmm, so windows can register it). ncclInvalidArgument for
  // a null `ptr`, and from memFree for a pointer memAlloc did not give
  // (NCCL API: ncclMemFree frees "memory allocated by ncclMemAlloc()"; on a
  // GPU the CUDA driver call under it fails instead, so this is stricter).
  // memFree(nullptr) does nothing.
  ncclResult_t memAlloc(void** ptr, size_t size) override;
  ncclResult_t memFree(void* ptr) override;
  ncclResult_t redOpCreatePreMulSum(
      ncclRedOp_t* op, void* scalar, ncclDataType_t type,
      ncclScalarResidence_t residence, ncclComm_t comm) override;
  ncclResult_t redOpDestroy(ncclRedOp_t op, ncclComm_t comm) override;

  // --- knobs (defaults: no delays, no minimum duration) ---
  // How long a nonblocking creation or split stays in progress after its
  // last member arrived.
  void setInitDelay(std::chrono::microseconds delay);
  // NCCL_LAUNCH_ORDER_IMPLICIT (off by default, as in NCCL): each
  // collective kernel launched from now on starts only after the one
  // launched before it on its device started (SimGpu::launchCollective).
  // NCCL reads the variable once per process (NCCL_PARAM), so it is a
  // setting here, not the environment.
  void setLaunchOrderImplicit(bool implicit);
  // How long a nonblocking groupEnd stays in progress before its thread
  // puts the kernels on the stream (default: no delay beyond the thread's
  // start); the second form for one communicator only (a slow group end).
  void setGroupEndDelay(std::chrono::microseconds delay);
  void setGroupEndDelay(ncclComm_t comm, std::chrono::microseconds delay);
  // The least time a collective kernel takes once its peers met.
  void setCollectiveDuration(std::chrono::microseconds duration);

  // --- memory ---
  // What a communicator takes on its device (SimGpu::memGetInfo shows it):
  // kCommBytes when it is created, kFirstUseBytes more when it first
  // connects its peers (its first group). On a GPU both depend on the
  // channels and transports NCCL picks: each channel has its buffers per
  // peer and protocol (NCCL_BUFFSIZE, 4 MiB for Simple by default, times
  // the channels, NCCL_MIN/MAX_NCHANNELS), NVLS adds its multicast buffers
  // (NCCL_NVLS_ENABLE; about 1-2 GiB per communicator on NVSwitch systems,
  // NCCL's environment-variable docs), and NCCL_RUNTIME_CONNECT (default 1
  // since 2.22) defers most of it to the first collective. So these are
  // parameters (setCommMemory), not figures to trust.
  // Given back when the last communicator of its clique in this process is
  // destroyed or aborted: NCCL frees a process's shared resources only when
  // its last local rank destroys or aborts (src/init.cc, commReclaim).
  static constexpr int64_t kCommBytes = int64_t{96} << 20;
  static constexpr int64_t kFirstUseBytes = int64_t{160} << 20;
  // Communicators created from now on take these amounts.
  void setCommMemory(int64_t creationBytes, int64_t firstUseBytes);
  // NCCL_LOCAL_REGISTER=1 (NCCL's default). With 0, or where P2P goes
  // through cudaMemcpy, ncclCommRegister answers ncclSuccess with a null
  // handle and registers nothing, and ncclCommDeregister takes that null
  // handle (NCCL 2.30.7 src/register/register.cc).
  void setLocalRegistration(bool enabled);

  // --- calls that hang on sick GPUs ---
  enum class Call { CommAbort, CommDestroy };
  // Each later `call` blocks this long (CallGate::kForever: until
  // releaseBlockedCalls()) before it does anything.
  void blockCalls(Call call, std::chrono::milliseconds howLong);
  void releaseBlockedCalls();
  int blockedCalls() const;

  // Nonblocking window registrations whose window slot was on the caller's
  // stack: NCCL writes it after the call returned, into a frame that may
  // be gone (must stay 0).
  int stackSlotWindows() const;

  // --- faults ---
  // From now on commGetAsyncError(comm) reports `error` and getLastError
  // `message`; the communicator's kernels stay blocked until it is aborted.
  void injectAsyncError(ncclComm_t comm, ncclResult_t error, std::string message);

  // --- accounting ---
  int liveComms() const;
  int liveRegistrations() const;
  // ncclMemAlloc'd blocks not yet freed.
  int liveMemAllocs() const;
  // Premul-sum reduce ops made and not yet destroyed, on live communicators.
  int liveReduceOps() const;
  // Communicators freed by ~SimNccl because nobody destroyed or aborted them.
  int leakedComms() const;
  // Kernels of one communicator that ran at the same time (must stay 0).
  int overlapViolations() const;
  // The id of a live communicator (as in KernelInterval::comm), its device,
  // whether it is blocking.
  uint64_t idOf(ncclComm_t comm) const;
  int deviceOf(ncclComm_t comm) const;
  bool isBlocking(ncclComm_t comm) const;
  // The live communicators on `device`, oldest first: how a test reaches
  // the communicators a lane made.
  std::vector<ncclComm_t> commsOn(int device) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace pycomm::sim
