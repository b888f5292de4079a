#include "nccl_comm.h"

#include <c10/cuda/CUDAGuard.h>

#include <thread>

#include "errors.h"
#include "nccl_api.h"

namespace pycomm {

namespace {
std::atomic<int64_t> liveComms{0};

// A poll of a nonblocking communicator costs one call; this keeps a waiting
// thread from spinning a core while NCCL connects.
constexpr auto kPollInterval = std::chrono::microseconds(200);

// Polls `comm`'s asynchronous state until it leaves ncclInProgress and
// returns it (ncclSuccess or the error). Returns ncclInProgress when the
// timeout passed, or `stop` was raised, first.
ncclResult_t pollAsyncState(
    ncclComm_t comm,
    std::chrono::milliseconds timeout,
    const std::atomic<bool>* stop = nullptr) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t result = nccl::getAsyncError(comm, &state);
    if (result != ncclSuccess) {
      return result;
    }
    if (state != ncclInProgress) {
      return state;
    }
    if ((stop != nullptr && stop->load()) ||
        std::chrono::steady_clock::now() > deadline) {
      return ncclInProgress;
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

} // namespace

NcclComm::NcclComm(NcclCommSpec spec) : spec_(std::move(spec)) {}

void NcclComm::adopt(ncclComm_t comm, const std::string& what) {
  const ncclResult_t state = pollAsyncState(comm, spec_.timeout);
  if (state == ncclInProgress) {
    (void)nccl::commAbort(comm); // freeing it is all that is left to do
    throw CollectiveTimeoutError(
        spec_.label + ": " + what + " did not complete within " +
        std::to_string(spec_.timeout.count()) +
        " ms; every member must duplicate the group with the same role");
  }
  if (state != ncclSuccess) {
    const std::string message = spec_.label + ": " + what + " failed: " +
        nccl::errorText(state) + " (NCCL: " + nccl::lastError(comm) + ")";
    (void)nccl::commAbort(comm);
    throw CollectiveError(message);
  }
  comm_ = comm;
  liveComms.fetch_add(1);
}

std::unique_ptr<NcclComm> NcclComm::initRank(
    NcclCommSpec spec,
    const std::string& uniqueId) {
  std::unique_ptr<NcclComm> self(new NcclComm(std::move(spec)));
  const NcclCommSpec& s = self->spec_;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s.device));
  ncclConfig_t config = nccl::makeConfig(s.settings);
  ncclComm_t comm = nullptr;
  const std::string what = "ncclCommInitRankConfig (rank " +
      std::to_string(s.rank) + " of " + std::to_string(s.size) + ")";
  const ncclResult_t result =
      nccl::commInitRank(&comm, s.size, uniqueId, s.rank, &config);
  if (result != ncclSuccess && result != ncclInProgress && comm != nullptr) {
    (void)nccl::commAbort(comm); // the error below is what matters
  }
  nccl::check(result, s.label + ": " + what, comm);
  self->adopt(comm, what);
  return self;
}

std::unique_ptr<NcclComm> NcclComm::split(NcclCommSpec spec, ncclComm_t parent) {
  std::unique_ptr<NcclComm> self(new NcclComm(std::move(spec)));
  const NcclCommSpec& s = self->spec_;
  if (parent == nullptr) {
    throw ConfigError(s.label + ": no parent NCCL communicator to split");
  }
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s.device));
  ncclConfig_t config = nccl::makeConfig(s.settings);
  const std::string what = "ncclCommSplit of the base group's communicator";
  // A nonblocking parent writes the child here only when the split is done,
  // after this call returned: the slot must outlive the call.
  auto slot = std::make_unique<ncclComm_t>(nullptr);
  // One color for all members: the child has exactly the parent's ranks, in
  // the same order (key = rank).
  const ncclResult_t result =
      nccl::commSplit(parent, /*color=*/0, /*key=*/s.rank, slot.get(), &config);
  nccl::check(result, s.label + ": " + what, parent);
  if (result == ncclInProgress) {
    const ncclResult_t state = pollAsyncState(parent, s.timeout);
    if (state == ncclInProgress) {
      // NCCL may still write the child into the slot: it is left to it.
      (void)slot.release();
      throw CollectiveTimeoutError(
          s.label + ": " + what + " did not complete within " +
          std::to_string(s.timeout.count()) + " ms");
    }
    nccl::check(state, s.label + ": " + what, parent);
  }
  if (*slot == nullptr) {
    throw CollectiveError(s.label + ": " + what + " returned no communicator");
  }
  self->adopt(*slot, what);
  return self;
}

NcclComm::~NcclComm() {
  // Finalizing here could wait for peers; a communicator nobody destroyed is
  // abandoned, so it is aborted.
  abort();
}

int64_t NcclComm::liveCount() {
  return liveComms.load();
}

void NcclComm::settleLocked(const std::string& what) {
  const ncclResult_t state = pollAsyncState(comm_, spec_.timeout, &abortRequested_);
  if (state == ncclInProgress) {
    if (abortRequested_.load()) {
      throw PoolClosedError(spec_.label + ": " + what + " was ended by abort()");
    }
    throw CollectiveTimeoutError(
        spec_.label + ": NCCL did not take " + what + " within " +
        std::to_string(spec_.timeout.count()) + " ms");
  }
  nccl::check(state, spec_.label + ": " + what, comm_);
}

void NcclComm::enqueue(
    const std::string& what,
    const std::function<ncclResult_t(ncclComm_t)>& calls) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr || abortRequested_.load()) {
    throw PoolClosedError(
        spec_.label + ": " + what + ": the NCCL communicator was " +
        (abortRequested_.load() ? "aborted" : "destroyed"));
  }
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(spec_.device));
  if (nccl::check(calls(comm_), spec_.label + ": " + what, comm_) ==
      ncclInProgress) {
    settleLocked(what);
  }
}

ncclResult_t NcclComm::asyncError() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return ncclSuccess;
  }
  ncclResult_t state = ncclSuccess;
  const ncclResult_t result = nccl::getAsyncError(comm_, &state);
  return result != ncclSuccess ? result : state;
}

std::string NcclComm::lastError() {
  std::lock_guard<std::mutex> lock(mutex_);
  return nccl::lastError(comm_);
}

void NcclComm::destroy() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return;
  }
  QuietDeviceScope device(spec_.device);
  try {
    if (nccl::check(nccl::commFinalize(comm_), spec_.label + ": ncclCommFinalize", comm_) ==
        ncclInProgress) {
      settleLocked("ncclCommFinalize");
    }
  } catch (const PycommError&) {
    // Finalize could not flush (a peer gone, or past the timeout): nothing
    // more can be delivered, so free without waiting.
    releaseLocked(/*abort=*/true);
    throw;
  }
  releaseLocked(/*abort=*/false);
}

void NcclComm::abort() noexcept {
  abortRequested_.store(true); // ends a poll in enqueue()/destroy() first
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return;
  }
  QuietDeviceScope device(spec_.device);
  releaseLocked(/*abort=*/true);
}

void NcclComm::releaseLocked(bool abort) {
  // The communicator is gone whatever NCCL answers; an error here leaves
  // nothing of ours to free, so it is not rethrown.
  (void)(abort ? nccl::commAbort(comm_) : nccl::commDestroy(comm_));
  comm_ = nullptr;
  liveComms.fetch_sub(1);
}

} // namespace pycomm
