"""Fuzzing (hypothesis) of scatter and gather on CPU replicas: random nested
structures (lists and a list subclass, tuples and a tuple subclass,
namedtuples (an empty one included), dicts and dict subclasses, dataclasses
(a frozen one included), None, ints, strings, bools; batched tensors of four
dtypes, contiguous or not; 0-dim tensors), random batch sizes, dims (negative
included), split sizes (zeros included) and device counts 1..6.

- scatter then gather returns exactly the input (torch.equal, same container
  types); every replica's piece is the right slice of the input;
- forward through an identity module wrapped in dpfast.DataParallel returns
  the input, and backward gives every input tensor the gradient of the
  identity; the same with explicit chunk_sizes (zeros included) set between
  calls.

0-dim tensors are given whole to every replica and gathered into a vector of
one value per replica, so for them "exactly the input" means that vector
(or the tensor itself where the wrapper runs the module directly on a single
replica). Shapes that broke scatter or gather are pinned as plain tests at
the end.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import dpfast  # noqa: E402
from dpfast import scatter_gather  # noqa: E402

CPU = torch.device("cpu")
MAX_DEVICES = 6
FUZZ = settings(max_examples=100, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Pair = collections.namedtuple("Pair", ["a", "b"])
Triple = collections.namedtuple("Triple", ["x", "y", "z"])
Empty = collections.namedtuple("Empty", [])


class TaggedDict(dict):
    """A dict subclass with a plain constructor."""


class Row(tuple):
    """A tuple subclass that is not a namedtuple."""


class Items(list):
    """A list subclass."""


@dataclasses.dataclass
class Record:
    features: Any
    label: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: Any
    b: Any


# -- strategies ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool]


def _values(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100, 100, shape, generator=g, dtype=dtype)


@st.composite
def batched_tensors(draw, batch: int, dim: int):
    """A tensor with `batch` rows along `dim` (negative dims count from the end)."""
    min_ndim = dim + 1 if dim >= 0 else -dim
    ndim = draw(st.integers(max(min_ndim, 1), 3))
    shape = [draw(st.integers(0, 3)) for _ in range(ndim)]
    shape[dim] = batch
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 16))
    if draw(st.booleans()):  # not contiguous: every other column of a wider tensor
        wide = list(shape)
        wide[-1] = 2 * wide[-1]
        tensor = _values(wide, dtype, seed)[..., ::2]
    else:
        tensor = _values(shape, dtype, seed)
    if dtype.is_floating_point and draw(st.booleans()):
        tensor = tensor.detach().requires_grad_()
    return tensor


@st.composite
def scalar_tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    tensor = _values((), dtype, draw(st.integers(0, 2 ** 16)))
    if dtype.is_floating_point and draw(st.booleans()):
        tensor = tensor.detach().requires_grad_()
    return tensor


def leaves(batch: int, dim: int, scalars: bool = True):
    options = [batched_tensors(batch, dim), batched_tensors(batch, dim), st.none(), st.integers(-5, 5),
               st.text(max_size=4), st.booleans()]
    if scalars:
        options.append(scalar_tensors())
    return st.one_of(options)


KEYS = st.one_of(st.sampled_from(["x", "y", "mask", "lengths", "meta"]), st.integers(0, 3))


@st.composite
def structures(draw, batch: int, dim: int, depth: int = 3, scalars: bool = True):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(leaves(batch, dim, scalars))
    child = structures(batch, dim, depth - 1, scalars)
    kind = draw(st.sampled_from(["list", "tuple", "row", "items", "pair", "triple", "empty", "dict", "tagged",
                                 "ordered", "record", "frozen"]))
    if kind in ("list", "tuple", "row", "items"):
        items = draw(st.lists(child, max_size=3))
        return {"list": list, "tuple": tuple, "row": Row, "items": Items}[kind](items)
    if kind == "pair":
        return Pair(draw(child), draw(child))
    if kind == "triple":
        return Triple(draw(child), draw(child), draw(child))
    if kind == "empty":
        return Empty()
    if kind in ("dict", "tagged", "ordered"):
        d = draw(st.dictionaries(KEYS, child, max_size=3))
        return {"dict": dict, "tagged": TaggedDict, "ordered": collections.OrderedDict}[kind](d)
    if kind == "record":
        return Record(draw(child), draw(child)) if draw(st.booleans()) else Record(draw(child))
    return Frozen(draw(child), draw(child))


@st.composite
def compositions(draw, total: int, parts: int):
    """Non-negative sizes that sum to total (zeros allowed)."""
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0] + cuts + [total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


# -- helpers ---------------------------------------------------------------------------------------

def walk(obj, path="obj"):
    """(path, leaf) for every leaf, in the order scatter and gather see them."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from walk(getattr(obj, f.name), f"{path}.{f.name}")
    else:
        yield path, obj


def has_batch(obj) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 for _, v in walk(obj))


def expected_after_gather(obj, copies: int):
    """obj with every 0-dim tensor replaced by a vector of `copies` copies of it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().reshape(1).expand(copies).clone() if obj.dim() == 0 else obj
    if isinstance(obj, dict):
        return type(obj)((k, expected_after_gather(v, copies)) for k, v in obj.items())
    if hasattr(obj, "_fields"):
        return type(obj)(*(expected_after_gather(v, copies) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(expected_after_gather(v, copies) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: expected_after_gather(getattr(obj, f.name), copies)
                            for f in dataclasses.fields(obj)})
    return obj


def assert_same(actual, expected, path="out"):
    assert type(actual) is type(expected), f"{path}: type {type(actual).__name__}, expected {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{path}: {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
        assert actual.device == expected.device, path
        assert torch.equal(actual, expected), f"{path}: values differ"
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), f"{path}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)}, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), f"{path}.{f.name}")
    else:
        assert actual == expected or (actual is expected), f"{path}: {actual!r} != {expected!r}"


# -- scatter then gather ---------------------------------------------------------------------------

@st.composite
def scatter_cases(draw):
    num_devices = draw(st.integers(1, MAX_DEVICES))
    batch = draw(st.integers(1, 13))
    dim = draw(st.integers(-3, 2))
    obj = draw(structures(batch, dim))
    if draw(st.booleans()):
        sizes = scatter_gather.even_chunk_sizes(batch, num_devices)  # torch.chunk's: maybe fewer replicas
    else:
        sizes = draw(compositions(batch, num_devices))  # explicit sizes, zeros allowed
    return obj, sizes, dim


@FUZZ
@given(scatter_cases())
def test_scatter_then_gather_returns_the_input(case):
    obj, sizes, dim = case
    devices = [CPU] * len(sizes)
    with torch.no_grad():
        pieces = scatter_gather.scatter(obj, devices, sizes, dim)
        assert isinstance(pieces, list) and len(pieces) == len(sizes)
        # Every replica gets the same structure, its own slice of each batched tensor, and
        # everything else whole.
        inputs = list(walk(obj))
        for k, piece in enumerate(pieces):
            leaves_k = list(walk(piece))
            assert [p for p, _ in leaves_k] == [p for p, _ in inputs]
            start = sum(sizes[:k])
            for (path, mine), (_, original) in zip(leaves_k, inputs):
                if isinstance(original, torch.Tensor) and original.dim() > 0:
                    assert torch.equal(mine, original.narrow(dim, start, sizes[k])), f"replica {k}: {path}"
                elif isinstance(original, torch.Tensor):
                    assert torch.equal(mine, original), f"replica {k}: {path}"
                else:
                    assert mine is original or mine == original, f"replica {k}: {path}"
        out = scatter_gather.gather(pieces, CPU, dim, devices)
    assert_same(out, expected_after_gather(obj, len(sizes)))


# -- forward through an identity module -----------------------------------------------------------

class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so that replicas and the reducer exist

    def forward(self, *args, **kwargs):
        return args, kwargs


_WRAPPERS = {}


def identity_wrapper(num_devices: int, dim: int) -> dpfast.DataParallel:
    """One wrapper per (device count, dim), reused across examples: its workers and replicas persist."""
    key = (num_devices, dim)
    if key not in _WRAPPERS:
        _WRAPPERS[key] = dpfast.DataParallel(Identity(), device_ids=["cpu"] * num_devices, dim=dim)
    return _WRAPPERS[key]


@st.composite
def forward_cases(draw):
    num_devices = draw(st.integers(1, MAX_DEVICES))
    batch = draw(st.integers(1, 13))
    dim = draw(st.integers(-3, 2))
    args = tuple(draw(st.lists(structures(batch, dim), min_size=1, max_size=3)))
    kwargs = draw(st.dictionaries(st.sampled_from(["mask", "lengths", "extra"]), structures(batch, dim),
                                  max_size=2))
    return num_devices, batch, dim, args, kwargs


@FUZZ
@given(forward_cases())
def test_forward_through_an_identity_module_returns_the_input(case):
    num_devices, batch, dim, args, kwargs = case
    wrapper = identity_wrapper(num_devices, dim)
    if has_batch((args, kwargs)):
        active = len(scatter_gather.even_chunk_sizes(batch, num_devices))
    else:
        active = num_devices  # nothing to split: every replica gets the inputs whole
    out = wrapper(*args, **kwargs)
    # One device: the module runs directly, so 0-dim tensors stay 0-dim (nn.DataParallel's rule;
    # one active replica of several still goes through the gather).
    assert_same(out, (args, kwargs) if num_devices == 1 else expected_after_gather((args, kwargs), active))

    # Backward through scatter and gather: the identity's gradient, summed over replicas for
    # tensors every replica received whole.
    needs_grad = [t for _, t in walk((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not needs_grad:
        return
    outputs = [t for _, t in walk(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.backward([t.sum() for t in outputs])
    for t in needs_grad:
        copies = 1 if t.dim() > 0 or active == 1 else active
        assert t.grad is not None and torch.equal(t.grad, torch.full_like(t, float(copies)))


_SPLIT_WRAPPERS = {}


@pytest.mark.skipif("chunk_sizes" not in __import__("inspect").signature(dpfast.DataParallel).parameters,
                    reason="this dpfast has no chunk_sizes option")
@FUZZ
@given(forward_cases(), st.data())
def test_forward_with_explicit_chunk_sizes_returns_the_input(case, data):
    """chunk_sizes set between calls, zeros included (those replicas sit the step out)."""
    num_devices, batch, dim, args, kwargs = case
    key = (num_devices, dim)
    if key not in _SPLIT_WRAPPERS:
        _SPLIT_WRAPPERS[key] = dpfast.DataParallel(Identity(), device_ids=["cpu"] * num_devices, dim=dim)
    wrapper = _SPLIT_WRAPPERS[key]
    sizes = data.draw(compositions(batch, num_devices), label="chunk_sizes")
    wrapper.chunk_sizes = sizes
    if has_batch((args, kwargs)):
        active = [k for k, size in enumerate(sizes) if size > 0]
    else:
        active = list(range(num_devices))
    out = wrapper(*args, **kwargs)
    direct = num_devices == 1  # one device: the module runs directly
    assert_same(out, (args, kwargs) if direct else expected_after_gather((args, kwargs), len(active)))


@FUZZ
@given(st.integers(1, 40), st.integers(1, MAX_DEVICES))
def test_even_chunk_sizes_are_torch_chunk(batch, num_devices):
    sizes = scatter_gather.even_chunk_sizes(batch, num_devices)
    assert sizes == [c.size(0) for c in torch.arange(batch).chunk(num_devices)]


# -- shapes that broke scatter or gather, pinned (the fuzzing above covers the empty namedtuple;
#    defaultdict and NaN stay out of the strategies so that those keep checking everything else:
#    add them back once these pass) -----------------------------------------------------------------


def test_empty_namedtuple_next_to_a_tensor_is_scattered():
    x = torch.arange(6).view(6, 1)
    pieces = scatter_gather.scatter((x, Empty()), [CPU] * 3, [2, 2, 2], 0)
    assert len(pieces) == 3, f"scatter returned {len(pieces)} pieces for 3 replicas: {pieces!r}"
    assert all(type(p[1]) is Empty for p in pieces)
    assert_same(scatter_gather.gather(pieces, CPU, 0, [CPU] * 3), (x, Empty()))


def test_defaultdict_inputs_keep_their_type_and_factory():
    x = torch.arange(6).view(6, 1)
    batch = collections.defaultdict(list, {"x": x})
    pieces = scatter_gather.scatter(batch, [CPU] * 3, [2, 2, 2], 0)
    assert all(type(p) is collections.defaultdict and p.default_factory is list for p in pieces)
    out = scatter_gather.gather(pieces, CPU, 0, [CPU] * 3)
    assert type(out) is collections.defaultdict and torch.equal(out["x"], x)


def test_a_nan_passed_to_every_replica_comes_back_as_itself():
    wrapper = identity_wrapper(3, 0)
    nan = math.nan
    args, kwargs = wrapper(torch.zeros(6, 1), threshold=nan)
    assert isinstance(kwargs["threshold"], float) and math.isnan(kwargs["threshold"]), (
        f"a float every replica returned unchanged came back as {kwargs['threshold']!r}")
