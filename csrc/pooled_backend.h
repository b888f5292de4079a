#pragma once
// A c10d::Backend bound to one pooled communicator and its lane. torch routes
// the collectives of a pooled ProcessGroup here; each op is checked, posted to
// the lane (FIFO: it starts when the one before it has ended) and issued to the
// transport, and its Work completes on the thread that finishes it.
//
// Thread-safety: every public method may be called from any thread; ops issued
// from several threads are ordered by the lane in the order submit() took
// them.
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "collective.h"
#include "cpu_transport.h"
#include "device_lane.h"
#include "lane.h"
#include "lane_stats.h"
#include "pooled_work.h"

namespace pycomm {

struct PooledGroupSpec {
  std::string name; // torch's name of the pooled group
  std::string description; // torch's description of it (group_desc)
  std::string baseGroupName; // the group it duplicates
  std::string role; // "ag" or "rs"
  std::vector<int64_t> globalRanks; // sorted
  int64_t rank = 0; // this process's rank inside the group
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  bool checkOrder = false;

  // "role 'ag' of group '3' (ranks 0,2)": how errors name the group.
  std::string label() const;
};

class PooledBackend : public c10d::Backend {
 public:
  PooledBackend(PooledGroupSpec spec, c10::intrusive_ptr<c10d::Backend> cpuComm);
  ~PooledBackend() override;

  const std::string getBackendName() const override {
    return "pycomm";
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(
      at::Tensor& output,
      at::Tensor& input,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output,
      at::Tensor& input,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> broadcast(
      std::vector<at::Tensor>& tensors,
      const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(
      const c10d::BarrierOptions& opts) override;

  // The rest of c10d's collectives and point-to-point ops, on the lane of
  // their tensors' device. all_gather_coalesced (deprecated by torch), sparse
  // all-reduce and recv from any source raise UnsupportedOpError naming the
  // group and what to use instead (torch's default is a bare RuntimeError).
  c10::intrusive_ptr<c10d::Work> allgather(
      std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&,
      const c10d::AllgatherOptions&) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&,
      const c10d::AllgatherOptions&) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>&, const c10d::AllreduceCoalescedOptions&) override;
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(
      std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override;
  c10::intrusive_ptr<c10d::Work> reduce(
      std::vector<at::Tensor>&, const c10d::ReduceOptions&) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(
      std::vector<at::Tensor>&, std::vector<std::vector<at::Tensor>>&,
      const c10d::ReduceScatterOptions&) override;
  c10::intrusive_ptr<c10d::Work> gather(
      std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&,
      const c10d::GatherOptions&) override;
  c10::intrusive_ptr<c10d::Work> scatter(
      std::vector<at::Tensor>&, std::vector<std::vector<at::Tensor>>&,
      const c10d::ScatterOptions&) override;
  c10::intrusive_ptr<c10d::Work> alltoall(
      std::vector<at::Tensor>&, std::vector<at::Tensor>&,
      const c10d::AllToAllOptions&) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(
      at::Tensor&, at::Tensor&, std::vector<int64_t>&, std::vector<int64_t>&,
      const c10d::AllToAllOptions&) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>&, int, int) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>&, int, int) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>&, int) override;
  // batch_isend_irecv: the sends and recvs issued between startCoalescing
  // and endCoalescing are held (each returns no Work, as torch's NCCL
  // backend's do) and run as one op, one NCCL group on an NCCL lane, whose
  // Work endCoalescing returns. Other ops issued meanwhile run at once (torch's
  // fast-path coalescing hands its all_reduce over just before
  // endCoalescing); a batch without sends or recvs returns the Work of the
  // last of them, which ends after the others (a lane runs its ops in
  // order), and none when there was nothing, as torch's.
  bool supportsCoalescing() const override {
    return true;
  }
  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  // The number of ops this group has taken so far, the same on every member
  // that issued the same ops: torch's DETAIL checks compare it across ranks.
  uint64_t getSequenceNumberForGroup() override;
  // The count starts with the group, so there is nothing to set: torch 2.14's
  // base is a deprecated no-op, 2.11's throws, which its DETAIL wrapper
  // (_ProcessGroupWrapper) calls on every group it wraps.
  void setSequenceNumberForGroup() override {}
  // As torch's backends give them: the timeout (set_timeout's once called),
  // the group's name, description and global ranks.
  c10::intrusive_ptr<Options> getBackendOptions() override;
  // The timeout of ops issued from now on, on the CPU and device lanes
  // (ops in flight keep theirs); ConfigError below 100 ms.
  void setTimeout(std::chrono::milliseconds timeout) override;

  // Fails every op not yet finished with PoolClosedError and stops taking new
  // ones, without waiting for a peer (for a hung or dead peer). Idempotent.
  void abort() override;
  // Same as close().
  void shutdown() override;
  // Stops taking ops, lets the queued ones finish (each bounded by the
  // timeout), then releases the lanes and the communicators. Idempotent.
  // With wait false (destructors), nothing here waits: queued ops finish
  // and are freed on other threads (see DeviceLane::release()).
  void close(bool wait = true);

  // Gives device (CUDA) tensors a lane of their own; without one, ops on
  // them raise UnsupportedOpError. Set once, right after construction.
  void attachDeviceLane(std::shared_ptr<DeviceLane> lane);
  std::shared_ptr<DeviceLane> deviceLane() const;
  // The device lane; UnsupportedOpError naming `what` when there is none.
  std::shared_ptr<DeviceLane> requireDeviceLane(const std::string& what) const;

  // Device memory, as (address, bytes) in the caller's order.
  using Segments = std::vector<std::pair<uintptr_t, size_t>>;
  // Registers the segments not registered yet with the device lane's
  // communicator (register_mem_pool). Symmetric windows are collective, one
  // NCCL call per segment on every member: the members first agree, over
  // the group's CPU side, on how many segments they register now and on
  // their sizes in order, so members holding different segments get
  // TensorMismatchError naming what each holds before NCCL sees any call,
  // instead of waiting in NCCL for a call that never comes. Blocks the
  // caller until registered (collective with symmetric).
  void registerMemory(const Segments& segments, bool symmetric);
  // NCCL's memory for FSDP2's buffers, as ProcessGroupNCCL gives it
  // (set_allocate_memory_from_process_group_for_comm): through the NCCL
  // lane, on its device only; the others refuse by name.
  bool supportsTensorAlloc(c10::DeviceIndex device) override;
  std::shared_ptr<c10::Allocator> getMemAllocator() override;
  at::Tensor allocateTensor(long size, at::TensorOptions options = {}) override;
  void deregisterMemory(const Segments& segments);

  bool isOpen() const;
  const PooledGroupSpec& spec() const {
    return spec_;
  }
  StatsSnapshot stats() const;
  std::vector<OpRecord> trace() const;
  // Ops queued or running.
  size_t pending() const;

 private:
  // What ops in flight share with the backend; held by shared_ptr so an op
  // still in flight after abort() or destruction never outlives what it
  // touches.
  struct LaneContext {
    LaneContext(
        c10::intrusive_ptr<c10d::Backend> comm,
        const PooledGroupSpec& spec);
    CpuTransport transport;
    Lane lane;
    LaneStats stats;
    bool checkOrder;
    int globalRank; // this process's, for the flight-recorder dump
    std::atomic<bool> dumped{false}; // one dump per group: its first timeout
    std::mutex mutex;
    std::map<uint64_t, c10::intrusive_ptr<PooledWork>> unfinished;
  };
  enum class State { Open, Closed, Aborted };
  // What a CPU lane entry does: run the op, or only check its place in the
  // cross-rank order (an op of the device lane, with PYCOMM_DEBUG=order).
  enum class Run { Op, OrderCheckOnly };

  // `collective` names the op in profiler records, `spanName` its span
  // (Collective::spanName), as torch's NCCL backend names them (the entry
  // point called, not the transport's op).
  c10::intrusive_ptr<c10d::Work> submit(
      Collective op, c10d::OpType type, const char* collective, const char* spanName);
  // Hands `op` to the lane its tensors belong to.
  c10::intrusive_ptr<c10d::Work> route(Collective op, c10d::OpType type);
  // Every member's `values` (the same count on each), by group rank,
  // all-gathered on the CPU lane; blocks until done.
  std::vector<int64_t> allGatherOnHost(const std::vector<int64_t>& values);
  // Posts an entry to the CPU lane; returns its Work (which holds
  // `callers`, the op as the caller gave it) and its place (seq) among this
  // group's ops. The transport runs `running`: `callers`, or a copy with
  // contiguous tensors, `writeBack` saying what to copy back.
  std::pair<c10::intrusive_ptr<PooledWork>, uint64_t> enqueue(
      std::shared_ptr<const Collective> callers,
      std::shared_ptr<Collective> running,
      c10d::OpType type,
      std::vector<StagedTensor> writeBack,
      Run run);
  // The device lane for `op`'s tensors; null for CPU tensors (and a
  // barrier). Throws where no lane serves their device.
  std::shared_ptr<DeviceLane> deviceLaneFor(const Collective& op) const;
  c10::intrusive_ptr<c10d::Work> submitToDevice(
      Collective op,
      c10d::OpType type,
      std::shared_ptr<DeviceLane> lane);
  static void start(
      const std::shared_ptr<LaneContext>& context,
      std::shared_ptr<Collective> op,
      std::vector<StagedTensor> writeBack,
      uint64_t seq,
      const c10::intrusive_ptr<PooledWork>& work,
      Run run);
  void throwIfNotOpen() const;
  [[noreturn]] void refuse(const char* op, const char* instead) const;
  // The one list torch gives a gather's root (outputs) or a scatter's
  // (inputs); none elsewhere.
  std::vector<at::Tensor> rootsList(
      const std::vector<std::vector<at::Tensor>>& lists, const char* op, const char* what) const;
  bool isOpenOrClosed() const;
  // route() without the bookkeeping of an open batch.
  c10::intrusive_ptr<c10d::Work> routeNow(Collective op, c10d::OpType type);
  // Whether a send or recv was held for endCoalescing.
  bool holdWhileCoalescing(const std::vector<at::Tensor>& tensors, const PointToPointPart& part);

  PooledGroupSpec spec_;
  // spec_.label(), made once: every op's Work shares it.
  std::shared_ptr<const std::string> label_;
  std::shared_ptr<LaneContext> context_;
  mutable std::mutex mutex_;
  State state_ = State::Open;
  uint64_t nextSeq_ = 0;
  std::optional<Collective> coalescing_; // between startCoalescing and endCoalescing
  std::atomic<bool> coalescingOpen_{false}; // coalescing_ is set: read without mutex_ on the hot path
  c10::intrusive_ptr<c10d::Work> lastWhileCoalescing_;
  std::chrono::milliseconds timeout_; // spec_.timeout until set_timeout()
  const bool timed_; // TORCH_NCCL_ENABLE_TIMING when the group was made
  // One set_timeout() at a time, so the Works, the transport and the device
  // lane end up with the same value.
  std::mutex setTimeoutMutex_;
  std::shared_ptr<DeviceLane> deviceLane_;
};

} // namespace pycomm
