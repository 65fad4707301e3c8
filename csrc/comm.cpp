// The engine's device-independent algorithms (scatter, gather, tree
// reduce-add and broadcast, coalescing) and the CPU's lane ops. CUDA's lane
// ops live beside this file in cuda/comm_cuda.cpp.
#include "comm.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <c10/util/strides.h>

#include <cstring>
#include <sstream>

#include "lane_ops.h"

namespace dpfast {

namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

class CpuLaneOps final : public LaneOps {
 public:
  void wait(const Lane&, const Lane&) override {}  // the CPU runs in program order
  void add_(const at::Tensor& dst, const Lane&, const at::Tensor& src, const Lane&) override { dst.add_(src); }
  void copy_(const at::Tensor& dst, const Lane&, const at::Tensor& src, const Lane&) override { dst.copy_(src); }
};

bool all_cpu(const std::vector<Lane>& lanes) {
  for (const auto& lane : lanes) {
    if (!lane.device.is_cpu()) return false;
  }
  return true;
}

bool all_cuda(const std::vector<Lane>& lanes) {
  for (const auto& lane : lanes) {
    if (!lane.device.is_cuda()) return false;
  }
  return true;
}

std::unique_ptr<LaneOps> lane_ops_for(const char* op, const std::vector<Lane>& lanes, bool allow_p2p) {
  if (all_cpu(lanes)) return make_cpu_lane_ops();
  TORCH_CHECK(all_cuda(lanes), "dpfast.", op, ": expected all lanes on CPU or all on CUDA devices, but got a mix");
#ifdef DPFAST_WITH_CUDA
  return cuda::make_cuda_lane_ops(allow_p2p);
#else
  (void)allow_p2p;
  TORCH_CHECK(false, "dpfast.", op, ": got CUDA tensors, but dpfast._C was built without CUDA (python -m dpfast.info)");
#endif
}

// The checks shared by the tree ops, worded like torch.cuda.comm's.
void check_tree_buffers(const char* op, const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes,
                        int64_t root) {
  TORCH_CHECK(!buffers.empty(), "dpfast.", op, ": expected at least one buffer, but got an empty list");
  TORCH_CHECK(buffers.size() == lanes.size(), "dpfast.", op, ": expected one lane per buffer (", buffers.size(),
              " buffers), but got ", lanes.size(), " lanes");
  TORCH_CHECK(root >= 0 && root < static_cast<int64_t>(buffers.size()), "dpfast.", op, ": expected root in [0, ",
              buffers.size(), "), but got ", root);
  const at::Tensor& first = buffers[0];
  for (size_t i = 0; i < buffers.size(); ++i) {
    const at::Tensor& b = buffers[i];
    TORCH_CHECK(b.defined(), "dpfast.", op, ": expected a tensor at buffers[", i, "], but got None");
    TORCH_CHECK(b.sizes().equals(first.sizes()), "dpfast.", op, ": expected all buffers to have shape ",
                shape_string(first), " (buffers[0]), but buffers[", i, "] has shape ", shape_string(b));
    TORCH_CHECK(b.scalar_type() == first.scalar_type(), "dpfast.", op, ": expected all buffers to have dtype ",
                first.scalar_type(), " (buffers[0]), but buffers[", i, "] has dtype ", b.scalar_type());
    TORCH_CHECK(b.is_contiguous(), "dpfast.", op, ": expected contiguous buffers, but buffers[", i,
                "] is not contiguous");
    TORCH_CHECK(b.device() == lanes[i].device, "dpfast.", op, ": expected buffers[", i, "] on lane ", i,
                "'s device ", lanes[i].device, ", but it is on ", b.device());
    TORCH_CHECK(!b.is_sparse(), "dpfast.", op, ": expected dense buffers, but buffers[", i, "] is sparse");
    for (size_t j = 0; j < i; ++j) {
      // Partial overlap too: the CUDA add kernel reads and writes through __restrict__ pointers.
      TORCH_CHECK(at::get_overlap_status(b, buffers[j]) == at::MemOverlapStatus::No, "dpfast.", op,
                  ": expected distinct buffers, but buffers[", j, "] and buffers[", i, "] share memory");
    }
  }
}

}  // namespace

std::unique_ptr<LaneOps> make_cpu_lane_ops() { return std::make_unique<CpuLaneOps>(); }

bool cuda_built() {
#ifdef DPFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool can_access_peer(int64_t device, int64_t peer) {
#ifdef DPFAST_WITH_CUDA
  return cuda::can_access_peer(device, peer);
#else
  (void)device;
  (void)peer;
  return false;
#endif
}

plan::TreeShape resolve_shape(const TreeOptions& options, int64_t bytes, int num_lanes) {
  if (options.shape == "auto") return plan::choose_tree(bytes, num_lanes, options.link);
  try {
    return plan::tree_shape_from_string(options.shape);
  } catch (const std::invalid_argument&) {
    TORCH_CHECK(false, "dpfast: tree shape: expected 'auto', 'chain' or 'binomial', but got '", options.shape, "'");
  }
}

int64_t resolve_chunk_bytes(const TreeOptions& options, plan::TreeShape shape, int64_t bytes, int num_lanes) {
  TORCH_CHECK(options.chunk_bytes >= 0, "dpfast: chunk_bytes: expected a value >= 0 (0 = automatic), but got ",
              options.chunk_bytes);
  if (options.chunk_bytes > 0) return options.chunk_bytes;
  return plan::choose_chunk_bytes(shape, bytes, num_lanes, options.link);
}

namespace {

// What reduce_add_ and broadcast_ share: the lane ops, the tree, the chunks and flat views.
struct TreeRun {
  std::unique_ptr<LaneOps> ops;
  plan::TreePlan tree;
  std::vector<plan::Chunk> chunks;
  std::vector<at::Tensor> flat;
};

// Checks the buffers and plans the run; nothing to run (one buffer, no elements) gives no ops.
TreeRun plan_tree_run(const char* op, const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes,
                      int64_t root, const TreeOptions& options) {
  check_tree_buffers(op, buffers, lanes, root);
  TreeRun run;
  const int n = static_cast<int>(buffers.size());
  const int64_t numel = buffers[0].numel();
  if (n == 1 || numel == 0) return run;
  run.ops = lane_ops_for(op, lanes, options.allow_p2p);
  const int64_t bytes = numel * buffers[0].element_size();
  const plan::TreeShape shape = resolve_shape(options, bytes, n);
  run.tree = plan::make_tree(n, static_cast<int>(root), shape);
  run.chunks = plan::make_chunks(numel, buffers[0].element_size(), resolve_chunk_bytes(options, shape, bytes, n));
  for (const auto& b : buffers) run.flat.push_back(b.dim() == 1 ? b : b.view(-1));
  return run;
}

// The part of a flat buffer that `chunk` covers: the buffer itself where the chunk is all of it
// (the CPU's case, and small buckets on CUDA), which spares a narrow() per add or copy: on the CPU,
// between two steps' compute, each ATen call costs several times its warm figure.
at::Tensor chunk_of(const at::Tensor& flat, const plan::Chunk& chunk) {
  if (chunk.begin == 0 && chunk.numel == flat.numel()) return flat;
  return flat.narrow(0, chunk.begin, chunk.numel);
}

}  // namespace

void reduce_add_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes, int64_t root,
                 const TreeOptions& options) {
  TORCH_CHECK(buffers.empty() || !buffers[0].defined() ||
                  (buffers[0].scalar_type() != at::kBool && !buffers[0].is_complex()),
              "dpfast.reduce_add_: expected a real floating-point or integer dtype, but got ", buffers[0].scalar_type());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // NOTE [Engine writes and version counters]
  TreeRun run = plan_tree_run("reduce_add_", buffers, lanes, root, options);
  if (!run.ops) return;
  // Chunk-major order: each lane's stream receives its chunks in order, so a
  // parent adds chunk c while its child already works on chunk c + 1.
  for (const plan::Chunk& chunk : run.chunks) {
    for (const auto& round : run.tree.rounds) {
      for (const plan::Edge& edge : round) {
        run.ops->wait(lanes[edge.parent], lanes[edge.child]);
        run.ops->add_(chunk_of(run.flat[edge.parent], chunk), lanes[edge.parent], chunk_of(run.flat[edge.child], chunk),
                      lanes[edge.child]);
      }
    }
  }
  // A child's buffer is read by its parent: later work on the child's lane
  // (the caller zeroing it, say) must wait for those reads.
  for (const auto& round : run.tree.rounds) {
    for (const plan::Edge& edge : round) run.ops->wait(lanes[edge.child], lanes[edge.parent]);
  }
}

void broadcast_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes, int64_t root,
                const TreeOptions& options) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // NOTE [Engine writes and version counters]
  TreeRun run = plan_tree_run("broadcast_", buffers, lanes, root, options);
  if (!run.ops) return;
  for (const plan::Chunk& chunk : run.chunks) {
    for (auto round = run.tree.rounds.rbegin(); round != run.tree.rounds.rend(); ++round) {
      for (const plan::Edge& edge : *round) {
        run.ops->wait(lanes[edge.child], lanes[edge.parent]);
        run.ops->copy_(chunk_of(run.flat[edge.child], chunk), lanes[edge.child], chunk_of(run.flat[edge.parent], chunk),
                       lanes[edge.parent]);
      }
    }
  }
  // A parent's buffer is read by its children: later writes on the parent's
  // lane (the next step's parameters) must wait for those reads.
  for (const auto& round : run.tree.rounds) {
    for (const plan::Edge& edge : round) run.ops->wait(lanes[edge.parent], lanes[edge.child]);
  }
}

std::vector<at::Tensor> scatter(const at::Tensor& tensor, const std::vector<Lane>& lanes,
                                const std::vector<int64_t>& chunk_sizes, int64_t dim) {
  TORCH_CHECK(tensor.defined(), "dpfast.scatter: expected a tensor, but got None");
  TORCH_CHECK(!lanes.empty(), "dpfast.scatter: expected at least one lane, but got an empty list");
  TORCH_CHECK(chunk_sizes.size() == lanes.size(), "dpfast.scatter: expected one chunk size per lane (", lanes.size(),
              " lanes), but got ", chunk_sizes.size(), " chunk sizes");
  TORCH_CHECK(tensor.dim() > 0, "dpfast.scatter: expected a tensor with at least one dimension, but got a 0-dim tensor");
  TORCH_CHECK(dim >= -tensor.dim() && dim < tensor.dim(), "dpfast.scatter: expected dim in [", -tensor.dim(), ", ",
              tensor.dim(), ") for a tensor of shape ", shape_string(tensor), ", but got ", dim);
  const int64_t wrapped_dim = dim < 0 ? dim + tensor.dim() : dim;
  int64_t total = 0;
  for (size_t i = 0; i < chunk_sizes.size(); ++i) {
    TORCH_CHECK(chunk_sizes[i] >= 0, "dpfast.scatter: expected non-negative chunk sizes, but chunk_sizes[", i,
                "] is ", chunk_sizes[i]);
    total += chunk_sizes[i];
  }
  TORCH_CHECK(total == tensor.size(wrapped_dim), "dpfast.scatter: expected chunk sizes that sum to the size of dim ",
              wrapped_dim, " (", tensor.size(wrapped_dim), "), but they sum to ", total);
  std::vector<at::Tensor> pieces;
  pieces.reserve(lanes.size());
  int64_t offset = 0;
  bool viewed = false;  // a piece on the source's device was already given as a view
  // On the source's device a piece is a view, as torch.cuda.comm.scatter gives there. Further
  // pieces on that device (several replicas on one device) alias the source with a version
  // counter of their own, as the copies on other devices have: a replica that writes its chunk in
  // place (`x /= 255` in forward) must not invalidate what another replica saved from its chunk.
  // A source that requires grad keeps views: autograd then checks in-place writes to them.
  // Under vmap (torch.autograd.functional.jacobian(vectorize=True) and is_grads_batched use the
  // legacy one, torch.func the other) the source is a batched wrapper, for which alias() has no
  // batching rule: views there too.
  const c10::DispatchKeySet keys = tensor.key_set();
  const bool functorch_wrapped = keys.has(c10::DispatchKey::Batched) || keys.has(c10::DispatchKey::FuncTorchBatched) ||
                                 keys.has(c10::DispatchKey::FuncTorchGradWrapper);
  auto on_source_device = [&](const at::Tensor& piece) {
    if (!viewed || tensor.requires_grad() || functorch_wrapped) {
      viewed = true;
      return piece;
    }
    // Below autograd's view tracking, alias() makes a tensor of the same memory, keys (a lazy
    // conjugate or negation included) and layout, with a version counter of its own.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return at::alias(piece);
  };
  for (size_t i = 0; i < lanes.size(); ++i) {
    at::Tensor piece = tensor.narrow(wrapped_dim, offset, chunk_sizes[i]);
    offset += chunk_sizes[i];
    if (lanes[i].device == tensor.device() && tensor.is_cpu()) {
      pieces.push_back(on_source_device(piece));
      continue;
    }
#ifdef DPFAST_WITH_CUDA
    if (lanes[i].device.is_cuda()) {
      if (lanes[i].device == tensor.device()) {
        // The lane's stream must see the source's producer.
        cuda::wait_all(lanes[i], {Lane{tensor.device(), -1}});
        cuda::record_stream(tensor, lanes[i]);
        pieces.push_back(on_source_device(piece));
      } else {
        pieces.push_back(cuda::copy_to_lane(piece, lanes[i]));
      }
      continue;
    }
#endif
    TORCH_CHECK(lanes[i].device.is_cpu(), "dpfast.scatter: lane ", i, " is on ", lanes[i].device,
                ", but dpfast._C was built without CUDA");
    pieces.push_back(piece.to(lanes[i].device, /*non_blocking=*/false, /*copy=*/true));
  }
  return pieces;
}

at::Tensor gather(const std::vector<at::Tensor>& tensors, const std::vector<Lane>& lanes, const Lane& destination,
                  int64_t dim) {
  TORCH_CHECK(!tensors.empty(), "dpfast.gather: expected at least one tensor, but got an empty list");
  TORCH_CHECK(tensors.size() == lanes.size(), "dpfast.gather: expected one lane per tensor (", tensors.size(),
              " tensors), but got ", lanes.size(), " lanes");
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.dim() > 0, "dpfast.gather: expected tensors with at least one dimension, but tensors[0] is 0-dim");
  TORCH_CHECK(dim >= -first.dim() && dim < first.dim(), "dpfast.gather: expected dim in [", -first.dim(), ", ",
              first.dim(), "), but got ", dim);
  const int64_t wrapped_dim = dim < 0 ? dim + first.dim() : dim;
  std::vector<int64_t> out_sizes = first.sizes().vec();
  out_sizes[wrapped_dim] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.dim() == first.dim(), "dpfast.gather: expected all tensors to have ", first.dim(),
                " dimensions (tensors[0]), but tensors[", i, "] has ", t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(d == wrapped_dim || t.size(d) == first.size(d), "dpfast.gather: expected all tensors to match ",
                  shape_string(first), " (tensors[0]) in every dimension but ", wrapped_dim, ", but tensors[", i,
                  "] has shape ", shape_string(t));
    }
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "dpfast.gather: expected all tensors to have dtype ",
                first.scalar_type(), " (tensors[0]), but tensors[", i, "] has dtype ", t.scalar_type());
    TORCH_CHECK(t.device() == lanes[i].device, "dpfast.gather: expected tensors[", i, "] on lane ", i, "'s device ",
                lanes[i].device, ", but it is on ", t.device());
    out_sizes[wrapped_dim] += t.size(wrapped_dim);
  }
  if (destination.device.is_cpu() && all_cpu(lanes)) return at::cat(tensors, wrapped_dim);
#ifdef DPFAST_WITH_CUDA
  if (destination.device.is_cuda()) {
    cuda::wait_all(destination, lanes);
    at::Tensor out;
    cuda::with_lane_stream(destination, [&] {
      out = at::empty(out_sizes, first.options().device(destination.device));
      int64_t offset = 0;
      for (size_t i = 0; i < tensors.size(); ++i) {
        const int64_t size = tensors[i].size(wrapped_dim);
        // Same device: the copy runs on the destination's stream. Another
        // device: ATen copies on the source's current stream and orders it
        // against the destination's; make that the source lane's stream.
        if (tensors[i].device() == destination.device) {
          cuda::record_stream(tensors[i], destination);
          out.narrow(wrapped_dim, offset, size).copy_(tensors[i], /*non_blocking=*/true);
        } else {
          cuda::with_lane_stream(lanes[i], [&] { out.narrow(wrapped_dim, offset, size).copy_(tensors[i], true); });
        }
        offset += size;
      }
    });
    return out;
  }
#endif
  // A CPU destination (output_device=-1) for CUDA lanes: each blocking copy runs on its lane's
  // stream, so it reads the tensor after the lane wrote it.
  std::vector<at::Tensor> moved;
  for (size_t i = 0; i < tensors.size(); ++i) {
#ifdef DPFAST_WITH_CUDA
    if (tensors[i].is_cuda()) {
      cuda::with_lane_stream(lanes[i], [&] { moved.push_back(tensors[i].to(destination.device)); });
      continue;
    }
#endif
    moved.push_back(tensors[i].to(destination.device));
  }
  return at::cat(moved, wrapped_dim);
}

namespace {
// tensors[i]'s dtype and device are the flat buffer's.
void check_fits_flat(const char* op, const at::Tensor& t, size_t i, const at::Tensor& flat) {
  TORCH_CHECK(t.defined(), "dpfast.", op, ": expected a tensor at tensors[", i, "], but got None");
  TORCH_CHECK(t.scalar_type() == flat.scalar_type(), "dpfast.", op, ": expected tensors of the flat buffer's dtype ",
              flat.scalar_type(), ", but tensors[", i, "] has dtype ", t.scalar_type());
  TORCH_CHECK(t.device() == flat.device(), "dpfast.", op, ": expected tensors on the flat buffer's device ",
              flat.device(), ", but tensors[", i, "] is on ", t.device());
}

int64_t check_coalesce(const char* op, const std::vector<at::Tensor>& tensors, const at::Tensor& flat) {
  TORCH_CHECK(flat.defined() && flat.dim() == 1 && flat.is_contiguous(), "dpfast.", op,
              ": expected a contiguous 1-D flat buffer, but got ", flat.defined() ? shape_string(flat) : "None");
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_fits_flat(op, tensors[i], i, flat);
    total += tensors[i].numel();
  }
  TORCH_CHECK(total <= flat.numel(), "dpfast.", op, ": expected a flat buffer of at least ", total,
              " elements (the tensors' total), but it has ", flat.numel());
  return total;
}
}  // namespace

namespace {
// Dense, contiguous memory whose bytes mean what they say: no lazy conjugate or negation bit, no
// tensor subclass's or transform's keys, no ZeroTensor (which has no memory).
bool plain_contiguous(const at::Tensor& t) {
  static const c10::DispatchKeySet not_plain({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                              c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
                                              c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize,
                                              c10::DispatchKey::ZeroTensor});
  return t.layout() == at::kStrided && t.is_contiguous() && !t.is_conj() && !t.is_neg() &&
         !t.key_set().has_any(not_plain) && (t.numel() == 0 || t.const_data_ptr() != nullptr);
}

// Where coalesce_into may copy bytes itself: CPU tensors and flat buffer all plain, no source
// overlapping the part of `flat` it fills (cat_out raises there), and little enough to copy on one
// thread, or one thread to copy with (cat_out spreads a large copy over the intra-op threads).
bool byte_copy_applies(const std::vector<at::Tensor>& tensors, const at::Tensor& flat, int64_t total) {
  const int64_t bytes = total * static_cast<int64_t>(flat.element_size());
  if (!flat.is_cpu() || !plain_contiguous(flat) || (bytes > (int64_t{1} << 20) && at::get_num_threads() > 1)) {
    return false;
  }
  const char* begin = static_cast<const char*>(flat.const_data_ptr());
  const char* end = begin + bytes;
  for (const auto& t : tensors) {
    if (!plain_contiguous(t)) return false;
    const char* data = static_cast<const char*>(t.const_data_ptr());
    const int64_t size = t.numel() * static_cast<int64_t>(t.element_size());
    if (size > 0 && data < end && begin < data + size) return false;
  }
  return true;
}
}  // namespace

void coalesce_into(const std::vector<at::Tensor>& tensors, const at::Tensor& flat) {
  const int64_t total = check_coalesce("coalesce_into", tensors, flat);
  if (tensors.empty() || total == 0) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (byte_copy_applies(tensors, flat, total)) {
    // One memcpy per tensor, no ATen call: the replicas' parameter sync at every step on CPU lanes.
    char* out = static_cast<char*>(flat.data_ptr());
    for (const auto& t : tensors) {
      const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
      if (bytes > 0) std::memcpy(out, t.const_data_ptr(), bytes);
      out += bytes;
    }
    return;
  }
  std::vector<at::Tensor> pieces;
  pieces.reserve(tensors.size());
  for (const auto& t : tensors) pieces.push_back(t.reshape(-1));
  at::Tensor target = flat.narrow(0, 0, total);
  at::cat_out(target, pieces, 0);  // one batched copy kernel on CUDA
}

void uncoalesce_from(const at::Tensor& flat, const std::vector<at::Tensor>& tensors) {
  const int64_t total = check_coalesce("uncoalesce_from", tensors, flat);
  if (tensors.empty() || total == 0) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::vector<at::Tensor> targets;
  std::vector<at::Tensor> pieces;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    targets.push_back(t);
    pieces.push_back(flat.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
  at::_foreach_copy_(targets, pieces);  // one fused launch on CUDA
}

void wait_lane(const Lane& consumer, const Lane& producer) {
  lane_ops_for("wait_lane", {consumer, producer}, true)->wait(consumer, producer);
}

void zero_(const std::vector<at::Tensor>& buffers, const std::vector<Lane>& lanes) {
  TORCH_CHECK(buffers.size() == lanes.size(), "dpfast.zero_: buffers: expected one per lane (", lanes.size(),
              " lanes), but got ", buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    TORCH_CHECK(buffers[i].defined() && buffers[i].device() == lanes[i].device, "dpfast.zero_: buffers[", i,
                "]: expected a tensor on ", lanes[i].device, ", but got ",
                buffers[i].defined() ? buffers[i].device().str() : std::string("None"));
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // NOTE [Engine writes and version counters]
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (buffers[i].is_cpu()) {
      buffers[i].zero_();
      continue;
    }
#ifdef DPFAST_WITH_CUDA
    const at::Tensor& buffer = buffers[i];
    cuda::with_lane_stream(lanes[i], [&buffer] { buffer.zero_(); });
#else
    TORCH_CHECK(false, "dpfast.zero_: buffers[", i, "] is on ", buffers[i].device(), ", but dpfast._C was built "
                "without CUDA");
#endif
  }
}

PointerWatch::PointerWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
  expected_.reserve(tensors_.size());
  for (const auto& t : tensors_) expected_.push_back(t.data_ptr());
}

std::vector<int64_t> PointerWatch::moved() const {
  std::vector<int64_t> indices;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (tensors_[i].data_ptr() != expected_[i]) indices.push_back(static_cast<int64_t>(i));
  }
  return indices;
}

MetaWatch::MetaWatch(const std::vector<at::Tensor>& tensors, std::vector<bool> watch_requires_grad,
                     std::vector<bool> watch_contiguity)
    : watch_requires_grad_(std::move(watch_requires_grad)), watch_contiguity_(std::move(watch_contiguity)) {
  TORCH_CHECK(watch_requires_grad_.size() == tensors.size(), "dpfast.MetaWatch: watch_requires_grad: expected one "
              "flag per tensor (", tensors.size(), "), but got ", watch_requires_grad_.size());
  TORCH_CHECK(watch_contiguity_.size() == tensors.size(), "dpfast.MetaWatch: watch_contiguity: expected one "
              "flag per tensor (", tensors.size(), "), but got ", watch_contiguity_.size());
  metas_.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.defined(), "dpfast.MetaWatch: expected tensors, but got None");
    metas_.push_back(Meta{t.scalar_type(), t.sizes().vec(), t.device(), t.requires_grad(), t.is_contiguous()});
  }
}

bool MetaWatch::changed(const std::vector<at::Tensor>& tensors) const {
  if (tensors.size() != metas_.size()) return true;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const Meta& meta = metas_[i];
    if (!t.defined() || t.scalar_type() != meta.dtype || t.device() != meta.device || t.sizes() != meta.sizes ||
        (watch_contiguity_[i] && t.is_contiguous() != meta.contiguous) ||
        (watch_requires_grad_[i] && t.requires_grad() != meta.requires_grad)) {
      return true;
    }
  }
  return false;
}

namespace {

void check_place(const char* op, const at::Tensor& flat, int64_t offset, int64_t numel) {
  TORCH_CHECK(flat.defined() && flat.dim() == 1 && flat.is_contiguous(), "dpfast.", op, ": flat: expected a "
              "contiguous 1-D tensor, but got ", flat.defined() ? flat.sizes() : at::IntArrayRef{});
  TORCH_CHECK(offset >= 0 && offset + numel <= flat.numel(), "dpfast.", op, ": offset: expected a place for ", numel,
              " elements in a flat buffer of ", flat.numel(), ", but got offset ", offset);
}

// NOTE [Exact storages]: a storage of exactly `numel` elements at `offset` in flat's memory, which
// it keeps alive. Resizable, with the device's allocator: a resize_ that grows a tensor on it
// (FakeQuantize's scale and its observers' min_val/max_val grow from 0 or 1 element to one per
// channel in the first forward) moves it to memory of its own, where a tensor on the flat
// buffer's storage would have grown over its neighbours.
c10::Storage exact_storage(const at::Tensor& flat, int64_t offset, int64_t numel) {
  const int64_t itemsize = static_cast<int64_t>(flat.element_size());
  void* begin = static_cast<char*>(flat.data_ptr()) + offset * itemsize;
  auto* keep_alive = new at::Tensor(flat);
  c10::DataPtr data(begin, keep_alive, [](void* context) { delete static_cast<at::Tensor*>(context); },
                    flat.device());
  return c10::Storage(c10::Storage::use_byte_size_t(), numel * itemsize, std::move(data),
                      c10::GetAllocator(flat.device().type()), /*resizable=*/true);
}

}  // namespace

at::Tensor exact_alias(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape) {
  const int64_t numel = c10::multiply_integers(shape);
  check_place("exact_alias", flat, offset, numel);
  at::Tensor out = at::empty({0}, flat.options());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  out.set_(exact_storage(flat, offset, numel), 0, shape, c10::contiguous_strides(shape));
  return out;
}

void point_into(const at::Tensor& tensor, const at::Tensor& flat, int64_t offset, std::optional<at::IntArrayRef> shape,
                bool exact) {
  TORCH_CHECK(tensor.defined(), "dpfast.point_into: expected a tensor, but got None");
  check_fits_flat("point_into", tensor, 0, flat);
  // The place is checked for `sizes`, not for the tensor's own: a replica buffer that a resize_
  // grew past its group's flat buffer goes back in the root's shape (NOTE [Exact storages]).
  const at::IntArrayRef sizes = shape.has_value() ? *shape : tensor.sizes();
  const int64_t numel = c10::multiply_integers(sizes);
  check_place("point_into", flat, offset, numel);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (exact) {
    tensor.set_(exact_storage(flat, offset, numel), 0, sizes, c10::contiguous_strides(sizes));
  } else {
    tensor.set_(flat.narrow(0, offset, numel).view(sizes));
  }
}

}  // namespace dpfast
