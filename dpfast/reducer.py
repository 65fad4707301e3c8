"""Reduction of the replicas' gradients into the root module's ``.grad``.

Replica k's gradients live as views into flat buckets (one per group of
parameters of a dtype, about ``bucket_cap_mb`` each, in reverse registration
order so that the first buckets fill first in backward). Autograd
accumulates into those views in place. A post-accumulate-grad hook on every
replica parameter marks it; the hooks and the counting are C++
(csrc/grad_ready.h), which calls back here once per backward and once per
completed bucket. As soon as a bucket holds every replica's gradient of every
one of its parameters, its tree reduction into the root's lane is launched
(on the comm streams, while backward goes on with earlier layers), and the
replicas' buckets are zeroed right after it on their comm streams. The first
mark of a backward also queues an autograd engine callback that runs when
backward ends: it launches the buckets still open (parameters unused on some
replica).

NOTE [Root gradients in the bucket]
The root module is replica 0. Its parameters' ``.grad`` are views into the
root's lane of the buckets, as DDP's ``gradient_as_bucket_view``: a hook on
each root parameter (csrc/grad_ready.h) moves autograd's gradient there and
marks it, so the tree reduction sums in place into ``.grad``, with no receive
buffer on the root's device, no add into ``.grad`` and no zeroing of the
root's lane. A gradient that must stay where autograd put it (sparse, a
parameter that is not contiguous, create_graph=True) is "held": its slice of
the root's lane is zero, and the reduced sum is added into ``.grad`` at the
end, as autograd accumulates. Across processes every parameter is held (the
root's lane is the local sum that is all-reduced; ``.grad`` keeps what earlier
steps left there).

NOTE [Unused parameters]
Only parameters that received a gradient on at least one replica (replica 0
included) are touched; a parameter unused everywhere keeps its ``.grad``
(None stays None), as on one device. Replicas' buckets are zero between
reductions, so a parameter unused on one replica adds nothing from it.

NOTE [Clearing an accumulation]
Under no_sync() replica 0's accumulated share is in the root's .grad and the
others' stay in the replicas' buckets. A zero_grad() before the next backward
must drop them all, as DDP's no_sync (which keeps everything in .grad) does.
After a no_sync backward the reducer records each root .grad (which tensor, its
version, and, on its device, whether it holds a nonzero entry); at the next
forward, when a rebuild reduces what is pending, and once more when backward
enters the wrapper's outputs (a prehook on their nodes, before any replica's
graph runs: `out = model(x); opt.zero_grad(); loss.backward()`), a root .grad
that is gone, or changed from holding values to all zero, has the replicas'
shares of it zeroed. Only a clear counts: clip_grad_norm_ multiplies by 1 in
place under its bound (a version bump, the values kept), and a .grad that held
nothing (replica 0 did not reach the parameter, or its rows gave zero) cannot
tell a zero_() from such a no-op, so it is read as kept; a None .grad given
zeros clears nothing. Across processes replica 0's share waits in the root's
lane (.grad keeps autograd's zeros during the block): whether it held values is
read there, and that lane is zeroed too.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import List, Optional

import torch

from . import _C, streams as lane_streams
from .devices import link_model
from .replicas import flat_alias
from .workers import give_back_caller_threads, note_caller_busy, restore_default_threads, share_out_caller_threads

_MB = 1024 * 1024
ROOT_NONE, ROOT_IN_VIEW, ROOT_HELD = 0, 1, 2  # GradReadiness.root_states()

# Every reducer alive: a .grad that is another reducer's view may still be reduced into on its
# comm stream (two wrappers of one module in one backward), and is read only after that.
_LIVE_REDUCERS: "weakref.WeakSet[GradReducer]" = weakref.WeakSet()


class GradReducer:
    def __init__(self, root_params: List[torch.Tensor], replica_params: List[List[torch.Tensor]],
                 devices: List[torch.device], streams: Optional[list], comm_streams: Optional[list] = None,
                 bucket_cap_mb: float = 25.0, first_bucket_cap_mb: float = 1.0, tree_shape: str = "auto",
                 allow_p2p: bool = True, phase=None, cross_process=None, sparse_dims: Optional[dict] = None):
        """replica_params[k - 1][i] is replica k's copy of root_params[i]. ``streams`` are the
        replicas' compute streams (their gradients are produced there), ``comm_streams`` the
        streams the reductions run on (None on the CPU). ``sparse_dims`` maps the index of a
        parameter whose gradient is sparse (a sparse nn.Embedding's weight) to its sparse_dim."""
        self.root_params = root_params
        self.replica_params = replica_params
        self.devices = devices
        self.streams = streams
        self.comm_streams = comm_streams if comm_streams is not None else streams
        self.comm_stream_ids = lane_streams.ids(self.comm_streams)
        self.tree_shape = tree_shape
        self.allow_p2p = allow_p2p
        self.link = link_model(devices)  # NOTE [Link model]
        self._phase = phase
        self.cross = cross_process  # dpfast.distributed.CrossProcess, or None inside one process
        self.num_replicas = len(replica_params) + 1
        self.sync_enabled = True
        self.reduction_count = 0  # bucket reductions so far, for tests and benchmarks
        # NOTE [Reduction trace]: the benchmark sets a list here; every backward then appends CUDA
        # timing events: each bucket's reduction span (from the moment every lane's gradients of it
        # are in to the end of the root's last add), the end of the replicas' backward work, and the
        # end of the end-of-backward step. Only for lanes on one device (events of different devices
        # cannot be compared). None costs nothing.
        self.trace: Optional[list] = None
        self.early_reduction_count = 0  # of which launched during backward
        self._lock = threading.Lock()
        self._callback_queued = False
        self._callback_task = -1  # the graph task whose end runs _end_of_backward
        self._queued_end = _no_end  # a weak reference to the latest _EndOfBackward queued
        self._replica_jobs: list = []  # NOTE [Parallel backward]: replicas' backward on the workers
        self._routed: list = []  # plan_alive() of routed forwards whose graphs may still run
        self._allow_early_launch = True  # False after a gradient came after its bucket's reduction
        self.no_routing = False  # True after backward(create_graph=True) in a routed window (_stop_routing_for_graphs)
        self._root_hooks = {}  # parameter index -> Python hook on the root's parameter (across processes)
        # NOTE [Clearing an accumulation]: after a no_sync backward, each root .grad (a weak
        # reference) and its version; None when the replicas' buckets hold nothing unreduced.
        self._accumulated: Optional[list] = None
        self._accumulated_held: Optional[torch.Tensor] = None
        self._cleared_check_task = -1  # the graph task that last looked (once per backward)
        # parameter index -> sparse_dim of its sparse gradient, declared by the module or seen on the
        # root: the sum is handed back sparse even when the root got none (replica buckets are dense)
        self._sparse_dims = dict(sparse_dims or {})
        self._hooked: List[torch.Tensor] = []  # replica parameters carrying a C++ hook
        # NOTE [Root gradients in the bucket]: which root gradients stay in .grad whatever happens.
        self._grads_in_buckets = self.cross is None
        self._held = [not self._grads_in_buckets or i in self._sparse_dims or not p.is_contiguous()
                      for i, p in enumerate(root_params)]
        # Buckets in reverse registration order: the last layers' gradients come first in backward.
        # Held gradients get buckets of their own, whose root lane is then a receive buffer.
        order = list(reversed(range(len(root_params))))
        group_ids = {}
        groups = [group_ids.setdefault((root_params[i].dtype, self._held[i]), len(group_ids)) for i in order]
        sizes = [root_params[i].numel() * root_params[i].element_size() for i in order]
        self.buckets: List[List[int]] = [[order[j] for j in bucket] for bucket in _C.assign_buckets(
            sizes, groups, int(bucket_cap_mb * _MB), int(min(first_bucket_cap_mb, bucket_cap_mb) * _MB))]
        self._bucket_len = [len(members) for members in self.buckets]
        self.bucket_of = [0] * len(root_params)
        self.offset_of = [0] * len(root_params)
        # flats[b][k]: bucket b's buffer on replica k; k = 0 is the root's: its parameters' .grad, or a
        # receive buffer where they are held.
        self.flats: List[List[torch.Tensor]] = []
        for b, members in enumerate(self.buckets):
            offset = 0
            for i in members:
                self.bucket_of[i], self.offset_of[i] = b, offset
                offset += root_params[i].numel()
            dtype = root_params[members[0]].dtype
            self.flats.append([torch.zeros(offset, dtype=dtype, device=devices[k]) for k in range(self.num_replicas)])
        # What the engine adds: a complex bucket as the real numbers it holds (a sum is a sum of those).
        self._real_flats = [[torch.view_as_real(f).view(-1) if f.is_complex() else f for f in flats]
                            for flats in self.flats]
        # _views[k][i]: parameter i's slice of its bucket on replica k, made once (hooks run per step).
        # Aliases rather than autograd views (replicas.flat_alias): a version counter each, and the old
        # zero_grad idiom `p.grad.detach_(); p.grad.zero_()` works on them (autograd refuses
        # detach_() on a view: DDP's gradient_as_bucket_view=True breaks it).
        self._views = [[flat_alias(self.flats[self.bucket_of[i]][k], self.offset_of[i], p.shape)
                        for i, p in enumerate(root_params)] for k in range(self.num_replicas)]
        self._lane0_separate = [all(self._held[i] for i in members) for members in self.buckets]
        self._ready = _C.GradReadiness(self.bucket_of, self._bucket_len, True)  # the root's lane counts too
        self._ready.set_callbacks(*_weak_callbacks(self))
        self._start_over()
        for k, stream in enumerate(self.streams or []):  # before any hook can run
            self._ready.set_lane_stream(k, stream.stream_id, devices[k].index)
        for k in range(1, self.num_replicas):
            for i, p in enumerate(replica_params[k - 1]):
                p.grad = self._view(i, k)
                self._ready.attach(p, i, k, self._view(i, k))
                self._hooked.append(p)
        # NOTE [Sparse rows]: parameter index -> the index tensors of the sparse gradients replicas
        # 1..n-1 accumulated into their (dense) buckets since the last reduction, or None where one
        # came dense. The sum is handed back sparse with those rows, zero-valued ones included, as
        # autograd's sparse accumulation keeps them (SparseAdam steps every row a gradient lists).
        self._sparse_rows: dict = {}
        self._sparse_hooks = [replica_params[k - 1][i].register_hook(_sparse_rows_hook(self, i))
                              for i in self._sparse_dims for k in range(1, self.num_replicas)]
        self._hook_roots([p.requires_grad for p in root_params])
        if self._grads_in_buckets:
            for i, p in enumerate(root_params):
                self._ready.attach_root(p, i, self._view(i, 0), self._held[i])
        _LIVE_REDUCERS.add(self)
        # NOTE [Reducer lifetime]: the wrapper's runtime holds the reducer, and so does every graph of
        # a forward that used it (data_parallel._hold_through_backward), so a backward still reduces
        # after the wrapper was dropped or its replicas rebuilt, as often as the graph is run. When
        # the last of them goes, so do the hooks on the root and the buckets, after the lanes.
        self._release = weakref.finalize(self, _release, self._root_hooks, self._ready, devices[0],
                                         (self.comm_streams or []) + (self.streams or []))
        self._release.atexit = False  # nothing to order at interpreter exit

    def _hook_roots(self, active: List[bool]) -> None:
        """NOTE [Cross-process gradients]: replica 0's share goes to the bucket, through a hook on
        each root parameter that requires grad (autograd takes none on a frozen one)."""
        if self.cross is None:
            return
        for i, p in enumerate(self.root_params):
            if active[i] and i not in self._root_hooks:
                self._root_hooks[i] = p.register_hook(self._make_root_hook(i))

    def set_active(self, active: List[bool]) -> None:
        """Which parameters require grad now: a bucket is complete when those of its parameters
        are in (a frozen parameter never marks)."""
        self._hook_roots(active)
        counts = [sum(1 for i in members if active[i]) for members in self.buckets]
        if counts != self._bucket_len:
            self._bucket_len = counts
            self._ready.set_bucket_len(counts)

    def _reset_window(self) -> None:
        """Per-backward state: marks per bucket, which buckets were launched (locally, and
        across processes in bucket order), and the cross-process work in flight."""
        self._ready.reset_window()
        # One entry per forward since the last backward's end; a forward's graph keeps the list it
        # was made in (NOTE [Parallel backward]: a retained graph's backward has no forward).
        self.window: list = []
        self._window_routed = False  # a forward of this window runs its replicas' backward passes
        self._early_launch = self._allow_early_launch
        self._launched = [False] * len(self.buckets)
        self._next_cross = 0
        self._cross_work = [None] * len(self.buckets)

    def _view(self, i: int, k: int) -> torch.Tensor:
        return self._views[k][i]

    def _make_root_hook(self, i: int):
        ref = weakref.ref(self)  # the hook lives on the root's parameter, which outlives this reducer

        def hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
            self = ref()
            if self is None or not self.root_params[i].requires_grad:
                return None  # frozen after the forward: autograd skips the leaf, nothing to carry (_finish)
            view = self._view(i, 0)
            with _NoGrad():
                view.add_(grad)
            self._ready.wait_for_current(view, 0)  # NOTE [Stream ordering]: where autograd ran elsewhere
            self._ready.mark(i, 0)
            # Autograd adds this into the root's .grad: nothing, the bucket carries it.
            if grad.is_sparse:  # an empty gradient of the same layout (autograd checks it)
                return torch.sparse_coo_tensor(grad._indices()[:, :0], grad._values()[:0], grad.shape,
                                               check_invariants=False)
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)
        return hook

    def _on_first_mark(self) -> None:
        """The first gradient of a backward: its end will finish the reduction."""
        with self._lock:
            if not self.window:
                # No forward since the last backward ended (a second loss of one forward, a retained
                # graph): the counter learns how many replicas took part only from their marks as
                # they come, so a bucket could count complete before the last replica's share.
                self._early_launch = False
            if not self._callback_queued:
                self._queue_end_of_backward()

    def _queue_end_of_backward(self) -> None:
        self._callback_queued = True
        self._callback_task = torch._C._current_graph_task_id()
        end = _EndOfBackward(self)
        self._queued_end = weakref.ref(end)
        torch.autograd.Variable._execution_engine.queue_callback(end)

    def _drop_failed_backward(self, end: "_EndOfBackward") -> None:
        """The backward that queued ``end`` raised (its graph task dropped the callback without
        calling it): its replicas' parts are waited for, then what it left is dropped, as
        note_forward would at the next forward."""
        with self._lock:
            if not self._callback_queued or self._queued_end() not in (None, end):
                return  # not the latest end (one queued since is still to come)
            jobs, self._replica_jobs = self._replica_jobs, []
        self._discard_after(jobs)

    def _discard_after(self, jobs: list) -> None:
        """What a backward that raised left is dropped, once its replicas' parts (``jobs``, which
        may still be running) are done."""
        for job in jobs:
            job.done.wait()
        restore_default_threads(jobs)
        with self._lock:
            self._discard()

    def note_routed(self, plan_alive) -> None:
        """NOTE [Parallel backward]: a forward's replicas' graphs will run as backward passes of
        their own (``plan_alive()``: not None while its graph is still there). A replica's parameter must
        then get its gradient from one pass per backward, or a bucket counted complete after the
        first could miss the next: with another forward in this window, or a graph of an earlier
        window still kept (retain_graph), this window's buckets are reduced at the end. Forwards
        under no_grad count too: a reentrant checkpoint's first forward runs so, and its graph is
        made again inside the backward. (This forward's note_forward looked for older graphs.)"""
        with self._lock:
            if len(self.window) > 1:
                self._early_launch = False
            self._routed.append(plan_alive)
            self._window_routed = True

    def _older_routed_graph_alive(self) -> bool:
        self._routed = [alive for alive in self._routed if alive() is not None]
        return bool(self._routed)

    def run_replica_backward(self, pool, fns: list, wheres: list, workers: List[int], replicas: int,
                             threads: int, window: list, caller_threads: Optional[int] = None) -> None:
        """NOTE [Parallel backward]: runs the replicas' parts of this backward on the workers. Its
        end (queued here, on the caller's graph task: the workers' hooks run in graph tasks of their
        own) waits for them. ``replicas`` (1 + the highest replica index of the forward) is told
        to the counter first: a backward of a retained graph has no forward before it, and a bucket
        must not count as complete when the first of the parallel replicas is in. ``window``: the
        forwards of the window the graph was made in. ``caller_threads``: the caller's intra-op
        threads until the end of this backward (NOTE [CPU threads]), which puts its own back."""
        task = torch._C._current_graph_task_id()
        with self._lock:
            stale = self._callback_queued and self._callback_task != task
            stale_jobs, self._replica_jobs = (self._replica_jobs, []) if stale else ([], self._replica_jobs)
        if stale:
            # An earlier backward raised (its end never came) and no forward came since to drop
            # what it left: its replicas' parts may still be running. Wait for them, then drop it.
            self._discard_after(stale_jobs)
        self._ready.note_replicas(replicas)
        with self._lock:
            if len(window) > 1 or window is not self.window:
                self._early_launch = False  # see note_routed
            if not self._callback_queued:
                self._queue_end_of_backward()
        # Before the workers have work: see WorkerPool.run.
        share_out_caller_threads(caller_threads)
        jobs = pool.submit(fns, wheres, workers, threads)
        with self._lock:
            self._replica_jobs.extend(jobs)

    def _wait_for_replica_backward(self) -> None:
        """Waits for the workers' parts of this backward; raises the first error among them. Not
        under the lock: the workers' hooks take it."""
        with self._lock:
            jobs, self._replica_jobs = self._replica_jobs, []
        for job in jobs:
            job.done.wait()
        note_caller_busy()  # NOTE [Idle caller]: the waits just now were not idleness before a step
        restore_default_threads(jobs)
        give_back_caller_threads()
        for job in jobs:
            if job.error is not None:
                with self._lock:
                    self._discard()  # the replicas' shares not yet reduced are dropped
                job.reraise()

    def _on_bucket_complete(self, b: int) -> None:
        """Every replica's gradient of every parameter of bucket b is in (replica 0's too): reduce
        it now, while backward goes on with the earlier layers. (With the root's lane alone there
        is nothing to reduce, except across processes.)"""
        with self._lock:
            if (self.sync_enabled and self._early_launch and not self._launched[b]
                    and (self.cross is not None or self._ready.replicas_used() > 1)):
                self._launch(b)
                self.early_reduction_count += 1

    @property
    def accumulating(self) -> bool:
        """Whether the replicas' buckets hold a no_sync() accumulation not yet reduced."""
        return self._accumulated is not None

    def _record_accumulated(self) -> None:
        """Each root .grad now (a weak reference, its version), and whether it holds anything: a
        grad that is all zero now (replica 0 did not reach the parameter) cannot show a clear, and
        the flags stay on the device until a change is looked at (no sync per step)."""
        grads = [p.grad for p in self.root_params]
        # Across processes replica 0's share is in the root's lane, and .grad holds zeros.
        shares = ([self._view(i, 0) for i, g in enumerate(grads) if g is not None] if self.cross is not None
                  else [g for g in grads if g is not None])
        with _NoGrad():
            held = _holds_values(shares) if shares else None
        self._accumulated = [(None, 0) if g is None else (weakref.ref(g), g._version) for g in grads]
        self._accumulated_held = held  # one flag per present .grad, in order

    def drop_cleared_accumulation(self) -> None:
        """NOTE [Clearing an accumulation]: the replicas' shares of every root .grad cleared since
        the last no_sync backward are zeroed. Inside a backward, once per backward and before any
        replica's graph runs."""
        with self._lock:
            if self._accumulated is None:
                return
            task = torch._C._current_graph_task_id()
            if task != -1:
                if task == self._cleared_check_task:
                    return
                self._cleared_check_task = task
            gone, changed, held_at = [], [], []  # held_at: the index of a changed .grad's flag
            flag = 0
            for i, (p, (ref, version)) in enumerate(zip(self.root_params, self._accumulated)):
                if ref is None:
                    continue  # None at the end of the block: a .grad made since clears nothing
                grad = p.grad
                if grad is None:
                    gone.append(i)
                elif grad is not ref() or grad._version != version:
                    changed.append(i)
                    held_at.append(flag)
                flag += 1
            cleared = list(gone)
            if changed:  # one read back for all of them (a device sync on a GPU, only after a change)
                with _NoGrad():
                    now = _holds_values([self.root_params[i].grad for i in changed])
                    before = self._accumulated_held[torch.tensor(held_at, device=now.device)]
                    # all zero now, where it held something: a no-op in place (clipping by 1) keeps it
                    flags = (before & ~now).tolist()
                cleared += [i for i, was_cleared in zip(changed, flags) if was_cleared]
            if not gone and not changed:
                return
            if cleared:
                self._zero_replica_shares(cleared)
            self._record_accumulated()

    def _zero_replica_shares(self, indices: List[int]) -> None:
        """Zeroes these parameters' slices of replicas 1..n-1's buckets (and of the root's lane
        across processes, where replica 0's share waits), each on its comm stream after its
        lane's work and the current stream's, before the lane's next accumulation. A replica's
        .grad that carries a graph (a no_sync backward with create_graph=True) is its share too:
        its view takes its place again."""
        for k in range(1, self.num_replicas):
            for i in indices:
                p = self.replica_params[k - 1][i]
                if p.grad is not self._view(i, k):
                    p.grad = self._view(i, k)
        for i in indices:
            self._sparse_rows.pop(i, None)  # NOTE [Sparse rows]
        current = lane_streams.current_stream(self.devices[0])
        with _NoGrad():
            for k in range(0 if self.cross is not None else 1, self.num_replicas):
                comm = self.comm_streams[k] if self.comm_streams else None
                lane_streams.wait(comm, current)
                if self.streams:
                    lane_streams.wait(comm, self.streams[k])
                with lane_streams.on(comm):
                    torch._foreach_zero_([self._view(i, k) for i in indices])
                if self.streams:
                    lane_streams.wait(self.streams[k], comm)

    def note_forward(self, num_replicas: int) -> None:
        if self._accumulated is not None and torch._C._current_graph_task_id() == -1:
            self.drop_cleared_accumulation()  # not for a recomputation inside backward
        with self._lock:
            if self._callback_queued and torch._C._current_graph_task_id() == -1:
                # A backward marked gradients but its end never came: it raised (autograd does not
                # run final callbacks then). Drop what it left, as if it had not run, so the next
                # backward reduces only its own gradients. (The caller drained the workers first.)
                # Not for a forward inside a backward (a checkpoint's recomputation): that
                # backward's end is still to come.
                self._replica_jobs = []
                self._discard()
            if self._window_routed or self._older_routed_graph_alive():
                self._early_launch = False  # see note_routed
            self._ready.note_replicas(num_replicas)
            self.window.append(num_replicas)
        if self._grads_in_buckets:
            self._ready.ensure_root_hooks()  # the reducer of the latest forward hooks the root

    def note_weights_moved(self) -> None:
        """A forward moved replica weights (Tensor.set_: a new gradient accumulator). After an
        earlier forward of the same backward, a weight then gets its gradient through two
        accumulators, one after the other: a bucket counted complete at the first could miss the
        second. This backward reduces every bucket at its end."""
        with self._lock:
            if len(self.window) > 1:
                self._early_launch = False

    def _discard(self) -> None:
        current = lane_streams.current_stream(self.devices[0])
        if self.comm_streams:
            # Buckets launched early are being reduced into the root's .grad: what comes next on
            # the caller's and the root's streams (zero_grad, the next step's hooks) waits for them.
            lane_streams.wait(current, self.comm_streams[0])
            lane_streams.wait(self.streams[0], self.comm_streams[0])
        with torch.no_grad():
            for i in self._ready.held_roots():
                if not self._lane0_separate[self.bucket_of[i]]:
                    self._view(i, 0).zero_()
        for b in range(len(self.buckets)):
            self._zero_bucket(b, self.num_replicas, current)
        if self._ready.take_graph_grads():
            self._put_views_back()
        self._callback_queued = False
        self._start_over()

    def _zero_bucket(self, b: int, replicas: int, current) -> None:
        """Zeroes bucket b on replicas 1 to `replicas` - 1 (and the root's lane where it is a
        receive buffer), each on its comm stream after what the current stream did with it; the
        next backward accumulates into it only after that."""
        with torch.no_grad():
            for k in range(0 if self._lane0_separate[b] else 1, replicas):
                comm = self.comm_streams[k] if self.comm_streams else None
                lane_streams.wait(comm, current)
                with lane_streams.on(comm):
                    self.flats[b][k].zero_()
                if self.streams:
                    lane_streams.wait(self.streams[k], comm)

    def _start_over(self) -> None:
        """No gradient pending: the state after a reduction (or after discarding one)."""
        self._ready.start_over()
        self._reset_window()
        self._accumulated = self._accumulated_held = None  # NOTE [Clearing an accumulation]
        self._sparse_rows = {}  # NOTE [Sparse rows]

    def _launch(self, b: int) -> None:
        """Starts bucket b's tree reduction on the comm streams, after the replicas' backward work
        that produced its gradients (NOTE [Stream ordering])."""
        used = self._ready.replicas_used()
        if self.streams:
            for k in range(used):
                lane_streams.wait(self.comm_streams[k], self.streams[k])
        trace = self.trace if self.comm_streams else None
        # The span starts when every lane's gradients of the bucket are in (each comm stream has
        # just waited for its lane), not when the root's lane is: no wait counts as reduction.
        ready = [_timing_event(self.comm_streams[k]) for k in range(used)] if trace is not None else None
        # Both below autograd (NOTE [Engine writes and version counters] in csrc/comm.h): no
        # torch.no_grad() needed, which cost more than either call on the CPU.
        flats = self._real_flats[b]
        _C.reduce_add_(flats[:used], 0, self.comm_stream_ids[:used], self.tree_shape, 0, self.allow_p2p, *self.link)
        # The replicas' buckets are zeroed for the next backward right away, each on its comm
        # stream, which reduce_add_ leaves after the reads of it (NOTE [Stream ordering] in
        # csrc/comm.h): not at the end of this backward. Their compute streams wait for that at
        # the end of backward (_finish).
        _C.zero_(flats[1:used], self.comm_stream_ids[1:used])
        if trace is not None:
            trace.append(("bucket", b, ready, _timing_event(self.comm_streams[0])))
        self._launched[b] = True
        self.reduction_count += 1
        if self.cross is not None:
            self._launch_cross_in_order()

    def _launch_cross_in_order(self) -> None:
        """All-reduces across processes every locally reduced bucket whose predecessors are all
        on their way: the same order on every rank (NOTE [Cross-process gradients])."""
        comm0 = self.comm_streams[0] if self.comm_streams else None
        while self._next_cross < len(self.buckets) and self._launched[self._next_cross]:
            b = self._next_cross
            self._cross_work[b] = self.cross.all_reduce_async(self.flats[b][0], comm0)
            self._next_cross += 1

    def _end_of_backward(self) -> None:
        self._wait_for_replica_backward()
        with self._lock:
            self._callback_queued = False
            if self._ready.marked_after_complete() and any(self._launched):
                # A replica's parameter got gradients from two backward passes of this backward
                # (a tied weight inside and outside a reentrant checkpoint, say), and the second
                # came after its bucket's reduction had started: the reduced sum misses it. Say
                # so, rather than train on it, and reduce at the end of backward from now on.
                self._allow_early_launch = False
                self._discard()
                raise RuntimeError(
                    "dpfast.DataParallel: a replica's parameter received gradients from two backward "
                    "passes in one backward (a weight used inside and outside a reentrant checkpoint, "
                    "for example), the second after its gradient bucket had been reduced, so the "
                    "gradients accumulated since the last reduction (this backward's, and any under "
                    "no_sync()) are incomplete in .grad: buckets reduced before it hold every replica's share, the "
                    "others only replica 0's. This wrapper now "
                    "reduces at the end of backward; run the step again.")
            if not self.sync_enabled:
                self._reset_window()  # no_sync(): gradients keep accumulating in the replicas' buckets
                self._record_accumulated()  # NOTE [Clearing an accumulation]
                return
            trace = self.trace if self.streams else None
            if trace is not None:  # the replicas' backward work is all enqueued by now
                current = lane_streams.current_stream(self.devices[0])
                trace.append(("compute_end", [_timing_event(s) for s in self.streams + [current]]))
            if self._phase is None:
                self._finish()
            else:
                with self._phase("reduce"):
                    self._finish()
            if trace is not None:
                trace.append(("finish_end", _timing_event(lane_streams.current_stream(self.devices[0]))))

    def reduce(self) -> None:
        """Reduces every bucket holding a gradient into the root's .grad now (outside backward):
        what a zero_grad() cleared since a no_sync() block is dropped first."""
        self.drop_cleared_accumulation()
        with self._lock:
            self._reset_window()
            self._finish()

    def _finish(self) -> None:
        """Launches the buckets not yet launched and adds the reduced sums of held gradients into
        the root's .grad."""
        used = self._ready.replicas_used()
        if self.cross is None and used < 2:
            self._start_over()  # the root's lane alone: autograd's .grad is the whole gradient
            return
        current = lane_streams.current_stream(self.devices[0])
        comm0 = self.comm_streams[0] if self.comm_streams else None
        got_grad = self._ready.got_grad()
        # Frozen between the forward and this backward (requires_grad_(False)): autograd skips the
        # root's leaf, as it skips a leaf that no longer requires grad on one device; the replicas'
        # parameters still required grad, and their shares are dropped, not handed to its .grad.
        frozen = [i for i, (got, p) in enumerate(zip(got_grad, self.root_params)) if got and not p.requires_grad]
        if frozen:
            self._zero_replica_shares(frozen)
            for i in frozen:
                got_grad[i] = False
        if self.cross is not None:  # every bucket, in order, on every rank
            for b in range(len(self.buckets)):
                if not self._launched[b]:
                    self._launch(b)
            got_grad = self.cross.any_rank(got_grad)
        # Held for this backward only: their slice of the root's lane is zero, their sum goes into .grad.
        held = [] if self.cross is not None else [i for i in self._ready.held_roots()
                                                   if not self._lane0_separate[self.bucket_of[i]]]
        adopt: List[int] = []  # parameters whose .grad becomes their view once reduced
        states = None
        separate: List[int] = []  # parameters whose reduced sum is added into .grad
        touched_buckets = []  # whose root lane may need zeroing
        with _NoGrad():
            for b, members in enumerate(self.buckets):
                touched = [i for i in members if got_grad[i]]
                if self._cross_work[b] is not None:
                    self._cross_work[b].wait()
                if not touched:
                    continue
                touched_buckets.append(b)
                if self._lane0_separate[b]:
                    separate.extend(touched)
                if not self._launched[b]:
                    if not self._lane0_separate[b]:
                        states = self._ready.root_states() if states is None else states
                        self._claim(touched, states, adopt, held, current)
                        lane_streams.wait(comm0, current)
                    self._launch(b)
            lane_streams.wait(current, comm0)
            graph_grads = self._ready.take_graph_grads()  # create_graph=True: replicas' .grad carry graphs
            if graph_grads and self.streams:
                for k in range(1, used):  # those gradients are read on the current stream
                    lane_streams.wait(lane_streams.current_stream(self.devices[k]), self.streams[k])
            with_graphs = graph_grads and not self._window_routed
            if graph_grads and self._window_routed:
                self._stop_routing_for_graphs()
            self._add_into_grads(separate + held, used if with_graphs else 0)
            if graph_grads:
                self._put_views_back()
            for i in adopt:
                self.root_params[i].grad = self._view(i, 0)
            # Where the root's lane is a receive buffer, and for gradients held this time: zero
            # again after the add, on the current stream. The next reduction into it runs on the
            # root's comm stream after the root's compute stream (_launch), which waits for the
            # current stream at the next forward that uses it; a claim (_claim) or a hook on
            # another stream is ordered by its own wait.
            zero = [self.flats[b][0] for b in touched_buckets if self._lane0_separate[b]]
            zero += [self._view(i, 0) for i in held]
            if zero:
                torch._foreach_zero_(zero)
            if self.streams:  # the next backward's accumulation waits for the zeroing (_launch)
                for k in range(1, used):
                    lane_streams.wait(self.streams[k], self.comm_streams[k])
        self._start_over()

    def _claim(self, touched: List[int], states: List[int], adopt: List[int], held: List[int], current) -> None:
        """Before a bucket is reduced at the end of backward: the root's lane must hold what each
        parameter's .grad holds (NOTE [Root gradients in the bucket]). The root's hook did that for
        those it marked; not for a parameter replica 0 did not use, nor where the hook was not
        ours (a Python hook registered after it, the root used without the wrapper)."""
        for i in touched:
            if states[i] == ROOT_HELD:
                continue  # already among `held`
            view = self._view(i, 0)
            grad = self.root_params[i].grad
            if grad is None:
                view.zero_()
                # a gradient seen sparse on the root (not declared) is handed back sparse
                (held if i in self._sparse_dims else adopt).append(i)
            elif _C.GradReadiness.keeps_in_grad(grad, view):
                view.zero_()
                held.append(i)
            elif grad.data_ptr() != view.data_ptr():
                _wait_for_other_reducers(self, current)
                view.copy_(grad)
                adopt.append(i)

    def _add_into_grads(self, indices: List[int], graph_replicas: int = 0) -> None:
        """Adds the reduced sums of these parameters into their .grad, exactly as autograd
        accumulates (creating it where it is None). ``graph_replicas``: after a backward with
        create_graph=True, the replicas 1..graph_replicas-1 whose .grad carry graphs; where all of
        them do for a parameter whose .grad does too, their gradients are added with their graphs
        (as nn.DataParallel's ReduceAddCoalesced does), so a penalty on .grad differentiates through
        every replica, not only replica 0."""
        grads, sums = [], []  # dense .grad to add into: one fused add
        for i in indices:
            p = self.root_params[i]
            reduced = self._view(i, 0)
            grad = p.grad
            if graph_replicas > 1 and grad is not None and grad.requires_grad and not grad.is_sparse:
                shares = [self.replica_params[k - 1][i].grad for k in range(1, graph_replicas)]
                if all(share is not None and share.requires_grad for share in shares):
                    with torch.enable_grad():
                        for share in shares:
                            grad = grad + share.to(grad.device)
                    p.grad = grad
                    continue
            if grad is None:
                sparse_dim = self._sparse_dims.get(i)
                p.grad = (torch.empty_like(p).copy_(reduced) if sparse_dim is None
                          else self._as_sparse(i, reduced, sparse_dim))
            elif grad.is_sparse:  # nn.Embedding(sparse=True): the sum stays sparse, as nn.DataParallel's
                self._sparse_dims[i] = grad.sparse_dim()
                p.grad = grad + self._as_sparse(i, reduced, grad.sparse_dim())
            else:
                grads.append(grad)
                sums.append(reduced)
        if grads and len(set(map(id, grads))) == len(grads):
            torch._foreach_add_(grads, sums)
        else:  # none, or a .grad shared by two parameters: one add after the other
            for grad, reduced in zip(grads, sums):
                grad.add_(reduced)

    def _as_sparse(self, i: int, reduced: torch.Tensor, sparse_dim: int) -> torch.Tensor:
        """The replicas' reduced (dense) sum of parameter i as a sparse gradient listing its nonzero
        rows and every row a replica's sparse gradient listed (NOTE [Sparse rows])."""
        rows = self._sparse_rows.pop(i, None)
        if not rows:  # none recorded, or one came dense: its nonzero rows
            return reduced.to_sparse(sparse_dim)
        listed = reduced.reshape(*reduced.shape[:sparse_dim], -1).ne(0).any(-1)
        listed[tuple(torch.cat(rows, dim=1).to(listed.device))] = True
        indices = listed.nonzero().t()
        return torch.sparse_coo_tensor(indices, reduced[tuple(indices)], reduced.shape, check_invariants=False)

    def _stop_routing_for_graphs(self) -> None:
        """backward(create_graph=True) where the replicas' backward passes ran on their workers
        (NOTE [Parallel backward]): a penalty's backward through their graphs would reach each
        replica's forward graph twice, once through its gradient and once through the routing node,
        in two graph tasks. This step's .grad carries replica 0's graph only (its values are exact);
        from the next forward on, the wrapper leaves the replicas' passes to autograd's own walk."""
        if not self.no_routing:
            self.no_routing = True
            warnings.warn("dpfast.DataParallel: backward(create_graph=True) with CPU replicas' backward passes "
                          "side by side (DPFAST_PARALLEL_BACKWARD): this step's .grad carries replica 0's graph "
                          "only; from the next step on the passes run in turn and .grad carries every replica's. "
                          "Set DPFAST_PARALLEL_BACKWARD=0 to have it from the first step", UserWarning, stacklevel=2)

    def _put_views_back(self) -> None:
        """After a backward with create_graph=True: the replicas' .grad that kept their graphs
        become their bucket views again (zero since their reduction), where the next backward
        accumulates."""
        for k in range(1, self.num_replicas):
            for i, p in enumerate(self.replica_params[k - 1]):
                view = self._view(i, k)
                if p.grad is not view:
                    p.grad = view

    def has_pending(self) -> bool:
        return self._ready.any_grad()

    def remove(self) -> None:
        """Detaches this reducer now: another takes over the same replicas' parameters."""
        for param in self._hooked:
            _C.GradReadiness.detach(param)
        self._hooked = []
        for handle in self._sparse_hooks:
            handle.remove()
        self._sparse_hooks = []
        self._ready.clear_callbacks()
        self._release()  # the root's hooks too


class _NoGrad:
    """torch.no_grad() for the hot paths (every backward's end, every root gradient across
    processes): the same thread-local switch, without the decorator machinery that made the
    context manager cost ~30 us a step of the caller's time on CPU lanes."""
    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc_info) -> None:
        torch._C._set_grad_enabled(self.prev)


def _no_end() -> None:
    return None


class _EndOfBackward:
    """The reducer's end-of-backward callback. A backward that raises never calls it, and drops it
    with its graph task, on the thread that ran the backward, as the error propagates: the caller's
    threads that a routed backward shared out go back then (NOTE [CPU threads]), and what that
    backward left in the buckets is dropped, before the user's code sees the error. A backward of
    the same graph may follow without a forward (retain_graph, a second loss of one forward): it
    starts from nothing and gets an end of its own, as it did only after a forward before."""

    __slots__ = ("reducer", "called", "__weakref__")

    def __init__(self, reducer: "GradReducer"):
        self.reducer = reducer
        self.called = False

    def __call__(self) -> None:
        self.called = True
        self.reducer._end_of_backward()

    def __del__(self) -> None:
        try:
            give_back_caller_threads()  # this thread's, if it still holds a share
            if not self.called:
                self.reducer._drop_failed_backward(self)
        except Exception:  # interpreter shutdown
            pass


def own_hook_ids() -> set:
    """The keys, in parameters' _backward_hooks, of the hooks that live reducers put on root
    parameters (across processes, _hook_roots): not the user's."""
    return {handle.id for reducer in list(_LIVE_REDUCERS) for handle in reducer._root_hooks.values()}


def _sparse_rows_hook(reducer: GradReducer, i: int):
    """A hook on a replica's parameter i (NOTE [Sparse rows]): records the rows its sparse gradient
    lists before autograd adds it into the replica's dense bucket. From any worker thread: one
    list append, atomic under the GIL."""
    ref = weakref.ref(reducer)  # the hook lives on the replica's parameter, which may outlive the reducer

    def hook(grad: torch.Tensor) -> None:
        reducer = ref()
        if reducer is None:
            return
        rows = reducer._sparse_rows
        if grad.is_sparse:
            if rows.get(i, []) is not None:
                rows.setdefault(i, []).append(grad._indices())
        else:
            rows[i] = None  # a dense gradient: its rows are the sum's nonzero ones
    return hook


def _holds_values(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A bool tensor on the first one's device: whether each tensor has an entry that is nonzero
    (or NaN). One aminmax each (a vectorised pass, 5-10x faster than any() on the CPU), then one
    comparison for all: the per-tensor calls are what costs on small models."""
    lows, highs = [], []
    for t in tensors:
        values = t.coalesce()._values() if t.is_sparse else t
        if values.is_complex():
            values = torch.view_as_real(values)
        if values.numel() == 0:
            values = values.new_zeros(1)
        low, high = torch.aminmax(values)
        lows.append(low)
        highs.append(high)
    device = tensors[0].device
    return (torch.stack(lows).to(device) != 0) | (torch.stack(highs).to(device) != 0)


def _timing_event(stream) -> "torch.cuda.Event":
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _wait_for_other_reducers(reducer: GradReducer, current) -> None:
    for other in list(_LIVE_REDUCERS):
        if other is not reducer and other.comm_streams and other.devices[0] == reducer.devices[0]:
            lane_streams.wait(current, other.comm_streams[0])


def _release(root_hooks: dict, ready, device: torch.device, streams: list) -> None:
    """What a reducer leaves behind: its hooks on the root's parameters, and its buckets, freed
    only after the lanes' work on them (the caching allocator would hand them out at once)."""
    for handle in root_hooks.values():
        handle.remove()
    root_hooks.clear()
    ready.detach_roots()
    current = lane_streams.current_stream(device)
    for stream in streams:
        lane_streams.wait(current, stream)


def _weak_callbacks(reducer: GradReducer):
    """The reducer's callbacks for its C++ counter, through a weak reference: the counter lives
    as long as the replicas' parameters (their hooks hold it), and must not keep the reducer alive
    in a cycle that Python's collector cannot see through C++."""
    ref = weakref.ref(reducer)

    def on_first_mark() -> None:
        r = ref()
        if r is not None:
            r._on_first_mark()

    def on_bucket_complete(b: int) -> None:
        r = ref()
        if r is not None:
            r._on_bucket_complete(b)

    return on_first_mark, on_bucket_complete
