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

// The grid-stride loop over elements [begin, numel), one element per load: all of a view that
// starts mid-packet, and the tail of one that does not.
template <typename T>
__device__ void add_elements(T* __restrict__ dst, const T* __restrict__ src, int64_t begin, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    dst[i] = Adder<T>::add(dst[i], src[i]);
  }
}

template <typename T>
__global__ void add_inplace_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t numel) {
  add_elements(dst, src, 0, numel);
}

// 16 bytes of T, moved by one 128-bit load or store. An add streams three
// bytes of memory per byte added; with one scalar load per element it stalls
// well short of the card's bandwidth, with 16-byte loads it reaches a copy's.
constexpr int kPacketBytes = 16;
template <typename T>
constexpr int kPerPacket = kPacketBytes / sizeof(T);
template <typename T>
struct alignas(kPacketBytes) Packet {
  T values[kPerPacket<T>];
};

// dst and src both 16-byte aligned: whole packets, then the last numel % kPerPacket elements.
template <typename T>
__global__ void add_inplace_packets_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t numel) {
  const int64_t packets = numel / kPerPacket<T>;
  auto* dst_packets = reinterpret_cast<Packet<T>*>(dst);
  const auto* src_packets = reinterpret_cast<const Packet<T>*>(src);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packets; i += stride) {
    Packet<T> sum = dst_packets[i];
    const Packet<T> addend = src_packets[i];
#pragma unroll
    for (int j = 0; j < kPerPacket<T>; ++j) sum.values[j] = Adder<T>::add(sum.values[j], addend.values[j]);
    dst_packets[i] = sum;
  }
  add_elements(dst, src, packets * kPerPacket<T>, numel);
}

bool packet_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kPacketBytes == 0;
}

constexpr int kThreads = 512;

// Enough blocks of kThreads for `units` (elements or packets), at most 4096: enough to fill the
// card, and the grid-stride loop does the rest. Peer reads over NVLink want many loads in flight,
// so be generous.
int blocks_for(int64_t units) {
  constexpr int64_t max_blocks = 4096;
  const int64_t wanted = (units + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
}

template <typename T>
void launch(void* dst, const void* src, int64_t numel, cudaStream_t stream) {
  auto* typed_dst = static_cast<T*>(dst);
  const auto* typed_src = static_cast<const T*>(src);
  if (packet_aligned(dst) && packet_aligned(src)) {
    const int64_t packets = (numel + kPerPacket<T> - 1) / kPerPacket<T>;
    add_inplace_packets_kernel<T><<<blocks_for(packets), kThreads, 0, stream>>>(typed_dst, typed_src, numel);
  } else {
    // A view that starts mid-packet (a user's chunk_bytes, an odd offset): one element per load.
    add_inplace_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(typed_dst, typed_src, numel);
  }
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
