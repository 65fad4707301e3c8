#include "plan.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace dpfast {
namespace plan {

std::string to_string(TreeShape shape) {
  switch (shape) {
    case TreeShape::Chain:
      return "chain";
    case TreeShape::Binomial:
      return "binomial";
  }
  return "unknown";
}

TreeShape tree_shape_from_string(const std::string& name) {
  if (name == "chain") return TreeShape::Chain;
  if (name == "binomial") return TreeShape::Binomial;
  throw std::invalid_argument("dpfast: tree shape: expected 'chain' or 'binomial', but got '" + name + "'");
}

static int ceil_log2(int n) {
  int rounds = 0;
  while ((1 << rounds) < n) ++rounds;
  return rounds;
}

TreePlan make_tree(int num_devices, int root, TreeShape shape) {
  if (num_devices < 1) {
    throw std::invalid_argument("dpfast: make_tree: expected num_devices >= 1, but got " +
                                std::to_string(num_devices));
  }
  if (root < 0 || root >= num_devices) {
    throw std::invalid_argument("dpfast: make_tree: expected root in [0, " + std::to_string(num_devices) +
                                "), but got " + std::to_string(root));
  }
  TreePlan tree;
  tree.num_devices = num_devices;
  tree.root = root;
  tree.shape = shape;
  // Plans are built on labels relative to the root (root = 0), then mapped back.
  auto device_of = [&](int relative) { return (relative + root) % num_devices; };
  if (shape == TreeShape::Chain) {
    // n-1 -> n-2 -> ... -> 1 -> 0: one edge per round; pipelining over chunks
    // is what makes the rounds overlap.
    for (int relative = num_devices - 1; relative >= 1; --relative) {
      tree.rounds.push_back({Edge{device_of(relative), device_of(relative - 1)}});
    }
  } else {
    // Binomial: in round r, every node whose label is an odd multiple of 2^r
    // sends to the node 2^r below it.
    for (int round = 0; round < ceil_log2(num_devices); ++round) {
      const int stride = 1 << round;
      std::vector<Edge> edges;
      for (int relative = stride; relative < num_devices; relative += 2 * stride) {
        edges.push_back(Edge{device_of(relative), device_of(relative - stride)});
      }
      tree.rounds.push_back(std::move(edges));
    }
  }
  return tree;
}

std::vector<Chunk> make_chunks(int64_t numel, int64_t elem_size, int64_t chunk_bytes) {
  if (numel < 0 || elem_size < 1 || chunk_bytes < 1) {
    throw std::invalid_argument("dpfast: make_chunks: expected numel >= 0, elem_size >= 1 and chunk_bytes >= 1, but got " +
                                std::to_string(numel) + ", " + std::to_string(elem_size) + ", " +
                                std::to_string(chunk_bytes));
  }
  const int64_t chunk_numel = std::max<int64_t>(1, chunk_bytes / elem_size);
  std::vector<Chunk> chunks;
  for (int64_t begin = 0; begin < numel; begin += chunk_numel) {
    chunks.push_back(Chunk{begin, std::min(chunk_numel, numel - begin)});
  }
  return chunks;
}

double predict_time_us(TreeShape shape, int64_t bytes, int num_devices, int64_t num_chunks, const LinkModel& link) {
  if (num_devices <= 1 || bytes <= 0) return 0.0;
  const double k = static_cast<double>(std::max<int64_t>(1, num_chunks));
  const double transfer_us = static_cast<double>(bytes) / (link.bandwidth_GBps * 1e3);  // GB/s = 1e3 bytes/us
  if (shape == TreeShape::Chain) {
    const double hops = num_devices - 1;
    return (k + hops - 1) * (transfer_us / k + link.hop_latency_us);
  }
  // The root's link carries one full buffer per round; each chunk costs a hop latency.
  const double rounds = ceil_log2(num_devices);
  return rounds * transfer_us + k * rounds * link.hop_latency_us;
}

int64_t best_num_chunks(TreeShape shape, int64_t bytes, int num_devices, const LinkModel& link) {
  if (shape == TreeShape::Binomial || num_devices <= 2 || bytes <= 0) return 1;
  const double transfer_us = static_cast<double>(bytes) / (link.bandwidth_GBps * 1e3);
  const double k_star = std::sqrt((num_devices - 2) * transfer_us / std::max(link.hop_latency_us, 1e-9));
  // The optimum of a convex function of an integer: check both neighbours.
  const int64_t low = std::max<int64_t>(1, static_cast<int64_t>(std::floor(k_star)));
  const int64_t high = low + 1;
  return predict_time_us(shape, bytes, num_devices, low, link) <= predict_time_us(shape, bytes, num_devices, high, link)
             ? low
             : high;
}

TreeShape choose_tree(int64_t bytes, int num_devices, const LinkModel& link) {
  const double chain = predict_time_us(TreeShape::Chain, bytes, num_devices,
                                       best_num_chunks(TreeShape::Chain, bytes, num_devices, link), link);
  const double binomial = predict_time_us(TreeShape::Binomial, bytes, num_devices, 1, link);
  return chain <= binomial ? TreeShape::Chain : TreeShape::Binomial;
}

int64_t choose_chunk_bytes(TreeShape shape, int64_t bytes, int num_devices, const LinkModel& link,
                           int64_t min_chunk_bytes) {
  const int64_t chunks = best_num_chunks(shape, bytes, num_devices, link);
  const int64_t chunk_bytes = std::max((std::max<int64_t>(bytes, 1) + chunks - 1) / chunks, min_chunk_bytes);
  // Every chunk then starts where its buffer's alignment allows 16-byte loads (the CUDA add
  // kernel's fast path) and a whole cache line.
  return (std::max<int64_t>(chunk_bytes, 1) + kChunkAlignBytes - 1) / kChunkAlignBytes * kChunkAlignBytes;
}

std::vector<std::vector<int64_t>> assign_buckets(const std::vector<int64_t>& tensor_bytes,
                                                 const std::vector<int64_t>& group, int64_t cap_bytes,
                                                 int64_t first_cap_bytes) {
  if (tensor_bytes.size() != group.size()) {
    throw std::invalid_argument("dpfast: assign_buckets: expected one group per tensor (" +
                                std::to_string(tensor_bytes.size()) + " tensors), but got " +
                                std::to_string(group.size()) + " groups");
  }
  struct Open {
    int64_t group;
    std::vector<int64_t> members;
    int64_t bytes;
    bool first;
  };
  std::vector<std::vector<int64_t>> buckets;
  std::vector<Open> open;  // one open bucket per group, in order of first appearance
  for (size_t index = 0; index < tensor_bytes.size(); ++index) {
    auto it = std::find_if(open.begin(), open.end(), [&](const Open& o) { return o.group == group[index]; });
    if (it == open.end()) {
      open.push_back(Open{group[index], {}, 0, true});
      it = open.end() - 1;
    }
    const int64_t cap = it->first ? first_cap_bytes : cap_bytes;
    if (!it->members.empty() && it->bytes + tensor_bytes[index] > cap) {
      buckets.push_back(std::move(it->members));
      it->members.clear();
      it->bytes = 0;
      it->first = false;
    }
    it->members.push_back(static_cast<int64_t>(index));
    it->bytes += tensor_bytes[index];
  }
  for (auto& o : open) {
    if (!o.members.empty()) buckets.push_back(std::move(o.members));
  }
  return buckets;
}

}  // namespace plan
}  // namespace dpfast
