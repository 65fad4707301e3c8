"""Optional: BatchNorm running statistics of the whole batch, not only of replica 0's chunk.

With nn.DataParallel (and dpfast by default) the root keeps the running
statistics that replica 0 computed on its chunk. With
``DataParallel(..., average_buffers=True)`` every training forward ends by
setting each BatchNorm's running_mean and running_var on the root to the
update that one BatchNorm would have made on the whole batch.

Each replica started from the root's statistics (r) and made the update
r_k = (1 - f) r + f s_k with its chunk's statistic s_k, where f is the
momentum (or 1 / num_batches_tracked when momentum is None). So
s_k = (r_k - (1 - f) r) / f recovers each chunk's mean and unbiased variance,
and with n_k elements per channel in chunk k (N in all) the whole batch's are
    mean = sum_k n_k mean_k / N
    var  = N / (N - 1) * sum_k n_k ((n_k - 1) / n_k var_k + (mean_k - mean)^2) / N,
which the root then applies once: r <- (1 - f) r + f s.

A BatchNorm called several times in one forward (a siamese encoder) makes one
update per call: a pre-hook notes the running statistics before each call, so
each call's chunk statistics come from the update of that call alone, and the
root applies the calls' whole-batch updates in order. Where only one chunk ran
(replica 0 was given no rows), its replica's update is the whole batch's.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _tracks(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None


class BatchNormAverager:
    def __init__(self) -> None:
        # id(module or replica) -> (elements per channel, running_mean, running_var) before each of
        # its calls in the last forward
        self.calls: Dict[int, List[Tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._hooked: Dict[int, object] = {}
        self.hooked_now = False
        self._recording = False  # between prepare() and apply(): calls outside a wrapper's forward are not kept

    def prepare(self, root_modules: List[nn.Module]) -> List[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Before a training forward: hooks every BatchNorm (the replicas copy the root's hooks)
        and returns (module index, running_mean, running_var, num_batches_tracked) snapshots."""
        self.calls.clear()
        self._recording = True
        self.hooked_now = False  # a new hook: the replicas get it from the root at their next refresh
        snapshots = []
        for j, m in enumerate(root_modules):
            if not _tracks(m) or not m.training:
                continue
            if id(m) not in self._hooked:
                self._hooked[id(m)] = m.register_forward_pre_hook(self._note_call)
                self.hooked_now = True
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            snapshots.append((j, m.running_mean.clone(), m.running_var.clone(), tracked))
        return snapshots

    def _note_call(self, module: nn.Module, args: tuple) -> None:
        if not self._recording or not module.training or not _tracks(module):
            return  # not inside a wrapper's training forward, or no update in this call
        x = args[0]
        # One list per module: each replica's copy is a module of its own, run by one thread.
        self.calls.setdefault(id(module), []).append(
            (x.numel() // x.size(1), module.running_mean.detach().clone(), module.running_var.detach().clone()))

    @torch.no_grad()
    def apply(self, snapshots, root_modules: List[nn.Module], active_replica_modules: List[List[nn.Module]]) -> None:
        """After the forward: active_replica_modules[a][j] is the a-th active replica's copy of
        root_modules[j] (the root's own module where replica 0 ran)."""
        try:
            self._apply(snapshots, root_modules, active_replica_modules)
        finally:
            self._recording = False
            self.calls.clear()

    def _apply(self, snapshots, root_modules: List[nn.Module], active_replica_modules: List[List[nn.Module]]) -> None:
        for j, mean_before, var_before, tracked_before in snapshots:
            root = root_modules[j]
            ran = [mods[j] for mods in active_replica_modules if id(mods[j]) in self.calls]
            if not ran or (len(ran) == 1 and ran[0] is root):
                continue  # no call, or the root's own chunk alone: its update is already the whole batch's
            calls = [self.calls[id(m)] for m in ran]
            if len({len(c) for c in calls}) != 1:
                continue  # replicas called it a different number of times (data-dependent): replica 0's stays
            device = root.running_mean.device
            mean, var = mean_before.clone(), var_before.clone()
            tracked = tracked_before.clone() if tracked_before is not None else None
            for c in range(len(calls[0])):
                momentum = root.momentum if root.momentum is not None else 1.0 / float(tracked.item() + 1)
                if tracked is not None:
                    tracked += 1
                if momentum == 0:
                    continue
                counts, means, variances = [], [], []
                for m, own in zip(ran, calls):
                    n, before_mean, before_var = own[c]
                    after_mean, after_var = (own[c + 1][1:] if c + 1 < len(own) else (m.running_mean, m.running_var))
                    counts.append(n)
                    means.append((after_mean.to(device) - (1 - momentum) * before_mean.to(device)) / momentum)
                    variances.append((after_var.to(device) - (1 - momentum) * before_var.to(device)) / momentum)
                total = float(sum(counts))
                whole_mean = sum(n * mu for n, mu in zip(counts, means)) / total
                biased = sum(n * ((n - 1) / n * v + (mu - whole_mean) ** 2)
                             for n, mu, v in zip(counts, means, variances)) / total
                unbiased = biased * total / max(total - 1.0, 1.0)
                mean = (1 - momentum) * mean + momentum * whole_mean
                var = (1 - momentum) * var + momentum * unbiased
            # Through .data: replica 0's BatchNorm saved these tensors for its backward (which reads
            # the batch statistics, not these), and a version bump would fail that backward.
            root.running_mean.data.copy_(mean)
            root.running_var.data.copy_(var)
            if root.num_batches_tracked is not None and tracked is not None:
                root.num_batches_tracked.data.copy_(tracked)  # whether or not replica 0 ran
