// Internal to the engine: the few primitive steps that the tree algorithms in
// comm.cpp are written in, with one implementation per device type (the CPU's
// in comm.cpp, CUDA's in cuda/comm_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "comm.h"

namespace dpfast {

class LaneOps {
 public:
  virtual ~LaneOps() = default;
  // Work enqueued on `consumer` from now on runs after the work already enqueued on `producer`.
  virtual void wait(const Lane& consumer, const Lane& producer) = 0;
  // dst += src, on dst_lane; src lives on src_lane (possibly another device).
  virtual void add_(const at::Tensor& dst, const Lane& dst_lane, const at::Tensor& src, const Lane& src_lane) = 0;
  // dst = src, on dst_lane.
  virtual void copy_(const at::Tensor& dst, const Lane& dst_lane, const at::Tensor& src, const Lane& src_lane) = 0;
};

std::unique_ptr<LaneOps> make_cpu_lane_ops();

#ifdef DPFAST_WITH_CUDA
namespace cuda {
std::unique_ptr<LaneOps> make_cuda_lane_ops(bool allow_p2p);
bool can_access_peer(int64_t device, int64_t peer);
// Copies `piece` (any device) to a new tensor on lane.device, asynchronously
// on the lane's stream, after the work on the source's current stream.
at::Tensor copy_to_lane(const at::Tensor& piece, const Lane& lane);
// The destination's stream waits for every lane of `lanes` (gather).
void wait_all(const Lane& consumer, const std::vector<Lane>& producers);
// Runs `fn` with the lane's stream current on its device.
void with_lane_stream(const Lane& lane, const std::function<void()>& fn);
// Marks `tensor`'s memory as in use by the lane's stream (caching allocator).
void record_stream(const at::Tensor& tensor, const Lane& lane);
}  // namespace cuda
#endif

}  // namespace dpfast
