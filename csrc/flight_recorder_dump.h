#pragma once
// torch's flight-recorder dump, written as ProcessGroupNCCL writes its own
// when one of its ops times out or its watchdog fails: the generic
// recorder's entries (the pooled groups', gloo's; ProcessGroupNCCL keeps
// its own entries in a recorder of its own, which it dumps itself) through
// torch's DebugInfoWriter, to TORCH_FR_DUMP_TEMP_FILE (or
// TORCH_NCCL_DEBUG_INFO_TEMP_FILE, else torch's default,
// comm_lib_trace_rank_ under torch's cache folder) followed by the rank, in
// the pickle format `python -m torch.distributed.flight_recorder.fr_trace`
// reads. One dump per process, the first failure's, as ProcessGroupNCCL
// dumps once: a later dump would replace the file that shows the first hang.
//
// Thread-safety: any thread; one process-wide lock around torch's writer,
// which has none of its own.
#include <string>

namespace pycomm {

// Whether the recorder records: TORCH_FR_BUFFER_SIZE (or
// TORCH_NCCL_TRACE_BUFFER_SIZE), read as torch reads it, is above 0; unset
// means torch's default of 2000 entries.
bool flightRecorderOn();

// Writes the dump when the recorder is on and no dump was written yet,
// saying `why` on stderr; never throws (a failed dump must not hide the
// error that asked for it). Stack traces are left out: symbolizing Python
// frames from a watchdog or gloo thread would need the GIL. Returns whether
// this call wrote it.
bool dumpFlightRecorder(int globalRank, const std::string& why) noexcept;

} // namespace pycomm
