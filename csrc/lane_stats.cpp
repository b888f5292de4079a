#include "lane_stats.h"

#include <chrono>

namespace pycomm {

int64_t LaneStats::nowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void LaneStats::record(const OpRecord& op) {
  std::lock_guard<std::mutex> lock(mutex_);
  totals_.ops += 1;
  totals_.opsByKind[static_cast<size_t>(op.kind)] += 1;
  totals_.bytes += op.bytes;
  totals_.errors += op.ok ? 0 : 1;
  totals_.busySeconds += static_cast<double>(op.endUs - op.startUs) * 1e-6;
  trace_.push_back(op);
  if (trace_.size() > kTraceCapacity) {
    trace_.pop_front();
  }
}

StatsSnapshot LaneStats::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return totals_;
}

std::vector<OpRecord> LaneStats::trace() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {trace_.begin(), trace_.end()};
}

} // namespace pycomm
