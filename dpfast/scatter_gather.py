"""Scatter of nested inputs onto the replicas and gather of their outputs.

The same structures as torch.nn.parallel.scatter_gather (tensors, lists,
tuples, namedtuples, dicts and dict subclasses, with the type kept) plus
dataclasses; non-tensor values go to every replica unchanged. Unlike
nn.DataParallel, tensors whose batch sizes disagree are rejected (but for one
row per replica, and whole multiples of the batch split per sample), 0-dim input
tensors are given whole to every replica instead of failing, and 0-dim outputs
are gathered into a vector without a warning.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _C
from .splits import even as even_chunk_sizes  # noqa: F401  (torch.chunk's split, used by tests)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_asdict") and hasattr(obj, "_fields")


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _dataclass_items(obj: Any):
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init]


def _rebuild_dataclass(template: Any, values: Dict[str, Any]) -> Any:
    out = type(template)(**values)
    for f in dataclasses.fields(template):  # fields outside __init__ keep the first replica's value
        if not f.init:
            object.__setattr__(out, f.name, getattr(template, f.name))
    return out


def _rebuild_dict(template: dict, items) -> dict:
    """A dict of template's own type (and default_factory, for a defaultdict) holding items."""
    if isinstance(template, collections.defaultdict):
        out = copy.copy(template)
        out.clear()
        out.update(items)
        return out
    return type(template)(items)


def iter_tensors(obj: Any, path: Optional[str]):
    """(path, tensor) for every tensor in a nested structure, in a stable order. With path None,
    every path is None: the walk without the strings, which only error messages read."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, None if path is None else f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, None if path is None else f"{path}[{i}]")
    elif _is_dataclass_instance(obj):
        for name, value in _dataclass_items(obj):
            yield from iter_tensors(value, None if path is None else f"{path}.{name}")


def find_batch_size(inputs: tuple, kwargs: dict, dim: int, num_replicas: Optional[int] = None) -> Optional[int]:
    """The common size along ``dim`` of every input tensor that has a batch
    dimension, or None when there is none. Raises on disagreement, except for
    tensors of ``num_replicas`` rows next to a batch of another size (they
    carry one row per replica) and tensors of a whole multiple of the batch's
    rows (several rows per sample, batch-major: MultiheadAttention's 3-D
    ``attn_mask`` of batch x heads rows); see ``scatter``."""
    distinct = set()  # at every call: first without the paths, which only an error names
    for _, tensor in itertools.chain(iter_tensors(inputs, None), iter_tensors(kwargs, None)):
        rank = tensor.dim()
        if tensor.is_meta:
            break
        if rank == 0:
            continue
        if not -rank <= dim < rank:
            break
        distinct.add(tensor.size(dim))
    else:
        if len(distinct) <= 1:
            return distinct.pop() if distinct else None
        batch = _batch_of(distinct, num_replicas)
        if batch is not None:
            return batch
    return _find_batch_size_naming_paths(inputs, kwargs, dim, num_replicas)


def _batch_of(distinct: set, num_replicas: Optional[int]) -> Optional[int]:
    """The batch among two or more sizes: the smallest, once one row per replica is set aside,
    where every other size is a whole multiple of it; else None. Not 1: a 1-row tensor next to
    the batch is most often one shared by every sample (expand it), and as the batch it would
    leave every replica but one idle."""
    sizes = distinct - {num_replicas}
    batch = min(sizes)
    if len(sizes) == 1 or (batch > 1 and all(size % batch == 0 for size in sizes)):
        return batch
    return None


def _find_batch_size_naming_paths(inputs: tuple, kwargs: dict, dim: int, num_replicas: Optional[int]) -> Optional[int]:
    sizes = []
    for path, tensor in list(iter_tensors(inputs, "inputs")) + list(iter_tensors(kwargs, "kwargs")):
        if tensor.is_meta:  # before anything is built for the call (the scatter's copy would be torch's error)
            raise ValueError(f"dpfast.DataParallel: {path.split('[')[0]}: expected tensors that hold data to "
                             f"scatter to the replicas, but {path} is a meta tensor (shape {tuple(tensor.shape)})")
        if tensor.dim() == 0:
            continue  # given whole to every replica
        if not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"dpfast.DataParallel: dim: expected a dimension in [{-tensor.dim()}, {tensor.dim()}) "
                             f"of every input tensor, but got dim={dim} and {path} has shape {tuple(tensor.shape)}")
        sizes.append((path, tensor.size(dim)))
    distinct = {size for _, size in sizes}
    if len(distinct) <= 1:
        return distinct.pop() if distinct else None
    batch = _batch_of(distinct, num_replicas)
    if batch is not None:
        return batch
    batch = min(n for _, n in sizes if n != num_replicas)
    disagree = next(i for i, (_, n) in enumerate(sizes)
                    if n not in (batch, num_replicas) and (batch <= 1 or n % batch))
    first = min(i for i, (_, n) in enumerate(sizes) if n == batch)
    (first_path, first_size), (path, size) = (sizes[i] for i in sorted((first, disagree)))  # in the inputs' order
    raise ValueError(f"dpfast.DataParallel: inputs: expected every input tensor to have the same size along "
                     f"dim {dim} (the batch), a whole multiple of it (rows per sample), or one row per replica, "
                     f"but {first_path} has {first_size} and {path} has {size}")


def _same_namedtuple(a: Any, b: Any) -> bool:
    """Namedtuples of one name and fields: a forward that makes its output's class at every call
    (pytorch/examples fast_neural_style's Vgg16) gives each replica a class of its own."""
    return (_is_namedtuple(a) and _is_namedtuple(b) and type(a).__name__ == type(b).__name__
            and a._fields == b._fields)


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def scatter_tensor(tensor: torch.Tensor, devices: List[torch.device], chunk_sizes: List[int], dim: int,
                   lane_stream_ids: List[int]) -> List[torch.Tensor]:
    if tensor.dim() == 0:  # whole to every replica, copied on the lanes as the rest of the inputs
        pieces = scatter_tensor(tensor.reshape(1).expand(len(devices)), devices, [1] * len(devices), 0,
                                lane_stream_ids)
        return [piece.reshape(()) for piece in pieces]
    # Recorded by autograd where the tensor requires grad: the pieces' gradients are gathered back
    # (csrc/autograd_ops.h).
    return _C.scatter(tensor, devices, chunk_sizes, dim, lane_stream_ids)


def scatter(obj: Any, devices: List[torch.device], chunk_sizes: List[int], dim: int,
            lane_stream_ids: List[int] = (), replica_rows: Optional[Tuple[int, List[int]]] = None) -> List[Any]:
    """One object per replica: tensors split along dim in chunk_sizes, the
    containers rebuilt with their own types, everything else shared.

    ``replica_rows`` is (number of replicas, indices of those that run): a tensor
    with one row per replica next to a batch of another size gives each running
    replica its row, as nn.DataParallel's chunking does (the Hugging Face Trainer
    passes ``num_items_in_batch`` so)."""
    lane_stream_ids = list(lane_stream_ids)
    batch = sum(chunk_sizes) if chunk_sizes and None not in chunk_sizes else None
    num_replicas, running = replica_rows if replica_rows is not None else (None, None)

    def scatter_map(value):
        if isinstance(value, torch.Tensor):
            rows = value.size(dim) if -value.dim() <= dim < value.dim() else batch  # else: scatter_tensor says so
            if rows != batch:
                if num_replicas is not None and rows == num_replicas:
                    all_run = list(running) == list(range(num_replicas))
                    picked = value if all_run else value.index_select(dim, torch.tensor(running, device=value.device))
                    return scatter_tensor(picked, devices, [1] * len(devices), dim, lane_stream_ids)
                if batch and rows % batch == 0:  # rows per sample, batch-major: each replica its samples' rows
                    per_sample = rows // batch
                    return scatter_tensor(value, devices, [size * per_sample for size in chunk_sizes], dim,
                                          lane_stream_ids)
            return scatter_tensor(value, devices, chunk_sizes, dim, lane_stream_ids)
        if _is_namedtuple(value) and len(value) > 0:
            return [type(value)(*fields) for fields in zip(*map(scatter_map, value))]
        if isinstance(value, tuple) and len(value) > 0:
            return [type(value)(items) if type(value) is not tuple else tuple(items)
                    for items in zip(*map(scatter_map, value))]
        if isinstance(value, list) and len(value) > 0:
            return [type(value)(items) for items in zip(*map(scatter_map, value))]
        if isinstance(value, dict) and len(value) > 0:
            keys = list(value.keys())
            per_key = [scatter_map(value[k]) for k in keys]
            return [_rebuild_dict(value, zip(keys, values)) for values in zip(*per_key)]
        if _is_dataclass_instance(value):
            items = _dataclass_items(value)
            per_field = [scatter_map(v) for _, v in items]
            return [_rebuild_dataclass(value, {name: vals[i] for i, (name, _) in enumerate(items)})
                    for vals in zip(*per_field)] if items else [value for _ in devices]
        return [value for _ in devices]

    try:
        return scatter_map(obj)
    finally:
        scatter_map = None  # the recursive closure refers to itself: no reference cycle per call


def _whole_batch(value: Any, devices: List[torch.device], chunk_sizes: List[int], dim: int) -> bool:
    """A tensor of exactly the batch's rows along dim: scatter() splits it in chunk_sizes."""
    return (isinstance(value, torch.Tensor) and len(chunk_sizes) == len(devices) and None not in chunk_sizes
            and -value.dim() <= dim < value.dim() and value.size(dim) == sum(chunk_sizes))


def scatter_kwargs(inputs: tuple, kwargs: Optional[dict], devices: List[torch.device], chunk_sizes: List[int],
                   dim: int, lane_stream_ids: List[int] = (), replica_rows: Optional[Tuple[int, List[int]]] = None
                   ) -> Tuple[List[tuple], List[dict]]:
    if not kwargs and len(inputs) == 1 and _whole_batch(inputs[0], devices, chunk_sizes, dim):
        # The common call, model(batch): what scatter() below gives for it, without its walk (tens
        # of microseconds per step on CPU replicas).
        pieces = _C.scatter(inputs[0], devices, chunk_sizes, dim, list(lane_stream_ids))
        return [(piece,) for piece in pieces], [{} for _ in devices]
    scattered_inputs = scatter(tuple(inputs), devices, chunk_sizes, dim, lane_stream_ids, replica_rows) if inputs else []
    scattered_kwargs = scatter(dict(kwargs), devices, chunk_sizes, dim, lane_stream_ids, replica_rows) if kwargs else []
    n = len(devices)
    scattered_inputs = list(scattered_inputs) + [() for _ in range(n - len(scattered_inputs))]
    scattered_kwargs = list(scattered_kwargs) + [{} for _ in range(n - len(scattered_kwargs))]
    return [tuple(i) for i in scattered_inputs], [dict(k) for k in scattered_kwargs]


def _items_of_iterables(values: List[Any]) -> Optional[List[list]]:
    """The items of each value, when every value is an iterable of one type (not a string, set or
    mapping) and all have as many items; else None."""
    first = values[0]
    if (not hasattr(type(first), "__iter__") or isinstance(first, (str, bytes, bytearray, torch.Tensor))
            or isinstance(first, (collections.abc.Set, collections.abc.Mapping))
            or any(type(v) is not type(first) for v in values[1:])):
        return None
    try:
        columns = [list(v) for v in values]
    except Exception:  # an __iter__ that refuses (detectron2's Instances raises NotImplementedError)
        return None
    return columns if all(len(c) == len(columns[0]) for c in columns) else None


def _first_other_shape(tensors: List[torch.Tensor], dim: int) -> Optional[int]:
    """The first replica whose tensor cannot be concatenated with replica 0's along dim (another
    number of dimensions, or another size in some other dimension), or None."""
    first = tensors[0].shape
    for k, t in enumerate(tensors[1:], start=1):
        if len(t.shape) != len(first):
            return k
        along = dim % len(first) if len(first) else 0
        if any(a != b for d, (a, b) in enumerate(zip(t.shape, first)) if d != along):
            return k
    return None


def gather(outputs: List[Any], destination: torch.device, dim: int, devices: List[torch.device],
           lane_stream_ids: List[int] = (), scalar_weights: Optional[List[int]] = None,
           stand_ins: Optional[Dict[int, torch.Tensor]] = None) -> Any:
    """The replicas' outputs concatenated along dim on ``destination`` (ready
    on its current stream), nested
    structures rebuilt with their own types. 0-dim tensors become a vector of
    one value per replica. Other values are kept when every replica returned
    an equal one, else gathered into a list. With ``scalar_weights`` (the
    chunk sizes), 0-dim outputs become their weighted mean instead: the
    full-batch value of a mean computed per replica. Other iterable objects
    (a cache of per-layer tensors) are gathered item by item and rebuilt with
    their type's constructor, as nn.DataParallel does, where it takes them. ``stand_ins`` maps
    id(tensor) to the tensor gathered in its place (NOTE [Parallel backward])."""
    lane_stream_ids = list(lane_stream_ids)

    def mismatch(path: str, expected: str, k: int, got: str):
        return TypeError(f"dpfast.DataParallel: outputs{path}: expected every replica to return {expected} (as "
                         f"replica 0 did), but replica {k} returned {got}")

    # Set while an iterable's items are gathered a second time (see below).
    keep_agreeing_scalars = [False]

    def gather_map(values: List[Any], path: str = ""):
        first = values[0]
        for k, v in enumerate(values[1:], start=1):
            if isinstance(first, torch.Tensor) != isinstance(v, torch.Tensor) or (first is None) != (v is None):
                raise mismatch(path, _kind(first), k, _kind(v))
            if isinstance(first, (dict, list, tuple)) and type(v) is not type(first) and not _same_namedtuple(first, v):
                raise mismatch(path, _kind(first), k, _kind(v))
            if isinstance(first, (list, tuple)) and len(v) != len(first):
                raise mismatch(path, f"{len(first)} items", k, f"{len(v)}")
            if isinstance(first, dict) and v.keys() != first.keys():  # in any order, as nn.DataParallel
                raise ValueError(f"dpfast.DataParallel: outputs{path}: expected every replica to return a dict "
                                 f"with the keys {list(first.keys())} (as replica 0 did), but replica {k} "
                                 f"returned the keys {list(v.keys())}")
        if isinstance(first, torch.Tensor):
            if stand_ins:
                values = [stand_ins.get(id(v), v) for v in values]
            scalars = first.dim() == 0
            if (scalars and keep_agreeing_scalars[0] and all(v.dim() == 0 for v in values)
                    and all(torch.equal(v.cpu(), first.cpu()) for v in values[1:])):
                return first.to(destination)
            tensors = [v.unsqueeze(0) if v.dim() == 0 else v for v in values]
            gather_dim = 0 if scalars else dim
            if not -tensors[0].dim() <= gather_dim < tensors[0].dim():  # IndexError, as torch's gather gives it
                raise IndexError(f"dpfast.DataParallel: outputs{path}: expected tensors with a dimension {dim} to "
                                 f"gather along (dim in [{-first.dim()}, {first.dim()})), but replica 0 returned "
                                 f"shape {list(first.shape)}")
            try:
                # Recorded by autograd where a piece requires grad: the backward scatters the gradient
                # back onto the replicas (csrc/autograd_ops.h).
                out = _C.gather(tensors, devices, destination, gather_dim, lane_stream_ids)
            except RuntimeError as error:
                k = _first_other_shape(tensors, gather_dim)
                if k is None:
                    raise
                # Which output, as the other checks here say (pad_packed_sequence without
                # total_length pads each replica's chunk to its own longest sequence).
                raise RuntimeError(f"dpfast.DataParallel: outputs{path}: expected every replica's tensor to match "
                                   f"replica 0's shape {list(tensors[0].shape)} in every dimension except dim "
                                   f"{gather_dim}, but replica {k} returned shape {list(tensors[k].shape)}") from error
            if scalars and scalar_weights is not None:
                total = float(sum(scalar_weights))
                weights = torch.tensor([w / total for w in scalar_weights], dtype=out.dtype, device=out.device)
                return (out * weights).sum()
            return out
        if first is None:
            return None
        if isinstance(first, dict):
            return _rebuild_dict(first, ((k, gather_map([v[k] for v in values], f"{path}[{k!r}]")) for k in first))
        if _is_namedtuple(first):
            return type(first)._make(gather_map(list(items), f"{path}.{name}")
                                     for name, items in zip(first._fields, zip(*values)))
        if isinstance(first, (list, tuple)):
            items = [gather_map(list(items), f"{path}[{i}]") for i, items in enumerate(zip(*values))]
            if type(first) in (list, tuple):
                return type(first)(items)
            try:
                return type(first)(items)
            except Exception:  # a subclass that takes other items (a torch.Size of sizes that differ)
                if any(True for _ in iter_tensors(first, None)):  # the gathered tensors, in the base type
                    return list(items) if isinstance(first, list) else tuple(items)
                return list(values)  # as other values that differ: one per replica
        if _is_dataclass_instance(first):
            return _rebuild_dataclass(first, {name: gather_map([getattr(v, name) for v in values], f"{path}.{name}")
                                              for name, _ in _dataclass_items(first)})
        if isinstance(first, collections.abc.Iterator) and all(type(v) is type(first) for v in values[1:]):
            # A one-shot iterator (a generator, map): its type cannot be made again from items, and
            # reading the items uses it up, so they come back gathered, in a list (nn.DataParallel's
            # rebuild raises a TypeError here).
            columns = [list(v) for v in values]
            for k, column in enumerate(columns[1:], start=1):
                if len(column) != len(columns[0]):
                    raise mismatch(path, f"an iterator of {len(columns[0])} items", k, f"one of {len(column)}")
            return [gather_map(list(row), f"{path}[{i}]") for i, row in enumerate(zip(*columns))]
        try:
            if all(v is first or v == first for v in values[1:]):
                return first
        except Exception:  # values whose == is not a plain bool
            pass
        columns = _items_of_iterables(values)
        if columns is not None:
            # nn.DataParallel's rule for other iterables: gather item by item and rebuild with the
            # type's constructor (Hugging Face's DynamicCache takes its per-layer tensors this way).
            items = [gather_map(list(row), f"{path}[{i}]") for i, row in enumerate(zip(*columns))]
            try:
                # An iterator, as nn.DataParallel passes: a list could mean something else to a
                # constructor (np.ndarray takes it as a shape).
                return type(first)(iter(items))
            except Exception:  # a type that is not built from its items
                pass
            if not keep_agreeing_scalars[0]:
                # Once more with the 0-dim tensors that every replica holds alike kept as they are:
                # a setting, not a value per sample (transformers' DynamicCache of a sliding-window
                # model yields each layer's window size with its keys and values, and builds itself
                # from a window size, not from a vector of one per replica).
                keep_agreeing_scalars[0] = True
                try:
                    items = [gather_map(list(row), f"{path}[{i}]") for i, row in enumerate(zip(*columns))]
                    return type(first)(iter(items))
                except Exception:
                    pass
                finally:
                    keep_agreeing_scalars[0] = False
        return list(values)

    try:
        return gather_map(outputs)
    finally:
        gather_map = None  # the recursive closure refers to itself: no reference cycle per call
