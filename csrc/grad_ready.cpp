#include "grad_ready.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <unordered_set>

namespace dpfast {

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(std::shared_ptr<GradReadiness> state, int64_t index, int64_t replica, at::Tensor view)
      : state(std::move(state)), index(index), replica(replica), view(std::move(view)) {}

  void operator()(const torch::autograd::Variable& param) override {
    // Autograd adds into the view in place (the hot path). The gradient is elsewhere when grad
    // mode is on in backward (create_graph=True: autograd accumulated out of place, the view's
    // contents included), or when something set the replica's .grad to None (a zero_grad() inside
    // forward, which nn.DataParallel's replicas ignore): autograd then made a new one of this
    // backward's gradient alone. Either way its values go into the view, for the reduction. A
    // gradient with a graph stays in .grad too: the reducer adds it into the root's .grad with
    // its graph, then puts the view back (reducer.py, _add_into_grads).
    at::Tensor& grad = param.mutable_grad();
    if (grad.defined() && (grad.layout() != c10::kStrided || grad.data_ptr() != view.data_ptr())) {
      const bool out_of_place = at::GradMode::is_enabled();
      at::NoGradGuard no_grad;
      if (out_of_place || grad.requires_grad()) {
        // Out of place: the view's contents included. A .grad with a graph is one this hook kept
        // (below), whose earlier values the view already holds; autograd added into it in place
        // (a backward without create_graph inside no_sync()).
        view.copy_(grad.layout() == c10::kStrided ? grad : grad.to_dense());
      } else {
        view.add_(grad);
      }
      if (out_of_place && grad.requires_grad()) {
        state->note_graph_grad();
      } else {
        grad = view;
      }
    }
    state->wait_for_current(view, replica);
    state->mark(index, replica);
  }

  std::shared_ptr<GradReadiness> state;
  int64_t index;
  int64_t replica;
  at::Tensor view;
};

// NOTE [Root gradients in the bucket]: one per hooked root parameter. Its owner moves the gradient
// into the view first, so that the hooks that were there (a user's Python post-accumulate-grad
// hooks) see .grad where it stays; then theirs run; then the owner marks it, so that the bucket's
// reduction starts only after what those hooks did to .grad.
struct RootHook : torch::autograd::PostAccumulateGradHook {
  explicit RootHook(std::unique_ptr<torch::autograd::PostAccumulateGradHook> previous)
      : previous(std::move(previous)) {}

  void operator()(const torch::autograd::Variable& param) override {
    if (!param.requires_grad()) {
      // Frozen after the forward (requires_grad_(False)): autograd accumulated nothing into .grad
      // (torch runs the hooks all the same). Neither moved nor marked: the reducer drops the
      // replicas' shares at the end of backward, as autograd skips the leaf (GradReducer._finish).
      if (previous) {
        (*previous)(param);
      }
      return;
    }
    std::shared_ptr<GradReadiness> state;
    int64_t i = 0;
    at::Tensor lane_view;
    bool always_held = false;
    {
      // A forward on another thread may hand this hook to another reducer meanwhile.
      std::lock_guard<std::mutex> lock(mutex);
      state = owner.lock();
      i = index;
      lane_view = view;
      always_held = held;
    }
    const bool kept = state ? state->root_move(param, lane_view, always_held) : false;
    if (previous) {
      (*previous)(param);
    }
    if (state) {
      state->root_done(param, i, lane_view, always_held, kept);
    }
  }

  void set(std::weak_ptr<GradReadiness> new_owner, int64_t new_index, at::Tensor new_view, bool new_held) {
    std::lock_guard<std::mutex> lock(mutex);
    owner = std::move(new_owner);
    index = new_index;
    view = std::move(new_view);
    held = new_held;
  }

  bool owned_by(const GradReadiness* state, int64_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    return owner.lock().get() == state && index == i;
  }

  std::mutex mutex;
  std::weak_ptr<GradReadiness> owner;  // the root outlives reducers: never keeps one alive
  int64_t index = 0;
  at::Tensor view;
  bool held = false;
  std::unique_ptr<torch::autograd::PostAccumulateGradHook> previous;
};

// The RootHook on `param`, if its slot holds one.
RootHook* root_hook_of(const at::Tensor& param) {
  torch::autograd::impl::materialize_autograd_meta(param);  // a frozen leaf may have none yet
  return dynamic_cast<RootHook*>(torch::autograd::impl::post_acc_grad_hooks(param).get());
}

}  // namespace

GradReadiness::GradReadiness(std::vector<int64_t> bucket_of, std::vector<int64_t> bucket_len, bool count_root)
    : bucket_of_(std::move(bucket_of)), bucket_len_(std::move(bucket_len)), count_root_(count_root) {
  for (size_t i = 0; i < bucket_of_.size(); ++i) {
    TORCH_CHECK(bucket_of_[i] >= 0 && bucket_of_[i] < static_cast<int64_t>(bucket_len_.size()),
                "dpfast.GradReadiness: bucket_of[", i, "]: expected a bucket index in [0, ", bucket_len_.size(),
                "), but got ", bucket_of_[i]);
  }
  got_grad_.assign(bucket_of_.size(), false);
  root_state_.assign(bucket_of_.size(), kRootNone);
  marks_.assign(bucket_len_.size(), 0);
  reported_.assign(bucket_len_.size(), false);
}

void GradReadiness::set_callbacks(std::function<void()> on_first_mark,
                                  std::function<void(int64_t)> on_bucket_complete) {
  std::shared_ptr<const Callbacks> fresh(new Callbacks{std::move(on_first_mark), std::move(on_bucket_complete)});
  {
    std::lock_guard<std::mutex> lock(mutex_);
    callbacks_.swap(fresh);
  }
  // `fresh` now holds the previous callbacks: dropped here, outside the mutex.
}

void GradReadiness::attach(const at::Tensor& param, int64_t i, int64_t k, const at::Tensor& view) {
  TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(bucket_of_.size()), "dpfast.GradReadiness.attach: index: expected "
              "a parameter index in [0, ", bucket_of_.size(), "), but got ", i);
  // A frozen parameter may be hooked too: the hook runs once it requires grad again.
  TORCH_CHECK(param.is_leaf(), "dpfast.GradReadiness.attach: param: expected a leaf tensor, but got one made by ",
              param.grad_fn() ? param.grad_fn()->name() : std::string("an operation"));
  torch::autograd::impl::set_post_acc_grad_hooks(param,
                                                 std::make_unique<ReadyHook>(shared_from_this(), i, k, view));
}

void GradReadiness::detach(const at::Tensor& param) {
  torch::autograd::impl::set_post_acc_grad_hooks(param, nullptr);
}

void GradReadiness::attach_root(const at::Tensor& param, int64_t i, const at::Tensor& view, bool held) {
  TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(bucket_of_.size()), "dpfast.GradReadiness.attach_root: index: "
              "expected a parameter index in [0, ", bucket_of_.size(), "), but got ", i);
  TORCH_CHECK(param.is_leaf(), "dpfast.GradReadiness.attach_root: param: expected a leaf tensor, but got one made by ",
              param.grad_fn() ? param.grad_fn()->name() : std::string("an operation"));
  TORCH_CHECK(view.defined() && view.sizes() == param.sizes() && view.scalar_type() == param.scalar_type() &&
                  view.device() == param.device() && view.is_contiguous(),
              "dpfast.GradReadiness.attach_root: view: expected a contiguous tensor of the parameter's shape ",
              param.sizes(), ", dtype ", param.scalar_type(), " and device ", param.device(), ", but got ",
              view.defined() ? view.toString() + " of shape " + c10::str(view.sizes()) + " on " + view.device().str()
                             : std::string("an undefined tensor"));
  roots_.push_back(RootParam{c10::weak_intrusive_ptr<at::TensorImpl, c10::UndefinedTensorImpl>(param.getIntrusivePtr()),
                             i, view, view.alias(), held});
  ensure_root_hooks();
}

int64_t GradReadiness::ensure_root_hooks() {
  int64_t hooked = 0;
  for (const auto& root : roots_) {
    if (root.view.data_ptr() != root.anchor.data_ptr()) {
      put_back(root);
    }
    auto impl = root.param.lock();
    if (!impl) {
      continue;  // the root's parameter is gone (the module was replaced)
    }
    const at::Tensor param(std::move(impl));
    RootHook* hook = root_hook_of(param);
    if (hook != nullptr && hook->owned_by(this, root.index)) {
      continue;  // the hot path: still ours
    }
    if (hook == nullptr) {
      auto fresh = std::make_unique<RootHook>(std::move(torch::autograd::impl::post_acc_grad_hooks(param)));
      hook = fresh.get();
      torch::autograd::impl::set_post_acc_grad_hooks(param, std::move(fresh));
    }
    hook->set(weak_from_this(), root.index, root.view, root.held);
    ++hooked;
  }
  return hooked;
}

void GradReadiness::put_back(const RootParam& root) {
  // `p.grad.data = t` re-points the tensor that is .grad, and that is our view: Module._apply does
  // it for .grad in model.half(), .float() and .to(). The bucket's reductions would land where .grad
  // no longer looks, for good. What .grad holds goes back into the bucket, and the view with it.
  const at::Tensor& view = root.view;
  const at::Tensor& anchor = root.anchor;
  if (view.sizes() != anchor.sizes() || view.scalar_type() != anchor.scalar_type() ||
      view.device() != anchor.device() || view.layout() != anchor.layout()) {
    return;  // another dtype or device: the next forward rebuilds the replicas and this reducer
  }
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // NOTE [Engine writes and version counters]
  anchor.copy_(view);
  view.set_(anchor);
}

void GradReadiness::detach_roots() {
  for (const auto& root : roots_) {
    auto impl = root.param.lock();
    if (!impl) {
      continue;
    }
    const at::Tensor param(std::move(impl));
    RootHook* hook = root_hook_of(param);
    if (hook == nullptr || !hook->owned_by(this, root.index)) {
      continue;  // another reducer's now, or a Python hook set on a parameter that had none replaced it
    }
    // The hooks that were there before ours go back in its place.
    torch::autograd::impl::set_post_acc_grad_hooks(param, std::move(hook->previous));
  }
  roots_.clear();
}

std::optional<c10::Stream> GradReadiness::stream_if_elsewhere(const at::Tensor& view, int64_t k) const {
  if (k < 0 || static_cast<size_t>(k) >= lane_streams_.size()) {
    return std::nullopt;  // CPU lanes: no streams
  }
  const std::optional<c10::Stream>& lane = lane_streams_[k];
  if (!lane || view.device() != lane->device()) {
    return std::nullopt;
  }
  const c10::impl::VirtualGuardImpl guard(lane->device_type());
  const c10::Stream current = guard.getStream(view.device());
  return current == *lane ? std::nullopt : std::optional<c10::Stream>(current);
}

void GradReadiness::wait_for_current(const at::Tensor& view, int64_t k) const {
  if (auto elsewhere = stream_if_elsewhere(view, k)) {
    std::lock_guard<std::mutex> lock(events_mutex_);
    c10::Event& event = *lane_events_[k];
    event.record(*elsewhere);
    event.block(*lane_streams_[k]);
  }
}

bool GradReadiness::root_move(const at::Tensor& param, const at::Tensor& view, bool held) const {
  at::Tensor& grad = param.mutable_grad();
  // A parameter held always (`held`) has a view that stays zero.
  const bool keep = held || !grad.defined() || keeps_in_grad(grad, view);
  if (held) {
    return true;
  }
  at::NoGradGuard no_grad;
  // Below autograd's version counting, as the engine writes (NOTE [Engine writes and version
  // counters] in comm.h): a graph that saved a .grad must stay valid.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (keep) {
    view.zero_();  // it may hold an earlier step's sum
  } else if (grad.data_ptr() != view.data_ptr()) {
    // autograd made a new .grad (it was None, or replaced): its sum since the last reduction
    if (auto elsewhere = stream_if_elsewhere(view, 0)) {
      grad.record_stream(*elsewhere);  // read there, after the allocator may see it freed
    }
    view.copy_(grad);
    grad = view;
  }
  return keep;
}

void GradReadiness::root_done(const at::Tensor& param, int64_t i, const at::Tensor& view, bool held, bool kept) {
  if (!kept) {
    const at::Tensor& grad = param.grad();
    if (!grad.defined() || grad.data_ptr() != view.data_ptr()) {
      kept = root_move(param, view, held);  // a hook that ran after ours replaced or dropped .grad
    }
  }
  wait_for_current(view, 0);  // NOTE [Stream ordering]: the lane's stream, and so the reduction, waits
  {
    std::lock_guard<std::mutex> lock(mutex_);
    root_state_[i] = kept ? kRootHeld : kRootInView;
  }
  mark(i, 0);
}

std::vector<int64_t> GradReadiness::root_states() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return root_state_;
}

void GradReadiness::set_lane_stream(int64_t replica, int64_t stream_id, int64_t device_index) {
  TORCH_CHECK(replica >= 0, "dpfast.GradReadiness.set_lane_stream: replica: expected a replica index >= 0, but got ",
              replica);
  if (static_cast<size_t>(replica) >= lane_streams_.size()) {
    lane_streams_.resize(replica + 1);
    lane_events_.resize(replica + 1);
  }
  lane_streams_[replica] =
      c10::Stream::unpack3(stream_id, static_cast<c10::DeviceIndex>(device_index), c10::DeviceType::CUDA);
  lane_events_[replica] = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
}

bool GradReadiness::keeps_in_grad(const at::Tensor& grad, const at::Tensor& view) {
  // The gradient stays in .grad (the view then adds nothing) where moving it would change what
  // the user gets: a graph (create_graph=True, or a .grad that still carries one), a sparse or
  // non-contiguous layout, another dtype.
  return at::GradMode::is_enabled() || grad.requires_grad() || grad.layout() != c10::kStrided ||
         grad.scalar_type() != view.scalar_type() || !grad.is_contiguous();
}

bool GradReadiness::is_root_hooked(const at::Tensor& param) {
  RootHook* hook = root_hook_of(param);
  return hook != nullptr && !hook->owner.expired();
}

std::vector<int64_t> GradReadiness::held_roots() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> held;
  for (size_t i = 0; i < root_state_.size(); ++i) {
    if (root_state_[i] == kRootHeld) {
      held.push_back(static_cast<int64_t>(i));
    }
  }
  return held;
}

void GradReadiness::set_bucket_len(std::vector<int64_t> bucket_len) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(bucket_len.size() == bucket_len_.size(), "dpfast.GradReadiness.set_bucket_len: bucket_len: expected ",
              bucket_len_.size(), " buckets, but got ", bucket_len.size());
  bucket_len_ = std::move(bucket_len);
}

void GradReadiness::mark(int64_t i, int64_t k) {
  bool first = false;
  int64_t complete = -1;
  std::shared_ptr<const Callbacks> callbacks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    callbacks = callbacks_;
    got_grad_[i] = true;
    replicas_used_ = std::max(replicas_used_, k + 1);
    if (!first_mark_seen_) {
      first_mark_seen_ = true;
      first = true;
    }
    const int64_t b = bucket_of_[i];
    // Each (replica, parameter) counts once per window: a second accumulation of one replica's
    // parameter (a weight used inside and outside a reentrant checkpoint) must not stand in for
    // another's that is still to come. Before the bucket's reduction it is harmless (both land in
    // the bucket); after it, the reduced sum misses it (marked_after_complete).
    if (static_cast<size_t>(k) >= marked_.size()) {
      marked_.resize(k + 1, std::vector<uint8_t>(bucket_of_.size(), 0));
    }
    const bool again = marked_[k][i] != 0;
    marked_[k][i] = 1;
    if (!again) {
      marks_[b] += 1;
    }
    const int64_t replicas_marking = count_root_ ? replicas_used_ : replicas_used_ - 1;
    if (reported_[b]) {
      marked_after_complete_ = true;
    } else if (!again && bucket_len_[b] > 0 && marks_[b] == bucket_len_[b] * replicas_marking) {
      reported_[b] = true;
      complete = b;
    }
  }
  // Outside the lock: the callbacks take Python's GIL, and Python code may call back in here.
  if (!callbacks) return;
  if (first && callbacks->on_first_mark) callbacks->on_first_mark();
  if (complete >= 0 && callbacks->on_bucket_complete) callbacks->on_bucket_complete(complete);
}

void GradReadiness::note_replicas(int64_t used) {
  std::lock_guard<std::mutex> lock(mutex_);
  replicas_used_ = std::max(replicas_used_, used);
}

void GradReadiness::reset_window_locked() {
  for (auto& replica : marked_) std::fill(replica.begin(), replica.end(), 0);
  std::fill(marks_.begin(), marks_.end(), 0);
  std::fill(reported_.begin(), reported_.end(), false);
  first_mark_seen_ = false;
  marked_after_complete_ = false;
}

void GradReadiness::reset_window() {
  std::lock_guard<std::mutex> lock(mutex_);
  reset_window_locked();
}

void GradReadiness::start_over() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::fill(got_grad_.begin(), got_grad_.end(), false);
  std::fill(root_state_.begin(), root_state_.end(), kRootNone);
  reset_window_locked();
  replicas_used_ = 1;
}

bool GradReadiness::marked_after_complete() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return marked_after_complete_;
}

std::vector<bool> GradReadiness::got_grad() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return got_grad_;
}

bool GradReadiness::any_grad() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::any_of(got_grad_.begin(), got_grad_.end(), [](bool got) { return got; });
}

int64_t GradReadiness::replicas_used() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return replicas_used_;
}

bool GradReadiness::first_mark_seen() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return first_mark_seen_;
}

namespace {

// Autograd's walk back from `roots` to the leaves: `on_leaf(leaf's TensorImpl)` for each leaf met,
// until it returns false. Returns whether the walk went to its end.
template <typename OnLeaf>
bool walk_to_leaves(const std::vector<at::Tensor>& roots, OnLeaf on_leaf) {
  using torch::autograd::Node;
  std::unordered_set<Node*> seen;
  std::vector<Node*> to_visit;
  auto visit = [&](const torch::autograd::Edge& edge) {
    if (edge.function && seen.insert(edge.function.get()).second) {
      to_visit.push_back(edge.function.get());
    }
  };
  // Held for the walk: a leaf whose accumulator did not exist yet gets one made here, owned by
  // nothing else (the leaf keeps only a weak reference to it).
  std::vector<torch::autograd::Edge> root_edges;
  for (const auto& root : roots) {
    if (root.requires_grad()) {
      root_edges.push_back(torch::autograd::impl::gradient_edge(root));  // a leaf's own accumulator
      visit(root_edges.back());
    }
  }
  while (!to_visit.empty()) {
    Node* node = to_visit.back();
    to_visit.pop_back();
    if (auto* accumulate = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
      if (!on_leaf(accumulate->variable.unsafeGetTensorImpl())) {
        return false;
      }
      continue;
    }
    for (const auto& next : node->next_edges()) {
      visit(next);
    }
  }
  return true;
}

std::unordered_set<const c10::TensorImpl*> impls_of(const std::vector<at::Tensor>& tensors) {
  std::unordered_set<const c10::TensorImpl*> impls;
  for (const auto& t : tensors) {
    impls.insert(t.unsafeGetTensorImpl());
  }
  return impls;
}

}  // namespace

bool graph_reaches_only(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& allowed) {
  const auto allowed_leaves = impls_of(allowed);
  return walk_to_leaves(roots, [&](const c10::TensorImpl* leaf) { return allowed_leaves.count(leaf) != 0; });
}

bool graph_reaches_any(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& leaves) {
  const auto wanted = impls_of(leaves);
  return !walk_to_leaves(roots, [&](const c10::TensorImpl* leaf) { return wanted.count(leaf) == 0; });
}

}  // namespace dpfast
