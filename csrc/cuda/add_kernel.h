// A plain CUDA kernel launcher with no torch types, so that the one .cu file
// of the build compiles in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dpfast {
namespace cuda {

enum class AddDType { Float32, Float64, Float16, BFloat16, Int8, UInt8, Int16, Int32, Int64 };

// dst[i] += src[i] for i < numel, on `stream`. `src` may live on another
// device that dst's device can access (peer access enabled), so a peer's
// chunk is read and added without a staging copy. Checks the launch.
void launch_add_inplace(void* dst, const void* src, int64_t numel, AddDType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace dpfast
