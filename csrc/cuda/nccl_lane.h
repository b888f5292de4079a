#pragma once
// The CUDA lane of a pooled group: its own NCCL communicator and its own CUDA
// stream (of a chosen priority) on one device. Ops run FIFO on the stream;
// lanes of other roles have other streams and communicators, so an
// all-gather and a reduce-scatter run concurrently on the device.
//
// Ordering: issue() records an event on the caller's current stream and makes
// the lane's stream wait on it, so the op sees everything queued before it,
// and the host never waits. Work.wait() makes the caller's stream wait on the
// op's end event.
//
// Memory: the lane holds references to every tensor of an op until its
// watchdog has seen the op's end event pass. That is the equivalent of
// recordStream without its cost in the caching allocator: a tensor the
// caller drops cannot be freed, so its memory cannot be handed to another
// stream while NCCL still reads or writes it.
//
// Errors: one watchdog thread per lane polls the end events and
// ncclCommGetAsyncError. An NCCL error or an op past its timeout aborts the
// communicator and fails every unfinished op with a named error; later ops
// raise that error at once.
//
// CUDA graphs: ops issued while the caller's stream is capturing raise
// UnsupportedOpError (the watchdog and the held references are host-side and
// cannot follow replays).
//
// Thread-safety: every public method may be called from any thread; issue()
// calls are serialized in the order they take the lane's lock.
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "cuda_resources.h"
#include "device_lane.h"
#include "nccl_comm.h"
#include "nccl_work.h"

namespace pycomm {

struct NcclLaneSpec {
  NcclCommSpec comm;
  std::string role; // "ag" or "rs": picks the default stream priority
  std::optional<int> streamPriority; // unset: highest for "ag", default for "rs"
};

class NcclLane : public DeviceLane {
 public:
  // Creates the communicator (split from `parent` when it is not null,
  // otherwise from `uniqueId`) and the stream. Collective over the group.
  NcclLane(
      const NcclLaneSpec& spec,
      const std::string& uniqueId,
      uintptr_t parent);
  ~NcclLane() override;

  c10::Device device() const override;
  c10::intrusive_ptr<c10d::Work> issue(
      const Collective& op,
      c10d::OpType type,
      std::string description) override;
  void bindStats(std::shared_ptr<LaneStats> stats) override;
  size_t pending() const override;
  void close() override;
  void abort() override;

  // The priority the stream has (CUDA may clamp what was asked).
  int streamPriority() const;
  uintptr_t streamHandle() const;
  bool createdBySplit() const {
    return createdBySplit_;
  }

  // The priority a role's lane gets when its config names none.
  static int defaultPriority(const std::string& role, int device);

 private:
  struct InFlight {
    c10::intrusive_ptr<NcclWork> work;
    std::vector<at::Tensor> tensors; // held until the end event passed
    CollectiveKind kind;
    int64_t bytes;
    int64_t issuedUs;
  };
  enum class State { Open, Closing, Closed, Failed };

  void enqueueCollective(const Collective& op, const std::string& what);
  void watch();
  // Aborts the communicator and fails every unfinished op with `error`.
  void fail(std::exception_ptr error, State next);

  NcclLaneSpec spec_;
  c10::Device device_;
  bool createdBySplit_;
  std::unique_ptr<NcclComm> comm_;
  std::unique_ptr<CudaStream> stream_;
  std::shared_ptr<LaneStats> stats_;

  mutable std::mutex mutex_; // guards everything below
  std::condition_variable changed_;
  State state_ = State::Open;
  std::exception_ptr failure_; // why the lane failed, for later ops
  std::deque<InFlight> inFlight_;
  std::mutex issueMutex_; // keeps event, NCCL and stream order in one order
  std::thread watchdog_;
};

} // namespace pycomm
