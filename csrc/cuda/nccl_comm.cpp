#include "nccl_comm.h"

#include <algorithm>
#include <thread>
#include <utility>
#include <vector>

#include "errors.h"
#include "nccl_calls.h"

namespace pycomm {

namespace {

// `what` behind the communicator's label, unless `what` starts with it
// already (a lane's op descriptions do).
std::string labelled(const std::string& label, const std::string& what) {
  return what.compare(0, label.size() + 2, label + ": ") == 0 ? what : label + ": " + what;
}
std::atomic<int64_t> liveComms{0};

// A group end on a connected communicator is taken within tens of
// microseconds (NCCL's thread starts and launches), and issue() waits for
// it, so a poll first yields the core: a sleep would wake late by Linux's
// timer slack (50 us). On the simulated GPU, yielding for 500 us rather than
// 50 us took issue()'s median from 93-111 to 78-80 us (docs/benchmarks.md).
// Creation and first connections take milliseconds to seconds, so the poll
// then sleeps, ever longer, up to a bound.
constexpr auto kYieldFor = std::chrono::microseconds(500);
constexpr auto kFirstSleep = std::chrono::microseconds(10);
constexpr auto kLongestSleep = std::chrono::microseconds(1000);

// Polls `comm`'s asynchronous state until it leaves ncclInProgress and
// returns it (ncclSuccess or the error). Returns ncclInProgress when the
// timeout passed, or `stop` was raised, first.
ncclResult_t pollAsyncState(
    NcclApi& api,
    ncclComm_t comm,
    std::chrono::milliseconds timeout,
    const std::atomic<bool>* stop = nullptr) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
  auto sleep = kFirstSleep;
  while (true) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t result = api.commGetAsyncError(comm, &state);
    if (result != ncclSuccess) {
      return result;
    }
    if (state != ncclInProgress) {
      return state;
    }
    const auto now = std::chrono::steady_clock::now();
    if ((stop != nullptr && stop->load()) || now > deadline) {
      return ncclInProgress;
    }
    if (now - start < kYieldFor) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, kLongestSleep);
    }
  }
}

// A split or window registration that did not complete may still have its
// result written into the slot by NCCL's own thread later: the slot stays
// valid for the life of the process (one pointer per failed call).
template <typename T>
void keepForNccl(std::unique_ptr<T> slot) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<void>> kept;
  std::lock_guard<std::mutex> lock(mutex);
  kept.emplace_back(std::move(slot));
}

std::string timeoutText(std::chrono::milliseconds timeout) {
  return std::to_string(timeout.count()) + " ms";
}

std::chrono::milliseconds timeLeft(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return std::max(left, std::chrono::milliseconds(0));
}

} // namespace

NcclComm::NcclComm(NcclCommSpec spec) : spec_(std::move(spec)), timeoutMs_(spec_.timeout.count()) {}

void NcclComm::adopt(
    ncclComm_t comm,
    const std::string& what,
    std::chrono::steady_clock::time_point deadline) {
  const ncclResult_t state = pollAsyncState(nccl(), comm, timeLeft(deadline));
  if (state == ncclInProgress) {
    (void)nccl().commAbort(comm); // freeing it is all that is left to do
    throw CollectiveTimeoutError(
        labelled(spec_.label, what) + " did not complete within " +
        timeoutText(spec_.creationBound()) +
        "; every member must duplicate the group with the same role");
  }
  if (state != ncclSuccess) {
    const std::string message = labelled(spec_.label, what) + " failed: " +
        nccl::errorText(nccl(), state) + " (NCCL: " + nccl::lastError(nccl(), comm) + ")";
    (void)nccl().commAbort(comm);
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
  const auto deadline = std::chrono::steady_clock::now() + s.creationBound();
  NcclApi& api = self->nccl();
  const ncclUniqueId id = nccl::uniqueIdFromBytes(uniqueId);
  DeviceScope device(*s.apis.cuda, s.device);
  ncclConfig_t config = nccl::makeConfig(s.settings, nccl::usableVersion(api), s.label);
  config.blocking = s.blocking ? 1 : 0;
  ncclComm_t comm = nullptr;
  const std::string what = "ncclCommInitRankConfig (rank " +
      std::to_string(s.rank) + " of " + std::to_string(s.size) + ")";
  const ncclResult_t result = api.commInitRankConfig(&comm, s.size, id, s.rank, &config);
  if (result != ncclSuccess && result != ncclInProgress && comm != nullptr) {
    (void)api.commAbort(comm); // the error below is what matters
  }
  nccl::check(api, result, labelled(s.label, what), comm);
  self->adopt(comm, what, deadline);
  return self;
}

std::unique_ptr<NcclComm> NcclComm::split(NcclCommSpec spec, NcclComm& parent) {
  std::unique_ptr<NcclComm> self(new NcclComm(std::move(spec)));
  const NcclCommSpec& s = self->spec_;
  const auto deadline = std::chrono::steady_clock::now() + s.creationBound();
  NcclApi& api = self->nccl();
  const std::string what = "ncclCommSplit of " + parent.spec_.label;
  DeviceScope device(*s.apis.cuda, s.device);
  ncclConfig_t config = nccl::makeConfig(s.settings, nccl::usableVersion(api), s.label);
  config.blocking = s.blocking ? 1 : 0;
  // The parent is nonblocking: NCCL writes the child here from its own
  // thread when the split is done, after the call returned.
  auto slot = std::make_unique<ncclComm_t>(nullptr);
  {
    std::lock_guard<std::mutex> lock(parent.mutex_);
    if (parent.comm_ == nullptr || parent.aborted()) {
      throw PoolClosedError(
          s.label + ": cannot split " + parent.spec_.label + ": it was " +
          (parent.aborted() ? "aborted" : "destroyed"));
    }
    // One color for all members: the child has exactly the parent's ranks,
    // in the same order (key = rank).
    const ncclResult_t result = api.commSplit(
        parent.comm_, /*color=*/0, /*key=*/s.rank, slot.get(), &config);
    // A nonblocking parent's split answers ncclSuccess while it still runs
    // (NCCL 2.28.9 and 2.30.7 ncclCommSplit returns ncclCommInitChildComm's
    // result, not the group end's ncclInProgress): only the parent's
    // asynchronous state says when the child was written, so it is polled
    // whatever the call answered. A blocking parent's state is final at once.
    ncclResult_t state = result;
    if (result == ncclSuccess || result == ncclInProgress) {
      state = pollAsyncState(api, parent.comm_, timeLeft(deadline), &parent.abortRequested_);
    }
    if (state != ncclSuccess) {
      // NCCL may still be splitting: neither the parent nor the slot can be
      // trusted or freed.
      const bool aborted = state == ncclInProgress && parent.abortRequested_.load();
      std::string message = aborted
          ? labelled(s.label, what) + " was ended by an abort (" + parent.abortReason() + ")"
          : state == ncclInProgress
          ? labelled(s.label, what) + " did not complete within " +
              timeoutText(s.creationBound()) +
              "; every member must duplicate the group with the same role"
          : labelled(s.label, what) + " failed: " + nccl::errorText(api, state) +
              " (NCCL: " + nccl::lastError(api, parent.comm_) + ")";
      ncclComm_t* written = slot.get();
      keepForNccl<ncclComm_t>(std::move(slot));
      parent.requestAbort(message);
      parent.releaseLocked(/*abort=*/true);
      // The parent's abort joined the split's job, which writes a split that
      // did not complete as a half-built child (NCCL 2.30.7 src/init.cc,
      // ncclCommInitRankFunc's fail path): only ncclCommAbort frees it, and
      // only now, after the parent that points at its abort flag is gone.
      if (ncclComm_t child = __atomic_load_n(written, __ATOMIC_ACQUIRE); child != nullptr) {
        (void)api.commAbort(child);
      }
      if (aborted) {
        throw PoolClosedError(message);
      }
      if (state == ncclInProgress) {
        throw CollectiveTimeoutError(message);
      }
      throw CollectiveError(message);
    }
  }
  // NCCL's thread wrote the slot before the parent's state left
  // ncclInProgress (an atomic release store).
  ncclComm_t child = __atomic_load_n(slot.get(), __ATOMIC_ACQUIRE);
  if (child == nullptr) {
    throw CollectiveError(labelled(s.label, what) + " returned no communicator");
  }
  self->adopt(child, what, deadline);
  return self;
}

NcclComm::~NcclComm() {
  // Finalizing here could wait for peers; a communicator nobody destroyed is
  // abandoned, so it is aborted.
  abort("the communicator was dropped without destroy()");
}

int64_t NcclComm::liveCount() {
  return liveComms.load();
}

std::string NcclComm::abortReason() const {
  std::lock_guard<std::mutex> lock(reasonMutex_);
  return abortReason_;
}

void NcclComm::requestAbort(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(reasonMutex_);
    if (abortReason_.empty()) {
      abortReason_ = reason;
    }
  }
  abortRequested_.store(true); // ends a poll in enqueue()/destroy()/split()
}

void NcclComm::settleLocked(const std::string& what) {
  const auto bound = timeout();
  const ncclResult_t state = pollAsyncState(nccl(), comm_, bound, &abortRequested_);
  if (state == ncclInProgress) {
    if (abortRequested_.load()) {
      throw PoolClosedError(
          labelled(spec_.label, what) + " was ended by an abort (" + abortReason() + ")");
    }
    throw CollectiveTimeoutError(
        spec_.label + ": NCCL did not take " + what + " within " +
        timeoutText(bound) +
        "; a peer may be gone or may not have issued the same call (NCCL "
        "connects the peers at a communicator's first op, which waits until "
        "every peer issued theirs)");
  }
  nccl::check(nccl(), state, labelled(spec_.label, what), comm_);
}

void NcclComm::enqueue(
    const std::string& what,
    const std::function<ncclResult_t(ncclComm_t)>& calls) {
  std::lock_guard<std::mutex> lock(mutex_);
  enqueueLocked(what, calls);
}

ncclResult_t NcclComm::callLocked(
    const std::string& what,
    const std::function<ncclResult_t(ncclComm_t)>& calls) {
  if (comm_ == nullptr || abortRequested_.load()) {
    throw PoolClosedError(
        labelled(spec_.label, what) + ": the NCCL communicator was " +
        (abortRequested_.load() ? "aborted (" + abortReason() + ")" : "destroyed"));
  }
  settleLaunchLocked();
  return nccl::check(nccl(), calls(comm_), labelled(spec_.label, what), comm_);
}

void NcclComm::enqueueLocked(
    const std::string& what,
    const std::function<ncclResult_t(ncclComm_t)>& calls) {
  DeviceScope device(*spec_.apis.cuda, spec_.device);
  if (callLocked(what, calls) == ncclInProgress) {
    settleLocked(what);
  }
}

void NcclComm::launch(
    const std::string& what,
    const std::function<ncclResult_t(ncclComm_t)>& calls,
    std::function<void()> onTaken) {
  std::lock_guard<std::mutex> lock(mutex_);
  DeviceScope device(*spec_.apis.cuda, spec_.device);
  if (callLocked(what, calls) == ncclInProgress) {
    if (spec_.launchInProgramOrder) {
      settleLocked(what); // throws if NCCL failed it or did not take it in time
      onTaken();
      return;
    }
    pendingLaunch_ = PendingLaunch{what, std::move(onTaken)};
  } else {
    onTaken(); // a blocking communicator launched on this thread
  }
}

void NcclComm::settle() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return;
  }
  DeviceScope device(*spec_.apis.cuda, spec_.device);
  settleLaunchLocked();
}

void NcclComm::settleLaunchLocked() {
  if (!pendingLaunch_) {
    return;
  }
  PendingLaunch launch = takePendingLaunchLocked();
  settleLocked(launch.what); // throws if NCCL failed it or did not take it in time
  launch.onTaken();
}

NcclComm::PendingLaunch NcclComm::takePendingLaunchLocked() {
  PendingLaunch launch = std::move(*pendingLaunch_);
  pendingLaunch_.reset();
  return launch;
}

std::optional<ncclResult_t> NcclComm::tryAsyncError() {
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    return std::nullopt;
  }
  if (comm_ == nullptr) {
    return ncclSuccess;
  }
  ncclResult_t state = ncclSuccess;
  const ncclResult_t result = nccl().commGetAsyncError(comm_, &state);
  if (result == ncclSuccess && state == ncclSuccess && pendingLaunch_) {
    DeviceScope device(*spec_.apis.cuda, spec_.device);
    takePendingLaunchLocked().onTaken();
  }
  return result != ncclSuccess ? result : state;
}

void NcclComm::registerBuffer(void* buffer, size_t bytes, bool symmetric) {
  const std::string what = std::string(symmetric ? "ncclCommWindowRegister" : "ncclCommRegister") +
      " of " + std::to_string(bytes) + " bytes";
  if (symmetric && nccl::loadedVersion(nccl()) < ncclVersionCode(2, 27, 0)) {
    throw UnsupportedOpError(
        spec_.label + ": symmetric registration needs NCCL 2.27, loaded " +
        ncclVersionText(nccl::loadedVersion(nccl())));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (registrations_.count(buffer)) {
    return;
  }
  // On a nonblocking communicator ncclCommWindowRegister returns
  // ncclSuccess at once and NCCL's thread writes the window when every rank
  // registered (NCCL 2.30.7 src/dev_runtime.cc): the slot is on the heap,
  // kept for NCCL if the registration does not complete, and the
  // registration is settled even when the call answered ncclSuccess.
  auto slot = std::make_unique<void*>(nullptr);
  try {
    enqueueLocked(what, [&](ncclComm_t comm) {
      return symmetric
          ? nccl().commWindowRegister(comm, buffer, bytes, slot.get(), /*NCCL_WIN_COLL_SYMMETRIC*/ 1)
          : nccl().commRegister(comm, buffer, bytes, slot.get());
    });
    if (symmetric) {
      settleLocked(what);
    }
  } catch (...) {
    keepForNccl(std::move(slot));
    throw;
  }
  if (*slot == nullptr && symmetric) {
    // NCCL answers success with no window when the communicator has no
    // symmetric memory support (src/dev_runtime.cc). A plain registration's
    // null handle is NCCL declining to register (NCCL_LOCAL_REGISTER=0, or
    // P2P through cudaMemcpy; src/register/register.cc): collectives then
    // copy through NCCL's own buffers, as with ProcessGroupNCCL, and the
    // null handle is what deregistration takes back.
    throw UnsupportedOpError(
        labelled(spec_.label, what) + ": NCCL gave no window (this communicator "
        "has no symmetric memory support)");
  }
  registrations_.emplace(buffer, Registration{*slot, symmetric});
}

void NcclComm::deregisterBuffer(void* buffer) {
  std::lock_guard<std::mutex> lock(mutex_);
  deregisterLocked(buffer);
}

void NcclComm::deregisterLocked(void* buffer) {
  auto it = registrations_.find(buffer);
  if (it == registrations_.end()) {
    return;
  }
  const Registration r = it->second;
  registrations_.erase(it);
  enqueueLocked(
      r.symmetric ? "ncclCommWindowDeregister" : "ncclCommDeregister",
      [&](ncclComm_t comm) {
        return r.symmetric ? nccl().commWindowDeregister(comm, r.handle)
                           : nccl().commDeregister(comm, r.handle);
      });
}

size_t NcclComm::registeredBuffers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return registrations_.size();
}

bool NcclComm::isRegistered(void* buffer) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return registrations_.count(buffer) != 0;
}

std::string NcclComm::lastError() {
  std::lock_guard<std::mutex> lock(mutex_);
  return comm_ == nullptr ? "" : nccl::lastError(nccl(), comm_);
}

void NcclComm::destroy() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return;
  }
  DeviceScope device(*spec_.apis.cuda, spec_.device, DeviceScope::Errors::Quiet);
  try {
    settleLaunchLocked();
    while (!registrations_.empty()) {
      deregisterLocked(registrations_.begin()->first);
    }
    if (nccl::check(nccl(), nccl().commFinalize(comm_), spec_.label + ": ncclCommFinalize", comm_) ==
        ncclInProgress) {
      settleLocked("ncclCommFinalize");
    }
  } catch (const PycommError& e) {
    // Finalize could not flush (a peer gone, or past the timeout): nothing
    // more can be delivered, so free without waiting.
    requestAbort(e.what());
    releaseLocked(/*abort=*/true);
    throw;
  }
  releaseLocked(/*abort=*/false);
}

void NcclComm::abort(const std::string& reason) noexcept {
  try {
    requestAbort(reason);
  } catch (...) {
    abortRequested_.store(true); // no memory for the reason: abort anyway
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) {
    return;
  }
  DeviceScope device(*spec_.apis.cuda, spec_.device, DeviceScope::Errors::Quiet);
  releaseLocked(/*abort=*/true);
}

void NcclComm::releaseLocked(bool abort) {
  // The communicator is gone whatever NCCL answers; an error here leaves
  // nothing of ours to free, so it is not rethrown.
  (void)(abort ? nccl().commAbort(comm_) : nccl().commDestroy(comm_));
  comm_ = nullptr;
  pendingLaunch_.reset(); // never taken: its event is never recorded
  registrations_.clear(); // NCCL frees them with the communicator
  liveComms.fetch_sub(1);
}

} // namespace pycomm
