#pragma once
// An owned, nonblocking ncclComm_t on one device: created by
// ncclCommInitRankConfig from a unique id or split from another NcclComm,
// freed by destroy() (finalize, then destroy) or abort(), or aborted by the
// destructor if neither ran. Every wait inside NCCL is a poll of
// ncclCommGetAsyncError bounded by the timeout, so a missing peer becomes a
// named error, not a hang. Only communicators pycomm owns are split: they are
// nonblocking, so the split is polled too (the split call blocks or not as
// its parent does, and a split of a blocking one would wait for a missing
// member forever).
//
// Thread-safety: every method may be called from any thread; one mutex
// serializes NCCL calls on the communicator, and abort() first raises a flag
// that ends any poll in progress.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "cuda_resources.h"
#include "gpu_apis.h"
#include "nccl_fields.h"

namespace pycomm {

struct NcclCommSpec {
  GpuApis apis;
  int device = 0;
  int rank = 0; // in the group
  int size = 1; // ranks in the group
  NcclSettings settings;
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  // How long creating the communicator (init or split) may take; unset: the
  // timeout. A pooled group's creation passes what its own deadline has
  // left after the rendezvous, so duplicate() keeps to one timeout.
  std::optional<std::chrono::milliseconds> creationTimeout;
  std::string label; // how errors name the group and role

  std::chrono::milliseconds creationBound() const {
    return creationTimeout.value_or(timeout);
  }
  // Whether launch() returns only once NCCL took the launch (put its kernels
  // on their streams). Then the process's NCCL launches on a device, torch's
  // from the calling thread included, happen in program order, the order
  // NCCL_LAUNCH_ORDER_IMPLICIT turns into the device's start order so that
  // communicators on one device cannot deadlock each other (NCCL user guide,
  // "Environment Variables": "Implicitly order NCCL operations from
  // different communicators on the same device using the host program
  // order"). Off: a nonblocking launch stays with NCCL's thread and the next
  // call on the communicator settles it, which costs the caller less but
  // lets launches of several communicators race, which NCCL 2.30.7 refuses
  // under that variable (src/misc/strongstream.cc, "host threads racing to
  // launch NCCL on same device").
  bool launchInProgramOrder = true;
  // Only for measuring the host cost side by side (bench_issue_cost): NCCL
  // aborts blocking communicators safely only when no thread is inside a
  // call on them (user guide, "Fault Tolerance"), so lanes are nonblocking.
  bool blocking = false;
};

class NcclComm {
 public:
  static std::unique_ptr<NcclComm> initRank(
      NcclCommSpec spec,
      const std::string& uniqueId);
  // Every member of `parent` splits it at the same point of its sequence of
  // calls; the child has the parent's ranks in the same order. If the split
  // fails or times out, NCCL may still be working on the parent, so the
  // parent is aborted too (its lane reports why).
  static std::unique_ptr<NcclComm> split(NcclCommSpec spec, NcclComm& parent);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Runs `calls` (NCCL calls on the communicator, e.g. a group of
  // collectives) under the lock and waits until NCCL has taken them.
  // `calls` returns the last NCCL result. Throws CollectiveError with NCCL's
  // message, CollectiveTimeoutError, or PoolClosedError after abort().
  void enqueue(
      const std::string& what,
      const std::function<ncclResult_t(ncclComm_t)>& calls);
  // Runs `calls` under the lock; `onTaken` runs, under the lock, once NCCL
  // has taken them (put the kernels on their streams). A nonblocking group
  // end hands the launch to NCCL's own thread and answers ncclInProgress:
  // with launchInProgramOrder (the default) launch() waits for it, as
  // enqueue() does; without, it returns and whoever sees NCCL take them
  // first runs `onTaken`: the next call on the communicator (NCCL refuses
  // calls while one is in progress, so every call settles the last launch
  // first), settle(), or tryAsyncError(). `onTaken` never runs if the
  // launch fails or the communicator is aborted first. Throws as enqueue().
  void launch(
      const std::string& what,
      const std::function<ncclResult_t(ncclComm_t)>& calls,
      std::function<void()> onTaken);
  // Waits, bounded by the timeout, until NCCL took the last launch, and runs
  // its onTaken; nothing to do when it was seen taken already.
  void settle();
  // The error NCCL met asynchronously (ncclSuccess or ncclInProgress when
  // none); nullopt while another call holds the communicator (that call
  // reports what it meets), so a watchdog never waits behind an issue.
  std::optional<ncclResult_t> tryAsyncError();
  // NCCL's message for the last error on this communicator.
  std::string lastError();
  // Registers [buffer, buffer + bytes) with the communicator, so collectives
  // on it are zero-copy; `symmetric`: a symmetric window (NCCL 2.27,
  // collective over the members). Registering a registered buffer again does
  // nothing. destroy() deregisters what is left; abort() lets NCCL free it.
  void registerBuffer(void* buffer, size_t bytes, bool symmetric);
  // Forgets a registration; a buffer that is not registered is ignored.
  void deregisterBuffer(void* buffer);
  size_t registeredBuffers() const;
  bool isRegistered(void* buffer) const;
  // Flushes what was issued (bounded by the timeout; past it, aborts) and
  // frees the communicator. Idempotent.
  void destroy();
  // Frees the communicator at once, without waiting for peers; operations in
  // flight end early. The first reason given is kept. Idempotent, any
  // thread, never throws.
  void abort(const std::string& reason = "abort()") noexcept;

  const NcclCommSpec& spec() const {
    return spec_;
  }
  // How long a wait for NCCL may take from now on (spec().timeout at first).
  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(timeoutMs_.load());
  }
  void setTimeout(std::chrono::milliseconds timeout) {
    timeoutMs_.store(timeout.count());
  }
  bool aborted() const {
    return abortRequested_.load();
  }
  // Why it was aborted; empty when it was not.
  std::string abortReason() const;
  // Communicators alive in this process (for leak checks).
  static int64_t liveCount();

 private:
  // The spec lives as long as the communicator: NCCL keeps pointers into
  // the config's strings (commName).
  explicit NcclComm(NcclCommSpec spec);
  NcclApi& nccl() const {
    return *spec_.apis.nccl;
  }
  // Waits for a new communicator to finish connecting and takes ownership;
  // aborts it on failure or past the timeout.
  // Waits for `comm` to be ready until `deadline` (the creation's: a split
  // waited for the parent against the same one).
  void adopt(ncclComm_t comm, const std::string& what, std::chrono::steady_clock::time_point deadline);
  // Refuses a communicator aborted or destroyed, settles the last launch,
  // then runs `calls`: NCCL's answer (errors thrown). Lock held, device set.
  ncclResult_t callLocked(
      const std::string& what,
      const std::function<ncclResult_t(ncclComm_t)>& calls);
  // Settles the last launch, if one is pending; lock held by the caller.
  void settleLaunchLocked();
  struct PendingLaunch {
    std::string what;
    std::function<void()> onTaken;
  };
  // Takes the pending launch (there is one) out of its slot; lock held.
  PendingLaunch takePendingLaunchLocked();
  // enqueue() with the lock held by the caller.
  void enqueueLocked(
      const std::string& what,
      const std::function<ncclResult_t(ncclComm_t)>& calls);
  // Polls until NCCL is done with the last call; lock held by the caller.
  void settleLocked(const std::string& what);
  // Records the first reason and raises the flag that ends polls.
  void requestAbort(const std::string& reason);
  void releaseLocked(bool abort);
  void deregisterLocked(void* buffer);

  struct Registration {
    void* handle;
    bool symmetric;
  };

  NcclCommSpec spec_;
  mutable std::mutex mutex_;
  ncclComm_t comm_ = nullptr;
  std::map<void*, Registration> registrations_; // by buffer
  std::optional<PendingLaunch> pendingLaunch_; // NCCL's thread may not have taken it yet
  std::atomic<bool> abortRequested_{false};
  std::atomic<int64_t> timeoutMs_; // set_timeout() may change it; a poll reads it once
  mutable std::mutex reasonMutex_; // not mutex_: set before a poll lets go of it
  std::string abortReason_;
};

} // namespace pycomm
