// dpfast's engine: data movement between logical devices, with no Python types
// and no knowledge of modules (the front end in dpfast/ owns that).
//
// A *lane* is one logical device: a device plus, on CUDA, the stream that
// carries that lane's work. Several lanes may share one physical device
// (several replicas on one GPU, or on the CPU); nothing here assumes that a
// lane index is a device index.
//
// NOTE [Stream ordering]
// Every op starts after the work already enqueued on its lanes' streams and
// leaves its results on those streams: whatever the caller enqueues later on a
// lane's stream sees the result, with no further synchronisation. The source
// of scatter is taken as ready on the *current* stream of its device, and the
// result of gather is left on the destination lane's stream. Between lanes the
// engine orders work with events (a consumer stream waits on an event recorded
// by the producer stream) and never with a device-wide synchronisation. A
// tensor allocated under one stream and read on another is record_stream-ed
// for the reader, so the caching allocator does not hand its memory out while
// the read is in flight. On the CPU everything runs in program order.
//
// NOTE [Engine writes and version counters]
// reduce_add_, broadcast_ and the coalescing ops write into existing buffers
// below autograd (AutoDispatchBelowADInplaceOrView): replicas' parameters are
// views of those buffers, and refreshing their values must neither be recorded
// by autograd nor bump the version counters of graphs still alive.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "plan.h"

namespace dpfast {

struct Lane {
  c10::Device device;
  int64_t stream_id = 0;  // CUDA: the lane's stream (torch.cuda.Stream.stream_id); ignored on the CPU
};

struct TreeOptions {
  std::string shape = "auto";  // "auto", "chain" or "binomial" (NOTE [Tree shape] in plan.h)
  int64_t chunk_bytes = 0;     // 0: chosen by the planner
  bool allow_p2p = true;       // false: peer reads go through a staging copy (DPFAST_DISABLE_P2P)
  plan::LinkModel link;
};

// Whether this build carries the CUDA implementation.
bool cuda_built();

// Whether device `device` can read device `peer`'s memory directly, enabling
// it through PyTorch's own peer-access cache the first time (CUDA only).
bool can_access_peer(int64_t device, int64_t peer);

// Splits `tensor` along `dim` into pieces of `chunk_sizes` and puts piece i on
// lanes[i], asynchronously on that lane's stream. The first piece whose lane is
// on the source's own device is a view of the source (as torch.cuda.comm.scatter
// does); further ones there alias the source with version counters of their own
// (views where the source requires grad); the others are copies, staged through
// pinned memory from the CPU.
std::vector<at::Tensor> scatter(const at::Tensor& tensor, const std::vector<Lane>& lanes,
                                const std::vector<int64_t>& chunk_sizes, int64_t dim);

// Watches where tensors' memory is: the replicas' check for weights that a forward re-pointed
// (`self.weight.data = ...`, an RNN's flatten_parameters()), twice a step over every replica
// tensor. Tensor.data_ptr() from Python costs about 0.2 us per Parameter; this, nanoseconds.
struct PointerWatch {
  explicit PointerWatch(std::vector<at::Tensor> tensors);
  std::vector<int64_t> moved() const;  // indices of the tensors whose data_ptr() is not the first seen

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<const void*> expected_;
};

// The metadata that makes a replica's structure: dtype, sizes and device of each tensor, and
// requires_grad where asked (a buffer's; a parameter's is followed in place, not rebuilt), and
// contiguity where asked (a parameter's: its gradient's place depends on it). The
// replicas' check at every call of whether a root tensor was given other data (`p.data = ...` of
// another shape or dtype, module.to()); about 1 us a tensor from Python, nanoseconds here. It is
// handed the tensors each time: torch.utils.swap_tensors gives a Python tensor another TensorImpl.
struct MetaWatch {
  MetaWatch(const std::vector<at::Tensor>& tensors, std::vector<bool> watch_requires_grad,
            std::vector<bool> watch_contiguity);
  bool changed(const std::vector<at::Tensor>& tensors) const;  // any differs from construction

 private:
  struct Meta {
    at::ScalarType dtype;
    std::vector<int64_t> sizes;
    c10::Device device;
    bool requires_grad;
    // A weight made channels_last between steps (model.to(memory_format=...)) has the same sizes;
    // its gradient must take the new layout, which the buckets built for the old one do not give.
    bool contiguous;
  };
  std::vector<Meta> metas_;
  std::vector<bool> watch_requires_grad_;
  std::vector<bool> watch_contiguity_;
};

// Concatenates tensors[i] (ready on lanes[i]) along `dim` into a new tensor on
// destination.device, ready on destination's stream.
at::Tensor gather(const std::vector<at::Tensor>& tensors, const std::vector<Lane>& lanes, const Lane& destination,
                  int64_t dim);

// In place: buffers[root] becomes the sum of all buffers (same shape, dtype,
// contiguous; buffers[i] on lanes[i]). The other buffers are used as scratch
// and hold partial sums afterwards. A tree of peer reads and adds, pipelined
// in chunks.
void reduce_add_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes, int64_t root,
                 const TreeOptions& options);

// In place: every buffer becomes a copy of buffers[root], by the same tree in
// reverse, pipelined in chunks.
void broadcast_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes, int64_t root,
                const TreeOptions& options);

// Work enqueued on `consumer`'s stream from now on runs after the work already enqueued on
// `producer`'s (CUDA lanes; nothing on the CPU): the front end's edges between a lane and the
// caller's stream (dpfast/streams.py). By the engine's one event per device and thread, reused, and
// never destroyed in a forked child. A torch.cuda.Event kept per thread in Python is destroyed in a
// child when Python clears the parent's other threads, and destroying it there aborts the child (a
// DataLoader worker started with fork after the wrapper ran on CUDA).
void wait_lane(const Lane& consumer, const Lane& producer);

// Zeroes buffers[i] on lanes[i]'s stream, after the work already enqueued there. reduce_add_
// leaves every lane but the root's after the reads of its buffer, so the buffers it used as
// scratch can be zeroed right after it, off the caller's stream (the replicas' gradient buckets,
// ready for the next backward without a pass at the end of this one).
void zero_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes);

// Copies `tensors` one after the other into the 1-D buffer `flat` (which must
// hold at least their total number of elements, same dtype and device), on the
// current stream: one copy per bucket instead of one per tensor.
void coalesce_into(const std::vector<at::Tensor>& tensors, const at::Tensor& flat);

// The inverse of coalesce_into: copies consecutive pieces of `flat` into `tensors`.
void uncoalesce_from(const at::Tensor& flat, const std::vector<at::Tensor>& tensors);

// Points `tensor` at `flat[offset : offset + tensor.numel()]`, viewed in its shape, without
// copying and below autograd (NOTE [Engine writes and version counters]): for a replica's weight
// that a forward moved out of its flat buffer (RNNBase.flatten_parameters), while graphs that saved
// it may still be alive.
// `shape` (default: the tensor's own) at `offset`; `exact`: on a storage of its own bytes
// (NOTE [Exact storages] in comm.cpp).
void point_into(const at::Tensor& tensor, const at::Tensor& flat, int64_t offset,
                std::optional<at::IntArrayRef> shape = std::nullopt, bool exact = false);

// A tensor of `shape` at `offset` in `flat`'s memory, on a storage of exactly its bytes that keeps
// `flat` alive: a resize_ that grows it moves it to memory of its own instead of over its
// neighbours (NOTE [Exact storages] in comm.cpp). A version counter of its own, as flat_alias.
at::Tensor exact_alias(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape);

// The plan the engine would follow for a buffer of `bytes` over `num_lanes`.
plan::TreeShape resolve_shape(const TreeOptions& options, int64_t bytes, int num_lanes);
int64_t resolve_chunk_bytes(const TreeOptions& options, plan::TreeShape shape, int64_t bytes, int num_lanes);

}  // namespace dpfast
