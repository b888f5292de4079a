#include "comm_pool.h"

#include <algorithm>
#include <exception>
#include <system_error>
#include <thread>

#include "errors.h"

namespace pycomm {

const std::vector<std::string>& CommPool::roles() {
  static const std::vector<std::string> known{"ag", "rs"};
  return known;
}

void CommPool::checkRole(const std::string& role) {
  const auto& known = roles();
  if (std::find(known.begin(), known.end(), role) == known.end()) {
    std::string allowed;
    for (const auto& r : known) {
      allowed += (allowed.empty() ? "'" : ", '") + r + "'";
    }
    throw UnknownRoleError(
        "unknown role '" + role + "'; a pooled group's role is one of " +
        allowed);
  }
}

CommPool::~CommPool() {
  try {
    destroy(/*wait=*/false);
  } catch (const std::exception&) {
    // destroy() closed every backend before rethrowing; nothing is left.
  }
}

void CommPool::throwIfClosed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!closedReason_.empty()) {
    throw PoolClosedError(
        "this CommPool was " + closedReason_ + "; create a new CommPool");
  }
}

void CommPool::add(c10::intrusive_ptr<PooledBackend> backend) {
  const auto& spec = backend->spec();
  checkRole(spec.role);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!closedReason_.empty()) {
    throw PoolClosedError(
        "this CommPool was " + closedReason_ + "; create a new CommPool");
  }
  Key key{spec.baseGroupName, spec.role};
  if (entries_.count(key)) {
    throw PycommError(spec.label() + " is already in this pool");
  }
  entries_.emplace(std::move(key), std::move(backend));
}

c10::intrusive_ptr<PooledBackend> CommPool::find(
    const std::string& baseGroupName,
    const std::string& role) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find({baseGroupName, role});
  return it == entries_.end() ? c10::intrusive_ptr<PooledBackend>()
                              : it->second;
}

c10::intrusive_ptr<PooledBackend> CommPool::remove(
    const std::string& baseGroupName,
    const std::string& role) {
  c10::intrusive_ptr<PooledBackend> backend;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find({baseGroupName, role});
    if (it == entries_.end()) {
      return backend;
    }
    backend = std::move(it->second);
    entries_.erase(it);
  }
  backend->close(); // outside the lock: it may wait for queued ops
  return backend;
}

std::vector<c10::intrusive_ptr<PooledBackend>> CommPool::entries() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<c10::intrusive_ptr<PooledBackend>> all;
  for (const auto& [key, backend] : entries_) {
    all.push_back(backend);
  }
  return all;
}

std::vector<c10::intrusive_ptr<PooledBackend>> CommPool::takeAll() {
  std::vector<c10::intrusive_ptr<PooledBackend>> all;
  for (auto& [key, backend] : entries_) {
    all.push_back(std::move(backend));
  }
  entries_.clear();
  return all;
}

void CommPool::destroy(bool wait) {
  std::vector<c10::intrusive_ptr<PooledBackend>> all;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closedReason_.empty()) {
      closedReason_ = "destroyed";
    }
    all = takeAll();
  }
  // Every backend is closed even if one fails; the first error is reported.
  std::exception_ptr first;
  for (auto& backend : all) {
    try {
      backend->close(wait);
    } catch (...) {
      if (!first) {
        first = std::current_exception();
      }
    }
  }
  if (first) {
    std::rethrow_exception(first);
  }
}

void CommPool::abort() {
  std::vector<c10::intrusive_ptr<PooledBackend>> all;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closedReason_.empty()) {
      closedReason_ = "aborted";
    }
    all = takeAll();
  }
  abortDeviceLanesAtOnce(all);
  for (auto& backend : all) {
    backend->abort(); // its device lane is aborted already: the CPU side
  }
}

void CommPool::abortDeviceLanesAtOnce(
    const std::vector<c10::intrusive_ptr<PooledBackend>>& backends) {
  // An NCCL abort waits for its communicator's stream, which may wait behind
  // another lane's hung op (a caller's stream joins the two): one lane at a
  // time would wait for that op's timeout. So every lane aborts at once, each
  // on a thread of its own.
  std::vector<std::shared_ptr<DeviceLane>> lanes;
  for (const auto& backend : backends) {
    if (auto lane = backend->deviceLane()) {
      lanes.push_back(std::move(lane));
    }
  }
  std::vector<std::thread> aborting;
  for (size_t i = 1; i < lanes.size(); ++i) {
    try {
      aborting.emplace_back([lane = lanes[i]] { lane->abort(); });
    } catch (const std::system_error&) {
      break; // no more threads: the rest abort on this one, in turn
    }
  }
  for (size_t i = aborting.size() + 1; i < lanes.size(); ++i) {
    lanes[i]->abort();
  }
  if (!lanes.empty()) {
    lanes.front()->abort();
  }
  for (auto& thread : aborting) {
    thread.join();
  }
}

bool CommPool::isOpen() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closedReason_.empty();
}

std::string CommPool::closedReason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closedReason_;
}

} // namespace pycomm
