#include "flight_recorder_dump.h"

#include <torch/csrc/distributed/c10d/FlightRecorder.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>

namespace pycomm {

namespace {
// torch's FlightRecorder default when neither variable is set.
constexpr long kTorchDefaultEntries = 2000;
} // namespace

bool flightRecorderOn() {
  for (const char* name : {"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}) {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') {
      continue;
    }
    char* end = nullptr;
    errno = 0;
    const long entries = std::strtol(value, &end, 10);
    if (end == value || errno != 0) {
      return kTorchDefaultEntries > 0; // not a number: torch keeps its default
    }
    return entries > 0;
  }
  return kTorchDefaultEntries > 0;
}

bool dumpFlightRecorder(int globalRank, const std::string& why) noexcept {
  static std::mutex mutex;
  static bool dumped = false;
  if (!flightRecorderOn()) {
    return false;
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (dumped) {
    return false;
  }
  dumped = true;
  try {
    auto& writer = c10d::DebugInfoWriter::getWriter(globalRank);
    writer.write(c10d::dump_fr_trace(
        /*includeCollectives=*/true, /*includeStackTraces=*/false, /*onlyActive=*/false));
    std::fprintf(
        stderr, "pycomm: %s; flight recorder dump written to %s\n", why.c_str(),
        writer.getWriterTarget().c_str());
    return true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pycomm: %s; the flight recorder dump failed: %s\n", why.c_str(), e.what());
  } catch (...) {
    std::fprintf(stderr, "pycomm: %s; the flight recorder dump failed\n", why.c_str());
  }
  return false;
}

} // namespace pycomm
