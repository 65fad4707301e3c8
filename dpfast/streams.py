"""Small helpers for the lanes' CUDA streams; every one is a no-op on the CPU.

NOTE [Stream ordering] in csrc/comm.h states the engine's rules: an engine op
starts after the work already on its lanes' streams and leaves its results on
them. The front end adds the edges between a lane and the caller's current
stream with these helpers, always by events, never by a device-wide
synchronize.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from . import _C


def make_lane_streams(devices: List[torch.device]) -> Optional[List["torch.cuda.Stream"]]:
    """One stream per replica (several may share a device), or None on the CPU."""
    if devices[0].type != "cuda":
        return None
    return [torch.cuda.Stream(device=d) for d in devices]


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def wait(consumer, producer) -> None:
    """Work enqueued on `consumer` from now on runs after the work already on `producer`.

    Through the engine (csrc/comm.h, wait_lane): one event per device and thread, reused by every
    wait (Stream.wait_stream makes a new event each time, and creating and destroying events was
    half of the engine's fixed cost per call on an H200), and fork-safe, which an event kept per
    thread in Python is not (see wait_lane)."""
    if consumer is not None and producer is not None and consumer != producer:
        _C.wait_lane(consumer.device, consumer.stream_id, producer.device, producer.stream_id)


def on(stream):
    """Makes `stream` current (and its device) for the block; nothing on the CPU."""
    if stream is None:
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)


def ids(streams) -> List[int]:
    return [s.stream_id for s in streams] if streams else []


def wait_for_callers(streams) -> None:
    """Every lane waits for its device's current stream."""
    for stream in streams or []:
        wait(stream, torch.cuda.current_stream(stream.device))


def callers_wait_for(streams, outputs=None) -> None:
    """Every lane's device's current stream waits for the lane; tensors in ``outputs[k]`` (made on
    lane k) are marked as used by that current stream, for the caching allocator."""
    for k, stream in enumerate(streams or []):
        current = torch.cuda.current_stream(stream.device)
        wait(current, stream)
        if outputs is not None:
            from .scatter_gather import iter_tensors

            for _, tensor in iter_tensors(outputs[k], None):
                if tensor.is_cuda:
                    tensor.record_stream(current)
