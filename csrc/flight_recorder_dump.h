#pragma once
// torch's flight-recorder dump, written where and as ProcessGroupNCCL writes
// it when one of its ops times out or its watchdog fails: the recorder's
// entries (the pooled groups' own and every other group's) through torch's
// DebugInfoWriter, to TORCH_FR_DUMP_TEMP_FILE (or
// TORCH_NCCL_DEBUG_INFO_TEMP_FILE, else /tmp/nccl_trace_rank_) followed by
// the rank, in the pickle format `python -m
// torch.distributed.flight_recorder.fr_trace` reads.
//
// Thread-safety: any thread; torch's writer serializes the writes.
#include <string>

namespace pycomm {

// Whether TORCH_FR_BUFFER_SIZE (or TORCH_NCCL_TRACE_BUFFER_SIZE) turns the
// recorder on.
bool flightRecorderOn();

// Writes the dump when the recorder is on, saying `why` on stderr; never
// throws (a failed dump must not hide the error that asked for it). Stack
// traces are left out: symbolizing Python frames from a watchdog or gloo
// thread would need the GIL. Returns whether a dump was written.
bool dumpFlightRecorder(int globalRank, const std::string& why) noexcept;

} // namespace pycomm
