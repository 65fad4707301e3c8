// The reduction/broadcast planner: who sends what to whom in which round,
// how a buffer is cut into pipeline chunks, and how tensors are grouped into
// buckets. Pure C++ (no torch, no CUDA) so that CMake can build and unit-test
// it on its own; the engine (comm.cpp) and the Python front end both use it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpfast {
namespace plan {

// NOTE [Tree shape]
// A reduction of S bytes over n devices with per-hop bandwidth B and per-hop
// latency a (perf-facts.md, nccl-tests PERFORMANCE.md):
//   chain, pipelined in k chunks:  (k + n - 2) * (S / (k B) + a)
//       -> approaches S / B for large S: every link carries S once, and the
//          hops overlap. Best k* ~ sqrt((n - 2) S / (B a)).
//   binomial tree, pipelined:      a parent receives from up to log2(n)
//       children one after the other, so its link carries log2(n) * S:
//       ~ log2(n) * S / B + log2(n) * a. Fewest rounds, most bytes per link.
// So the chain wins once S / B dominates a, and the binomial tree wins when
// latency dominates (small buffers, many devices). choose_tree() evaluates
// both formulas with the link model and picks the cheaper one; with the
// default link model (25 GB/s, 5 us) the crossover for 8 devices is near
// 100 KB. Several logical devices sharing one physical device change only B.
enum class TreeShape { Chain = 0, Binomial = 1 };

std::string to_string(TreeShape shape);
TreeShape tree_shape_from_string(const std::string& name);  // "chain", "binomial"

// One transfer of a round: `child` sends its (partial) buffer to `parent`.
// For a reduction the parent adds it into its own buffer; a broadcast runs the
// rounds in reverse order and the parent copies to the child.
struct Edge {
  int child;
  int parent;
};

// rounds[r] are the edges of round r. Every device except the root is a child
// in exactly one edge; a device sends only after all rounds in which it is a
// parent, so round order is a valid schedule for a reduction.
struct TreePlan {
  int num_devices = 0;
  int root = 0;
  TreeShape shape = TreeShape::Chain;
  std::vector<std::vector<Edge>> rounds;
};

// Throws std::invalid_argument on num_devices < 1 or root out of range.
TreePlan make_tree(int num_devices, int root, TreeShape shape);

// A contiguous piece [begin, begin + numel) of a flat buffer, in elements.
struct Chunk {
  int64_t begin;
  int64_t numel;
};

// Cuts numel elements of elem_size bytes into chunks of at most chunk_bytes
// (rounded down to whole elements, at least one element). numel == 0 gives
// no chunks.
std::vector<Chunk> make_chunks(int64_t numel, int64_t elem_size, int64_t chunk_bytes);

struct LinkModel {
  double bandwidth_GBps = 25.0;  // per direction, per hop
  double hop_latency_us = 5.0;   // enqueue + first byte, per transfer
};

// Predicted time of one reduction (or broadcast) by the formulas of
// NOTE [Tree shape], with k chunks.
double predict_time_us(TreeShape shape, int64_t bytes, int num_devices, int64_t num_chunks, const LinkModel& link);

// The number of pipeline chunks that minimises predict_time_us, at least 1.
int64_t best_num_chunks(TreeShape shape, int64_t bytes, int num_devices, const LinkModel& link);

TreeShape choose_tree(int64_t bytes, int num_devices, const LinkModel& link);

// Chunk sizes are multiples of this, so chunk views keep their buffer's alignment.
constexpr int64_t kChunkAlignBytes = 256;

// Chunk size in bytes for `bytes` over `num_devices` with `shape`, a multiple
// of kChunkAlignBytes, never below min_chunk_bytes (tiny chunks cost more in
// launches than they save).
int64_t choose_chunk_bytes(TreeShape shape, int64_t bytes, int num_devices, const LinkModel& link,
                           int64_t min_chunk_bytes = 256 * 1024);

// Groups tensors into buckets of at most cap_bytes each (the first bucket at
// most first_cap_bytes), keeping their order and never splitting a tensor: a
// tensor larger than the cap gets a bucket of its own. Tensors of different
// `group` (a dtype and device key) never share a bucket. Returns, per bucket,
// the indices of its tensors.
std::vector<std::vector<int64_t>> assign_buckets(const std::vector<int64_t>& tensor_bytes,
                                                 const std::vector<int64_t>& group,
                                                 int64_t cap_bytes, int64_t first_cap_bytes);

}  // namespace plan
}  // namespace dpfast
