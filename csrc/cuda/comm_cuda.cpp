// CUDA's lane ops: streams, events, peer reads and copies. Built only in the
// CUDA variant (DPFAST_WITH_CUDA). NOTE [Stream ordering] in comm.h states
// the rules these follow.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/PeerToPeerAccess.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <unistd.h>

#include <functional>
#include <memory>
#include <vector>

#include "../lane_ops.h"
#include "add_kernel.h"

namespace dpfast {
namespace cuda {

namespace {

c10::cuda::CUDAStream stream_of(const Lane& lane) {
  TORCH_CHECK(lane.device.is_cuda() && lane.device.has_index(), "dpfast: expected a CUDA lane with a device index, but got ",
              lane.device);
  if (lane.stream_id == -1) return c10::cuda::getCurrentCUDAStream(lane.device.index());
  return c10::cuda::CUDAStream::unpack3(lane.stream_id, lane.device.index(), c10::DeviceType::CUDA);
}

AddDType add_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return AddDType::Float32;
    case at::kDouble: return AddDType::Float64;
    case at::kHalf: return AddDType::Float16;
    case at::kBFloat16: return AddDType::BFloat16;
    case at::kChar: return AddDType::Int8;
    case at::kByte: return AddDType::UInt8;
    case at::kShort: return AddDType::Int16;
    case at::kInt: return AddDType::Int32;
    case at::kLong: return AddDType::Int64;
    default:
      TORCH_CHECK(false, "dpfast.reduce_add_: expected a float32/float64/float16/bfloat16 or integer dtype, but got ",
                  type);
  }
}

void copy_peer_async(void* dst, int dst_device, const void* src, int src_device, size_t bytes,
                     cudaStream_t stream) {
  if (bytes == 0) return;
  if (dst_device == src_device) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
  } else {
    // Goes over the peer link where access is enabled, else the driver stages it.
    C10_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_device, src, src_device, bytes, stream));
  }
}

// The event a wait records on a stream of `device`: one per device and thread, recorded again for
// every wait. cudaStreamWaitEvent waits for the record the event holds when it is called, and a
// later cudaEventRecord does not change that (CUDA runtime API, cudaEventRecord), so reuse is
// safe. An event made and destroyed per wait cost more host time than a small chunk's add: on an
// H200 (2026-11-27) reduce_add_ of 1 MiB over 2 lanes of one GPU took 111 us, over 4 lanes 186 us;
// with reuse, 72 and 101 us.
struct WaitEvent {
  cudaEvent_t event = nullptr;
  pid_t owner = 0;
  // At thread exit, perhaps after CUDA shut down or in a forked child: never throw, and leave a
  // parent's event alone (at::cuda::CUDAEvent's destructor sets the device first, which can throw).
  ~WaitEvent() {
    if (event != nullptr && owner == getpid()) (void)cudaEventDestroy(event);
  }
};

cudaEvent_t wait_event(c10::DeviceIndex device) {
  thread_local std::vector<std::unique_ptr<WaitEvent>> events;
  if (events.size() <= static_cast<size_t>(device)) events.resize(device + 1);
  auto& slot = events[device];
  if (!slot || slot->owner != getpid()) {
    slot = std::make_unique<WaitEvent>();
    c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&slot->event, cudaEventDisableTiming));
    slot->owner = getpid();
  }
  return slot->event;
}

class CudaLaneOps final : public LaneOps {
 public:
  explicit CudaLaneOps(bool allow_p2p) : allow_p2p_(allow_p2p) {}

  void wait(const Lane& consumer, const Lane& producer) override {
    auto consumer_stream = stream_of(consumer);
    auto producer_stream = stream_of(producer);
    if (consumer_stream == producer_stream) return;  // one stream is already in order
    const cudaEvent_t event = wait_event(producer_stream.device_index());
    {
      c10::cuda::CUDAGuard guard(producer_stream.device_index());
      C10_CUDA_CHECK(cudaEventRecord(event, producer_stream.stream()));
    }
    c10::cuda::CUDAGuard guard(consumer_stream.device_index());
    C10_CUDA_CHECK(cudaStreamWaitEvent(consumer_stream.stream(), event, 0));
  }

  void add_(const at::Tensor& dst, const Lane& dst_lane, const at::Tensor& src, const Lane& src_lane) override {
    const auto dst_device = dst_lane.device.index();
    const auto src_device = src_lane.device.index();
    c10::cuda::CUDAGuard guard(dst_device);
    auto stream = stream_of(dst_lane);
    const auto dtype = add_dtype(dst.scalar_type());
    // allow_p2p_ false (DPFAST_DISABLE_P2P=1) stages even between lanes of one device, so that
    // the staged path is exercised on a machine with a single GPU.
    if (allow_p2p_ && (src_device == dst_device || can_access_peer(dst_device, src_device))) {
      // The fused path: dst's kernel reads the peer's chunk directly.
      launch_add_inplace(dst.data_ptr(), src.data_ptr(), dst.numel(), dtype, stream.stream());
      return;
    }
    // Staged: copy the peer's chunk next to dst, then add locally. The staging
    // buffer is allocated on dst's stream and only used there, so freeing it
    // at the end of this call is safe under the caching allocator's rules.
    c10::cuda::CUDAStreamGuard stream_guard(stream);
    at::Tensor staging = at::empty_like(dst);
    copy_peer_async(staging.data_ptr(), dst_device, src.data_ptr(), src_device, dst.numel() * dst.element_size(),
                    stream.stream());
    launch_add_inplace(dst.data_ptr(), staging.data_ptr(), dst.numel(), dtype, stream.stream());
  }

  void copy_(const at::Tensor& dst, const Lane& dst_lane, const at::Tensor& src, const Lane& src_lane) override {
    c10::cuda::CUDAGuard guard(dst_lane.device.index());
    copy_peer_async(dst.data_ptr(), dst_lane.device.index(), src.data_ptr(), src_lane.device.index(),
                    dst.numel() * dst.element_size(), stream_of(dst_lane).stream());
  }

 private:
  bool allow_p2p_;
};

}  // namespace

std::unique_ptr<LaneOps> make_cuda_lane_ops(bool allow_p2p) { return std::make_unique<CudaLaneOps>(allow_p2p); }

bool can_access_peer(int64_t device, int64_t peer) {
  if (device == peer) return true;
  // PyTorch's own cache enables access once, so caching-allocator pools keep working.
  return at::cuda::get_p2p_access(static_cast<c10::DeviceIndex>(device), static_cast<c10::DeviceIndex>(peer));
}

void record_stream(const at::Tensor& tensor, const Lane& lane) {
  if (!tensor.is_cuda() || tensor.numel() == 0) return;
  c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), stream_of(lane));
}

void wait_all(const Lane& consumer, const std::vector<Lane>& producers) {
  CudaLaneOps ops(false);
  for (const auto& producer : producers) {
    if (producer.device.is_cuda()) ops.wait(consumer, producer);
  }
}

void with_lane_stream(const Lane& lane, const std::function<void()>& fn) {
  c10::cuda::CUDAStreamGuard guard(stream_of(lane));
  fn();
}

at::Tensor copy_to_lane(const at::Tensor& piece, const Lane& lane) {
  auto lane_stream = stream_of(lane);
  if (piece.is_cpu()) {
    // Stage through pinned memory so the host-to-device copy is asynchronous;
    // ATen records the copy's event with the pinned block, which keeps it alive.
    at::Tensor source = piece.contiguous();
    if (!source.is_pinned()) {
      at::Tensor pinned = at::empty(source.sizes(), source.options().pinned_memory(true));
      pinned.copy_(source);
      source = pinned;
    }
    c10::cuda::CUDAStreamGuard guard(lane_stream);
    at::Tensor out = at::empty(source.sizes(), source.options().device(lane.device).pinned_memory(false));
    out.copy_(source, /*non_blocking=*/true);
    return out;
  }
  TORCH_CHECK(piece.is_cuda(), "dpfast.scatter: expected a CPU or CUDA source, but got one on ", piece.device());
  const Lane source_lane{piece.device(), -1};
  at::Tensor source;
  {
    // Make the piece contiguous on the source's current stream (its producer).
    c10::cuda::CUDAGuard guard(piece.device().index());
    source = piece.contiguous();
  }
  wait_all(lane, {source_lane});
  c10::cuda::CUDAStreamGuard guard(lane_stream);
  at::Tensor out = at::empty(source.sizes(), source.options().device(lane.device));
  copy_peer_async(out.data_ptr(), lane.device.index(), source.data_ptr(), piece.device().index(),
                  source.numel() * source.element_size(), lane_stream.stream());
  record_stream(source, lane);  // read on the lane's stream, allocated on another
  return out;
}

}  // namespace cuda
}  // namespace dpfast
