#pragma once
// An owned, nonblocking ncclComm_t on one device: created by ncclCommSplit
// from a parent or by ncclCommInitRankConfig from a unique id, freed by
// destroy() (finalize, then destroy) or abort(), or aborted by the destructor
// if neither ran. Every wait inside NCCL is a poll of ncclCommGetAsyncError
// bounded by the timeout, so a missing peer becomes a named error, not a hang.
//
// Thread-safety: enqueue(), asyncError(), destroy() and abort() may be called
// from any thread; one mutex serializes NCCL calls on the communicator, and
// abort() first raises a flag that ends any poll in progress.
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "cuda_resources.h"
#include "nccl_fields.h"

namespace pycomm {

struct NcclCommSpec {
  int device = 0;
  int rank = 0; // in the group
  int size = 1; // ranks in the group
  NcclSettings settings;
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  std::string label; // how errors name the group and role
};

class NcclComm {
 public:
  static std::unique_ptr<NcclComm> initRank(
      NcclCommSpec spec,
      const std::string& uniqueId);
  // Every member of `parent` must split it in the same order; the child has
  // the parent's ranks. NCCL takes splitShare from the parent's config: the
  // caller must not pass a parent created with splitShare=1. A blocking
  // parent (torch's default) makes this call block until every member split,
  // which the members-only rendezvous before it makes prompt; a nonblocking
  // one is polled, bounded by the timeout.
  static std::unique_ptr<NcclComm> split(NcclCommSpec spec, ncclComm_t parent);
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
  // ncclSuccess, ncclInProgress, or the error NCCL met asynchronously.
  ncclResult_t asyncError();
  // NCCL's message for the last error on this communicator.
  std::string lastError();
  // Flushes what was issued (bounded by the timeout; past it, aborts) and
  // frees the communicator. Idempotent.
  void destroy();
  // Frees the communicator at once, without waiting for peers; operations in
  // flight end with an error. Idempotent, any thread, never throws.
  void abort() noexcept;

  const NcclCommSpec& spec() const {
    return spec_;
  }
  bool aborted() const {
    return abortRequested_.load();
  }
  // Communicators alive in this process (for leak checks).
  static int64_t liveCount();

 private:
  // The spec lives as long as the communicator: NCCL keeps pointers into
  // the config's strings (commName).
  explicit NcclComm(NcclCommSpec spec);
  // Waits for a new communicator to finish connecting and takes ownership;
  // aborts it on failure or past the timeout.
  void adopt(ncclComm_t comm, const std::string& what);
  // Polls until NCCL is done with the last call; lock held by the caller.
  void settleLocked(const std::string& what);
  void releaseLocked(bool abort);

  NcclCommSpec spec_;
  std::mutex mutex_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> abortRequested_{false};
};

} // namespace pycomm
