#pragma once
// The one thin layer over the CUDA runtime and torch's CUDA helpers that the
// NCCL lane uses. The lane, its communicator, work and events make every CUDA
// call through a CudaApi handed in by whoever creates them:
// runtimeCudaApi() forwards to CUDA and torch (what users get); the tests
// hand in a simulated GPU (csrc/tests/simgpu/).
//
// Thread-safety: implementations accept every call from any thread, as the
// CUDA runtime does.
#include <cuda_runtime_api.h>

#include <memory>

namespace pycomm {

class CudaApi {
 public:
  virtual ~CudaApi() = default;

  // torch's current device of the calling thread (c10::cuda::GetDevice):
  // the device a guard left as torch's target when it had no context to
  // switch to, otherwise CUDA's current device.
  virtual cudaError_t getDevice(int* device) = 0;
  // Makes `device` CUDA's (and torch's) current device for the calling
  // thread (c10::cuda::SetDevice); creates the device's primary context if
  // it has none.
  virtual cudaError_t setDevice(int device) = 0;
  // Goes back to `device` as torch's guards do on leaving
  // (c10::cuda::MaybeSetDevice): setDevice() if it has a primary context,
  // otherwise it only becomes torch's target device, so no context is made
  // on a device the thread never used, and torch still sees it current.
  virtual cudaError_t restoreDevice(int device) = 0;
  // Whether `device` has a primary context in this process (setting it
  // current would not create one); false for a device that does not exist.
  // Never throws: destructors call it.
  virtual bool hasPrimaryContext(int device) = 0;
  // Of the current device.
  virtual cudaError_t deviceGetStreamPriorityRange(int* least, int* greatest) = 0;
  virtual cudaError_t deviceGetAttribute(int* value, cudaDeviceAttr attr, int device) = 0;
  // Free and total memory of the current device.
  virtual cudaError_t memGetInfo(size_t* free, size_t* total) = 0;

  virtual cudaError_t streamCreateWithPriority(
      cudaStream_t* stream, unsigned int flags, int priority) = 0;
  virtual cudaError_t streamDestroy(cudaStream_t stream) = 0;
  virtual cudaError_t streamGetPriority(cudaStream_t stream, int* priority) = 0;
  virtual cudaError_t streamIsCapturing(
      cudaStream_t stream, cudaStreamCaptureStatus* status) = 0;
  virtual cudaError_t streamWaitEvent(
      cudaStream_t stream, cudaEvent_t event, unsigned int flags) = 0;
  virtual cudaError_t threadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) = 0;

  virtual cudaError_t eventCreateWithFlags(cudaEvent_t* event, unsigned int flags) = 0;
  virtual cudaError_t eventDestroy(cudaEvent_t event) = 0;
  virtual cudaError_t eventRecord(cudaEvent_t event, cudaStream_t stream) = 0;
  // cudaSuccess once the recorded work is done, cudaErrorNotReady before.
  virtual cudaError_t eventQuery(cudaEvent_t event) = 0;
  // Milliseconds between two passed events, both made with timing.
  virtual cudaError_t eventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) = 0;

  virtual const char* getErrorName(cudaError_t error) = 0;
  virtual const char* getErrorString(cudaError_t error) = 0;

  // torch's current stream of the calling thread on `device`
  // (at::cuda::getCurrentCUDAStream).
  virtual cudaStream_t currentStream(int device) = 0;
};

// The CUDA runtime and torch's helpers; one instance per process.
std::shared_ptr<CudaApi> runtimeCudaApi();

} // namespace pycomm
