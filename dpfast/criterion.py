"""The loss on the replicas: outputs are never gathered onto one device.

nn.DataParallel gathers every output (the logits of the whole batch) and then
the loss onto GPU0, which is why GPU0 runs out of memory first. With
``DataParallel(model, gather=False)`` the forward returns the replicas'
outputs where they are (a ``ReplicaOutputs``), and ``ParallelCriterion``
scatters the targets the same way, computes the loss next to each output and
combines the per-replica losses into exactly the full-batch value:

    model = dpfast.DataParallel(net, gather=False)
    criterion = dpfast.ParallelCriterion(nn.CrossEntropyLoss())
    loss = criterion(model(x), y)          # a scalar on output_device
    loss.backward()

NOTE [Combining per-replica losses]
For ``reduction="sum"`` the losses add. For ``"mean"`` each replica's loss is
computed as a sum and the total is divided by the full batch's denominator:
the number of elements for element-wise losses (rows are split, so this is
the chunk-size weighted mean), and for CrossEntropyLoss/NLLLoss the summed
class weights of the targets that are not ``ignore_index`` (what torch's mean
divides by). CTCLoss's mean divides each sample's loss by its target length
first (torch's definition), then by the number of samples; its targets and
lengths are split along dim 0 whatever the wrapper's ``dim`` (log_probs are
(T, N, C): ``dim=1``), and 1-D concatenated targets by each replica's summed
target lengths. ``"none"`` gathers
the per-sample losses. Criteria without a ``reduction`` attribute are treated
as means over rows (chunk-size weighted); pass ``reduction=`` to say otherwise.
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import torch
from torch import nn

from . import scatter_gather


class ReplicaOutputs(list):
    """The replicas' outputs, one entry per replica that ran, left on their devices."""

    def __init__(self, outputs: List[Any], chunk_sizes: List[int], devices: List[torch.device],
                 output_device: torch.device, dim: int):
        super().__init__(outputs)
        self.chunk_sizes = list(chunk_sizes)
        self.devices = list(devices)
        self.output_device = output_device
        self.dim = dim

    def gather(self) -> Any:
        """What DataParallel with gather=True would have returned."""
        return scatter_gather.gather(list(self), self.output_device, self.dim, self.devices)


def _scatter_like(value: Any, outputs: ReplicaOutputs, dim: int) -> List[Any]:
    return scatter_gather.scatter(value, outputs.devices, outputs.chunk_sizes, dim)


class ParallelCriterion(nn.Module):
    """Computes ``criterion(output_k, target_k)`` next to each replica's output
    and combines the results into the full-batch value (NOTE [Combining
    per-replica losses])."""

    def __init__(self, criterion: Any, reduction: Optional[str] = None):
        super().__init__()
        self.criterion = criterion
        self.reduction = reduction if reduction is not None else getattr(criterion, "reduction", "mean")
        if self.reduction == "batchmean":  # KLDivLoss: a mean over rows
            self.reduction = "mean"
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"dpfast.ParallelCriterion: reduction: expected 'mean', 'sum' or 'none', but got "
                             f"{self.reduction!r}")
        self._has_reduction = isinstance(getattr(criterion, "reduction", None), str)
        # torch's mean of most criteria is the mean of their unreduced losses, whose shape is the
        # criterion's own (one per element for MSELoss, one per row for MultiMarginLoss or
        # TripletMarginLoss): those are computed unreduced per replica and averaged over them all.
        # Cross-entropy's and NLL's means are weighted and KLDivLoss's batchmean is over rows: sums
        # per replica, then their own denominators (_denominator).
        self._unreduced_mean = (self._has_reduction and self.reduction == "mean"
                                and not isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))
                                and not (isinstance(criterion, nn.KLDivLoss) and criterion.reduction == "batchmean"))
        # CTCLoss's mean: each sample's loss over its target length, then the mean over samples.
        self._ctc_mean = self._unreduced_mean and isinstance(criterion, nn.CTCLoss)
        if self._has_reduction:  # computes sums per replica; the mean is taken over the whole batch
            self._summing = copy.copy(criterion)
            self._summing.reduction = ("none" if self._unreduced_mean else
                                       "sum" if self.reduction == "mean" else self.reduction)

    def forward(self, outputs: ReplicaOutputs, target: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(outputs, ReplicaOutputs):
            raise TypeError("dpfast.ParallelCriterion: outputs: expected the ReplicaOutputs of "
                            f"DataParallel(..., gather=False), but got {type(outputs).__name__}")
        ctc = isinstance(self.criterion, nn.CTCLoss)
        # CTCLoss's targets, lengths and per-sample losses have the batch first whatever the
        # outputs' dim (its (T, N, C) log-probabilities come from a wrapper with dim=1).
        batch_dim = 0 if ctc else outputs.dim
        if ctc:
            args, kwargs = tuple(_lengths_tensor(a) for a in args), {k: _lengths_tensor(v) for k, v in kwargs.items()}
        if ctc and isinstance(target, torch.Tensor) and target.dim() == 1:
            targets = _scatter_concatenated_targets(target, args, kwargs, outputs)
        else:
            targets = _scatter_like(target, outputs, batch_dim)
        extra_args = _scatter_like(args, outputs, batch_dim) if args else [()] * len(outputs)
        extra_kwargs = _scatter_like(kwargs, outputs, batch_dim) if kwargs else [{}] * len(outputs)
        fn = self._summing if self._has_reduction else self.criterion
        losses = [fn(out, tgt, *a, **kw) for out, tgt, a, kw in zip(outputs, targets, extra_args, extra_kwargs)]
        if self.reduction == "none":
            return scatter_gather.gather(losses, outputs.output_device, batch_dim, outputs.devices)
        if self._ctc_mean:
            losses = [loss / _ctc_target_lengths(a, kw).to(loss.device, loss.dtype).clamp(min=1)
                      for loss, a, kw in zip(losses, extra_args, extra_kwargs)]
        if self._unreduced_mean:
            count = sum(loss.numel() for loss in losses)
            return torch.stack([loss.sum().to(outputs.output_device) for loss in losses]).sum() / count
        on_output = [loss.to(outputs.output_device) for loss in losses]
        if self.reduction == "sum":
            return torch.stack(on_output).sum()
        if not self._has_reduction:  # a mean over rows from each replica: weight by rows
            total = sum(outputs.chunk_sizes)
            return sum(loss * (rows / total) for loss, rows in zip(on_output, outputs.chunk_sizes))
        denominator = sum(self._denominator(out, tgt).to(outputs.output_device) for out, tgt in zip(outputs, targets))
        return torch.stack(on_output).sum() / denominator

    def _denominator(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What torch's mean of this criterion divides by, for one replica's share."""
        c = self.criterion
        if isinstance(c, (nn.CrossEntropyLoss, nn.NLLLoss)):
            if torch.is_floating_point(target):  # class probabilities: a mean over all but the class dim
                return torch.tensor(float(output.numel() // output.size(1)), device=output.device)
            keep = target != c.ignore_index
            if c.weight is None:
                return keep.sum().to(output.dtype)
            weights = c.weight.to(target.device)[target.clamp(min=0) * keep]
            return (weights * keep).sum().to(output.dtype)
        return torch.tensor(float(output.size(0)), device=output.device)  # KLDivLoss's batchmean


def _scatter_concatenated_targets(target: torch.Tensor, args: tuple, kwargs: dict,
                                  outputs: ReplicaOutputs) -> List[torch.Tensor]:
    """CTCLoss's targets concatenated into one 1-D tensor, split by the summed target lengths of
    each replica's samples."""
    rows = list(outputs.chunk_sizes)
    lengths = _ctc_target_lengths(args, kwargs)
    if lengths.dim() != 1 or lengths.size(0) != sum(rows):
        raise ValueError(f"dpfast.ParallelCriterion: target_lengths: expected one length per sample "
                         f"({sum(rows)}), but got a tensor of shape {tuple(lengths.shape)}")
    per_replica = [int(piece.sum()) for piece in lengths.split(rows)]
    if sum(per_replica) != target.size(0):
        raise ValueError(f"dpfast.ParallelCriterion: targets: expected the concatenated targets, "
                         f"sum(target_lengths) = {sum(per_replica)} labels, but got {target.size(0)}")
    return scatter_gather.scatter(target, outputs.devices, per_replica, 0)


def _lengths_tensor(value: Any) -> Any:
    """CTCLoss takes lengths as a tuple or list of ints too: a tensor, to be split with the batch."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return torch.tensor(value, dtype=torch.long)
    return value


def _ctc_target_lengths(args: tuple, kwargs: dict) -> torch.Tensor:
    """One replica's target_lengths, CTCLoss's fourth argument (after log_probs and targets)."""
    lengths = kwargs["target_lengths"] if "target_lengths" in kwargs else args[1] if len(args) > 1 else None
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"dpfast.ParallelCriterion: target_lengths: expected a tensor of one length per sample "
                        f"(split with the batch), but got {type(lengths).__name__}")
    return lengths
