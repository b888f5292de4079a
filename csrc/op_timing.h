#pragma once
// Whether pooled groups time their ops for Work._get_duration(), as torch's
// NCCL backend does under TORCH_NCCL_ENABLE_TIMING: read when a group or lane
// is made (ProcessGroupNCCL reads it in its constructor), so a change later
// affects only groups made later.
//
// Thread-safety: stateless; reads the environment.
#include <string>

namespace pycomm {

inline constexpr const char* kOpTimingEnv = "TORCH_NCCL_ENABLE_TIMING";

// TORCH_NCCL_ENABLE_TIMING read by torch's reader of boolean variables
// (1/true/t/y/yes on, 0/false/f/n/no and unset off, anything else refused).
bool opTimingRequested();

// The error Work._get_duration() raises on a group made with timing off.
std::string opTimingOffMessage(const std::string& op);

} // namespace pycomm
