// Which gradient buckets are complete, counted in C++ by post-accumulate-grad
// hooks on the replicas' parameters.
//
// A Python hook per parameter per replica costs about 10 us of interpreter
// time inside backward (tens of milliseconds per step for models with a
// thousand parameters and a few replicas); this hook costs a counter update.
// Python is called only twice per bucket and backward: at the first mark of a
// backward (to queue the end-of-backward callback) and when a bucket is
// complete (to launch its reduction). See dpfast/reducer.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <c10/core/Event.h>
#include <c10/core/Stream.h>

#include <functional>
#include <optional>
#include <memory>
#include <atomic>
#include <mutex>
#include <vector>

namespace dpfast {

class GradReadiness : public std::enable_shared_from_this<GradReadiness> {
 public:
  // bucket_of[i]: the bucket of parameter i; bucket_len[b]: its number of parameters. With
  // count_root (the reducer's case: the root's gradients go to the bucket, NOTE [Root gradients in
  // the bucket]), replica 0's gradients are marked too; otherwise a bucket is complete when
  // replicas 1..used-1 have marked all its parameters.
  GradReadiness(std::vector<int64_t> bucket_of, std::vector<int64_t> bucket_len, bool count_root);

  // Called, without any lock held, at the first mark of a backward and when bucket b becomes
  // complete (once per bucket until reset_window()).
  void set_callbacks(std::function<void()> on_first_mark, std::function<void(int64_t)> on_bucket_complete);

  // Hooks `param` (replica k's copy of parameter i), whose .grad should be `view` (its slice of
  // the bucket): when autograd replaces it (backward with create_graph=True accumulates out of
  // place), the hook copies the gradient into the view and points .grad back at it.
  void attach(const at::Tensor& param, int64_t i, int64_t k, const at::Tensor& view);
  static void detach(const at::Tensor& param);

  // NOTE [Root gradients in the bucket]: the root's parameter i keeps its gradient in `view`, its
  // slice of the bucket on the root's lane, which the tree reduction then completes in place: no
  // receive buffer, no add into .grad. A hook on the root's parameter (chained in front of the
  // hooks that were there: a user's Python post-accumulate-grad hooks keep running, after the move
  // and before the mark) copies autograd's gradient into the view and points .grad at it, unless
  // the gradient must stay where it is (`held`: a sparse gradient, a parameter that is not
  // contiguous, a backward with create_graph=True): the view is then zero, and the reducer adds
  // the reduced bucket into .grad as before. One reducer hooks a parameter at a time: the one
  // attached (or ensured) last.
  void attach_root(const at::Tensor& param, int64_t i, const at::Tensor& view, bool held);
  // Hooks again the root parameters whose hook is gone (the first Python post-accumulate-grad hook
  // registered on a parameter replaces whatever is in its slot) or now another reducer's; returns
  // how many. Puts back into the bucket a view that `.grad.data = ...` re-pointed (put_back).
  int64_t ensure_root_hooks();
  void detach_roots();
  // Called by the root's hook: the move into the view (returns whether the gradient is held), and,
  // after the hooks that were there, the mark.
  bool root_move(const at::Tensor& param, const at::Tensor& view, bool held) const;
  void root_done(const at::Tensor& param, int64_t i, const at::Tensor& view, bool held, bool kept);
  // Per parameter, since start_over(): kRootNone, kRootInView (.grad is the view) or kRootHeld.
  std::vector<int64_t> root_states() const;
  // Replica k's lane stream (CUDA): its bucket's reduction waits for it, so a gradient made or
  // moved on another stream is ordered before the reduction by wait_for_current (a root gradient
  // from an accumulator made outside the wrapper's forward; a replica that a subclass of the
  // wrapper ran on the device's current stream, with torch's parallel_apply).
  void set_lane_stream(int64_t replica, int64_t stream_id, int64_t device_index);
  // Where the current stream on view's device is not replica k's lane stream: the lane waits for
  // what was enqueued on it so far (NOTE [Stream ordering]).
  void wait_for_current(const at::Tensor& view, int64_t k) const;
  static bool is_root_hooked(const at::Tensor& param);  // for tests: does a reducer hook it
  // Whether a root parameter's (defined) gradient must stay in .grad rather than move into its
  // bucket view: the one rule for the hook and for the reducer's claim at the end of backward.
  static bool keeps_in_grad(const at::Tensor& grad, const at::Tensor& view);
  std::vector<int64_t> held_roots() const;  // the parameters whose state is kRootHeld
  static constexpr int64_t kRootNone = 0, kRootInView = 1, kRootHeld = 2;

  // How many parameters of each bucket take part now (those that require grad: a frozen one never
  // marks, and must not hold its bucket back until the end of backward).
  void set_bucket_len(std::vector<int64_t> bucket_len);

  void mark(int64_t i, int64_t k);
  void note_replicas(int64_t used);  // a forward ran on `used` replicas

  // The per-backward counts (window) and, on top, which parameters got a gradient (start_over).
  void reset_window();
  void start_over();

  // Whether a bucket already counted complete in this window was marked again: a parameter got
  // gradients from two backward passes of one backward (a reentrant checkpoint around a tied
  // weight, say), and the second came after the bucket's reduction started.
  bool marked_after_complete() const;

  std::vector<bool> got_grad() const;
  bool any_grad() const;
  // Whether a replica's gradient came with a graph (create_graph=True) since the last call: it is
  // left in the replica's .grad (its values also in the view) for the reducer to sum differentiably.
  bool take_graph_grads() { return graph_grads_.exchange(false); }
  void note_graph_grad() { graph_grads_.store(true); }
  int64_t replicas_used() const;
  bool first_mark_seen() const;

 private:
  std::vector<int64_t> bucket_of_;
  std::vector<int64_t> bucket_len_;
  bool count_root_;
  struct RootParam {
    c10::weak_intrusive_ptr<at::TensorImpl, c10::UndefinedTensorImpl> param;  // the user's: not kept alive
    int64_t index;
    at::Tensor view;    // handed out as the parameter's .grad
    at::Tensor anchor;  // the same slice, never handed out: where `view` belongs
    bool held;
  };
  std::vector<RootParam> roots_;  // touched only with Python's GIL held (attach, ensure, detach)
  static void put_back(const RootParam& root);
  std::vector<std::optional<c10::Stream>> lane_streams_;  // set before any hook runs
  // One event per lane, made once: a wait for another stream costs a record and a wait, not an
  // event's creation (a subclass's replicas wait once per parameter). Recorded and waited for
  // under events_mutex_: hooks of replicas that share a device run on one autograd thread, but a
  // reentrant backward may run others beside it.
  std::vector<std::unique_ptr<c10::Event>> lane_events_;
  mutable std::mutex events_mutex_;
  std::optional<c10::Stream> stream_if_elsewhere(const at::Tensor& view, int64_t k) const;
  void reset_window_locked();  // the per-window counts, with mutex_ held (reset_window, start_over)
  struct Callbacks {
    std::function<void()> on_first_mark;
    std::function<void(int64_t)> on_bucket_complete;
  };
  // Swapped as a whole under the mutex and copied out as a pointer: copying or dropping the
  // functions themselves takes Python's GIL, which must never be waited for under the mutex.
  std::shared_ptr<const Callbacks> callbacks_;

  std::atomic<bool> graph_grads_{false};
  mutable std::mutex mutex_;
  std::vector<bool> got_grad_;
  std::vector<int64_t> root_state_;
  std::vector<int64_t> marks_;                // per bucket: distinct (replica, parameter) marks
  std::vector<std::vector<uint8_t>> marked_;  // [replica][parameter] marked in this window
  std::vector<bool> reported_;
  int64_t replicas_used_ = 1;
  bool first_mark_seen_ = false;
  bool marked_after_complete_ = false;
};

// Whether autograd's walk back from `roots` meets no leaf but those in `allowed`: a replica's
// graph that stands alone, whose backward can run on another thread than the caller's graph
// (NOTE [Parallel backward] in dpfast/backward.py). Costs a visit per node, without Python.
bool graph_reaches_only(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& allowed);

// Whether autograd's walk back from `roots` meets one of `leaves`: replica 0's graph, which the
// caller's backward walks, must not reach into a replica whose backward is routed to a worker
// (a value cached across replicas: parametrize.cached() keys its cache by the root module).
bool graph_reaches_any(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& leaves);

}  // namespace dpfast
