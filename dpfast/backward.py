"""The replicas' backward passes in parallel, on CPU replicas.

NOTE [Parallel backward]
PyTorch's autograd engine runs every CPU node of a backward on the thread that
called ``backward()`` (a GPU's nodes go to that GPU's own thread). Left alone,
CPU replicas' backward passes run one after the other, while their forwards
ran side by side on the workers.

So, on CPU lanes, the outputs of replicas 1..n-1 reach the gather through one
autograd node (``_C.route``, a C++ node: a Python one cost the step 0.06 ms
warm), that owns their graphs: its backward hands
each replica's part (a backward of that replica's outputs, entered as
``torch.autograd.backward`` enters the engine) to
the replica's worker thread and returns at once, and the caller's thread goes
on with replica 0's graph (the root module's own, left connected). It also
queues the reducer's end-of-backward callback on the caller's graph task; that
callback first waits for the workers' parts (and raises the first error, naming
the replica), then reduces as usual. The workers' gradients arrive through the
same C++ hooks, which launch each complete bucket's reduction from whichever
thread completes it.

Whether to use it (``wanted``): DPFAST_PARALLEL_BACKWARD=1 always, 0 never, auto
(the default) when the caller runs one intra-op thread (torch.set_num_threads(1)
or OMP_NUM_THREADS=1), or shares its threads (workers.caller_shares: idle OpenMP
threads sleep, OMP_WAIT_POLICY=PASSIVE, or one thread per replica and libgomp's
pause): there the workers bring cores that autograd's walk leaves idle, and from
the node's backward to the end-of-backward callback the caller runs replica 0's
part on its share of the intra-op threads (NOTE [CPU threads] in workers.py).
Otherwise the passes in turn already span the cores.

The node is used only where the result is the same as autograd's own walk:
- replica k's graph reaches no leaf but replica k's own parameters
  (``_C.graph_reaches_only``): no input that requires grad, no tensor of the
  caller's graph captured by the module. Otherwise two graph tasks would run
  the caller's nodes;
- every tensor of the outputs is where the gather finds it by structure
  (tensors, None, plain values, lists, tuples, dicts, dataclasses);
- not across processes (the root's hooks order the all-reduce there);
- no forward hook on the module or its submodules (ReplicaSet.forward_hooks_seen), no forward
  pre-hook but PyTorch's weight-recomputing ones (weight_norm, spectral_norm, pruning), and no
  global forward hook or pre-hook (register_module_forward_hook): such a hook may keep a
  replica's activations for ``torch.autograd.grad`` (Grad-CAM, captum's Layer methods), which
  could not reach them through the node (the stand-ins are detached).
Its backward runs only for a backward of everything: ``torch.autograd.grad``
and ``backward(inputs=...)`` never reach it (its only input is a private leaf),
and see replica 0's share, as the README says of them. Each replica's pass keeps
its graph exactly when the caller's backward keeps its own (its retain_graph,
which defaults to create_graph), and where another forward of the same window
may share its nodes; otherwise it frees each node's saved tensors as it goes, as
autograd does for replica 0. The node keeps each replica output until a backward
that does not keep the graph has taken it, and then only where its graph starts
(its gradient edge): a backward of some outputs (loss_G) leaves the others
(loss_D, from the same forward) to a later backward, as on one device; a second
backward of a taken output runs where its graph saved no tensors and is
autograd's own error where it did (dpfast's, where two forwards shared that
backward: their passes kept the graphs, which go with the outputs).

Each replica's part is a graph task of its own, so a parameter used by two
forwards of one backward is marked once per part (autograd's walk sums first
and marks once): the reducer then reduces every bucket at the end of backward
instead of early (GradReducer.note_routed). A mark that still comes after its
bucket's reduction started is an error (GradReadiness.marked_after_complete).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import has_torch_function

from . import _C
from .scatter_gather import iter_tensors
from .workers import caller_shares

_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def _plain_structure(obj: Any) -> bool:
    """True when iter_tensors finds every tensor of obj, as the gather walks it."""
    if isinstance(obj, (torch.Tensor,) + _PLAIN):
        return True
    if isinstance(obj, dict):
        return all(_plain_structure(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_plain_structure(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return all(_plain_structure(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


class _Plan:
    """Replicas 1..n-1's outputs that require grad, flattened, and where each replica's start."""

    def __init__(self, per_replica: List[List[torch.Tensor]], where: List[Tuple[str, str]], replicas: int, threads: int,
                 caller_threads: int, pool, reducer):
        self.replicas = replicas  # 1 + the highest replica index that ran
        self.threads = threads  # each worker's intra-op threads (NOTE [CPU threads])
        self.caller_threads = caller_threads  # the caller's, for replica 0's part
        self.tensors = [t for ts in per_replica for t in ts]
        self.bounds = []
        start = 0
        for ts in per_replica:
            self.bounds.append((start, start + len(ts)))
            start += len(ts)
        self.where = where
        self.pool = pool
        self.reducer = reducer
        self.window = reducer.window  # the forwards of this graph's window, this one included


class _RoutedOutputs:
    """The routing node's backward (_C.route calls it with the stand-ins' gradients, None where none
    came): each replica's part to its worker. Holds the replica outputs, each until a backward that
    does not keep the graph has taken it (then its gradient edge alone): two losses from one forward
    may be backwarded one after the other (a GAN's G and D losses, pix2pixHD), as on one device,
    each through its own outputs."""

    def __init__(self, plan: _Plan, outputs: List[torch.Tensor]):
        self.plan, self.outputs = plan, outputs

    def __call__(self, grads: List[Optional[torch.Tensor]]) -> None:
        plan, tensors = self.plan, self.outputs
        if any(t is None and g is not None for t, g in zip(tensors, grads)):
            raise RuntimeError("dpfast.DataParallel: Trying to backward through the graph a second time through "
                               "replicas' outputs that an earlier backward took without retain_graph (another "
                               "forward shared that backward, and their graphs went with it): specify "
                               "retain_graph=True the first time")
        create_graph = torch.is_grad_enabled()
        # Two forwards of one window may share a replica's nodes (state kept on the module): the
        # first pass must not free what the second still walks.
        caller_keeps = _caller_keeps_graph()
        keep_graph = caller_keeps or len(plan.window) > 1
        if not caller_keeps:
            # Taken. Where this backward's passes free their graphs' saved tensors as they go, the
            # node keeps where each output's graph starts, not its values, as autograd keeps a
            # graph's nodes after it freed their saved tensors: a second backward then works where
            # the replica's graph saved nothing, and is autograd's own error where it did, as on
            # one device. Where the passes keep them (for another forward of the window), the
            # graphs go with the outputs.
            self.outputs = [t if g is None else None if keep_graph else _gradient_edge(t)
                            for t, g in zip(tensors, grads)]
        fns, wheres, workers = [], [], []
        for lane, ((start, end), where) in enumerate(zip(plan.bounds, plan.where), start=1):
            pairs = [(t, g) for t, g in zip(tensors[start:end], grads[start:end]) if g is not None]
            if pairs:
                fns.append(_sub_backward([t for t, _ in pairs], [g for _, g in pairs], create_graph, keep_graph))
                wheres.append(where)
                workers.append(lane)  # the worker that ran this replica's forward
        if fns:
            plan.reducer.run_replica_backward(plan.pool, fns, wheres, workers, plan.replicas, plan.threads,
                                              plan.window, plan.caller_threads)


def _gradient_edge(output: Any) -> Any:
    return output if isinstance(output, torch.autograd.graph.GradientEdge) else \
        torch.autograd.graph.get_gradient_edge(output)


# torch.autograd.backward's own entry into the engine (private; where a torch lacks it, the
# public function is used).
_engine_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _caller_keeps_graph() -> bool:
    """Whether the backward running now keeps its graph (retain_graph or create_graph). Where
    torch cannot say, True: the replicas' graphs then go with the node's saved tensors."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else bool(keeps())


def _sub_backward(tensors, grads, create_graph: bool, keep_graph: bool = True):
    """A replica's part of the backward, for its worker. It keeps the replica's graph where the
    caller's backward keeps its own; otherwise it frees each node's saved tensors as it goes, as
    autograd does for replica 0: the replicas' activations do not all wait for the end of backward
    (peak memory), and freeing them all at once there held up the step's end."""
    tensors, grads = tuple(tensors), tuple(grads)
    if _engine_run_backward is None or has_torch_function(tensors + grads):  # a subclass may handle backward itself
        def run():
            torch.autograd.backward(tensors, grads, retain_graph=keep_graph, create_graph=create_graph)
        return run

    def run():
        # The engine's entry, as torch.autograd.backward calls it, without that function's argument
        # checks and _make_grads: these gradients are the gather's backward's pieces, of the outputs'
        # shapes and dtypes by construction.
        _engine_run_backward(tensors, grads, keep_graph, create_graph, (), allow_unreachable=True,
                             accumulate_grad=True)
    return run


def wanted(num_lanes: int, after_sleep: bool = False) -> bool:
    """DPFAST_PARALLEL_BACKWARD: "1" always, "0" never, "auto" (the default) when the caller runs
    one intra-op thread, or runs replica 0's part on its share of the threads (caller_shares: idle
    OpenMP threads sleep, OMP_WAIT_POLICY=PASSIVE, or libgomp's pause sends them away, not after a
    sleep of the caller: NOTE [CPU threads], NOTE [Idle caller]). Measured on 2 cores
    (bench/results/20261127-cpu-parallel-backward.txt, 20261127-cpu-omp-wait-policy.txt): with one
    intra-op thread, steps with the replicas' backward passes side by side take 0.64-0.84x the time
    of the same steps with the passes in turn. With two threads under the default wait policy they
    take 1.16-1.32x (each pass in turn already spans the cores, and the caller's intra-op team,
    working or spinning, contends with the workers); under PASSIVE, with the caller on its share,
    the whole step took 0.93-1.12x the bare module's time (two runs), against 1.49-1.65x in turn."""
    setting = os.environ.get("DPFAST_PARALLEL_BACKWARD", "auto").strip().lower()
    if setting in ("1", "0"):
        return setting == "1"
    if setting not in ("auto", ""):
        raise ValueError(f"dpfast.DataParallel: DPFAST_PARALLEL_BACKWARD: expected '1', '0' or 'auto', but got "
                         f"{setting!r}")
    return num_lanes > 1 and (torch.get_num_threads() == 1 or caller_shares(num_lanes, after_sleep))


# A private leaf, the node's only input (it never receives a gradient: the node returns None for
# it), shared by every routed forward.
_ANCHOR = torch.empty(0, device="cpu", requires_grad=True)  # whatever torch.set_default_device says


def route(outputs: List[Any], replica_tensors: List[List[torch.Tensor]], where: List[Tuple[str, str]], replicas: int,
          threads: int, caller_threads: int, pool, reducer) -> Optional[Dict[int, torch.Tensor]]:
    """outputs[k], replica_tensors[k] (parameters and buffers) and where[k] of the replicas that ran,
    replica 0 first; ``replicas``: 1 + the highest index among them; ``threads``: each worker's
    intra-op threads, ``caller_threads``: the caller's for replica 0's part. Returns
    {id(output tensor): its stand-in} for the gather, or None where the outputs go to autograd as
    they are."""
    if len(outputs) < 2 or not _plain_structure(outputs[0]):
        return None
    per_replica = []
    for k in range(1, len(outputs)):
        if not _plain_structure(outputs[k]):
            return None
        seen = {}
        for _, t in iter_tensors(outputs[k], None):
            if t.requires_grad:
                seen.setdefault(id(t), t)
        tensors = list(seen.values())
        if tensors and not _C.graph_reaches_only(tensors, replica_tensors[k]):
            return None
        per_replica.append(tensors)
    if not any(per_replica):
        return None
    # The caller's backward walks replica 0's graph: it must stay out of the routed ones (a tensor
    # cached across replicas, as parametrize.cached() does, would have both walk one graph).
    own = [t for _, t in iter_tensors(outputs[0], None) if t.requires_grad]
    if own and _C.graph_reaches_any(own, [t for tensors in replica_tensors[1:len(outputs)] for t in tensors]):
        return None
    plan = _Plan(per_replica, where[1:], replicas, threads, caller_threads, pool, reducer)
    tensors = plan.tensors
    plan.tensors = None  # the node's backward holds them (_RoutedOutputs)
    # A tensor of its own, saved by the node: alive exactly as long as the graph may still run (an
    # output may be a parameter, which outlives every graph).
    sentinel = torch.empty(0)
    reducer.note_routed(weakref.ref(sentinel))
    stand_ins = _C.route(tensors, _ANCHOR, sentinel, _RoutedOutputs(plan, tensors))
    return {id(t): s for t, s in zip(tensors, stand_ins)}
