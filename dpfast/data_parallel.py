"""dpfast.DataParallel: nn.DataParallel's signature and semantics, with
persistent replicas, persistent workers, one stream per replica and an
engine that moves data by trees of peer copies."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from . import devices as _devices
from . import scatter_gather, streams as lane_streams
from .reducer import GradReducer
from .replicas import ReplicaSet
from .workers import WorkerPool, capture_thread_state, thread_state


class _Runtime:
    """What the wrapper builds on first use and drops on pickling: replicas,
    the gradient reducer, the workers and the lanes' streams."""

    def __init__(self, wrapper: "DataParallel"):
        self.module = wrapper.module
        self.streams = lane_streams.make_lane_streams(wrapper.devices)  # replicas' compute
        self.comm_streams = lane_streams.make_lane_streams(wrapper.devices)  # gradient reductions
        self.replicas = ReplicaSet(wrapper.module, wrapper.devices, self.streams,
                                   trust_version_counters=wrapper.trust_version_counters,
                                   tree_shape=wrapper.tree_shape, allow_p2p=_devices.p2p_allowed())
        self.reducer: Optional[GradReducer] = None
        self.reducer_build = -1
        self.pool = WorkerPool(len(wrapper.devices) - 1)

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.remove()
        self.pool.close()


class DataParallel(nn.Module):
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

    Differences from nn.DataParallel are listed in the README.
    """

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[Any]] = None, output_device: Any = None,
                 dim: int = 0, *, trust_version_counters: bool = False, bucket_cap_mb: float = 25.0,
                 tree_shape: str = "auto"):
        super().__init__()
        torch._C._log_api_usage_once("dpfast.data_parallel")
        if not isinstance(module, nn.Module):
            raise TypeError(f"dpfast.DataParallel: module: expected a torch.nn.Module, but got "
                            f"{type(module).__name__}")
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dpfast.DataParallel: dim: expected an int, but got {dim!r} ({type(dim).__name__})")
        if tree_shape not in ("auto", "chain", "binomial"):
            raise ValueError(f"dpfast.DataParallel: tree_shape: expected 'auto', 'chain' or 'binomial', but got "
                             f"{tree_shape!r}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"dpfast.DataParallel: bucket_cap_mb: expected a positive size, but got {bucket_cap_mb!r}")
        self.module = module
        self.dim = dim
        # An object with .phase(name) -> context manager, told about each step's phases
        # ("scatter", "param_sync", "forward", "gather", "reduce"); the benchmark sets it.
        self.phase_timer = None
        self.trust_version_counters = trust_version_counters
        self.bucket_cap_mb = bucket_cap_mb
        self.tree_shape = tree_shape
        self.devices: List[torch.device] = _devices.parse_device_ids(device_ids)
        if not self.devices:  # no CUDA and no device named: run the module directly, as nn.DataParallel does
            self.device_ids: list = []
            self.output_device = None
            self.src_device_obj = None
            return
        self.device_ids = _devices.public_device_ids(self.devices)
        output = _devices.parse_output_device(output_device, self.devices)
        self.output_device = output.index if output.type == "cuda" else output
        self.output_device_obj = output
        self.src_device_obj = self.devices[0]
        self._check_module_device()
        self._runtime: Optional[_Runtime] = None

    # -- nn.DataParallel's steps, overridable as there -----------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with torch.autograd.profiler.record_function("dpfast.DataParallel.forward"):
            if not self.devices:
                return self.module(*inputs, **kwargs)
            runtime = self._ensure_runtime()
            batch = scatter_gather.find_batch_size(inputs, kwargs, self.dim)
            if batch == 0:
                raise ValueError(f"dpfast.DataParallel: inputs: expected a non-empty batch, but the batch "
                                 f"dimension (dim {self.dim}) has size 0")
            chunk_sizes = (scatter_gather.even_chunk_sizes(batch, len(self.devices)) if batch is not None
                           else [None] * len(self.devices))
            num_replicas = len(chunk_sizes)
            devices = self.devices[:num_replicas]
            if num_replicas == 1:
                inputs, kwargs = scatter_gather.scatter_kwargs(inputs, kwargs, devices, [batch] if batch else [],
                                                               self.dim)
                return self.module(*inputs[0], **kwargs[0])
            streams = runtime.streams[:num_replicas] if runtime.streams else None
            with self._phase("scatter"):
                scattered_inputs, scattered_kwargs = self.scatter(inputs, kwargs, devices, chunk_sizes, streams)
            with self._phase("param_sync"):
                replicas = self.replicate(self.module, num_replicas)
            with self._phase("forward"):
                outputs = self.parallel_apply(replicas, scattered_inputs, scattered_kwargs, chunk_sizes)
            with self._phase("gather"):
                return self.gather(outputs, self.output_device_obj, devices, streams)

    def scatter(self, inputs, kwargs, devices, chunk_sizes, streams=None):
        return scatter_gather.scatter_kwargs(inputs, kwargs, devices, chunk_sizes, self.dim,
                                             lane_streams.ids(streams))

    def replicate(self, module: nn.Module, num_replicas: int) -> List[nn.Module]:
        runtime = self._ensure_runtime()
        replicas = runtime.replicas.sync(num_replicas)
        self._ensure_reducer(runtime).note_forward(num_replicas)
        return replicas

    def parallel_apply(self, replicas: List[nn.Module], inputs: List[tuple], kwargs: List[dict],
                       chunk_sizes: Optional[List[Any]] = None) -> List[Any]:
        runtime = self._ensure_runtime()
        state = capture_thread_state()
        streams = runtime.streams or [None] * len(replicas)

        def job(replica, args, kw, stream):
            def run():
                with thread_state(state, stream):
                    return replica(*args, **kw)
            return run

        fns = [job(r, a, k, s) for r, a, k, s in zip(replicas, inputs, kwargs, streams)]
        sizes = chunk_sizes or [None] * len(replicas)
        wheres = [f"in replica {k} on device {self.devices[k]}" +
                  (f" (a batch chunk of {sizes[k]} rows)" if sizes[k] is not None else "")
                  for k in range(len(replicas))]
        return runtime.pool.run(fns, wheres)

    def gather(self, outputs: List[Any], output_device, devices=None, streams=None) -> Any:
        devices = devices if devices is not None else self.devices[:len(outputs)]
        return scatter_gather.gather(outputs, _devices.to_device(output_device, "output_device"), self.dim,
                                     devices, lane_streams.ids(streams))

    # -- extras ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate on the replicas; the first backward after the
        block reduces the accumulated sum into the root's .grad."""
        if not self.devices or len(self.devices) == 1:
            yield
            return
        reducer = self._ensure_reducer(self._ensure_runtime())
        previous, reducer.sync_enabled = reducer.sync_enabled, False
        try:
            yield
        finally:
            reducer.sync_enabled = previous

    def stats(self) -> dict:
        """Counters for tests and benchmarks: replica builds, parameter
        broadcasts and bucket reductions so far."""
        runtime = self._runtime
        if runtime is None:
            return {"replica_builds": 0, "broadcasts": 0, "reductions": 0, "early_reductions": 0, "buckets": 0}
        return {"replica_builds": runtime.replicas.build_count, "broadcasts": runtime.replicas.broadcast_count,
                "reductions": runtime.reducer.reduction_count if runtime.reducer else 0,
                "early_reductions": runtime.reducer.early_reduction_count if runtime.reducer else 0,
                "buckets": len(runtime.reducer.buckets) if runtime.reducer else 0}

    # -- internals -------------------------------------------------------------------------------
    def _phase(self, name: str):
        """``with self._phase(name)``: reports the block to ``self.phase_timer`` when one is
        set (the benchmark's), else does nothing."""
        timer = self.__dict__.get("phase_timer")
        return timer.phase(name) if timer is not None else contextlib.nullcontext()

    def _check_module_device(self) -> None:
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if t.device != self.src_device_obj:
                raise RuntimeError(f"dpfast.DataParallel: module must have its parameters and buffers on device "
                                   f"{self.src_device_obj} (device_ids[0]) but found one of them on device: "
                                   f"{t.device}")

    def _ensure_runtime(self) -> _Runtime:
        runtime = self.__dict__.get("_runtime")
        if runtime is not None and runtime.module is not self.module:
            runtime.close()  # the wrapped module itself was replaced
            runtime = None
        if runtime is None:
            runtime = _Runtime(self)
            self.__dict__["_runtime"] = runtime
            weakref.finalize(self, runtime.close)
        return runtime

    def _ensure_reducer(self, runtime: _Runtime) -> GradReducer:
        replicas = runtime.replicas
        if runtime.reducer is None or runtime.reducer_build != replicas.build_count:
            pending = runtime.reducer is not None and runtime.reducer.has_pending()
            if pending:
                runtime.reducer.reduce()  # gradients accumulated under no_sync() before a rebuild
            if runtime.reducer is not None:
                runtime.reducer.remove()
            runtime.reducer = GradReducer(
                replicas.root_grad_params(),
                [replicas.replica_params(k) for k in range(1, len(self.devices))],
                self.devices, runtime.streams, runtime.comm_streams, bucket_cap_mb=self.bucket_cap_mb,
                tree_shape=self.tree_shape, allow_p2p=_devices.p2p_allowed(), phase=self._phase)
            runtime.reducer_build = replicas.build_count
        return runtime.reducer

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runtime"] = None  # threads, streams and replicas are rebuilt on first use
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_runtime", None)

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new
