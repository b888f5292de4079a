#pragma once
// The CPU transport: a gloo communicator owned by one pooled group (its own
// store prefix, its own connections). torch's wheel ships no gloo headers, so
// the communicator is made through torch's Python API and reaches C++ as a
// plain c10d::Backend; only its virtual interface is used here.
//
// The hot ops complete through their gloo Work's future, on the gloo worker
// that ran them, so they wake no thread beyond gloo's own. gloo's tensor
// reduce-scatter Work has no future; it is issued as what gloo runs for one
// (an all-reduce of a copy of the input, then this rank's slice), through
// gloo's all-reduce, whose Work has one. Works without a future (gloo's list
// reduce-scatter, send, recv) are watched by the waiter thread.
//
// Thread-safety: start() and release() may be called from any thread; the
// lane calls start() for one op at a time (a send or recv frees it once
// issued), which keeps the issue order equal on every rank (gloo matches
// collectives by that order, point-to-point ops by peer and tag). The
// wrapped gloo backend is thread-safe.
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "collective.h"
#include "waiter.h"

namespace pycomm {

class CpuTransport {
 public:
  // Called exactly once per started op, with its error or null, on the
  // thread that finished it (a gloo worker, or the starting thread when the
  // op could not be issued).
  using OnDone = std::function<void(std::exception_ptr)>;

  CpuTransport(
      c10::intrusive_ptr<c10d::Backend> comm,
      std::string label,
      int64_t rank,
      int64_t size);

  // Issues `op` without waiting for it. Errors reach `onDone` as
  // CollectiveTimeoutError or CollectiveError naming the group, role and op
  // (while the caller still holds `op`), with gloo's own message. Once the
  // op completed the transport holds none of its tensors: the caller's
  // references are the last ones.
  void start(std::shared_ptr<Collective> op, OnDone onDone) const;

  // Like start(), after exchanging the op's fingerprint with every rank of
  // the group: differing ops fail with OrderMismatchError naming both.
  // `seq` is the op's position on the lane.
  void startChecked(std::shared_ptr<Collective> op, uint64_t seq, OnDone onDone)
      const;

  // Only the exchange of startChecked(): `onDone` gets null where every rank
  // issued the same op at `seq`, OrderMismatchError otherwise. For ops that
  // run on another transport (the device lane's).
  void checkOrder(std::shared_ptr<Collective> op, uint64_t seq, OnDone onDone)
      const;

  // Hands back the communicator (for the caller to drop on a thread of its
  // choosing: gloo's destructor waits for its ops in flight and joins its
  // workers) once no thread is issuing an op through it, so the reference
  // handed back is the transport's last, and stops the waiter thread. Later ops fail with
  // PoolClosedError.
  c10::intrusive_ptr<c10d::Backend> release();
  // The communicator's timeout for ops started from now on; nothing once
  // released.
  void setTimeout(std::chrono::milliseconds timeout) const;

 private:
  // How errors name an op, built only when one is raised: `prefix`, the
  // description of `op` (while it is alive), `suffix`.
  struct OpName {
    std::weak_ptr<const Collective> op;
    std::string prefix;
    std::string suffix;
    std::string text() const;
  };
  // start() of `op`, whose errors carry `name`: the order check's exchange
  // is named after the user's op it checks, not after itself.
  void startNamed(std::shared_ptr<Collective> op, OpName name, OnDone onDone) const;
  std::exception_ptr describedError(const OpName& name, std::exception_ptr error) const;

  // Calls `onEnd` when `work` ends: through its future when it has one,
  // else through the waiter thread (started on first need; gloo never needs
  // it).
  void whenDone(
      const c10::intrusive_ptr<c10d::Work>& work,
      CollectiveKind kind,
      std::function<void(std::exception_ptr)> onEnd) const;

  // The communicator while a thread uses it (issuing an op, setting the
  // timeout). The count of these lets release() wait until no such thread
  // holds a reference, so the reference it hands back is the last one.
  struct CommInUse {
    explicit CommInUse(const CpuTransport& transport);
    ~CommInUse();
    CommInUse(const CommInUse&) = delete;
    CommInUse& operator=(const CommInUse&) = delete;
    c10::intrusive_ptr<c10d::Backend> comm; // null once released
   private:
    const CpuTransport& transport_;
  };

  mutable std::mutex mutex_;
  mutable std::condition_variable commUsersGone_;
  mutable int commUsers_ = 0;
  c10::intrusive_ptr<c10d::Backend> comm_;
  // Kinds whose gloo Work was seen without a future; asking again would cost
  // a thrown c10::Error per op.
  mutable std::atomic<uint32_t> kindsWithoutFuture_{0};
  mutable std::unique_ptr<Waiter> waiter_;
  // Sends and receives without a future, each waited for on an idle waiter
  // of these (one made when none is idle): a recv waited for on the one
  // waiter thread would hold back the report of a send behind it, which
  // its peer may need before it sends what the recv waits for.
  mutable std::vector<std::unique_ptr<Waiter>> pointToPointWaiters_;
  std::string label_;
  int64_t rank_;
  int64_t size_;
};

} // namespace pycomm
