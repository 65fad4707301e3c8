"""Persistent replicas of the root module, kept consistent with it.

Replica 0 is the root module itself. Replicas 1..n-1 are built once: a
shallow copy of every submodule whose parameters and buffers are views into
one flat buffer per dtype on the replica's device. Before each forward,
``ReplicaSet.sync`` makes them equal to what nn.DataParallel's per-call
``replicate`` would build.

NOTE [Replica consistency]
What a user can change on the root between calls, and how a replica sees it:
- Values of parameters and buffers (optimizer steps, load_state_dict,
  in-place edits under no_grad or through ``.data``): the root's tensors are
  coalesced into a flat buffer and tree-broadcast into the replicas' flat
  buffers before every forward. ``.data`` edits do not bump version counters,
  so by default this happens on every call; ``trust_version_counters=True``
  skips a dtype group whose root and replica tensors kept their versions and
  storage since the last broadcast (wrong after ``.data`` edits: opt-in).
- Everything else a module holds in its ``__dict__`` (training flags, plain
  attributes such as ``dropout.p``, hook dictionaries): every replica
  submodule's ``__dict__`` is re-copied (shallow) from its root submodule on
  every call, with only ``_parameters``, ``_buffers`` and ``_modules``
  pointing at the replica's own. Hook dictionaries are shared objects, so a
  hook registered on the root is a hook of every replica.
- Structure (a submodule, parameter or buffer replaced, added or removed; a
  dtype, shape or device change; requires_grad of a buffer): detected by
  comparing the identity of every entry of those three dictionaries and the
  metadata of every tensor with a snapshot; any difference rebuilds the
  replicas, but for a buffer replaced by a tensor like it (NOTE [Replaced
  buffers]), which takes the old one's place.
- A parameter's requires_grad (flipped every step by GANs that freeze the
  discriminator for the generator's step): copied onto the replicas' parameters
  in place; the gradient reducer follows it (dpfast/reducer.py).
Attributes written inside a replica's forward are lost at the next call, as
with nn.DataParallel, entries of its three dictionaries too (a buffer
re-assigned, `self.seen = self.seen + 1`: each refresh puts back what the
replica was built with); replica 0 is the root, so its writes stay (as on one
device).

NOTE [RNN replicas]
cuDNN runs an RNN without copying its weights only when they lie in one
buffer of exactly cuDNN's size, at cuDNN's offsets; otherwise it copies them
on every call and warns ("RNN module weights are not part of single
contiguous chunk of memory"), as nn.DataParallel's replicas do. So the
weights of every RNN that cuDNN takes get a group of their own, laid out as
cuDNN itself lays them out (rnn_weight_layout); the root's weights are copied
into that layout and broadcast like any other group. Many models call
``self.rnn.flatten_parameters()`` in forward: on a replica that moves the
weights into a new buffer, out of reach of the broadcast, so every sync
points such tensors back into their flat buffer first (_repoint).
"""

from __future__ import annotations

import collections
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _C, streams as lane_streams
from .buffers import BatchNormAverager
from .devices import link_model


def rnn_weight_layout(rnn: nn.RNNBase) -> Optional[Tuple[int, List[int]]]:
    """(numel, offsets): the flat buffer cuDNN wants for ``rnn``'s weights (``_flat_weights``
    order), or None where cuDNN will not take them (CPU, mixed dtypes, aliased weights, cuDNN
    off). Asked of RNNBase.flatten_parameters() itself, run on a shell of the module that holds
    scratch copies of the weights: PyTorch's own checks and cuDNN call, the root untouched."""
    weights = getattr(rnn, "_flat_weights", None)
    if not weights or not all(isinstance(w, torch.Tensor) and w.is_cuda for w in weights):
        return None
    if len({w.data_ptr() for w in weights}) != len(weights):
        return None  # aliased weights: one replica tensor would need two places
    shell = rnn.__class__.__new__(rnn.__class__)
    shell.__dict__.update(rnn.__dict__)
    shell.__dict__["_flat_weights"] = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    try:
        shell.flatten_parameters()  # re-points the scratch copies into one buffer in cuDNN's layout
    except RuntimeError as error:  # never let it stop training, only cost speed
        warnings.warn(f"dpfast: cuDNN would not lay out the weights of {type(rnn).__name__} ({error}); its "
                      f"replicas keep them packed, and cuDNN copies them on every call")
        return None
    scratch = shell._flat_weights
    storage = scratch[0].untyped_storage()
    if any(w.untyped_storage().data_ptr() != storage.data_ptr() for w in scratch):
        return None  # flatten_parameters() declined: cuDNN will not take these weights
    size = scratch[0].element_size()
    offsets = [(w.data_ptr() - storage.data_ptr()) // size for w in scratch]
    return checked_layout(storage.nbytes() // size, offsets, [w.numel() for w in scratch])


def checked_layout(numel: int, offsets: List[int], sizes: List[int]) -> Optional[Tuple[int, List[int]]]:
    """(numel, offsets) when the pieces lie inside the buffer without overlapping, else None (the
    packed layout is kept)."""
    spans = sorted((offset, offset + n) for offset, n in zip(offsets, sizes))
    if not spans or spans[0][0] < 0 or spans[-1][1] > numel or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None
    return numel, list(offsets)


def flat_alias(flat: torch.Tensor, offset: int, shape: torch.Size) -> torch.Tensor:
    """A tensor of `shape` at `offset` in `flat`'s memory, with a version counter of its own, as
    torch.cuda.comm gives each tensor of a coalesced broadcast (NOTE [ Version Counter in
    comm.*_coalesced ] in torch/csrc/cuda/comm.cpp). A view of the flat buffer would share the
    buffer's counter with every other tensor in it: a buffer updated in place in forward (an EMA
    codebook, a running normaliser) would then fail the backward of every weight saved before it."""
    return torch.empty(0, dtype=flat.dtype, device=flat.device).set_(flat.narrow(0, offset, shape.numel()).view(shape))


_ENTRY_DICTS = ("_parameters", "_buffers", "_modules")


def _same_entries(current: Any, snapshot: dict) -> bool:
    """The same names in the same order, naming the same objects (identity)."""
    return (isinstance(current, dict) and len(current) == len(snapshot)
            and all(a == b and current[a] is snapshot[b] for a, b in zip(current, snapshot)))


def _entry_snapshot(module: nn.Module) -> tuple:
    """Copies of a module's parameters, buffers and children dictionaries (their names, order and
    objects) and its class (`module.__class__ = ...` swaps a forward), compared with at every call
    (_C.entries_unchanged, NOTE [Replica dictionaries] in csrc/bindings.cpp)."""
    d = module.__dict__
    return tuple(dict(d[key]) for key in _ENTRY_DICTS) + (type(module),)


# The dictionaries of nn.Module that register_forward_hook / register_forward_pre_hook write.
_FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                       "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def check_on_device(tensors, device: torch.device) -> None:
    """nn.DataParallel's check that the module lives on device_ids[0], with its message."""
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"dpfast.DataParallel: module must have its parameters and buffers on device "
                               f"{device} (device_ids[0]) but found one of them on device: {t.device}")


def _keeps_nothing(hook: Any) -> bool:
    """Whether a forward pre-hook is one of PyTorch's own that only recompute a weight from others
    (weight_norm, spectral_norm, pruning) or dpfast's BatchNorm averager (which keeps statistics):
    none keeps the replica's inputs for a later torch.autograd.grad (NOTE [Parallel backward])."""
    return (isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))
            or isinstance(getattr(hook, "__self__", None), BatchNormAverager))


def may_keep_activations(forward_hooks: dict, forward_pre_hooks: dict) -> bool:
    """Whether hooks of these dictionaries may keep a replica's activations: any forward hook, and
    any pre-hook but the known ones that keep nothing (a pre-hook collecting a layer's inputs, as
    captum's layer attribution does with respect to inputs, keeps them as well)."""
    return bool(forward_hooks) or not all(_keeps_nothing(h) for h in forward_pre_hooks.values())


def _dynamo_context(compiled: Any) -> Any:
    """The torch._dynamo context a compiled callable (torch.compile(fn)) was made with, found in
    the wrapper's closure (torch keeps no public handle to it), or None."""
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:
        return None
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


def _is_optimized_module(module: nn.Module) -> bool:
    """torch.compile(module)'s OptimizedModule, whose `forward` is compiled around its _orig_mod."""
    return type(module).__name__ == "OptimizedModule" and "dynamo_ctx" in module.__dict__


def _keep_layout() -> None:
    """A replica RNN's flatten_parameters(): its weights already sit in their flat group."""


def _referent(value: Any) -> Any:
    return value() if isinstance(value, weakref.ReferenceType) else value


class ReplicaSet:
    """The replicas of ``root`` on ``devices`` (devices[0] is the root's)."""

    def __init__(self, root: nn.Module, devices: List[torch.device], streams: Optional[list],
                 trust_version_counters: bool = False, tree_shape: str = "auto", allow_p2p: bool = True):
        self.root = root
        self.devices = list(devices)
        self.streams = streams
        self.lane_stream_ids = lane_streams.ids(streams)
        self.trust_version_counters = trust_version_counters
        self.tree_shape = tree_shape
        self.allow_p2p = allow_p2p
        self.link = link_model(self.devices)  # NOTE [Link model]
        self.build_count = 0
        self.broadcast_count = 0
        self.buffer_follow_count = 0  # NOTE [Replaced buffers]
        self._build()

    # -- building ------------------------------------------------------------------------------
    def _build(self) -> None:
        root, devices = self.root, self.devices
        for name, m in root.named_modules():
            if (len(devices) > 1 and getattr(m, "devices", None)
                    and any(c.__name__ == "DataParallel" and c.__module__ == "dpfast.data_parallel"
                            for c in type(m).__mro__)):
                # Its replicas would share the inner wrapper's runtime (threads, replicas), and each
                # would take it over in turn: the inner wrapper would be broken for good.
                raise RuntimeError(f"dpfast.DataParallel: module: expected a module without a dpfast.DataParallel "
                                   f"inside, but found one at {name or 'the root'!r}: wrap the inner module once")
            if isinstance(m, torch.jit.ScriptModule):
                # Its parameters, buffers and submodules live in a C++ object: the replicas, which
                # are Python copies of each module with dictionaries of their own, cannot be made.
                raise RuntimeError(f"dpfast.DataParallel: module: expected Python modules, but found a TorchScript "
                                   f"module (torch.jit.script or torch.jit.trace) at {name or 'the root'!r}: "
                                   f"wrap the eager module instead (torch.compile of it works), or use "
                                   f"torch.nn.DataParallel for this one")
        self.modules: List[nn.Module] = [m for _, m in root.named_modules()]
        self.entries = [_entry_snapshot(m) for m in self.modules]
        tensors: List[torch.Tensor] = []
        index_of: Dict[int, int] = {}
        # Tensors held in more than one place (one buffer registered in two modules).
        self.shared_indices = set()
        for m in self.modules:
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is None:
                    continue
                if id(t) in index_of:
                    self.shared_indices.add(index_of[id(t)])
                else:
                    index_of[id(t)] = len(tensors)
                    tensors.append(t)
        if any(nn.parameter.is_lazy(t) for t in tensors):
            # The second sentence is nn.DataParallel's (torch's lazy modules raise it there).
            raise RuntimeError("dpfast.DataParallel: module: expected initialized parameters and buffers, but found "
                               "uninitialized ones (a lazy module such as nn.LazyLinear). Modules with "
                               "uninitialized parameters can't be used with `DataParallel`: run one forward of the "
                               "module itself first, to initialize them, then call the wrapper")
        self.tensors = tensors
        self.is_param = [isinstance(t, nn.Parameter) for t in tensors]
        # NOTE [Graph-carrying entries]: tensors of the module that lead back to a graph of their
        # own: a computed tensor put in `_parameters` (MAML's fast weights, `_parameters[k] = p -
        # lr * g`, as learn2learn and higher do), a plain tensor or buffer that requires grad. The
        # flat buffers' copies would cut that graph; replicas read a differentiable copy made in
        # each call's graph, so every replica's gradient reaches it, as nn.DataParallel's
        # differentiable Broadcast gives, and an in-place write in forward stays the replica's.
        # The reducer never sees them.
        self.live = [i for i, t in enumerate(tensors)
                     if t.requires_grad and not (self.is_param[i] and t.grad_fn is None)]
        # dtype, shape and device of each; a buffer's requires_grad too (a parameter's is not
        # structure: GANs flip it every step, and sync() follows it in place); a parameter's
        # contiguity (channels_last after training began: the reducer keeps a non-contiguous
        # weight's gradient out of the buckets, in autograd's layout).
        self.meta_watch = _C.MetaWatch(tensors, [not p for p in self.is_param], list(self.is_param))
        self.param_indices = [i for i, p in enumerate(self.is_param) if p]
        self.grad_flags = tuple(tensors[i].requires_grad for i in self.param_indices)
        check_on_device(tensors, devices[0])
        for i, t in enumerate(tensors):
            if t.is_sparse or t.layout != torch.strided:
                raise RuntimeError(f"dpfast.DataParallel: expected dense parameters and buffers, but found one with "
                                   f"layout {t.layout}")
        # One flat buffer per group: the weights of each RNN that cuDNN takes, alone and in cuDNN's
        # layout (NOTE [RNN replicas]); every other tensor in one group per dtype, packed in
        # first-appearance order.
        self.groups: List[Tuple[torch.dtype, List[int]]] = []
        layouts: List[Optional[Tuple[int, List[int]]]] = []  # (numel, offsets) of a laid-out group
        claimed = set()
        for m in self.modules:
            layout = rnn_weight_layout(m) if isinstance(m, nn.RNNBase) else None
            members = [index_of.get(id(w)) for w in m._flat_weights] if layout is not None else []
            if not members or None in members or claimed.intersection(members):
                continue
            claimed.update(members)
            self.groups.append((tensors[members[0]].dtype, members))
            layouts.append(layout)
        group_of: Dict[torch.dtype, int] = {}
        for i, t in enumerate(tensors):
            if i in claimed:
                continue
            if t.dtype not in group_of:
                group_of[t.dtype] = len(self.groups)
                self.groups.append((t.dtype, []))
                layouts.append(None)
            self.groups[group_of[t.dtype]][1].append(i)
        self.offsets = [0] * len(tensors)
        self.group_numel = []
        for (_, members), layout in zip(self.groups, layouts):
            offset = 0
            for j, i in enumerate(members):
                self.offsets[i] = offset if layout is None else layout[1][j]
                offset += tensors[i].numel()
            self.group_numel.append(offset if layout is None else layout[0])
        self.packed = [layout is None for layout in layouts]
        n = len(devices)
        # flats[k][g]: replica k's buffer of group g; flats[0][g] is the root's coalescing buffer.
        # A laid-out group may have gaps: zeros, never read.
        self.flats = [[(torch.empty if packed else torch.zeros)(numel, dtype=dtype, device=devices[k])
                       for (dtype, _), numel, packed in zip(self.groups, self.group_numel, self.packed)]
                      for k in range(n)]
        # The zeros were written on each device's current stream; the broadcasts that fill the
        # buffers run on the lanes (NOTE [Stream ordering]).
        lane_streams.wait_for_callers(self.streams)
        group_index = self.group_index = {i: g for g, (_, members) in enumerate(self.groups) for i in members}
        # replica_tensors[k][i]: replica k's version of root tensor i (k = 0: the root's own).
        self.replica_tensors: List[List[torch.Tensor]] = [tensors]
        for k in range(1, n):
            own = []
            for i, t in enumerate(tensors):
                flat = self.flats[k][group_index[i]]
                if self.is_param[i]:
                    own.append(nn.Parameter(flat_alias(flat, self.offsets[i], t.shape), requires_grad=t.requires_grad))
                else:  # a buffer may be resized in forward: NOTE [Exact storages] in csrc/comm.cpp
                    own.append(_C.exact_alias(flat, self.offsets[i], t.shape))
            self.replica_tensors.append(own)
        # The root's tensors of a laid-out group are copied into views at their offsets.
        self.root_views = [None if packed else [self.flats[0][g].narrow(0, self.offsets[i], tensors[i].numel())
                                                .view(tensors[i].shape) for i in members]
                           for g, ((_, members), packed) in enumerate(zip(self.groups, self.packed))]
        # Where each replica tensor must sit (_moved): a forward may re-point one (an RNN's
        # flatten_parameters(); a max-norm constraint's `self.weight.data = renorm(...)`).
        self.pointer_watch = [None] + [_C.PointerWatch(own) for own in self.replica_tensors[1:]]
        self.repoint_count = 0
        # Replicas of nn.RNNBase keep their weights where the flat group put them (in cuDNN's layout
        # where it takes them): their flatten_parameters() does nothing (NOTE [RNN replicas]).
        self.is_rnn = [isinstance(m, nn.RNNBase) for m in self.modules]
        # replica_modules[k][j]: replica k's copy of self.modules[j]; with their own three dictionaries.
        module_index = {id(m): j for j, m in enumerate(self.modules)}
        self.replica_modules: List[List[nn.Module]] = [self.modules]
        self.replica_dicts: List[List[tuple]] = [[]]
        for k in range(1, n):
            # The root's own class, past any __new__: a torch.fx GraphModule's __new__ makes a class
            # per instance, and the forward lives on the root's (so a recompile() reaches replicas).
            mods = [object.__new__(type(m)) for m in self.modules]
            dicts = []
            for j, m in enumerate(self.modules):
                own = self.replica_tensors[k]
                params = {name: None if p is None else own[index_of[id(p)]] for name, p in m._parameters.items()}
                buffers = {name: None if b is None else own[index_of[id(b)]] for name, b in m._buffers.items()}
                children = {name: None if c is None else mods[module_index[id(c)]] for name, c in m._modules.items()}
                hooks = {key: collections.OrderedDict() for key in _FORWARD_HOOK_DICTS}
                # What the three hold at every call's start: a forward's writes to them are undone
                # at the next refresh (restore_entries in csrc/bindings.cpp).
                templates = (dict(params), dict(buffers), dict(children))
                dicts.append((params, buffers, children, hooks, templates))
            self.replica_modules.append(mods)
            self.replica_dicts.append(dicts)
        live = set(self.live)
        # (module, 0 for _parameters or 1 for _buffers, name, tensor index) of every live entry.
        self.live_slots = [(j, d, name, index_of[id(t)]) for j, m in enumerate(self.modules)
                           for d, entries in enumerate((m._parameters, m._buffers))
                           for name, t in entries.items() if t is not None and index_of[id(t)] in live]
        # live_values[k]: {tensor index: what replica k reads for it}, set by each sync.
        self.live_values: List[Dict[int, torch.Tensor]] = [{} for _ in range(n)]
        # Plain attributes that hold the module's own tensors (nn.RNNBase's _flat_weights list, a
        # cached reference to a weight): replicas get them mapped to their own tensors, as
        # RNNBase._replicate_for_data_parallel does for nn.DataParallel.
        self.index_of = index_of
        self.alias_keys = [[key for key, value in m.__dict__.items()
                            if key not in _ENTRY_DICTS and self._holds_own_tensor(value)]
                           for m in self.modules]
        # Modules whose replicas' dictionaries _refresh_one makes, not _C.refresh_replica_dicts.
        # NOTE [Compiled modules]: OptimizedModule's (torch.compile(module)) are made here too; a
        # module's own compile() (_compiled_call_impl) is found by the C++ walk at every call.
        self.is_optimized = [_is_optimized_module(m) for m in self.modules]
        self.compiled_cache: Dict[Tuple[int, int], tuple] = {}
        # NOTE [Attribute tensors]: (k, j, name) -> (a weak reference to the root's tensor, its
        # version, replica k's copy).
        self.attribute_copies: Dict[Tuple[int, int, str], tuple] = {}
        self.refresh_in_python = [bool(keys) or rnn or optimized
                                  for keys, rnn, optimized in zip(self.alias_keys, self.is_rnn, self.is_optimized)]
        # Whether a forward hook was on any module at the last refresh (NOTE [Parallel backward]).
        self.forward_hooks_seen = False
        self.versions: Optional[list] = None  # per group, at the last broadcast (trust_version_counters)
        self.versions_replicas = 0
        self.build_count += 1
        self.refresh_attributes(n)

    def _holds_own_tensor(self, value: Any) -> bool:
        if isinstance(value, (torch.Tensor, weakref.ReferenceType)):
            return id(_referent(value)) in self.index_of
        if isinstance(value, (list, tuple)):
            return any(isinstance(v, (torch.Tensor, weakref.ReferenceType)) and id(_referent(v)) in self.index_of
                       for v in value)
        return False

    def _map_to_replica(self, value: Any, k: int) -> Any:
        """A tensor of the module becomes the replica's own, and a weak reference to one (RNNBase's
        _flat_weight_refs, which it compares with its weights to decide whether to flatten them
        again) a weak reference to the replica's own."""
        if isinstance(value, torch.Tensor):
            i = self.index_of.get(id(value))
            return value if i is None else self.live_values[k].get(i, self.replica_tensors[k][i])
        if isinstance(value, weakref.ReferenceType):
            i = self.index_of.get(id(value()))
            return value if i is None else weakref.ref(self.replica_tensors[k][i])
        if isinstance(value, (list, tuple)):
            return type(value)(self._map_to_replica(v, k) for v in value)
        return value

    # -- per call ------------------------------------------------------------------------------
    def structure_changed(self) -> bool:
        # The tree of modules is unchanged as long as every _modules dictionary is.
        return not _C.entries_unchanged(self.modules, self.entries) or self.meta_watch.changed(self.tensors)

    def refresh_attributes(self, num_replicas: int) -> None:
        hooked = False
        root_device = self.devices[0]
        for k in range(1, num_replicas):
            # NOTE [Attribute tensors]: only for a replica on another device than the root's.
            scan = root_device if self.devices[k] != root_device else None
            # NOTE [Replica dictionaries]: the common case in C++; the modules it leaves, here.
            left, on_root_device = _C.refresh_replica_dicts(self.modules, self.replica_modules[k],
                                                            self.replica_dicts[k], self.refresh_in_python, scan)
            for j in left:
                hooked |= self._refresh_one(k, j)
            for j, key in on_root_device:  # after _refresh_one made the left modules' dictionaries
                self._give_attribute_tensor(k, j, key)
        if num_replicas > 1:
            self.forward_hooks_seen = hooked

    def _give_attribute_tensor(self, k: int, j: int, key: str) -> None:
        """NOTE [Attribute tensors]: replica 0 is the module itself, so what its forward caches in a
        plain attribute (a causal mask made once, `self.src_mask` in PyTorch's word_language_model)
        stays on the module, on the root's device, and the other replicas' dictionaries, copied from
        the module's, would read it there: on another GPU, a device mismatch. nn.DataParallel's
        replicas never see such a write (its replica 0 is a copy); each makes its own. Here replica
        k gets a copy on its device, made again only when the module's tensor is another or was
        written. The module's own tensors (alias_keys) are mapped already, and a tensor that
        carries a graph is left as it is (a copy would join replica k's graph to replica 0's)."""
        value = self.modules[j].__dict__[key]
        if self.index_of.get(id(value)) is not None or value.requires_grad:
            return
        version = -1 if value.is_inference() else value._version  # an inference tensor has no counter
        cached = self.attribute_copies.get((k, j, key))
        if cached is None or cached[0]() is not value or cached[1] != version:
            device, lane = self.devices[k], (self.streams[k] if self.streams else None)
            copy = value.detach().to(device)
            if lane is not None:  # read on the lane; freed, maybe, long after (the allocator must know)
                copy.record_stream(lane)
            cached = self.attribute_copies[(k, j, key)] = (weakref.ref(value), version, copy)
        self.replica_modules[k][j].__dict__[key] = cached[2]

    def _refresh_one(self, k: int, j: int) -> bool:
        """Replica k's module j: a shallow copy of the root module's __dict__ with the replica's own
        three dictionaries (what _C.refresh_replica_dicts does for the others). Returns whether a
        hook that may keep the replica's activations (may_keep_activations) is registered on the
        module or was installed on the replica (NOTE [Parallel backward])."""
        m, replica = self.modules[j], self.replica_modules[k][j]
        params, buffers, children, hooks, _ = self.replica_dicts[k][j]
        d = m.__dict__.copy()
        d["_parameters"] = params
        d["_buffers"] = buffers
        d["_modules"] = children
        # NOTE [Replica hooks]: the root's forward hooks, in dictionaries of the replica's own.
        # A hook that a replica's forward installs (Hugging Face installs its output
        # capturing hooks in the first forward that asks) stays with that replica for the
        # call; the root's forward installs its own. Shared dictionaries would get one copy
        # per replica, forever (nn.DataParallel: per replica and call). Never mutated, but
        # replaced: another thread's forward may be iterating the previous one.
        # The *_with_kwargs and *_always_called dictionaries only name hooks of these two.
        forward_hooks = (may_keep_activations(d["_forward_hooks"], d["_forward_pre_hooks"])  # before a
                         or may_keep_activations(hooks["_forward_hooks"], hooks["_forward_pre_hooks"]))  # reset
        if not (d["_forward_hooks"] or d["_forward_pre_hooks"]
                or hooks["_forward_hooks"] or hooks["_forward_pre_hooks"]):
            d.update(hooks)  # no hooks anywhere (the common case)
        else:
            for key, own in hooks.items():
                shared = d[key]
                if shared:
                    d[key] = shared.copy()
                else:
                    if own:
                        own = hooks[key] = collections.OrderedDict()
                    d[key] = own
        for key in self.alias_keys[j]:
            if key in d:
                d[key] = self._map_to_replica(d[key], k)
        if self.is_rnn[j]:  # in place before the swap: another thread's forward may be running it
            d["flatten_parameters"] = _keep_layout
        object.__setattr__(replica, "__dict__", d)
        if self.is_optimized[j] or d.get("_compiled_call_impl") is not None:
            self._compile_for_replica(k, j, d)
        return forward_hooks

    def _compile_for_replica(self, k: int, j: int, d: dict) -> None:
        """NOTE [Compiled modules]: a compiled module keeps its compiled forward in its __dict__,
        bound to itself: torch.compile(module)'s OptimizedModule a `forward` around its _orig_mod,
        module.compile() a `_compiled_call_impl` around its _call_impl. Copied as they are, every
        replica would run the root's module (its parameters and buffers, from every thread at
        once), as nn.DataParallel's replicas do (a device mismatch on GPUs). Replica k gets the
        same compilation around its own module instead, made once per compiled object of the root;
        where the dynamo context cannot be found, the replica runs eagerly."""
        replica = self.replica_modules[k][j]
        keys = ("forward", "_forward", "_compiled_call_impl")
        root_values = tuple(d.get(key) for key in keys)
        cached = self.compiled_cache.get((k, j))
        if cached is None or any(a is not b for a, b in zip(cached[0], root_values)):
            own = {}
            if self.is_optimized[j]:
                type(replica)._initialize(replica)  # OptimizedModule's own: writes forward (and _forward)
                own.update((key, d[key]) for key in ("forward", "_forward") if key in d)
            if root_values[2] is not None:
                context = _dynamo_context(root_values[2])
                own["_compiled_call_impl"] = context(replica._call_impl) if context is not None else None
            cached = self.compiled_cache[(k, j)] = (root_values, own)
        d.update(cached[1])

    def _current_versions(self, g: int, num_replicas: int) -> list:
        members = self.groups[g][1]
        return [(t._version, t.data_ptr()) for t in (self.tensors[i] for i in members)] + [
            self.replica_tensors[k][i]._version for k in range(1, num_replicas) for i in members]

    def _broadcast_values(self, num_replicas: int) -> None:
        if self.versions is None or self.versions_replicas != num_replicas:
            self.versions = [None] * len(self.groups)
            self.versions_replicas = num_replicas
        # The root's flat buffer is written on the current stream and read on the lanes' (NOTE [Stream ordering]).
        current = lane_streams.current_stream(self.devices[0])
        root_lane = self.streams[0] if self.streams else None
        lane_streams.wait(current, root_lane)
        for g, (_, members) in enumerate(self.groups):
            if self.trust_version_counters:
                versions = self._current_versions(g, num_replicas)
                if versions == self.versions[g]:
                    continue
            if self.packed[g]:
                _C.coalesce_into([self.tensors[i] for i in members], self.flats[0][g])
            else:
                with torch.no_grad():  # the root's parameters require grad: no graph for this copy
                    torch._foreach_copy_(self.root_views[g], [self.tensors[i] for i in members])
            lane_streams.wait(root_lane, current)
            _C.broadcast_([self.flats[k][g] for k in range(num_replicas)], 0,
                          self.lane_stream_ids[:num_replicas], self.tree_shape, 0, self.allow_p2p, *self.link)
            self.broadcast_count += 1
            if self.trust_version_counters:
                self.versions[g] = self._current_versions(g, num_replicas)

    def sync(self, num_replicas: int) -> List[nn.Module]:
        """The first num_replicas replicas (replica 0 is the root), made equal to the root."""
        if self.structure_changed() and not self._follow_replaced_buffers():
            with torch.inference_mode(False):
                self._build()
        if self.live_slots:
            self._attach_live(num_replicas)
        self.refresh_attributes(num_replicas)
        self._follow_requires_grad()
        if num_replicas > 1:
            self._repoint(num_replicas)
            self._broadcast_values(num_replicas)
        return [mods[0] for mods in self.replica_modules[:num_replicas]]

    def _follow_replaced_buffers(self) -> bool:
        """NOTE [Replaced buffers]: a root buffer re-assigned with a tensor like the one it replaces
        (`self.ema = 0.9 * self.ema + 0.1 * x.mean(0)` in forward, which replica 0, the root, runs
        every step; `module.counter = torch.zeros(())` between steps) changes no replica: the new
        tensor takes the old one's place and is broadcast from then on. A rebuild instead (new flat
        buffers, modules, reducer) doubled a ResNet-18's step on CPU replicas. Returns False, and
        changes nothing, where anything else changed: the caller rebuilds."""
        swaps: Dict[int, torch.Tensor] = {}  # tensor index -> the tensor that replaced it
        for m, snapshot in zip(self.modules, self.entries):
            d = m.__dict__
            if type(m) is not snapshot[3] or not all(
                    _same_entries(d.get(key), snapshot[n]) for n, key in ((0, "_parameters"), (2, "_modules"))):
                return False
            buffers, before = d.get("_buffers"), snapshot[1]
            if not isinstance(buffers, dict) or list(buffers) != list(before):
                return False
            for name, old in before.items():
                new = buffers[name]
                if new is old:
                    continue
                if (old is None or not isinstance(new, torch.Tensor) or isinstance(new, nn.Parameter)
                        or id(new) in self.index_of or new.requires_grad or old.requires_grad
                        or new.layout != torch.strided or new.dtype != old.dtype or new.shape != old.shape
                        or new.device != old.device or nn.parameter.is_lazy(new)):
                    return False
                i = self.index_of[id(old)]
                if i in swaps or i in self.shared_indices or any(new is t for t in swaps.values()):
                    return False  # a tensor in two places, before or after
                swaps[i] = new
        if not swaps:
            return False
        if any(self._holds_any(m.__dict__.get(key), swaps) for m, keys in zip(self.modules, self.alias_keys)
               for key in keys):
            return False  # an attribute also points at a replaced tensor (NOTE [RNN replicas]'s kind)
        if self.meta_watch.changed([swaps.get(i, t) for i, t in enumerate(self.tensors)]):
            return False  # another tensor changed in place too (a resize_, a buffer's requires_grad)
        for i, new in swaps.items():
            del self.index_of[id(self.tensors[i])]
            self.tensors[i] = new  # replica_tensors[0] is this list
            self.index_of[id(new)] = i
        self.entries = [_entry_snapshot(m) for m in self.modules]
        # trust_version_counters compares (version, address): a view of the old tensor (`m.b =
        # m.b.t()`) has both, and its group would not be broadcast.
        self.versions = None
        self.buffer_follow_count += 1
        return True

    def _holds_any(self, value: Any, swaps: Dict[int, torch.Tensor]) -> bool:
        values = value if isinstance(value, (list, tuple)) else [value]
        return any(self.index_of.get(id(_referent(v))) in swaps for v in values
                   if isinstance(v, (torch.Tensor, weakref.ReferenceType)))

    def _attach_live(self, num_replicas: int) -> None:
        """NOTE [Graph-carrying entries]: replicas 1..num_replicas-1 read a copy of the root's
        tensor made now, in this call's graph, on their device."""
        for k in range(1, num_replicas):
            values = self.live_values[k] = {}
            for i in self.live:
                # A copy of its own even on the root's device (CPU replicas, device_ids=[0, 0]):
                # a forward that writes it in place (`self.scale.mul_(0.9)`, a fast weight's
                # add_) must write replica k's copy alone, as under nn.DataParallel, whose
                # Broadcast gives every replica but the first a copy.
                t = self.tensors[i]
                values[i] = t.clone() if self.devices[k] == t.device else t.to(self.devices[k])
            for j, d, name, i in self.live_slots:
                self.replica_dicts[k][j][d][name] = self.replica_dicts[k][j][4][d][name] = values[i]

    def _repoint(self, num_replicas: int) -> None:
        """Points replica tensors that a forward moved out of their flat buffer back into it.

        An RNN's flatten_parameters(), which many models call at the start of forward to
        silence cuDNN's warning under nn.DataParallel, copies the weights into a new buffer and
        re-points the parameters there (Tensor.set_). The broadcast writes the flat buffer, so
        such a replica would run on the previous step's weights from then on."""
        for k, i in self._moved(num_replicas):
            # Below autograd: a graph of an earlier call (two forwards, one backward) may have
            # saved this weight, and a version bump would fail its backward.
            # The root's shape: a replica's resize_ of a buffer (NOTE [Exact storages]) is undone too.
            _C.point_into(self.replica_tensors[k][i], self.flats[k][self.group_index[i]], self.offsets[i],
                          self.tensors[i].shape, exact=not self.is_param[i])
            self.repoint_count += 1

    def _moved(self, num_replicas: int) -> List[Tuple[int, int]]:
        """(replica, tensor index) of the replica tensors that are not in their flat buffer."""
        return [(k, i) for k in range(1, num_replicas) for i in self.pointer_watch[k].moved()]

    def weights_moved(self, num_replicas: int) -> bool:
        """Whether a forward moved replica weights (Tensor.set_ gives them a new gradient
        accumulator: two forwards before one backward then accumulate each through its own)."""
        return bool(self._moved(num_replicas))

    def _follow_requires_grad(self) -> None:
        """Replica parameters require grad exactly where the root's do (a GAN freezes its
        discriminator for the generator's step, every step): flipped in place, no rebuild."""
        flags = tuple(self.tensors[i].requires_grad for i in self.param_indices)
        if flags == self.grad_flags:
            return
        for own in self.replica_tensors[1:]:
            for i, flag in zip(self.param_indices, flags):
                if own[i].requires_grad != flag:
                    own[i].requires_grad_(flag)
        self.grad_flags = flags

    def grad_indices(self) -> List[int]:
        """Indices (into self.tensors) of the parameters that require grad now."""
        return [i for i, flag in zip(self.param_indices, self.grad_flags) if flag]

    def replica_params(self, k: int, indices: List[int]) -> List[torch.Tensor]:
        """Replica k's copies of the tensors at ``indices`` (k = 0: the root's own)."""
        return [self.replica_tensors[k][i] for i in indices]
