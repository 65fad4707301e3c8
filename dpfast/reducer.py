"""Reduction of the replicas' gradients into the root module's ``.grad``.

Replica k's gradients live as views into flat buckets (one per group of
parameters of a dtype, about ``bucket_cap_mb`` each, in reverse registration
order so that the first buckets fill first in backward). Autograd
accumulates into those views in place. A post-accumulate-grad hook on every
replica parameter marks it; the first mark of a backward queues an autograd
engine callback that runs when backward ends, tree-reduces every bucket that
received a gradient into a receive buffer on the root's device, and adds the
result into the root parameters' ``.grad`` (creating it where it is None),
exactly as autograd accumulates: replica 0 is the root module, whose
gradients autograd has already put there.

NOTE [Unused parameters]
Only parameters that received a gradient on at least one replica (replica 0
included, through autograd) are touched; a parameter unused everywhere keeps
its ``.grad`` (None stays None), as on one device. Buckets are zero between
reductions, so a parameter unused on one replica adds nothing from it.
"""

from __future__ import annotations

import threading
from typing import List, Optional

import torch

from . import _C, streams as lane_streams

_MB = 1024 * 1024


class GradReducer:
    def __init__(self, root_params: List[torch.Tensor], replica_params: List[List[torch.Tensor]],
                 devices: List[torch.device], streams: Optional[list], bucket_cap_mb: float = 25.0,
                 first_bucket_cap_mb: float = 1.0, tree_shape: str = "auto", phase=None):
        """replica_params[k - 1][i] is replica k's copy of root_params[i]."""
        self.root_params = root_params
        self.replica_params = replica_params
        self.devices = devices
        self.streams = streams
        self.lane_stream_ids = lane_streams.ids(streams)
        self.tree_shape = tree_shape
        self._phase = phase
        self.num_replicas = len(replica_params) + 1
        self.sync_enabled = True
        self.reduction_count = 0  # buckets reduced, for tests and benchmarks
        self._lock = threading.Lock()
        self._callback_queued = False
        self._got_grad = [False] * len(root_params)
        self._replicas_used = 1
        self._hooks = []
        # Buckets in reverse registration order: the last layers' gradients come first in backward.
        order = list(reversed(range(len(root_params))))
        dtype_ids = {}
        groups = [dtype_ids.setdefault(root_params[i].dtype, len(dtype_ids)) for i in order]
        sizes = [root_params[i].numel() * root_params[i].element_size() for i in order]
        self.buckets: List[List[int]] = [[order[j] for j in bucket] for bucket in _C.assign_buckets(
            sizes, groups, int(bucket_cap_mb * _MB), int(first_bucket_cap_mb * _MB))]
        self.bucket_of = [0] * len(root_params)
        self.offset_of = [0] * len(root_params)
        # flats[b][k]: bucket b's buffer on replica k; k = 0 is the receive buffer on the root's device.
        self.flats: List[List[torch.Tensor]] = []
        for b, members in enumerate(self.buckets):
            offset = 0
            for i in members:
                self.bucket_of[i], self.offset_of[i] = b, offset
                offset += root_params[i].numel()
            dtype = root_params[members[0]].dtype
            self.flats.append([torch.zeros(offset, dtype=dtype, device=devices[k]) for k in range(self.num_replicas)])
        for k in range(1, self.num_replicas):
            for i, p in enumerate(replica_params[k - 1]):
                p.grad = self._view(i, k)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i, k)))

    def _view(self, i: int, k: int) -> torch.Tensor:
        p = self.root_params[i]
        return self.flats[self.bucket_of[i]][k].narrow(0, self.offset_of[i], p.numel()).view(p.shape)

    def _make_hook(self, i: int, k: int):
        def hook(param: torch.Tensor) -> None:
            view = self._view(i, k)
            if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                # Autograd replaced the view (create_graph=True accumulates out of place).
                with torch.no_grad():
                    view.copy_(param.grad)
                param.grad = view
            with self._lock:
                self._got_grad[i] = True
                self._replicas_used = max(self._replicas_used, k + 1)
                if not self._callback_queued:
                    self._callback_queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return hook

    def note_forward(self, num_replicas: int) -> None:
        self._replicas_used = max(self._replicas_used, num_replicas)

    def _end_of_backward(self) -> None:
        with self._lock:
            self._callback_queued = False
            if not self.sync_enabled:
                return  # no_sync(): gradients keep accumulating in the replicas' buckets
            if self._phase is None:
                self.reduce()
            else:
                with self._phase("reduce"):
                    self.reduce()

    def reduce(self) -> None:
        """Reduces every bucket holding a gradient into the root's .grad, then zeroes the buckets."""
        used = self._replicas_used
        current = lane_streams.current_stream(self.devices[0])
        with torch.no_grad():
            for b, members in enumerate(self.buckets):
                touched = [i for i in members if self._got_grad[i]]
                if not touched:
                    continue
                buffers = [self.flats[b][k] for k in range(used)]
                _C.reduce_add_(buffers, 0, self.lane_stream_ids[:used], self.tree_shape)
                self.reduction_count += 1
                lane_streams.wait(current, self.streams[0] if self.streams else None)
                for i in touched:
                    p = self.root_params[i]
                    reduced = self._view(i, 0)
                    if p.grad is None:
                        p.grad = torch.empty_like(p).copy_(reduced)
                    else:
                        p.grad.add_(reduced)
                for k, buffer in enumerate(buffers):
                    lane = self.streams[k] if self.streams else None
                    lane_streams.wait(lane, current)
                    with lane_streams.on(lane):
                        buffer.zero_()
        self._got_grad = [False] * len(self.root_params)
        self._replicas_used = 1

    def has_pending(self) -> bool:
        return any(self._got_grad)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
