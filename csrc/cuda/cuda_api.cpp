// The CUDA runtime and torch's CUDA helpers behind CudaApi: forwarders only.
#include "cuda_api.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>

namespace pycomm {

namespace {

c10::DeviceIndex toIndex(int device) {
  return static_cast<c10::DeviceIndex>(device);
}

// c10's device calls throw c10::Error when cudaGetDevice fails (no device):
// CudaApi reports CUDA's error instead.
template <typename Call>
cudaError_t reportingCudaError(const Call& call) {
  try {
    return call();
  } catch (const c10::Error&) {
    int ignored = -1;
    const cudaError_t error = cudaGetDevice(&ignored);
    return error != cudaSuccess ? error : cudaErrorInvalidDevice;
  }
}

class RuntimeCudaApi final : public CudaApi {
 public:
  cudaError_t getDevice(int* device) override {
    c10::DeviceIndex index = -1;
    const cudaError_t result = c10::cuda::GetDevice(&index);
    *device = index;
    return result;
  }
  cudaError_t setDevice(int device) override {
    return reportingCudaError([&] { return c10::cuda::SetDevice(toIndex(device)); });
  }
  cudaError_t restoreDevice(int device) override {
    return reportingCudaError([&] { return c10::cuda::MaybeSetDevice(toIndex(device)); });
  }
  bool hasPrimaryContext(int device) override {
    try {
      return c10::cuda::hasPrimaryContext(toIndex(device));
    } catch (const c10::Error&) {
      return false; // no such device in this process: no context either
    }
  }
  cudaError_t deviceGetStreamPriorityRange(int* least, int* greatest) override {
    return cudaDeviceGetStreamPriorityRange(least, greatest);
  }
  cudaError_t deviceGetAttribute(int* value, cudaDeviceAttr attr, int device) override {
    return cudaDeviceGetAttribute(value, attr, device);
  }
  cudaError_t memGetInfo(size_t* free, size_t* total) override {
    return cudaMemGetInfo(free, total);
  }
  cudaError_t streamCreateWithPriority(
      cudaStream_t* stream, unsigned int flags, int priority) override {
    return cudaStreamCreateWithPriority(stream, flags, priority);
  }
  cudaError_t streamDestroy(cudaStream_t stream) override {
    return cudaStreamDestroy(stream);
  }
  cudaError_t streamGetPriority(cudaStream_t stream, int* priority) override {
    return cudaStreamGetPriority(stream, priority);
  }
  cudaError_t streamIsCapturing(
      cudaStream_t stream, cudaStreamCaptureStatus* status) override {
    return cudaStreamIsCapturing(stream, status);
  }
  cudaError_t streamWaitEvent(
      cudaStream_t stream, cudaEvent_t event, unsigned int flags) override {
    return cudaStreamWaitEvent(stream, event, flags);
  }
  cudaError_t threadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) override {
    return cudaThreadExchangeStreamCaptureMode(mode);
  }
  cudaError_t eventCreateWithFlags(cudaEvent_t* event, unsigned int flags) override {
    return cudaEventCreateWithFlags(event, flags);
  }
  cudaError_t eventDestroy(cudaEvent_t event) override {
    return cudaEventDestroy(event);
  }
  cudaError_t eventRecord(cudaEvent_t event, cudaStream_t stream) override {
    return cudaEventRecord(event, stream);
  }
  cudaError_t eventQuery(cudaEvent_t event) override {
    return cudaEventQuery(event);
  }
  cudaError_t eventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) override {
    return cudaEventElapsedTime(ms, start, end);
  }
  const char* getErrorName(cudaError_t error) override {
    return cudaGetErrorName(error);
  }
  const char* getErrorString(cudaError_t error) override {
    return cudaGetErrorString(error);
  }
  cudaStream_t currentStream(int device) override {
    return at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  }
};

} // namespace

std::shared_ptr<CudaApi> runtimeCudaApi() {
  static const std::shared_ptr<CudaApi> api = std::make_shared<RuntimeCudaApi>();
  return api;
}

} // namespace pycomm
