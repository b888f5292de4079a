#pragma once
// What one pooled group did: counters and a bounded trace of op intervals.
//
// Thread-safety: record() and the readers may be called concurrently from any
// thread (one mutex).
#include <array>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "collective.h"

namespace pycomm {

// One finished op. Times are microseconds of the system clock, so traces of
// the ranks of one host line up.
struct OpRecord {
  CollectiveKind kind;
  int64_t bytes;
  int64_t startUs;
  int64_t endUs;
  bool ok;
};

struct StatsSnapshot {
  int64_t ops = 0;
  int64_t bytes = 0;
  int64_t errors = 0;
  double busySeconds = 0.0;
  std::array<int64_t, kCollectiveKindCount> opsByKind{}; // indexed by CollectiveKind
};

class LaneStats {
 public:
  static constexpr size_t kTraceCapacity = 16384;

  void record(const OpRecord& op);
  StatsSnapshot snapshot() const;
  // The most recent ops, oldest first (at most kTraceCapacity).
  std::vector<OpRecord> trace() const;

  static int64_t nowUs();

 private:
  mutable std::mutex mutex_;
  StatsSnapshot totals_;
  std::deque<OpRecord> trace_;
};

} // namespace pycomm
