#pragma once
// The two layers the NCCL lane talks to the GPU through, handed together to
// whoever creates a lane or communicator: the real ones for users, a
// simulated GPU in the tests.
#include <memory>

#include "cuda_api.h"
#include "nccl_api.h"

namespace pycomm {

struct GpuApis {
  std::shared_ptr<CudaApi> cuda;
  std::shared_ptr<NcclApi> nccl;
};

// The CUDA runtime and the libnccl loaded (cuda_api.cpp, nccl_api.cpp).
inline GpuApis realGpuApis() {
  return GpuApis{runtimeCudaApi(), libraryNcclApi()};
}

} // namespace pycomm
