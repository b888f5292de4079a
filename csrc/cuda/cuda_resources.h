#pragma once
// Owned CUDA streams and events, and the check every CUDA call goes through.
//
// Thread-safety: CudaStream and CudaEvent are immutable handles after
// construction; CUDA allows their use from any thread.
#include <cuda_runtime_api.h>

#include <string>

namespace pycomm {

// Throws CollectiveError naming `what` and CUDA's message.
void checkCuda(cudaError_t result, const std::string& what);

// The stream priorities the device allows: `greatest` is the numerically
// lowest, i.e. the most urgent.
struct StreamPriorityRange {
  int least = 0;
  int greatest = 0;
};
StreamPriorityRange streamPriorityRange(int device);

// A non-blocking stream (it does not synchronize with the legacy default
// stream) of a given priority on the current device, destroyed with it.
class CudaStream {
 public:
  explicit CudaStream(int priority);
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  cudaStream_t get() const {
    return stream_;
  }
  int priority() const;

 private:
  cudaStream_t stream_ = nullptr;
};

// Makes `device` current for a scope and restores the previous one; never
// throws, for teardown paths (abort, destructors) where an error can only be
// ignored: if the device cannot be set, the NCCL call after it reports it.
class QuietDeviceScope {
 public:
  explicit QuietDeviceScope(int device);
  ~QuietDeviceScope();
  QuietDeviceScope(const QuietDeviceScope&) = delete;
  QuietDeviceScope& operator=(const QuietDeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// An event without timing (cheaper to record and wait on), on the current
// device, destroyed with it; CUDA releases it once pending work is done.
class CudaEvent {
 public:
  CudaEvent();
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void record(cudaStream_t stream);
  // `stream` waits on the device until the event's work is done.
  void block(cudaStream_t stream) const;
  // True once the recorded work is done; throws on a device error.
  bool query() const;
  cudaEvent_t get() const {
    return event_;
  }

 private:
  cudaEvent_t event_ = nullptr;
};

} // namespace pycomm
