#include "op_timing.h"

#include <torch/csrc/distributed/c10d/Utils.hpp>

namespace pycomm {

bool opTimingRequested() {
  // torch's own reader of its boolean variables, so the same values mean
  // the same (and a value it refuses is refused here too).
  return c10d::getCvarBool({kOpTimingEnv}, false);
}

std::string opTimingOffMessage(const std::string& op) {
  return op + ": Work._get_duration() needs " + kOpTimingEnv +
      "=1 in the environment when the pooled group is made, as torch's NCCL "
      "groups need it when they are made";
}

} // namespace pycomm
