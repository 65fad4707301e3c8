"""Parsing and validation of ``device_ids`` and ``output_device``.

nn.DataParallel takes CUDA indices only. dpfast also takes ``"cpu"`` and may
repeat a device (several replicas on one device); every entry becomes a
``torch.device`` with an index for CUDA.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def to_device(value: Any, argument: str) -> torch.device:
    """One entry of device_ids (an int, a string, or a torch.device) as a torch.device."""
    if isinstance(value, bool):
        raise TypeError(f"dpfast.DataParallel: {argument}: expected a CUDA index, 'cpu', 'cuda:N' or a torch.device, "
                        f"but got {_describe(value)}")
    if isinstance(value, int):
        device = torch.device("cuda", value)
    elif isinstance(value, (str, torch.device)):
        try:
            device = torch.device(value)
        except RuntimeError as error:
            raise ValueError(f"dpfast.DataParallel: {argument}: expected a device such as 'cpu' or 'cuda:0', "
                             f"but got {value!r} ({error})") from None
    else:
        raise TypeError(f"dpfast.DataParallel: {argument}: expected a CUDA index, 'cpu', 'cuda:N' or a torch.device, "
                        f"but got {_describe(value)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"dpfast.DataParallel: {argument}: expected an available device, but got {device} and "
                             f"CUDA is not available here (use 'cpu' for CPU replicas)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"dpfast.DataParallel: {argument}: expected a CUDA index in [0, {torch.cuda.device_count()}), "
                             f"but got {index}")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"dpfast.DataParallel: {argument}: expected a CPU or CUDA device, but got {device}")
    return torch.device("cpu")


def parse_device_ids(device_ids: Optional[Sequence[Any]]) -> List[torch.device]:
    """The devices of the replicas, in order; [] means "run the module directly"
    (as nn.DataParallel does when CUDA is not available)."""
    if device_ids is None:
        if not torch.cuda.is_available():
            return []
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if isinstance(device_ids, (str, int, torch.device)):
        raise TypeError(f"dpfast.DataParallel: device_ids: expected a list of devices, but got {_describe(device_ids)}; "
                        f"write [{device_ids!r}]")
    try:
        entries = list(device_ids)
    except TypeError:
        raise TypeError(f"dpfast.DataParallel: device_ids: expected a list of devices, but got {_describe(device_ids)}") from None
    if not entries:
        raise ValueError("dpfast.DataParallel: device_ids: expected at least one device, but got an empty list")
    devices = [to_device(entry, f"device_ids[{i}]") for i, entry in enumerate(entries)]
    types = {d.type for d in devices}
    if len(types) > 1:
        first_cpu = next(i for i, d in enumerate(devices) if d.type == "cpu")
        first_cuda = next(i for i, d in enumerate(devices) if d.type == "cuda")
        raise ValueError(f"dpfast.DataParallel: device_ids: expected devices of one type, but got a mix of CPU and CUDA "
                         f"(device_ids[{first_cuda}] is {devices[first_cuda]}, device_ids[{first_cpu}] is cpu)")
    return devices


def parse_output_device(output_device: Any, devices: List[torch.device]) -> torch.device:
    if output_device is None:
        return devices[0]
    return to_device(output_device, "output_device")


def public_device_ids(devices: List[torch.device]) -> list:
    """``device_ids`` as nn.DataParallel exposes it: CUDA indices as ints, CPU devices as torch.device."""
    return [d.index if d.type == "cuda" else d for d in devices]


def p2p_allowed() -> bool:
    """False when DPFAST_DISABLE_P2P=1: peer reads then go through a staging copy."""
    import os

    return os.environ.get("DPFAST_DISABLE_P2P", "").strip().lower() not in ("1", "true", "yes", "on")
