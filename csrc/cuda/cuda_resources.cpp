#include "cuda_resources.h"

#include "errors.h"

namespace pycomm {

void checkCuda(cudaError_t result, const std::string& what) {
  if (result != cudaSuccess) {
    throw CollectiveError(
        what + " failed: " + cudaGetErrorName(result) + ": " +
        cudaGetErrorString(result));
  }
}

StreamPriorityRange streamPriorityRange(int device) {
  int current = 0;
  checkCuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) {
    checkCuda(cudaSetDevice(device), "cudaSetDevice");
  }
  StreamPriorityRange range;
  cudaError_t result =
      cudaDeviceGetStreamPriorityRange(&range.least, &range.greatest);
  if (current != device) {
    checkCuda(cudaSetDevice(current), "cudaSetDevice");
  }
  checkCuda(result, "cudaDeviceGetStreamPriorityRange");
  return range;
}

CudaStream::CudaStream(int priority) {
  checkCuda(
      cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority),
      "cudaStreamCreateWithPriority");
}

CudaStream::~CudaStream() {
  // Work still queued finishes; CUDA frees the stream afterwards. A failure
  // here cannot be reported from a destructor and leaks nothing we own.
  (void)cudaStreamDestroy(stream_);
}

int CudaStream::priority() const {
  int priority = 0;
  checkCuda(cudaStreamGetPriority(stream_, &priority), "cudaStreamGetPriority");
  return priority;
}

QuietDeviceScope::QuietDeviceScope(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) {
    previous_ = -1;
  }
  if (previous_ != device) {
    (void)cudaSetDevice(device);
  }
}

QuietDeviceScope::~QuietDeviceScope() {
  int current = -1;
  if (previous_ >= 0 && cudaGetDevice(&current) == cudaSuccess &&
      current != previous_) {
    (void)cudaSetDevice(previous_);
  }
}

CudaEvent::CudaEvent() {
  checkCuda(
      cudaEventCreateWithFlags(&event_, cudaEventDisableTiming),
      "cudaEventCreateWithFlags");
}

CudaEvent::~CudaEvent() {
  (void)cudaEventDestroy(event_);
}

void CudaEvent::record(cudaStream_t stream) {
  checkCuda(cudaEventRecord(event_, stream), "cudaEventRecord");
}

void CudaEvent::block(cudaStream_t stream) const {
  checkCuda(cudaStreamWaitEvent(stream, event_, 0), "cudaStreamWaitEvent");
}

bool CudaEvent::query() const {
  const cudaError_t result = cudaEventQuery(event_);
  if (result == cudaErrorNotReady) {
    return false;
  }
  checkCuda(result, "cudaEventQuery");
  return true;
}

} // namespace pycomm
