"""Past one machine: the same wrapper, hierarchical, on torch.distributed.

When torch.distributed is initialised with more than one process (``torchrun``),
``dpfast.DataParallel`` drives each process's local devices as before (tree
reduction by peer copies inside the process) and, across processes,
all-reduces the locally reduced gradient buckets through torch.distributed
(NCCL for CUDA, gloo for the CPU), bucket by bucket, asynchronously, while
backward goes on. Nothing home-made crosses the network.

NOTE [Cross-process gradients]
- Parameters start identical: rank 0's parameters and buffers are broadcast
  when the wrapper's runtime is built (its first forward, or no_sync()); every
  rank then applies the same averaged gradients.
  Buffers (BatchNorm statistics) are re-broadcast from rank 0 before every
  training forward, as DDP's ``broadcast_buffers=True`` does.
- Mean-loss semantics: the result equals one process training on the
  concatenation of all processes' batches, whatever the split. Each training
  forward all-reduces the batch sizes (B_p, B in all) and scales the gradient
  that flows back through this process's outputs by B_p / B; the buckets are
  then all-reduced with SUM. (With equal batches that is DDP's average.)
- Replica 0 is the root module; in this mode a hook on each root parameter
  moves replica 0's gradient into the bucket instead of ``.grad``, so that a
  bucket holds this process's whole new gradient (and not gradients
  accumulated from earlier steps) when it crosses the network.
- Collectives must be issued in the same order on every rank, so buckets are
  all-reduced strictly in bucket order (each as soon as it and all before it
  are complete, the rest at the end of backward), every bucket every
  backward, followed by one small all-reduce of which parameters received a
  gradient anywhere (a parameter unused here but used elsewhere still gets
  the others' gradient, and ranks stay identical).
- Every rank must run the same number of training forwards (train mode, grad
  enabled: each broadcasts buffers and all-reduces batch sizes) and backward
  passes (as with DDP's broadcast_buffers=True); eval and no_grad forwards
  issue none. A
  rank that dies makes the others fail with torch.distributed's error once
  the process group's timeout (``init_process_group(timeout=...)``, 10
  minutes by default for gloo, NCCL's own watchdog for NCCL) expires, or
  at once when the transport sees the peer go away.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist


def default_group_if_initialized():
    """The default process group when torch.distributed runs more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class CrossProcess:
    """The collectives one dpfast.DataParallel issues across processes."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = dist.get_backend(group)
        # NCCL needs CUDA tensors; gloo takes CPU ones (and CUDA ones for the big buckets).
        self.small_device = device if backend == "nccl" else torch.device("cpu")

    def broadcast_from_rank0(self, tensors: List[torch.Tensor]) -> None:
        """Overwrites the tensors with rank 0's, one flat buffer per dtype."""
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        src = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch._utils._flatten_dense_tensors([t.detach() for t in group])
                dist.broadcast(flat, src=src, group=self.group)
                for t, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                    t.copy_(value)

    def global_batch(self, local_batch: int) -> int:
        count = torch.tensor([float(local_batch)], dtype=torch.float64 if self.small_device.type == "cpu"
                             else torch.float32, device=self.small_device)
        dist.all_reduce(count, group=self.group)
        return int(round(count.item()))

    def all_reduce_async(self, tensor: torch.Tensor, stream=None):
        """Starts SUM over the processes. On CUDA the collective is ordered after the work on
        ``stream`` (the one that produced the tensor)."""
        if stream is None:
            return dist.all_reduce(tensor, group=self.group, async_op=True)
        with torch.cuda.stream(stream):
            return dist.all_reduce(tensor, group=self.group, async_op=True)

    def any_rank(self, flags: List[bool]) -> List[bool]:
        """Element-wise OR of flags over the processes."""
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.small_device)
        dist.all_reduce(values, group=self.group)
        return [v > 0 for v in values.tolist()]


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (B_p / B)."""

    @staticmethod
    def forward(ctx, factor: float, tensor: torch.Tensor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad * ctx.factor


def scale_output_grads(obj: Any, factor: float) -> Any:
    """Applies ScaleGrad to every tensor of a nested output that requires grad."""
    from .scatter_gather import _dataclass_items, _is_dataclass_instance, _is_namedtuple, _rebuild_dataclass

    if isinstance(obj, torch.Tensor):
        return ScaleGrad.apply(factor, obj) if obj.requires_grad else obj
    if isinstance(obj, dict):
        return type(obj)((k, scale_output_grads(v, factor)) for k, v in obj.items())
    if _is_namedtuple(obj):
        return type(obj)(*(scale_output_grads(v, factor) for v in obj))
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "chunk_sizes"):
        return type(obj)(scale_output_grads(v, factor) for v in obj)
    if isinstance(obj, list):  # ReplicaOutputs: keep its attributes
        obj[:] = [scale_output_grads(v, factor) for v in obj]
        return obj
    if _is_dataclass_instance(obj):
        return _rebuild_dataclass(obj, {n: scale_output_grads(v, factor) for n, v in _dataclass_items(obj)})
    return obj


def process_group_or_default(process_group: Optional[Any]) -> Optional[Any]:
    """The group a wrapper's gradients cross processes in: the one given, else the default group
    when torch.distributed runs; None when this process is alone."""
    group = process_group if process_group is not None else default_group_if_initialized()
    if group is None or dist.get_world_size(group) <= 1:
        return None
    return group


def maybe_cross_process(process_group: Optional[Any], device: torch.device) -> Optional[CrossProcess]:
    group = process_group_or_default(process_group)
    return None if group is None else CrossProcess(group, device)
