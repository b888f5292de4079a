#pragma once
// The CPU transport: a gloo communicator owned by one pooled group (its own
// store prefix, its own connections). torch's wheel ships no gloo headers, so
// the communicator is made through torch's Python API and reaches C++ as a
// plain c10d::Backend; only its virtual interface is used here.
//
// Thread-safety: run() blocks and is meant for one lane worker at a time
// (the lane gives the FIFO order); release() may be called from any thread;
// the wrapped gloo backend is thread-safe.
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <chrono>
#include <mutex>
#include <string>

#include "collective.h"

namespace pycomm {

class CpuTransport {
 public:
  CpuTransport(
      c10::intrusive_ptr<c10d::Backend> comm,
      std::string label,
      int64_t rank,
      int64_t size);

  // Runs `op` to completion. Throws CollectiveTimeoutError or CollectiveError
  // naming the group, role and op, with gloo's own message.
  void run(Collective& op) const;

  // Exchanges `op`'s fingerprint with every rank of the group and throws
  // OrderMismatchError, naming both ops, when they differ. `seq` is the op's
  // position on the lane.
  void checkOrder(const Collective& op, uint64_t seq) const;

  // Drops this transport's reference to the communicator; an op still running
  // keeps its own until it returns. Later ops throw PoolClosedError.
  void release();

 private:
  void runOne(c10d::Backend& comm, Collective& op) const;

  mutable std::mutex mutex_;
  c10::intrusive_ptr<c10d::Backend> comm_;
  std::string label_;
  int64_t rank_;
  int64_t size_;
};

} // namespace pycomm
