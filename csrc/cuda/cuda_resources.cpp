#include "cuda_resources.h"

#include "errors.h"

#include <utility>

namespace pycomm {

void checkCuda(CudaApi& api, cudaError_t result, const std::string& what) {
  if (result != cudaSuccess) {
    throw CollectiveError(
        what + " failed: " + api.getErrorName(result) + ": " +
        api.getErrorString(result));
  }
}

DeviceScope::DeviceScope(CudaApi& api, int device, Errors errors) : api_(api) {
  int current = -1;
  const cudaError_t got = api_.getDevice(&current);
  // Set even when torch reports `device` current already: that may be only
  // torch's target, with CUDA's current device elsewhere.
  const cudaError_t set = api_.setDevice(device);
  if (got == cudaSuccess && current != device) {
    previous_ = current;
  }
  if (errors == Errors::Throw) {
    checkCuda(api_, got, "cudaGetDevice");
    checkCuda(api_, set, "cudaSetDevice");
  }
}

DeviceScope::~DeviceScope() {
  if (previous_ >= 0) {
    (void)api_.restoreDevice(previous_);
  }
}

StreamPriorityRange streamPriorityRange(CudaApi& api, int device) {
  DeviceScope scope(api, device);
  StreamPriorityRange range;
  checkCuda(
      api,
      api.deviceGetStreamPriorityRange(&range.least, &range.greatest),
      "cudaDeviceGetStreamPriorityRange");
  return range;
}

CudaStream::CudaStream(std::shared_ptr<CudaApi> api, int priority)
    : api_(std::move(api)) {
  checkCuda(
      *api_,
      api_->streamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority),
      "cudaStreamCreateWithPriority");
}

CudaStream::~CudaStream() {
  // Work still queued finishes; CUDA frees the stream afterwards. A failure
  // here cannot be reported from a destructor and leaks nothing we own.
  (void)api_->streamDestroy(stream_);
}

int CudaStream::priority() const {
  int priority = 0;
  checkCuda(*api_, api_->streamGetPriority(stream_, &priority), "cudaStreamGetPriority");
  return priority;
}

CudaEvent::CudaEvent(std::shared_ptr<CudaApi> api, bool timed) : api_(std::move(api)) {
  checkCuda(
      *api_,
      api_->eventCreateWithFlags(&event_, timed ? cudaEventDefault : cudaEventDisableTiming),
      "cudaEventCreateWithFlags");
}

CudaEvent::~CudaEvent() {
  (void)api_->eventDestroy(event_);
}

void CudaEvent::record(cudaStream_t stream) {
  checkCuda(*api_, api_->eventRecord(event_, stream), "cudaEventRecord");
}

void CudaEvent::block(cudaStream_t stream) const {
  checkCuda(*api_, api_->streamWaitEvent(stream, event_, 0), "cudaStreamWaitEvent");
}

float CudaEvent::millisecondsSince(const CudaEvent& start) const {
  float ms = 0.0f;
  checkCuda(*api_, api_->eventElapsedTime(&ms, start.event_, event_), "cudaEventElapsedTime");
  return ms;
}

bool CudaEvent::query() const {
  const cudaError_t result = api_->eventQuery(event_);
  if (result == cudaErrorNotReady) {
    return false;
  }
  checkCuda(*api_, result, "cudaEventQuery");
  return true;
}

std::shared_ptr<EndEvent> EndEventPool::take() {
  std::unique_ptr<EndEvent> event;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      event = std::move(free_.back());
      free_.pop_back();
    }
  }
  if (!event) {
    event = std::make_unique<EndEvent>(api_, timed_);
  }
  event->reset();
  std::weak_ptr<EndEventPool> pool = weak_from_this();
  return std::shared_ptr<EndEvent>(event.release(), [pool](EndEvent* e) {
    if (auto self = pool.lock()) {
      self->giveBack(e);
    } else {
      delete e;
    }
  });
}

void EndEventPool::giveBack(EndEvent* event) {
  std::unique_ptr<EndEvent> owned(event);
  std::lock_guard<std::mutex> lock(mutex_);
  if (free_.size() < kKept) {
    free_.push_back(std::move(owned));
  }
}

} // namespace pycomm
