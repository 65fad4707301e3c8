"""How a batch is split over the replicas: torch.chunk's even split (as
nn.DataParallel), explicit ``chunk_sizes``, or relative ``weights`` (a busy or
smaller GPU0 gets less work, the ``gpu0_bsz`` idea of BalancedDataParallel)."""

from __future__ import annotations

import collections.abc
import math
import numbers
from typing import Any, List, Optional, Sequence


def even(batch: int, num_devices: int) -> List[int]:
    """torch.chunk's split: ceil(batch / n) rows per replica, so a small batch uses fewer replicas."""
    if batch <= 0:
        return []
    per_replica = -(-batch // num_devices)
    return [min(per_replica, batch - start) for start in range(0, batch, per_replica)]


def kept(sizes: Any) -> Any:
    """chunk_sizes or weights as the wrapper keeps them: a one-shot iterator (a generator, map) as
    a list, read once here (checking it would use it up); anything else as given."""
    return list(sizes) if isinstance(sizes, collections.abc.Iterator) else sizes


def validate_sizes(argument: str, sizes: Sequence, num_devices: int) -> List:
    """The entries of chunk_sizes or weights, checked: one non-negative number per device; for
    chunk_sizes whole numbers, for weights at least one positive."""
    try:
        if isinstance(sizes, (str, bytes)):
            raise TypeError
        values = list(sizes)
    except TypeError:
        raise ValueError(f"dpfast.DataParallel: {argument}: expected a sequence of one entry per device "
                         f"({num_devices}), but got {sizes!r}") from None
    if len(values) != num_devices:
        raise ValueError(f"dpfast.DataParallel: {argument}: expected one entry per device ({num_devices}), but got "
                         f"{len(values)}: {values}")
    for i, v in enumerate(values):
        # numbers.Real: numpy's scalars too (np.int64 from an array, np.float32)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"dpfast.DataParallel: {argument}: expected non-negative numbers, but {argument}[{i}] "
                             f"is {v!r}")
    values = [int(v) if isinstance(v, numbers.Integral) else float(v) for v in values]
    if argument == "chunk_sizes" and any(int(v) != v for v in values):
        raise ValueError(f"dpfast.DataParallel: chunk_sizes: expected whole numbers of rows, but got {values}")
    if argument == "weights" and sum(values) <= 0:
        raise ValueError(f"dpfast.DataParallel: weights: expected at least one positive weight, but got {values}")
    return values


def by_weights(batch: int, weights: Sequence[float]) -> List[int]:
    """Rows proportional to weights, rounded by largest remainder so they sum to batch."""
    total = float(sum(weights))
    exact = [batch * w / total for w in weights]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (exact[i] - sizes[i], weights[i]), reverse=True)
    for i in by_remainder[: batch - sum(sizes)]:
        sizes[i] += 1
    return sizes


def chunk_sizes_for(batch: int, num_devices: int, chunk_sizes: Optional[Sequence[int]] = None,
                    weights: Optional[Sequence[float]] = None) -> List[int]:
    """Rows per replica (a list of length num_devices where chunk_sizes or
    weights are given, zeros allowed; torch.chunk's possibly shorter list otherwise)."""
    if chunk_sizes is not None:
        sizes = validate_sizes("chunk_sizes", chunk_sizes, num_devices)
        if any(int(s) != s for s in sizes):
            raise ValueError(f"dpfast.DataParallel: chunk_sizes: expected whole numbers of rows, but got {sizes}")
        if sum(sizes) != batch:
            raise ValueError(f"dpfast.DataParallel: chunk_sizes: expected sizes that sum to the batch size ({batch}), "
                             f"but they sum to {sum(sizes)}: {sizes}")
        return [int(s) for s in sizes]
    if weights is not None:
        values = validate_sizes("weights", weights, num_devices)
        if sum(values) <= 0:
            raise ValueError(f"dpfast.DataParallel: weights: expected at least one positive weight, but got {values}")
        return by_weights(batch, values)
    return even(batch, num_devices)
