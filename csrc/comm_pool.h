#pragma once
// The registry of pooled groups: (base group, role) -> pooled backend.
// Creation itself (the rendezvous and the torch group) is driven by the
// Python layer, which registers each backend here once torch has it.
//
// Thread-safety: every method may be called concurrently from any thread.
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "pooled_backend.h"

namespace pycomm {

class CommPool {
 public:
  // The roles a pooled group may have; anything else is UnknownRoleError.
  static const std::vector<std::string>& roles();
  static void checkRole(const std::string& role);

  CommPool() = default;
  ~CommPool();
  CommPool(const CommPool&) = delete;
  CommPool& operator=(const CommPool&) = delete;

  // Throws PoolClosedError after destroy()/abort(), PycommError when the
  // (base group, role) is taken.
  void add(c10::intrusive_ptr<PooledBackend> backend);
  // Null when absent.
  c10::intrusive_ptr<PooledBackend> find(
      const std::string& baseGroupName,
      const std::string& role) const;
  // Closes and forgets one entry; returns it (null when absent).
  c10::intrusive_ptr<PooledBackend> remove(
      const std::string& baseGroupName,
      const std::string& role);
  std::vector<c10::intrusive_ptr<PooledBackend>> entries() const;

  // Closes every entry (queued ops finish first) and refuses new ones.
  // Idempotent. Without wait (the destructor's way), queued ops finish on
  // other threads (see PooledBackend::close()).
  void destroy(bool wait = true);
  // Fails every unfinished op and refuses new entries, without waiting for
  // peers; the NCCL lanes abort at once, each on a thread of its own.
  // Idempotent; destroy() after abort() only forgets the entries.
  void abort();

  bool isOpen() const;
  // "" while open; "destroyed" or "aborted" after.
  std::string closedReason() const;
  void throwIfClosed() const;

 private:
  using Key = std::pair<std::string, std::string>;
  std::vector<c10::intrusive_ptr<PooledBackend>> takeAll();
  static void abortDeviceLanesAtOnce(
      const std::vector<c10::intrusive_ptr<PooledBackend>>& backends);

  mutable std::mutex mutex_;
  std::map<Key, c10::intrusive_ptr<PooledBackend>> entries_;
  std::string closedReason_;
};

} // namespace pycomm
