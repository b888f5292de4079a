// The CUDA runtime and torch's CUDA helpers behind CudaApi: forwarders only.
#include "cuda_api.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>

namespace pycomm {

namespace {

class RuntimeCudaApi final : public CudaApi {
 public:
  cudaError_t getDevice(int* device) override {
    return cudaGetDevice(device);
  }
  cudaError_t setDevice(int device) override {
    return cudaSetDevice(device);
  }
  bool hasPrimaryContext(int device) override {
    try {
      return c10::cuda::hasPrimaryContext(static_cast<c10::DeviceIndex>(device));
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
