"""Helpers shared by bench/run.py, bench/comm.py and bench/model.py: device
lists, clocks, the machine record, result files, tables and progress bars.

Optional packages (tqdm, matplotlib, pynvml from nvidia-ml-py) are imported
lazily: a bare GPU machine with only torch must still run the benchmark and
say what it could not do, rather than stop on an ImportError.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "bench", "results")
SCHEMA_VERSION = 1


class WrongResult(AssertionError):
    """A timed operation produced a wrong result: the run must fail, not report a time."""


# -- devices -------------------------------------------------------------------------------------

def parse_devices(text: str) -> List[torch.device]:
    """'0,1', 'cuda:0,cuda:0' or 'cpu,cpu,cpu,cpu' -> torch.devices (a bare integer is a CUDA index)."""
    devices = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        devices.append(torch.device("cuda", int(entry)) if entry.isdigit() else torch.device(entry))
    if not devices:
        raise ValueError(f"--devices: expected a comma-separated list of devices, but got {text!r}")
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"--devices: expected devices of one type, but got {text!r}")
    if devices[0].type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--devices: {text!r} names CUDA devices, but CUDA is not available here")
        devices = [torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index) for d in devices]
    return devices


def default_devices(replicas_on_one_device: int = 4) -> List[torch.device]:
    """All GPUs; one GPU or none: that device repeated, so that dpfast still
    runs several replicas (several lanes on one GPU, or CPU replicas)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return [device] * replicas_on_one_device


def distinct(devices: Sequence[torch.device]) -> List[torch.device]:
    return list(dict.fromkeys(devices))


def describe_devices(devices: Sequence[torch.device]) -> str:
    """A label that says plainly what the replicas run on."""
    n = len(devices)
    unique = distinct(devices)
    if devices[0].type == "cpu":
        why = "no GPU: " if not torch.cuda.is_available() else ""
        return f"{n} CPU replicas ({why}every replica runs on the host's cores)"
    names = sorted({torch.cuda.get_device_name(d) for d in unique})
    if len(unique) == 1:
        return f"{n} replicas on one GPU ({unique[0]}, {names[0]})"
    return f"{n} GPUs ({', '.join(names)})"


def devices_json(devices: Sequence[torch.device]) -> List[str]:
    return [str(d) for d in devices]


@contextlib.contextmanager
def exact_float32():
    """TF32 off for the block (cuDNN's convolutions use it by default on Ampere and later): the
    checked steps compare a split batch with the whole one, and TF32's per-batch-size algorithms
    would differ by more than any tolerance that still catches a wrong gradient."""
    # torch's fp32_precision settings where they exist: once a process has used them, the older
    # allow_tf32 flags raise ("mix of the legacy and new APIs"); the reverse is allowed.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        flags = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                 (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        flags = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, exact in flags:
        setattr(owner, name, exact)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def synchronize(devices: Iterable[torch.device]) -> None:
    for device in distinct(list(devices)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


# -- clocks --------------------------------------------------------------------------------------

class Clock:
    """Timestamps for steps and phases.

    CPU: time.perf_counter, and the work is done when the call returns.
    CUDA: events on the current stream of `devices[0]`. Work that other streams
    (dpfast's lanes) do between two marks is only covered when
    `synchronize_marks` is set: every mark then first waits for all `devices`.
    That serialises the phases, so a step timed that way shows no overlap;
    the benchmark uses it only for the phase breakdown, never for step times.
    """

    def __init__(self, devices: Sequence[torch.device], synchronize_marks: bool = False):
        self.devices = distinct(devices)
        self.cuda = self.devices[0].type == "cuda"
        self.synchronize_marks = synchronize_marks and self.cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        if self.synchronize_marks:
            synchronize(self.devices)
        event = torch.cuda.Event(enable_timing=True)
        # Explicit stream: the autograd engine calls the "reduce" phase from its own thread.
        event.record(torch.cuda.current_stream(self.devices[0]))
        return event

    def elapsed_us(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e6
        end.synchronize()
        return start.elapsed_time(end) * 1e3


class PhaseTimer:
    """The object dpfast.DataParallel.phase_timer expects: phase(name) -> context manager.
    Phases that repeat within a step (several buckets) add up."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._marks: list = []

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.clock.mark()
        try:
            yield
        finally:
            self._marks.append((name, start, self.clock.mark()))

    def take_us(self) -> Dict[str, float]:
        """Per-phase times since the last call, then forgets them."""
        marks, self._marks = self._marks, []
        totals: Dict[str, float] = {}
        for name, start, end in marks:
            totals[name] = totals.get(name, 0.0) + self.clock.elapsed_us(start, end)
        return totals


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def median_of_phases(per_step: List[Dict[str, float]]) -> Dict[str, float]:
    names = dict.fromkeys(name for step in per_step for name in step)
    return {name: statistics.median([step.get(name, 0.0) for step in per_step]) for name in names}


# -- memory --------------------------------------------------------------------------------------

def reset_peak_memory(devices: Sequence[torch.device]) -> None:
    for device in distinct(devices):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory(devices: Sequence[torch.device]) -> dict:
    """torch's allocator peak per device, NVML's current device-wide usage per
    device (everything on the card, all processes, including what the caching
    allocator holds), and the process's peak resident set on the host."""
    unique = distinct(devices)
    record = {
        "torch_peak_allocated_bytes": {str(d): torch.cuda.max_memory_allocated(d) for d in unique if d.type == "cuda"},
        "torch_peak_reserved_bytes": {str(d): torch.cuda.max_memory_reserved(d) for d in unique if d.type == "cuda"},
        "nvml_used_bytes": nvml_used_bytes([d for d in unique if d.type == "cuda"]),
        # ru_maxrss is in KiB on Linux; it is the process's peak so far, not this run's alone.
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return record


def _nvml_handle(pynvml, device: torch.device):
    props = torch.cuda.get_device_properties(device)
    # CUDA_VISIBLE_DEVICES may renumber devices; the UUID names the same card in both APIs.
    with contextlib.suppress(Exception):
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
    with contextlib.suppress(Exception):
        return pynvml.nvmlDeviceGetHandleByPciBusId(
            f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
    return pynvml.nvmlDeviceGetHandleByIndex(device.index)


def nvml_used_bytes(cuda_devices: Sequence[torch.device]):
    """{device: bytes} from NVML, or a string saying why there is none."""
    if not cuda_devices:
        return "not measured: no CUDA device"
    try:
        import pynvml
    except ImportError:
        return "not measured: pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
        try:
            return {str(d): int(pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(pynvml, d)).used) for d in cuda_devices}
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # NVML missing from the driver, or no permission
        return f"not measured: NVML failed ({error})"


# -- the machine record --------------------------------------------------------------------------

def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> dict:
    def git(*args):
        # --no-optional-locks: reading the status must not rewrite the index.
        return subprocess.run(["git", "--no-optional-locks", "-C", REPO_ROOT, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout or git missing)", "dirty": None}


def machine_record() -> dict:
    import dpfast.info

    info = dpfast.info.collect()
    record = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": info["python"],
        "torch": info["torch"],
        "torch_cuda": info["torch_cuda"],
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dpfast_cuda_built": info["dpfast_cuda_built"],
        "cuda_available": info["cuda_available"],
        "gpus": info["devices"],
        "peer_access": info["peer_access"],
        "nvidia_driver": nvidia_driver_version(),
        "git": git_commit(),
    }
    return record


def nvidia_driver_version() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def card_label(devices: Sequence[torch.device]) -> str:
    """A short file-name label for the hardware: 'cpu', 'gpu1', 'gpu8'."""
    if devices[0].type == "cpu":
        return "cpu"
    return f"gpu{len(distinct(devices))}"


# -- result files --------------------------------------------------------------------------------

def now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def result_path(out_dir: str, started: datetime.datetime, label: str, suffix: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{started:%Y%m%d-%H%M%S}-{label}{suffix}")


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False)
        f.write("\n")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- terminal output -----------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns right-aligned except the first two (names)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), separator] + [line(r) for r in cells[1:]])


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class _NoProgress:
    def __init__(self, total=None, desc=None, **_):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, or a silent stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoProgress()


def timed_loop_us(fn: Callable[[], object], devices: Sequence[torch.device], iters: int, warmup: int) -> float:
    """Mean time of one call to fn over `iters` back-to-back calls, after `warmup`
    calls; the devices are synchronised only around the loop (as nccl-tests does),
    so launch latency overlaps with the previous call's work."""
    for _ in range(warmup):
        fn()
    synchronize(devices)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(devices)
    return (time.perf_counter() - start) * 1e6 / iters
