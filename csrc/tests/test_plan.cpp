// Unit tests of the pure-C++ planner (csrc/plan.cpp), run by ctest.
#include "plan.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace dpfast::plan;

static int failures = 0;
static int checks = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    ++checks;                                                                \
    if (!(cond)) {                                                           \
      ++failures;                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)

static bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

// Runs the plan as a reduction on integer values: device d starts with value
// d + 1 (and a bit of its own so double counting shows), and checks the
// schedule: every non-root sends exactly once, only after it has received
// everything it will ever receive, and the root ends with the exact sum.
static void check_reduction(int n, int root, TreeShape shape) {
  const TreePlan tree = make_tree(n, root, shape);
  std::vector<long long> value(n);
  std::vector<int> sent(n, 0);
  long long expected = 0;
  for (int d = 0; d < n; ++d) {
    value[d] = (1LL << (d % 40)) + d;
    expected += value[d];
  }
  for (const auto& round : tree.rounds) {
    for (const Edge& e : round) {
      CHECK(e.child >= 0 && e.child < n && e.parent >= 0 && e.parent < n && e.child != e.parent);
      CHECK(sent[e.child] == 0);
      CHECK(sent[e.parent] == 0);  // a parent must not have sent its partial sum yet
      value[e.parent] += value[e.child];
      sent[e.child] += 1;
    }
  }
  for (int d = 0; d < n; ++d) CHECK(sent[d] == (d == root ? 0 : 1));
  CHECK(value[root] == expected);

  // Broadcast: the rounds in reverse reach every device, each from a device that already has the data.
  std::vector<bool> has(n, false);
  has[root] = true;
  for (auto round = tree.rounds.rbegin(); round != tree.rounds.rend(); ++round) {
    for (const Edge& e : *round) {
      CHECK(has[e.parent]);
      has[e.child] = true;
    }
  }
  for (int d = 0; d < n; ++d) CHECK(has[d]);
}

static void test_trees() {
  for (int n = 1; n <= 17; ++n) {
    for (int root = 0; root < n; ++root) {
      check_reduction(n, root, TreeShape::Chain);
      check_reduction(n, root, TreeShape::Binomial);
    }
  }
  CHECK(make_tree(8, 0, TreeShape::Chain).rounds.size() == 7);
  CHECK(make_tree(8, 0, TreeShape::Binomial).rounds.size() == 3);
  CHECK(make_tree(9, 0, TreeShape::Binomial).rounds.size() == 4);
  CHECK(make_tree(1, 0, TreeShape::Binomial).rounds.empty());
  CHECK(throws([] { make_tree(0, 0, TreeShape::Chain); }));
  CHECK(throws([] { make_tree(4, 4, TreeShape::Chain); }));
  CHECK(throws([] { make_tree(4, -1, TreeShape::Binomial); }));
  CHECK(tree_shape_from_string("chain") == TreeShape::Chain);
  CHECK(tree_shape_from_string(to_string(TreeShape::Binomial)) == TreeShape::Binomial);
  CHECK(throws([] { tree_shape_from_string("ring"); }));
}

static void test_chunks() {
  CHECK(make_chunks(0, 4, 1024).empty());
  for (long long numel : {1LL, 7LL, 255LL, 256LL, 257LL, 1000003LL}) {
    for (long long chunk_bytes : {1LL, 4LL, 1000LL, 1024LL, 1LL << 20}) {
      const auto chunks = make_chunks(numel, 4, chunk_bytes);
      long long next = 0;
      for (const Chunk& c : chunks) {
        CHECK(c.begin == next);
        CHECK(c.numel >= 1);
        CHECK(c.numel * 4 <= std::max(chunk_bytes, 4LL));
        next += c.numel;
      }
      CHECK(next == numel);
    }
  }
  CHECK(throws([] { make_chunks(-1, 4, 4); }));
  CHECK(throws([] { make_chunks(4, 0, 4); }));
}

static void test_cost_model() {
  // The worked example of shared/perf-facts.md: 100 MB, 8 GPUs, 5 us per hop.
  LinkModel pcie{25.0, 5.0};
  const long long bytes = 100LL * 1000 * 1000;
  const long long k = best_num_chunks(TreeShape::Chain, bytes, 8, pcie);
  CHECK(k >= 60 && k <= 80);
  const double chain_ms = predict_time_us(TreeShape::Chain, bytes, 8, k, pcie) / 1e3;
  CHECK(std::fabs(chain_ms - 4.7) < 0.1);
  CHECK(std::fabs(predict_time_us(TreeShape::Binomial, bytes, 8, 1, pcie) / 1e3 - 12.0) < 0.1);
  CHECK(std::fabs(predict_time_us(TreeShape::Chain, bytes, 8, 1, pcie) / 1e3 - 28.0) < 0.1);  // unpipelined = star
  // Large buffers go by chain, small ones by binomial tree; the crossover sits near 1 MB for 8 devices.
  CHECK(choose_tree(bytes, 8, pcie) == TreeShape::Chain);
  CHECK(choose_tree(4096, 8, pcie) == TreeShape::Binomial);
  CHECK(choose_tree(512 * 1000, 8, pcie) == TreeShape::Binomial);
  CHECK(choose_tree(2 * 1000 * 1000, 8, pcie) == TreeShape::Chain);
  CHECK(predict_time_us(TreeShape::Chain, bytes, 1, 1, pcie) == 0.0);
  CHECK(choose_chunk_bytes(TreeShape::Chain, 1024, 8, pcie) == 256 * 1024);
  const long long chunk = choose_chunk_bytes(TreeShape::Chain, bytes, 8, pcie);
  CHECK(chunk % kChunkAlignBytes == 0);
  CHECK(chunk >= (bytes + k - 1) / k && chunk < (bytes + k - 1) / k + kChunkAlignBytes);
}

static void test_buckets() {
  // cap 100, first cap 10: the first bucket closes early.
  auto b = assign_buckets({8, 8, 40, 40, 40, 500, 1}, {0, 0, 0, 0, 0, 0, 0}, 100, 10);
  CHECK(b.size() == 5);
  CHECK((b[0] == std::vector<int64_t>{0}));
  CHECK((b[1] == std::vector<int64_t>{1, 2, 3}));
  CHECK((b[2] == std::vector<int64_t>{4}));
  CHECK((b[3] == std::vector<int64_t>{5}));  // larger than the cap: a bucket of its own
  CHECK((b[4] == std::vector<int64_t>{6}));
  // Groups never mix, and every index appears exactly once.
  auto g = assign_buckets({4, 4, 4, 4}, {0, 1, 0, 1}, 1000, 1000);
  CHECK(g.size() == 2);
  CHECK((g[0] == std::vector<int64_t>{0, 2}));
  CHECK((g[1] == std::vector<int64_t>{1, 3}));
  CHECK(assign_buckets({}, {}, 10, 10).empty());
  CHECK(throws([] { assign_buckets({1, 2}, {0}, 10, 10); }));
}

int main() {
  test_trees();
  test_chunks();
  test_cost_model();
  test_buckets();
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
