#include "flight_recorder_dump.h"

#include <torch/csrc/distributed/c10d/FlightRecorder.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>

namespace pycomm {

bool flightRecorderOn() {
  for (const char* name : {"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}) {
    if (const char* value = std::getenv(name); value != nullptr && *value != '\0') {
      return std::atoi(value) > 0;
    }
  }
  return false;
}

bool dumpFlightRecorder(int globalRank, const std::string& why) noexcept {
  if (!flightRecorderOn()) {
    return false;
  }
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
