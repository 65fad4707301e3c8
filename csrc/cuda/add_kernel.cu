#include "add_kernel.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dpfast {
namespace cuda {
namespace {

template <typename T>
struct Adder {
  __device__ static T add(T a, T b) { return a + b; }
};
// Half types add in float, as ATen's add does, then round once.
template <>
struct Adder<__half> {
  __device__ static __half add(__half a, __half b) { return __float2half(__half2float(a) + __half2float(b)); }
};
template <>
struct Adder<__nv_bfloat16> {
  __device__ static __nv_bfloat16 add(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __float2bfloat16(__bfloat162float(a) + __bfloat162float(b));
  }
};

template <typename T>
__global__ void add_inplace_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    dst[i] = Adder<T>::add(dst[i], src[i]);
  }
}

// 16 bytes of T, moved by one 128-bit load or store. An add streams three
// bytes of memory per byte added; with one scalar load per element it stalls
// well short of the card's bandwidth, with 16-byte loads it reaches a copy's.
constexpr int kPacketBytes = 16;
template <typename T>
struct alignas(kPacketBytes) Packet {
  T values[kPacketBytes / sizeof(T)];
};

// dst and src both 16-byte aligned: whole packets, then the last numel % per_packet elements.
template <typename T>
__global__ void add_inplace_packets_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t numel) {
  constexpr int per_packet = kPacketBytes / sizeof(T);
  const int64_t packets = numel / per_packet;
  auto* dst_packets = reinterpret_cast<Packet<T>*>(dst);
  const auto* src_packets = reinterpret_cast<const Packet<T>*>(src);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < packets; i += stride) {
    Packet<T> sum = dst_packets[i];
    const Packet<T> addend = src_packets[i];
#pragma unroll
    for (int j = 0; j < per_packet; ++j) sum.values[j] = Adder<T>::add(sum.values[j], addend.values[j]);
    dst_packets[i] = sum;
  }
  for (int64_t i = packets * per_packet + first; i < numel; i += stride) {
    dst[i] = Adder<T>::add(dst[i], src[i]);
  }
}

bool packet_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kPacketBytes == 0;
}

template <typename T>
void launch(void* dst, const void* src, int64_t numel, cudaStream_t stream) {
  constexpr int threads = 512;
  // Enough blocks to fill the card; the grid-stride loop does the rest. Peer
  // reads over NVLink want many loads in flight, so be generous.
  constexpr int max_blocks = 4096;
  if (packet_aligned(dst) && packet_aligned(src)) {
    const int64_t packets = (numel + kPacketBytes / sizeof(T) - 1) / (kPacketBytes / sizeof(T));
    const int64_t wanted = (packets + threads - 1) / threads;
    const int blocks = static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
    add_inplace_packets_kernel<T>
        <<<blocks, threads, 0, stream>>>(static_cast<T*>(dst), static_cast<const T*>(src), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // A view that starts mid-packet (a user's chunk_bytes, an odd offset): one element per load.
  const int64_t wanted = (numel + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
  add_inplace_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(dst), static_cast<const T*>(src), numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_add_inplace(void* dst, const void* src, int64_t numel, AddDType dtype, cudaStream_t stream) {
  if (numel <= 0) return;
  switch (dtype) {
    case AddDType::Float32: return launch<float>(dst, src, numel, stream);
    case AddDType::Float64: return launch<double>(dst, src, numel, stream);
    case AddDType::Float16: return launch<__half>(dst, src, numel, stream);
    case AddDType::BFloat16: return launch<__nv_bfloat16>(dst, src, numel, stream);
    case AddDType::Int8: return launch<int8_t>(dst, src, numel, stream);
    case AddDType::UInt8: return launch<uint8_t>(dst, src, numel, stream);
    case AddDType::Int16: return launch<int16_t>(dst, src, numel, stream);
    case AddDType::Int32: return launch<int32_t>(dst, src, numel, stream);
    case AddDType::Int64: return launch<int64_t>(dst, src, numel, stream);
  }
  TORCH_CHECK(false, "dpfast.reduce_add_: unsupported dtype code ", static_cast<int>(dtype));
}

}  // namespace cuda
}  // namespace dpfast
