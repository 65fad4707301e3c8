"""Checkpoints with or without the ``module.`` prefix, in either direction.

nn.DataParallel and dpfast.DataParallel save their module's keys under
``module.``; a plain module saves them bare. These helpers move a state_dict
between the two forms, keeping its ``_metadata`` (which load_state_dict uses
for versioned modules such as BatchNorm).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from torch import nn

PREFIX = "module."


def _rename(state_dict: Mapping[str, Any], rename) -> "OrderedDict[str, Any]":
    out = OrderedDict((rename(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = type(metadata)((rename(k + ".")[:-1] if k else rename(k), v) for k, v in metadata.items())
    return out


def is_wrapped(state_dict: Mapping[str, Any]) -> bool:
    """True when every key carries the ``module.`` prefix (and there is at least one key)."""
    return len(state_dict) > 0 and all(k.startswith(PREFIX) for k in state_dict)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """A wrapper's state_dict as the plain module's (``module.`` removed); a plain one is returned as is."""
    if not is_wrapped(state_dict):
        return OrderedDict(state_dict) if getattr(state_dict, "_metadata", None) is None else _rename(state_dict, str)
    return _rename(state_dict, lambda k: k[len(PREFIX):] if k.startswith(PREFIX) else ("" if k == "module" else k))


def wrap_state_dict(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """A plain module's state_dict as a wrapper's (``module.`` added); a wrapped one is returned as is."""
    if is_wrapped(state_dict):
        return OrderedDict(state_dict) if getattr(state_dict, "_metadata", None) is None else _rename(state_dict, str)
    return add_prefix(state_dict)


def add_prefix(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """``module.`` added to every key, and the wrapper's own metadata entry (version) first, as a
    wrapper's state_dict has it."""
    out = _rename(state_dict, lambda k: PREFIX + k if k else "module")
    metadata = getattr(out, "_metadata", None)
    if metadata is not None:
        out._metadata = type(metadata)([("", {"version": nn.Module._version})] + list(metadata.items()))
    return out


def loads_with_prefix(keys: set, expected: set) -> bool:
    """Whether keys that already start with ``module.`` are still a plain module's: a module whose
    child is named ``module``. Their prefixed form fits more of the wrapper's keys than they do (a
    partial checkpoint with extra keys included, for strict=False)."""
    return len({PREFIX + k for k in keys} & expected) > len(keys & expected)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True):
    """Loads a checkpoint saved with or without the ``module.`` prefix into a
    plain module or into a wrapper (dpfast's or nn.DataParallel), with a clear
    error on keys that are genuinely missing or unexpected (after the modules'
    own load hooks; as with torch's strict load, the entries that match are
    loaded before it is raised)."""
    from .data_parallel import DataParallel

    wrapper = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel, DataParallel))
    target = model.module if wrapper else model
    plain = unwrap_state_dict(state_dict)
    # A plain dict whose keys all start with `module.` (the target has a child of that name) is
    # taken as it is where that form fits more of the target's keys, as the wrapper decides.
    if is_wrapped(state_dict) and loads_with_prefix(set(plain), set(target.state_dict().keys())):
        plain = state_dict
    # torch checks the keys after the modules' own load hooks have run: an old BatchNorm checkpoint
    # (no num_batches_tracked) or an old weight_norm one loads, as it does into the module itself.
    result = target.load_state_dict(plain, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
        raise RuntimeError(f"dpfast.load_state_dict: state_dict: expected the keys of {type(target).__name__} "
                           f"(with or without the 'module.' prefix), but {len(missing)} are missing "
                           f"{missing[:10]} and {len(unexpected)} are unexpected {unexpected[:10]}")
    return result
