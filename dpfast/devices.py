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
        if value < -1:
            raise ValueError(f"dpfast.DataParallel: {argument}: expected a CUDA index >= 0 (or -1 for the CPU), "
                             f"but got {value}")
        device = torch.device("cpu") if value == -1 else torch.device("cuda", value)  # -1: CPU, as torch
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


def _ignored_without_cuda(value: Any) -> bool:
    """An entry nn.DataParallel ignores where CUDA is not available: a CUDA device, or any index
    (-1 included: mmcv's MMDataParallel(model, device_ids=[-1]) for the CPU then runs its own
    CPU branch, which tests `not self.device_ids`)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= -1
    try:
        return torch.device(value).type == "cuda"
    except (RuntimeError, TypeError):
        return False


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
        if not torch.cuda.is_available():
            return []  # as nn.DataParallel without CUDA: run the module directly
        raise ValueError("dpfast.DataParallel: device_ids: expected at least one device, but got an empty list")
    if not torch.cuda.is_available() and all(_ignored_without_cuda(entry) for entry in entries):
        # nn.DataParallel without CUDA ignores device_ids and runs the module directly, so that
        # GPU code also runs on a machine without one; so does dpfast.
        return []
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


# NOTE [Link model]
# The engine picks its tree and pipeline chunk count from a link model (NOTE [Tree shape] in
# csrc/plan.h). Lanes that share one device "link" through its memory, where an add moves about
# three bytes per byte reduced: hundreds of GB/s, so a few chunks suffice and each extra chunk is
# only host-side launch and event cost. Distinct GPUs get a PCIe Gen4-like 25 GB/s (conservative
# for NVLink: more chunks than needed, never too few), with 5 us per hop.
SAME_DEVICE_BANDWIDTH_GBPS = {"cuda": 1000.0, "cpu": 10.0}
DISTINCT_GPUS_BANDWIDTH_GBPS = 25.0
HOP_LATENCY_US = 5.0


def link_model(devices: List[torch.device]) -> tuple:
    """(bandwidth_GBps, hop_latency_us) for the engine's planner, for lanes on these devices."""
    if len(set(devices)) == 1:
        return SAME_DEVICE_BANDWIDTH_GBPS.get(devices[0].type, DISTINCT_GPUS_BANDWIDTH_GBPS), HOP_LATENCY_US
    return DISTINCT_GPUS_BANDWIDTH_GBPS, HOP_LATENCY_US


def p2p_allowed() -> bool:
    """False when DPFAST_DISABLE_P2P=1: peer reads then go through a staging copy."""
    import os

    return os.environ.get("DPFAST_DISABLE_P2P", "").strip().lower() not in ("1", "true", "yes", "on")


# -- device_ids="auto" ---------------------------------------------------------------------------

class NvmlSource:
    """What auto_device_ids needs from NVML (nvidia-ml-py); tests pass a fake with the same methods."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml

    def devices(self) -> List[dict]:
        """Per physical GPU: uuid, pci_bus_id, free and total memory (bytes), utilization (%)."""
        nvml, out = self._nvml, []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            bus_id = nvml.nvmlDeviceGetPciInfo(handle).busId
            out.append({
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "pci_bus_id": bus_id.decode() if isinstance(bus_id, bytes) else bus_id,
                "free_bytes": memory.free, "total_bytes": memory.total,
                "utilization_percent": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            })
        return out


def _torch_cuda_identities() -> List[dict]:
    """uuid and PCI bus id of every CUDA index torch sees (CUDA_VISIBLE_DEVICES applied)."""
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", ""))
        pci = f"{getattr(props, 'pci_domain_id', 0):08X}:{getattr(props, 'pci_bus_id', 0):02X}:" \
              f"{getattr(props, 'pci_device_id', 0):02X}.0"
        out.append({"uuid": uuid if uuid.startswith("GPU-") or not uuid else f"GPU-{uuid}", "pci_bus_id": pci})
    return out


def _normalize_bus_id(bus_id: str) -> str:
    # NVML says 00000000:17:00.0; other tools drop leading zeros of the domain.
    parts = bus_id.upper().split(":")
    if len(parts) == 3:
        return f"{int(parts[0], 16):08X}:{parts[1]}:{parts[2]}"
    return bus_id.upper()


def select_devices(nvml_devices: List[dict], cuda_devices: List[dict], max_utilization_percent: float = 50.0,
                   min_free_fraction: float = 0.2) -> List[int]:
    """CUDA indices of the GPUs that are not busy, best first (most free memory, then least
    utilization). NVML's physical GPUs are matched to CUDA indices by UUID, else by PCI bus id,
    so CUDA_VISIBLE_DEVICES (which renumbers) is respected."""
    chosen = []
    for cuda_index, ident in enumerate(cuda_devices):
        match = next((d for d in nvml_devices if ident["uuid"] and d["uuid"] == ident["uuid"]), None)
        if match is None:
            match = next((d for d in nvml_devices
                          if _normalize_bus_id(d["pci_bus_id"]) == _normalize_bus_id(ident["pci_bus_id"])), None)
        if match is None:
            continue
        busy = (match["utilization_percent"] > max_utilization_percent
                or match["free_bytes"] < min_free_fraction * match["total_bytes"])
        if not busy:
            chosen.append((-match["free_bytes"], match["utilization_percent"], cuda_index))
    return [index for _, _, index in sorted(chosen)]


def auto_device_ids(module=None, nvml_source=None, cuda_identities=None, **thresholds) -> List[int]:
    """``device_ids="auto"``: the GPUs with the most free memory and least utilization, busy ones
    skipped; without NVML, all GPUs; without GPUs, [] (the module runs directly). The device the
    module already lives on comes first when it is among them."""
    import warnings

    if not torch.cuda.is_available() and cuda_identities is None:
        warnings.warn("dpfast.DataParallel: device_ids='auto': no CUDA GPU is visible; running the module directly")
        return []
    try:
        source = nvml_source if nvml_source is not None else NvmlSource()
        nvml_devices = source.devices()
    except Exception as error:  # no NVML library or driver
        count = torch.cuda.device_count()
        warnings.warn(f"dpfast.DataParallel: device_ids='auto': NVML is not available ({error}); using all {count} "
                      f"GPUs")
        return list(range(count))
    ids = select_devices(nvml_devices, cuda_identities if cuda_identities is not None else _torch_cuda_identities(),
                         **thresholds)
    if not ids:
        raise RuntimeError("dpfast.DataParallel: device_ids='auto': expected at least one GPU that is not busy, but "
                           "every visible GPU is above the utilization or below the free-memory threshold")
    if module is not None:
        first = next(iter(module.parameters()), None)
        if first is not None and first.device.type == "cuda" and first.device.index in ids:
            ids.remove(first.device.index)
            ids.insert(0, first.device.index)
    return ids


def warn_on_imbalance(devices: List[torch.device], has_split_option: bool, properties=None) -> bool:
    """nn.DataParallel's imbalance check (a GPU with under 75% of the memory or cores of the
    largest), with a message that names the options that fix it. Returns whether it warned."""
    import warnings

    distinct = sorted({d.index for d in devices if d.type == "cuda"})
    if len(distinct) < 2 or has_split_option:
        return False
    props = properties if properties is not None else [torch.cuda.get_device_properties(i) for i in distinct]
    for attribute in ("total_memory", "multi_processor_count"):
        values = [getattr(p, attribute) for p in props]
        small, large = min(range(len(values)), key=values.__getitem__), max(range(len(values)), key=values.__getitem__)
        if values[small] < 0.75 * values[large]:
            warnings.warn(f"dpfast.DataParallel: there is an imbalance between your GPUs: GPU {distinct[small]} has "
                          f"less than 75% of the {attribute.replace('_', ' ')} of GPU {distinct[large]}. Give it less "
                          f"work with weights= or chunk_sizes=, or leave it out of device_ids.")
            return True
    return False
