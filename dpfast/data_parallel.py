"""dpfast.DataParallel: nn.DataParallel's signature and semantics, with
persistent replicas, persistent workers, one stream per replica and an
engine that moves data by trees of peer copies."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import numbers
import threading
import warnings
import weakref
from typing import Any, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import backward as parallel_backward
from . import checkpoint, distributed, splits
from . import devices as _devices
from . import scatter_gather, streams as lane_streams
from .buffers import BatchNormAverager
from .criterion import ReplicaOutputs
from .reducer import GradReducer, own_hook_ids
from .replicas import ReplicaSet, check_on_device, may_keep_activations
from .workers import (WorkerPool, caller_lane_threads, caller_slept, capture_thread_state, cpu_lane_threads,
                      give_back_caller_threads, omp_pause_setting, python_modes_active, spin_setting, thread_state)


def _make_reducer(*args, **kwargs) -> GradReducer:
    with torch.inference_mode(False):  # buckets made under inference_mode could not train later
        return GradReducer(*args, **kwargs)


def _sparse_dims(module: nn.Module, params: List[torch.Tensor]) -> dict:
    """Which parameters get sparse gradients, by DDP's rule (``expect_sparse_gradient``): the
    weights of nn.Embedding and nn.EmbeddingBag built with sparse=True (sparse_dim 1)."""
    sparse = {id(m.weight) for m in module.modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    return {i: 1 for i, p in enumerate(params) if id(p) in sparse}


def _hold_through_backward(outputs: Any, runtime: _Runtime) -> Any:
    """The outputs' autograd nodes keep the runtime (and so the gradient reducer) alive: a wrapper
    dropped between forward and backward (``DataParallel(m)(x).sum().backward()``) still reduces,
    as nn.DataParallel, which keeps nothing between calls, does."""
    if not torch.is_grad_enabled():
        return outputs
    reducer = runtime.reducer
    # NOTE [Clearing an accumulation]: a zero_grad() between this forward and a backward of it,
    # where gradients accumulate or will (this forward inside no_sync(), its backward after it)
    watch = reducer is not None and (reducer.accumulating or not reducer.sync_enabled)
    gathered = not isinstance(outputs, ReplicaOutputs)
    if not gathered and not watch:
        return outputs
    nodes = {id(t.grad_fn): t.grad_fn for _, t in scatter_gather.iter_tensors(outputs, None) if t.grad_fn is not None}
    if not gathered:
        # gather=False: those nodes are the module's own; metadata holding the runtime would make a
        # cycle through a module that keeps its output, which the collector cannot see through C++
        # (the README says so). The prehook holds the reducer alone.
        for node in nodes.values():
            node.register_prehook(_drop_cleared_accumulation_of(reducer))
        return outputs
    for node in nodes.values():
        node.metadata["dpfast"] = (runtime, reducer)  # the reducer of these replicas, should it be replaced
        if watch:
            node.register_prehook(_drop_cleared_accumulation_of(reducer))
    return outputs


def _drop_cleared_accumulation_of(reducer):
    def prehook(grad_outputs):
        reducer.drop_cleared_accumulation()
    return prehook


_STEPS = ("scatter", "replicate", "parallel_apply", "gather")


# The wrapper whose forward calls a replicate that is not dpfast's own, on this thread
# (_replicate_keeping_the_root).
_REPLICATING = threading.local()


def _overrides_a_step(cls: type) -> bool:
    return any(getattr(cls, name) is not getattr(DataParallel, name) for name in _STEPS)


def _same_devices(device_ids: Any, built: list) -> bool:
    """Whether device_ids names the devices the wrapper was made with (as a tuple, or as strings)."""
    try:
        devices = _devices.parse_device_ids(device_ids)
    except (TypeError, ValueError):
        return False
    return _devices.public_device_ids(devices) == list(built)


def _run_then_put_back(undo, run) -> Any:
    """run(), then puts back what a custom replicate wrote on the root's modules (`undo`, from
    _replicate_keeping_the_root; None: nothing to put back) at the end of the backward of its
    outputs: a checkpointed part of replica 0 recomputes in backward and must see the module as
    its forward did. Where no backward will come (no output requires grad, or run raised), at
    once; where none came, at the wrapper's next call."""
    if undo is None:
        return run()
    outputs = None
    try:
        outputs = run()
        return outputs
    finally:
        _undo_after_backward(undo, outputs)


def _undo_after_backward(undo, outputs) -> None:
    """Every output that carries a graph is hooked: the loss may use any of them (a forward that
    returns (features, logits), a loss on the logits alone). The first hook to run queues the undo
    at the end of that backward."""
    queued = []

    def queue(grad):
        if not queued:
            queued.append(True)
            torch.autograd.Variable._execution_engine.queue_callback(undo)
        return grad
    hooked = False
    for _, t in scatter_gather.iter_tensors(outputs, None):
        if t.requires_grad and t.grad_fn is not None:
            t.register_hook(queue)
            hooked = True
    if not hooked:
        undo()


_NO_PHASE = contextlib.nullcontext()  # reusable: one for every block that no timer reports


def _weak_phase(wrapper: "DataParallel"):
    """wrapper._phase through a weak reference: the runtime (kept by the wrapper's finalizer)
    must not keep the wrapper alive."""
    ref = weakref.ref(wrapper)

    def phase(name: str):
        w = ref()
        return w._phase(name) if w is not None else _NO_PHASE

    return phase


def _global_hooks_may_keep_activations() -> bool:
    """Hooks of every module (torch.nn.modules.module.register_module_forward_hook and its pre-hook
    twin) may keep the replicas' activations too (NOTE [Parallel backward])."""
    return may_keep_activations(getattr(torch_module, "_global_forward_hooks", {}),
                                getattr(torch_module, "_global_forward_pre_hooks", {}))


def module_device_is_cpu(module: nn.Module) -> bool:
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return first is None or first.device.type == "cpu"


def _is_process_group(group: Any) -> bool:
    """A torch.distributed process group, or new_group's mark for a rank outside the group (the
    wrapper checks that it is initialised when it builds its runtime)."""
    distributed_module = getattr(torch, "distributed", None)
    kind = getattr(distributed_module, "ProcessGroup", None) if distributed_module is not None else None
    members = getattr(distributed_module, "GroupMember", None) if distributed_module is not None else None
    outside = getattr(members, "NON_GROUP_MEMBER", object())
    return (kind is not None and isinstance(group, kind)) or group is outside


def _is_flag(value: Any) -> bool:
    """True or False, or what stands for them: 0 and 1, numpy's bool scalars."""
    if isinstance(value, numbers.Integral):  # bool, int, numpy's ints
        return value in (0, 1)
    return getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "ndim", None) == 0


def _as_megabytes(value: Any) -> Optional[float]:
    """A number of megabytes (an int, a float, numpy's or a one-element tensor), or None."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class _Runtime:
    """What the wrapper builds on first use and drops on pickling: replicas,
    the gradient reducer, the workers and the lanes' streams."""

    def __init__(self, wrapper: "DataParallel"):
        spin_setting()  # a bad DPFAST_SPIN_US is named before anything is built
        omp_pause_setting()  # and a bad DPFAST_OMP_PAUSE
        self.module = wrapper.module
        self.owner = weakref.ref(wrapper)
        self.streams = lane_streams.make_lane_streams(wrapper.devices)  # replicas' compute
        self.comm_streams = lane_streams.make_lane_streams(wrapper.devices)  # gradient reductions
        self.cpu_lanes = all(d.type == "cpu" for d in wrapper.devices)
        with torch.inference_mode(False):  # buffers made under inference_mode could not train later
            self.replicas = ReplicaSet(wrapper.module, wrapper.devices, self.streams,
                                       trust_version_counters=wrapper.trust_version_counters,
                                       tree_shape=wrapper.tree_shape, allow_p2p=_devices.p2p_allowed())
        self.reducer: Optional[GradReducer] = None
        self.reducer_build = -1
        self.reducer_indices: List[int] = []  # the parameters it covers (indices into replicas.tensors)
        self.reducer_flags: Optional[tuple] = None  # replicas.grad_flags it was last set up for
        self.bn_averager = BatchNormAverager()
        self.cross = distributed.maybe_cross_process(wrapper.process_group, wrapper.devices[0])
        if self.cross is not None:  # every process starts from rank 0's parameters and buffers
            self.cross.broadcast_from_rank0(list(self.module.parameters()) + list(self.module.buffers()))
        self.pool = WorkerPool(len(wrapper.devices) - 1, cpu_lanes=self.cpu_lanes)
        self.devices = list(wrapper.devices)
        self._wheres: dict = {}
        self.in_own_forward = False  # while dpfast's forward calls replicate()
        self.caller_slept = False  # NOTE [Idle caller]: decided by the last parallel_apply

    def where(self, k: int, rows: Optional[int] = None, backward: bool = False) -> Tuple[str, str]:
        """How an error inside replica k names it, and what the message adds after the replica's
        traceback: made once per replica and chunk size (formatting a device at every step cost more
        than the rest of the hand-off). The first part is nn.DataParallel's own ("in replica 1 on
        device 0" for cuda:0), so that what matches its messages matches these."""
        key = (k, rows, backward)
        where = self._wheres.get(key)
        if where is None:
            device = self.devices[k]
            where = (f"in replica {k} on device {device.index if device.type == 'cuda' else device}"
                     + (" (backward)" if backward else ""),
                     f"replica {k} ran a batch chunk of {rows} rows" if rows is not None and not backward else "")
            if len(self._wheres) > 4096:  # batch sizes that keep changing
                self._wheres.clear()
            self._wheres[key] = where
        return where

    def close(self) -> None:
        # The reducer goes when nothing holds it any more (NOTE [Reducer lifetime]): a graph of a
        # forward may still need it.
        self.pool.close()


_Module = TypeVar("_Module", bound=nn.Module)


class DataParallel(nn.DataParallel[_Module]):  # generic as nn.DataParallel is: DataParallel[MyNet] in annotations
    r"""Implements data parallelism at the module level, as
    :class:`torch.nn.DataParallel` does, as a drop-in replacement.

    Args:
        module: the module to parallelize; it must live on ``device_ids[0]``.
        device_ids: CUDA indices or devices (default: all GPUs). ``"cpu"``
            entries give CPU replicas, and a device may repeat (several
            replicas on one device).
        output_device: where outputs are gathered (default: ``device_ids[0]``).
        dim: the batch dimension inputs are split along and outputs joined on.
        trust_version_counters: skip re-broadcasting parameters whose version
            counters did not change. Wrong after in-place edits through
            ``.data`` (which do not bump them); off by default.
        bucket_cap_mb: size of the gradient buckets.
        tree_shape: ``"auto"``, ``"chain"`` or ``"binomial"`` (see csrc/plan.h).
        chunk_sizes: rows per replica for every batch (must sum to the batch);
            a 0 skips that replica. Settable between calls.
        weights: relative share of each replica (rows are rounded to sum to
            the batch), e.g. ``[0.5, 1, 1, 1]`` for a GPU0 that also holds the loss.
        gather: ``False`` returns the replicas' outputs where they are (a
            ``ReplicaOutputs``), for ``dpfast.ParallelCriterion``.
        scalar_outputs: ``"vector"`` (one value per replica, as nn.DataParallel
            but without its warning) or ``"mean"`` (the chunk-size weighted
            mean: the full-batch value of a mean loss computed in forward).
        average_buffers: after a training forward, set BatchNorm running
            statistics on the root to the whole batch's (not only replica 0's).
        process_group: under torch.distributed (torchrun), the group whose
            processes all-reduce the locally reduced gradients (default: the
            default group when it has more than one process). See
            dpfast/distributed.py.

    Differences from nn.DataParallel are listed in the README.
    """

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[Any]] = None, output_device: Any = None,
                 dim: int = 0, *, trust_version_counters: bool = False, bucket_cap_mb: float = 25.0,
                 tree_shape: str = "auto", chunk_sizes: Optional[Sequence[int]] = None,
                 weights: Optional[Sequence[float]] = None, gather: bool = True, scalar_outputs: str = "vector",
                 average_buffers: bool = False, process_group: Any = None):
        # A subclass of nn.DataParallel so that isinstance checks in user code keep working, but
        # none of its state: nn.Module's constructor only.
        nn.Module.__init__(self)
        torch._C._log_api_usage_once("dpfast.data_parallel")
        if not isinstance(module, nn.Module):
            raise TypeError(f"dpfast.DataParallel: module: expected a torch.nn.Module, but got "
                            f"{type(module).__name__}")
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dpfast.DataParallel: dim: expected an int, but got {dim!r} ({type(dim).__name__})")
        if tree_shape not in ("auto", "chain", "binomial"):
            raise ValueError(f"dpfast.DataParallel: tree_shape: expected 'auto', 'chain' or 'binomial', but got "
                             f"{tree_shape!r}")
        bucket_mb = _as_megabytes(bucket_cap_mb)
        if bucket_mb is None or not math.isfinite(bucket_mb) or not bucket_mb > 0:
            raise ValueError(f"dpfast.DataParallel: bucket_cap_mb: expected a positive, finite number of megabytes, "
                             f"but got {bucket_cap_mb!r}")
        for name, flag in (("trust_version_counters", trust_version_counters), ("gather", gather),
                           ("average_buffers", average_buffers)):
            if not _is_flag(flag):
                raise TypeError(f"dpfast.DataParallel: {name}: expected True or False, but got {flag!r}")
        if process_group is not None and not _is_process_group(process_group):
            raise TypeError(f"dpfast.DataParallel: process_group: expected None or a torch.distributed process "
                            f"group (torch.distributed.new_group), but got {process_group!r}")
        if scalar_outputs not in ("vector", "mean"):
            raise ValueError(f"dpfast.DataParallel: scalar_outputs: expected 'vector' or 'mean', but got "
                             f"{scalar_outputs!r}")
        if chunk_sizes is not None and weights is not None:
            raise ValueError("dpfast.DataParallel: chunk_sizes, weights: expected at most one of them, but got both")
        self.chunk_sizes = splits.kept(chunk_sizes)
        self.weights = splits.kept(weights)
        self.gather_outputs = bool(gather)
        self.scalar_outputs = scalar_outputs
        self.average_buffers = bool(average_buffers)
        self.process_group = process_group
        self.module = module
        self.dim = dim
        # An object with .phase(name) -> context manager, told about each step's phases
        # ("scatter", "param_sync", "forward", "gather", "reduce"); the benchmark sets it.
        self.phase_timer = None
        self.trust_version_counters = bool(trust_version_counters)
        self.bucket_cap_mb = bucket_mb
        self.tree_shape = tree_shape
        self._runtime: Optional[_Runtime] = None  # built on first use
        if isinstance(device_ids, str) and device_ids == "auto":
            device_ids = _devices.auto_device_ids(module) or None  # None: no GPU, run the module directly
            if device_ids and module_device_is_cpu(module):
                module.to(torch.device("cuda", device_ids[0]))  # "auto" chose where the module lives
        self.devices: List[torch.device] = _devices.parse_device_ids(device_ids)
        if not self.devices and self._cpu_lane_for_processes():
            self.devices = [torch.device("cpu")]
        if not self.devices:  # no CUDA and no device named: run the module directly, as nn.DataParallel does
            self.device_ids: list = []
            self.output_device = None
            self.src_device_obj = None
            return
        self._set_devices(output_device)

    def _cpu_lane_for_processes(self) -> bool:
        """NOTE [Cross-process gradients]: with no GPU and no device named, a process of a
        torch.distributed job (torchrun with gloo on CPU machines, DDP's CPU case) still trains
        with the others: its module on one CPU lane, as DDP runs a CPU module, rather than alone
        (each rank would train apart, silently). Not for a module elsewhere (meta)."""
        if distributed.process_group_or_default(self.process_group) is None:
            return False
        return all(t.device.type == "cpu" for t in itertools.chain(self.module.parameters(), self.module.buffers()))

    def _set_devices(self, output_device: Any) -> None:
        """The attributes that follow from self.devices (a non-empty list), and the options checked
        against them: at construction, or at the first forward that adopts a CPU lane."""
        self.device_ids = _devices.public_device_ids(self.devices)
        self._built_device_ids = self.device_ids  # nn.DataParallel reads device_ids at each forward
        output = _devices.parse_output_device(output_device, self.devices)
        self.output_device = output.index if output.type == "cuda" else output
        self.output_device_obj = output
        self._output_device_given = self.output_device  # nn.DataParallel reads output_device at each forward
        self.src_device_obj = self.devices[0]
        self.device_type = self.devices[0].type
        if len(self.devices) == 1:  # as nn.DataParallel: one device runs the module itself, moved there
            self.module.to(self.src_device_obj)
        # The module may still move (DataParallel(model).cuda() is common): its device is
        # checked at each forward, as nn.DataParallel does.
        if self.chunk_sizes is not None:
            splits.validate_sizes("chunk_sizes", self.chunk_sizes, len(self.devices))
        if self.weights is not None:
            splits.validate_sizes("weights", self.weights, len(self.devices))
        _devices.warn_on_imbalance(self.devices,
                                   has_split_option=self.chunk_sizes is not None or self.weights is not None)
        if _overrides_a_step(type(self)):
            for name, value, default in (("gather", self.gather_outputs, True),
                                         ("scalar_outputs", self.scalar_outputs, "vector"),
                                         ("average_buffers", self.average_buffers, False)):
                if value != default:
                    raise ValueError(f"dpfast.DataParallel: {name}: expected {default!r} in a subclass that overrides "
                                     f"scatter, replicate, parallel_apply or gather (its steps run as nn.DataParallel's "
                                     f"do), but got {value!r}")

    # -- nn.DataParallel's steps, overridable as there -----------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if torch.autograd._profiler_enabled():  # the step by name in a profiler's trace (30 us a step otherwise)
            with torch.autograd.profiler.record_function("dpfast.DataParallel.forward"):
                return self._run_forward(inputs, kwargs)
        return self._run_forward(inputs, kwargs)

    def _run_forward(self, inputs: tuple, kwargs: dict) -> Any:
        if not self.devices and self._cpu_lane_for_processes():  # torch.distributed started after the wrapper
            self.devices = [torch.device("cpu")]
            self._set_devices(None)
        if not self.devices:
            if not self.gather_outputs:
                return self._alone_as_replica_outputs(inputs, kwargs)
            return self.module(*inputs, **kwargs)
        built = self.__dict__.get("_built_device_ids")
        if built is not None and self.device_ids is not built and not _same_devices(self.device_ids, built):
            raise ValueError(f"dpfast.DataParallel: device_ids: expected the devices the wrapper was made with, "
                             f"{built}, but it was changed to {self.device_ids!r}: make a new wrapper for other "
                             f"devices (its replicas, threads and buckets are built for these)")
        given = self.__dict__.get("_output_device_given", self.output_device)
        if self.output_device is not given and self.output_device != given:  # changed since: used, as there
            output = _devices.parse_output_device(self.output_device, self.devices)
            self.output_device_obj, self._output_device_given = output, self.output_device
        if _overrides_a_step(type(self)):
            return self._forward_through_overrides(inputs, kwargs)
        n = len(self.devices)
        batch = scatter_gather.find_batch_size(inputs, kwargs, self.dim, n)
        if not inputs and not kwargs:  # as nn.DataParallel: a forward without inputs runs once
            sizes = [None] + [0] * (n - 1)
        elif batch == 0:  # an empty batch: replica 0 runs it (an empty output, as the module gives)
            sizes = [0] * n
        elif batch is None:  # no tensor to split: every replica gets the same inputs, as nn.DataParallel
            sizes = [None] * n
        else:
            sizes = splits.chunk_sizes_for(batch, n, self.chunk_sizes, self.weights)
        active = [k for k, size in enumerate(sizes) if size != 0] or [0]  # 0 rows: sits this step out
        chunk_sizes = [sizes[k] for k in active]
        devices = [self.devices[k] for k in active]
        if self.gather_outputs and self._alone_on_one_device():
            self._check_module_device()
            inputs, kwargs = scatter_gather.scatter_kwargs(inputs, kwargs, devices, chunk_sizes, self.dim,
                                                           replica_rows=(1, [0]))
            return self.module(*inputs[0], **kwargs[0])
        runtime = self._ensure_runtime()  # after the inputs were checked: bad input starts nothing
        cross = runtime.cross
        if cross is not None and self.training and torch.is_grad_enabled():
            share = self._cross_process_share(cross, batch)
            return _hold_through_backward(distributed.scale_output_grads(
                self._forward_replicas(runtime, inputs, kwargs, batch, active, chunk_sizes, devices), share),
                runtime)
        return _hold_through_backward(
            self._forward_replicas(runtime, inputs, kwargs, batch, active, chunk_sizes, devices), runtime)

    def _alone_as_replica_outputs(self, inputs: tuple, kwargs: dict) -> ReplicaOutputs:
        """gather=False with no device to run on (GPU code on a machine without one: the module runs
        directly): its output as the one replica's, where it is, so ParallelCriterion and
        ReplicaOutputs.gather() work as with devices."""
        outputs = self.module(*inputs, **kwargs)
        device = next((t.device for _, t in scatter_gather.iter_tensors(outputs, None)), torch.device("cpu"))
        try:
            batch = scatter_gather.find_batch_size(inputs, kwargs, self.dim)
        except ValueError:  # inputs the module took as they are: no batch to name
            batch = None
        return ReplicaOutputs([outputs], [batch], [device], device, self.dim)

    def _alone_on_one_device(self) -> bool:
        """One device and no other process: as nn.DataParallel, the module itself runs, and nothing
        is built for it, so that what has no replicas (a lazy module before its first forward, a
        TorchScript module) runs as there."""
        return len(self.devices) == 1 and distributed.process_group_or_default(self.process_group) is None

    def _check_module_device(self) -> None:
        check_on_device(itertools.chain(self.module.parameters(), self.module.buffers()), self.src_device_obj)

    def _cross_process_share(self, cross, batch: Optional[int]) -> float:
        """NOTE [Cross-process gradients]: rank 0's buffers, and this process's share of the batch."""
        cross.broadcast_from_rank0(list(self.module.buffers()))
        return (batch or 0) / max(cross.global_batch(batch or 0), 1)

    def _forward_through_overrides(self, inputs: tuple, kwargs: dict) -> Any:
        """nn.DataParallel's forward, step by step, for a subclass that overrides one of its steps
        (scatter, replicate, parallel_apply, gather): each is called with nn.DataParallel's
        signature."""
        self._check_module_device()
        if self._alone_on_one_device():
            return self._steps(inputs, kwargs, one_device_shortcut=True)
        cross = self._ensure_runtime().cross
        if cross is not None and self.training and torch.is_grad_enabled():
            share = self._cross_process_share(cross, scatter_gather.find_batch_size(inputs, kwargs, self.dim))
            return distributed.scale_output_grads(self._steps(inputs, kwargs, one_device_shortcut=False), share)
        return self._steps(inputs, kwargs, one_device_shortcut=True)

    def _steps(self, inputs: tuple, kwargs: dict, one_device_shortcut: bool) -> Any:
        inputs, kwargs = self.scatter(inputs, kwargs, self.device_ids)
        if not inputs and not kwargs:
            inputs, kwargs = ((),), ({},)
        if len(self.device_ids) == 1 and one_device_shortcut:
            return self.module(*inputs[0], **kwargs[0])
        replicas, undo = self._replicate_keeping_the_root(self.device_ids[:len(inputs)])
        return _run_then_put_back(undo, lambda: self.gather(self.parallel_apply(replicas, inputs, kwargs),
                                                            self.output_device))

    def _forward_replicas(self, runtime, inputs, kwargs, batch, active, chunk_sizes, devices):
        """Scatter, replica sync, parallel forward and gather for the active replicas."""
        with self._phase("param_sync"):
            runtime.in_own_forward = True  # replicate() is a step of dpfast's forward, which orders the streams
            try:
                replicas, undo = self._replicate_keeping_the_root(active[-1] + 1)
            finally:
                runtime.in_own_forward = False
        return _run_then_put_back(undo, lambda: self._forward_replicated(
            runtime, inputs, kwargs, batch, active, chunk_sizes, devices, [replicas[k] for k in active]))

    def _replicate_keeping_the_root(self, num_replicas) -> Tuple[List[nn.Module], Optional[Any]]:
        """self.replicate, and where it is not dpfast's own (a subclass's override, or an instance
        patched by Synchronized-BatchNorm's patch_replication_callback), a function that puts back
        the attributes it wrote on the root's modules. nn.DataParallel hands replicate's callers
        copies; here replica 0 is the module itself, and replication callbacks mark it
        (__data_parallel_replicate__: `_is_parallel = True`), so that the module run alone later
        would wait for replicas that never come."""
        if "replicate" not in self.__dict__ and type(self).replicate is DataParallel.replicate:
            return self.replicate(self.module, num_replicas), None
        for pending in self.__dict__.pop("_pending_undos", []):  # an earlier call's, never backwarded
            pending()
        modules = list(self.module.modules())
        before = [dict(m.__dict__) for m in modules]
        outer, _REPLICATING.wrapper = getattr(_REPLICATING, "wrapper", None), self
        try:
            replicas = self.replicate(self.module, num_replicas)
        finally:
            _REPLICATING.wrapper = outer
        missing = object()
        written = [(m, {k: old.get(k, missing) for k, v in m.__dict__.items() if old.get(k, missing) is not v})
                   for m, old in zip(modules, before)]
        written = [(m, keys) for m, keys in written if keys]

        done = []

        def undo():
            if done:
                return
            done.append(True)
            for m, keys in written:
                for k, old in keys.items():
                    if old is missing:
                        m.__dict__.pop(k, None)
                    else:
                        m.__dict__[k] = old
        if written:
            self.__dict__.setdefault("_pending_undos", []).append(undo)
        return replicas, (undo if written else None)

    def _forward_replicated(self, runtime, inputs, kwargs, batch, active, chunk_sizes, devices, replicas):
        streams = [runtime.streams[k] for k in active] if runtime.streams else None
        averaging = self.average_buffers and self.training
        snapshots = runtime.bn_averager.prepare(runtime.replicas.modules) if averaging else None
        if averaging and runtime.bn_averager.hooked_now:
            runtime.replicas.refresh_attributes(active[-1] + 1)  # NOTE [Replica hooks]: copy the new hooks
        # NOTE [Stream ordering]: each lane starts after what the caller enqueued on its device's
        # current stream (the optimizer step, zero_grad, the snapshots above). This also orders the
        # reuse of memory the allocator hands to a lane after the caller freed it.
        lane_streams.wait_for_callers(streams)
        with self._phase("scatter"):
            scattered_inputs, scattered_kwargs = self.scatter(inputs, kwargs, devices, chunk_sizes, streams,
                                                              replica_indices=active)
        with self._phase("forward"):
            outputs = self.parallel_apply(replicas, scattered_inputs, scattered_kwargs, chunk_sizes, active)
        if runtime.replicas.weights_moved(active[-1] + 1) and runtime.reducer is not None:
            runtime.reducer.note_weights_moved()
        if snapshots:
            lane_streams.callers_wait_for(streams)
            runtime.bn_averager.apply(snapshots, runtime.replicas.modules,
                                      [runtime.replicas.replica_modules[k] for k in active])
        if not self.gather_outputs:
            # The outputs are read on the current streams from here on: order and keep them alive there.
            lane_streams.callers_wait_for(streams, outputs)
            return ReplicaOutputs(outputs, chunk_sizes, devices, self.output_device_obj, self.dim)
        with self._phase("gather"):
            weights = chunk_sizes if self.scalar_outputs == "mean" and batch else None  # not for an empty batch
            stand_ins = self._route_backward(runtime, outputs, active, devices)
            return self.gather(outputs, self.output_device_obj, devices, streams, scalar_weights=weights,
                               stand_ins=stand_ins)

    def _route_backward(self, runtime, outputs, active, devices):
        """NOTE [Parallel backward]: on CPU lanes, the replicas' parts of the backward run on their
        workers (DPFAST_PARALLEL_BACKWARD); otherwise autograd walks them one after the other."""
        if (len(active) < 2 or runtime.cross is not None or not torch.is_grad_enabled()
                or not runtime.cpu_lanes or runtime.reducer is None or runtime.reducer.no_routing
                or runtime.replicas.forward_hooks_seen or _global_hooks_may_keep_activations() or python_modes_active()
                or not parallel_backward.wanted(len(active), runtime.caller_slept)):
            return None
        replica_tensors = [runtime.replicas.replica_tensors[k] for k in active]
        wheres = [runtime.where(k, backward=True) for k in active]
        return parallel_backward.route(outputs, replica_tensors, wheres, active[-1] + 1, cpu_lane_threads(devices),
                                       caller_lane_threads(devices, runtime.caller_slept), runtime.pool,
                                       runtime.reducer)

    # The four steps take nn.DataParallel's arguments (a subclass may override any of them, or call
    # them from its own forward); dpfast's forward also passes what it already knows.
    def scatter(self, inputs: tuple, kwargs: Optional[dict], device_ids: Sequence[Any],
                chunk_sizes: Optional[List[Any]] = None, streams=None, replica_indices: Optional[List[int]] = None
                ) -> Tuple[List[tuple], List[dict]]:
        if replica_indices is not None:  # dpfast's forward: its own devices, checked when it was built
            devices = list(device_ids)
        else:
            devices = [_devices.to_device(d, f"device_ids[{i}]") for i, d in enumerate(device_ids)]
        num_replicas = len(self.devices) if replica_indices is not None else len(devices)
        if chunk_sizes is None:  # called as nn.DataParallel's step: the wrapper's split
            if not inputs and not kwargs:
                return [], []
            batch = scatter_gather.find_batch_size(inputs, kwargs or {}, self.dim, num_replicas)
            if batch is None:
                chunk_sizes = [None] * len(devices)
            elif batch == 0:  # an empty piece for every device, as torch.chunk gives
                chunk_sizes = [0] * len(devices)
            else:
                own_policy = len(devices) == len(self.devices)
                chunk_sizes = splits.chunk_sizes_for(batch, len(devices), self.chunk_sizes if own_policy else None,
                                                     self.weights if own_policy else None)
                while len(chunk_sizes) > 1 and chunk_sizes[-1] == 0:  # fewer pieces, as torch.chunk gives
                    chunk_sizes = chunk_sizes[:-1]
                devices = devices[:len(chunk_sizes)]  # torch.chunk's split may have fewer pieces (9 over 4: 3)
        running = replica_indices if replica_indices is not None else list(range(len(devices)))
        return scatter_gather.scatter_kwargs(inputs, kwargs, devices, chunk_sizes, self.dim,
                                             lane_streams.ids(streams), replica_rows=(num_replicas, running))

    def replicate(self, module: nn.Module, device_ids: Any) -> List[nn.Module]:
        """The first len(device_ids) replicas (device_ids may be that number), made equal to the
        module: replica 0 is the module itself."""
        if module is not self.module:
            # A deep copy of a wrapper whose replicate was patched on the instance
            # (Synchronized-BatchNorm's patch_replication_callback; EMA and AveragedModel copy the
            # wrapper) calls the original's replicate with its own module: the copy's it is.
            caller = getattr(_REPLICATING, "wrapper", None)
            if caller is not None and caller is not self and caller.module is module:
                return DataParallel.replicate(caller, module, device_ids)
            raise ValueError(f"dpfast.DataParallel.replicate: module: expected the wrapped module (self.module), "
                             f"but got another {type(module).__name__}")
        num_replicas = device_ids if isinstance(device_ids, int) else len(device_ids)
        runtime = self._ensure_runtime()
        runtime.pool.drain()  # a backward that raised may have left replicas' parts running
        # NOTE [Stream ordering]: called as nn.DataParallel's step (a subclass's own forward), the
        # replicas may run on the devices' current streams (torch's parallel_apply), as
        # nn.DataParallel's replicas do: the lanes write their weights after what ran there, and
        # the current streams read them after the lanes wrote them.
        lanes = runtime.streams[:num_replicas] if runtime.streams and not runtime.in_own_forward else None
        lane_streams.wait_for_callers(lanes)
        replicas = runtime.replicas.sync(num_replicas)
        lane_streams.callers_wait_for(lanes)
        self._ensure_reducer(runtime).note_forward(num_replicas)
        return replicas

    def parallel_apply(self, replicas: List[nn.Module], inputs: List[tuple], kwargs: Optional[List[dict]] = None,
                       chunk_sizes: Optional[List[Any]] = None, replica_indices: Optional[List[int]] = None
                       ) -> List[Any]:
        runtime = self._ensure_runtime()
        state = capture_thread_state()
        own_call = replica_indices is not None  # from dpfast's forward, which orders the lanes itself
        if replica_indices is None:  # called as nn.DataParallel's step: which replicas are these?
            index_of = {id(mods[0]): k for k, mods in enumerate(runtime.replicas.replica_modules)}
            replica_indices = [index_of.get(id(r), k) for k, r in enumerate(replicas)]
        if kwargs is None:
            kwargs = [{} for _ in replicas]
        streams = [runtime.streams[k] for k in replica_indices] if runtime.streams else [None] * len(replicas)

        def job(replica, args, kw, stream):
            def run():
                with thread_state(state, stream):
                    return replica(*args, **kw)
            return run

        # As torch.nn.parallel.parallel_apply: an input that is not a list or tuple is one argument.
        inputs = [a if isinstance(a, (list, tuple)) else (a,) for a in inputs]
        fns = [job(r, a, k, s) for r, a, k, s in zip(replicas, inputs, kwargs, streams)]
        sizes = chunk_sizes or [None] * len(replicas)
        wheres = [runtime.where(k, size) for k, size in zip(replica_indices, sizes)]
        lanes = [self.devices[k] for k in replica_indices]
        if runtime.cpu_lanes and torch._C._current_graph_task_id() == -1:
            give_back_caller_threads()  # a backward that shared them out raised before its end
        runtime.caller_slept = runtime.cpu_lanes and caller_slept()  # NOTE [Idle caller], also for the routing
        # NOTE [CPU threads]
        threads, own_threads = cpu_lane_threads(lanes), caller_lane_threads(lanes, runtime.caller_slept)
        if own_call or not runtime.streams:
            return runtime.pool.run(fns, wheres, threads, own_threads)
        lane_streams.wait_for_callers(streams)  # NOTE [Stream ordering]
        outputs = runtime.pool.run(fns, wheres, threads, own_threads)
        lane_streams.callers_wait_for(streams, outputs)
        return outputs

    def gather(self, outputs: List[Any], output_device, devices=None, streams=None, scalar_weights=None,
               stand_ins=None) -> Any:
        if devices is None:  # called as nn.DataParallel's step (an override's super() call, say)
            devices = [next((t.device for _, t in scatter_gather.iter_tensors(out, None)), self.devices[k])
                       for k, out in enumerate(outputs)]
            return _hold_through_backward(
                scatter_gather.gather(outputs, _devices.to_device(output_device, "output_device"), self.dim, devices),
                self._ensure_runtime())
        if not isinstance(output_device, torch.device):  # dpfast's forward passes self.output_device_obj
            output_device = _devices.to_device(output_device, "output_device")
        return scatter_gather.gather(outputs, output_device, self.dim, devices, lane_streams.ids(streams),
                                     scalar_weights=scalar_weights, stand_ins=stand_ins)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes a plain module's state_dict (keys without ``module.``; or, for a module with a
        child named ``module``, keys whose prefixed form fits the wrapper's and who do not)."""
        if len(state_dict) > 0 and (
                not any(k.startswith(checkpoint.PREFIX) for k in state_dict)
                or checkpoint.loads_with_prefix(set(state_dict), set(super().state_dict().keys()))):
            state_dict = checkpoint.add_prefix(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- extras ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate on the replicas; the first backward after the
        block reduces the accumulated sum into the root's .grad."""
        if not self.devices or len(self.devices) == 1:
            yield
            return
        # The flag lives on the wrapper: a reducer built inside the block (parameters unfrozen, the
        # module replaced) takes it from there.
        previous = self.__dict__.get("_sync_enabled", True)
        self.__dict__["_sync_enabled"] = False
        self._ensure_reducer(self._ensure_runtime()).sync_enabled = False
        try:
            yield
        finally:
            self.__dict__["_sync_enabled"] = previous
            current = self.__dict__.get("_runtime")
            if current is not None and current.reducer is not None:
                current.reducer.sync_enabled = previous

    def stats(self) -> dict:
        """Counters for tests and benchmarks: replica builds, parameter
        broadcasts and bucket reductions so far."""
        runtime = self._runtime
        if runtime is None:
            return {"replica_builds": 0, "broadcasts": 0, "reductions": 0, "early_reductions": 0, "buckets": 0,
                    "bucket_layout": []}
        return {"replica_builds": runtime.replicas.build_count, "broadcasts": runtime.replicas.broadcast_count,
                "reductions": runtime.reducer.reduction_count if runtime.reducer else 0,
                "early_reductions": runtime.reducer.early_reduction_count if runtime.reducer else 0,
                "buckets": len(runtime.reducer.buckets) if runtime.reducer else 0,
                # (elements, dtype name) of each gradient bucket, in reduction order
                "bucket_layout": [(b[0].numel(), str(b[0].dtype).replace("torch.", ""))
                                  for b in runtime.reducer.flats] if runtime.reducer else []}

    # -- internals -------------------------------------------------------------------------------
    def _phase(self, name: str):
        """``with self._phase(name)``: reports the block to ``self.phase_timer`` when one is
        set (the benchmark's), else does nothing."""
        timer = self.__dict__.get("phase_timer")
        return timer.phase(name) if timer is not None else _NO_PHASE

    def _ensure_runtime(self) -> _Runtime:
        runtime = self.__dict__.get("_runtime")
        if runtime is not None and runtime.owner() is not self:
            # A shallow copy of a wrapper (copy.copy; learn2learn's clone_module, which MAML calls
            # for every task, copies __dict__ and clones the module): the runtime, its replicas
            # and threads stay with the wrapper that built them, and this one builds its own.
            runtime = None
        # _modules, not self.module: nn.Module's __getattr__ costs more than the rest, 3 times a step.
        elif runtime is not None and runtime.module is not self._modules.get("module"):
            # The wrapped module itself was replaced: gradients accumulated under no_sync() belong
            # to the old one's parameters (often the new one's too): reduce them first.
            if runtime.reducer is not None and runtime.reducer.has_pending():
                runtime.reducer.reduce()
            runtime.close()
            runtime = None
        if runtime is None:
            runtime = _Runtime(self)
            self.__dict__["_runtime"] = runtime
            weakref.finalize(self, runtime.close)
        return runtime

    def _ensure_reducer(self, runtime: _Runtime) -> GradReducer:
        """The gradient reducer for the parameters that require grad now. It covers every parameter
        that required grad since the replicas were built, so freezing and unfreezing (a GAN's
        discriminator, every step) only changes which of them it waits for."""
        replicas = runtime.replicas
        if runtime.reducer_flags is replicas.grad_flags and runtime.reducer_build == replicas.build_count:
            return runtime.reducer  # nothing changed since the last forward (the hot path)
        wanted = set(replicas.grad_indices())
        same_build = runtime.reducer is not None and runtime.reducer_build == replicas.build_count
        if not same_build or not wanted <= set(runtime.reducer_indices):
            indices = sorted(wanted | set(runtime.reducer_indices)) if same_build else sorted(wanted)
            pending = runtime.reducer is not None and runtime.reducer.has_pending()
            if pending:
                runtime.reducer.reduce()  # gradients accumulated under no_sync() before a rebuild
            if runtime.reducer is not None and same_build:
                # The same replicas: the new reducer's hooks take over. New replicas: the old reducer
                # stays with the graphs of forwards on the old ones (NOTE [Reducer lifetime]).
                runtime.reducer.remove()
            runtime.reducer = _make_reducer(
                replicas.replica_params(0, indices),
                [replicas.replica_params(k, indices) for k in range(1, len(self.devices))],
                self.devices, runtime.streams, runtime.comm_streams, bucket_cap_mb=self.bucket_cap_mb,
                tree_shape=self.tree_shape, allow_p2p=_devices.p2p_allowed(), phase=_weak_phase(self),
                cross_process=runtime.cross, sparse_dims=_sparse_dims(self.module, replicas.replica_params(0, indices)))
            runtime.reducer.sync_enabled = self.__dict__.get("_sync_enabled", True)  # inside no_sync(): False
            self._warn_on_parameter_hooks(replicas.replica_params(0, indices))
            runtime.reducer_build = replicas.build_count
            runtime.reducer_indices = indices
        runtime.reducer.set_active([i in wanted for i in runtime.reducer_indices])
        runtime.reducer_flags = replicas.grad_flags
        return runtime.reducer

    def _warn_on_parameter_hooks(self, params: List[torch.Tensor]) -> None:
        """A hook on a root parameter (register_hook, register_post_accumulate_grad_hook) runs on
        replica 0's share of its gradient: the root module is replica 0, and the other replicas'
        parameters are leaves of their own, whose shares reach .grad through the buckets. Under
        nn.DataParallel every replica is a copy made from the parameter, and its hooks see the sum.
        Said once per parameter, as it changes results silently (a clamp per parameter, say)."""
        own = own_hook_ids() if any(p._backward_hooks for p in params) else set()
        hooked = [p for p in params if (p._backward_hooks and not own.issuperset(p._backward_hooks))
                  or getattr(p, "_post_accumulate_grad_hooks", None)]
        warned = self.__dict__.setdefault("_warned_parameter_hooks", set())
        if not hooked or all(id(p) in warned for p in hooked):
            return
        names = {id(p): name for name, p in self.module.named_parameters()}
        new = [p for p in hooked if id(p) not in warned]
        warned.update(id(p) for p in new)
        listed = ", ".join(repr(names.get(id(p), "?")) for p in new[:3]) + (" and others" if len(new) > 3 else "")
        warnings.warn(f"dpfast.DataParallel: hooks registered on parameters ({listed}) with register_hook or "
                      f"register_post_accumulate_grad_hook see only replica 0's share of the gradient, before the "
                      f"other replicas' shares are added into .grad (under nn.DataParallel they see the sum): "
                      f"transform the gradient on .grad after backward instead (torch.nn.utils.clip_grad_value_, "
                      f"say)", UserWarning, stacklevel=4)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runtime"] = None  # threads, streams and replicas are rebuilt on first use
        state.pop("_sync_enabled", None)  # a copy made inside no_sync() is not inside the block
        state.pop("_pending_undos", None)  # closures over this process's modules
        state["process_group"] = None  # a process group belongs to its process: the copy uses the default one
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_runtime", None)

    def __getattr__(self, name: str) -> Any:
        """What the wrapper itself lacks is read from the wrapped module, as FSDP and torch.compile's
        wrapper do: `model.stride`, `model.names`, `model.config` on the wrapper (code that unwraps by
        exact type, `type(model) in (nn.DataParallel, DDP)`, then reads the module's attributes on
        it). nn.DataParallel raises AttributeError there; its own attributes, parameters and
        buffers come first, writes stay on the wrapper, and dunder names and the module's methods
        are not forwarded: the wrapper is one of model.modules(), and the common loops over them
        (`model.apply(init)` with `hasattr(m, "reset_parameters")`, `if hasattr(m, "fuse"):
        m.fuse()`) would call the module's method twice."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            module = modules.get("module") if modules is not None else None
            if module is None or (name.startswith("__") and name.endswith("__")):
                raise
            try:
                value = getattr(module, name)
            except AttributeError:
                pass
            else:
                if not (inspect.ismethod(value) and value.__self__ is module):
                    return value
            raise

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new


def data_parallel(module: nn.Module, inputs: Any, device_ids: Optional[Sequence[Any]] = None,
                  output_device: Any = None, dim: int = 0, module_kwargs: Optional[dict] = None) -> Any:
    r"""The functional form, as :func:`torch.nn.parallel.data_parallel`: evaluates
    ``module(*inputs, **module_kwargs)`` over the devices in ``device_ids``, the batch split along
    ``dim``, the outputs gathered on ``output_device``.

    ``inputs`` is a tensor or a tuple of arguments. The module must already live on
    ``device_ids[0]`` (it is never moved). As there, nothing is kept between calls: every call
    builds its replicas and workers again, so a training loop should hold a
    :class:`DataParallel` instead, which keeps them. Gradients of a backward through the outputs
    reach the module's ``.grad`` summed over the replicas, as there. Without CUDA and with no
    device named (or only CUDA ones), the module runs directly, as DataParallel does.
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs,) if inputs is not None else ()
    if module_kwargs is None:
        module_kwargs = {}
    elif not isinstance(module_kwargs, dict):
        raise TypeError(f"dpfast.data_parallel: module_kwargs: expected a dict or None, but got "
                        f"{type(module_kwargs).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"dpfast.data_parallel: module: expected a torch.nn.Module, but got {type(module).__name__}")
    devices = _devices.parse_device_ids(device_ids)
    if not devices:
        return module(*inputs, **module_kwargs)
    # Checked before the wrapper is made: with one device it would move the module there.
    check_on_device(itertools.chain(module.parameters(), module.buffers()), devices[0])
    return DataParallel(module, device_ids, output_device, dim)(*inputs, **module_kwargs)
