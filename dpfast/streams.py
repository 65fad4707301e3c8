"""Small helpers for the lanes' CUDA streams; every one is a no-op on the CPU.

NOTE [Stream ordering] in csrc/comm.h states the engine's rules: an engine op
starts after the work already on its lanes' streams and leaves its results on
them. The front end adds the edges between a lane and the caller's current
stream with these helpers, always by events, never by a device-wide
synchronize.
"""

from __future__ import annotations

import contextlib
import threading
from typing import List, Optional

import torch


class _WaitEvents(threading.local):
    def __init__(self):
        self.by_device: dict = {}  # this thread's event per device index


_wait_events = _WaitEvents()


def make_lane_streams(devices: List[torch.device]) -> Optional[List["torch.cuda.Stream"]]:
    """One stream per replica (several may share a device), or None on the CPU."""
    if devices[0].type != "cuda":
        return None
    return [torch.cuda.Stream(device=d) for d in devices]


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _wait_event(device: torch.device) -> "torch.cuda.Event":
    """This thread's event for waits on streams of `device`, recorded again by every wait.

    A wait holds the record the event had when it was enqueued; a later record does not change
    it (cudaEventRecord), so one event serves every wait. Stream.wait_stream makes a new event
    each time, and creating and destroying events was half of the engine's fixed cost per call
    on an H200 (csrc/cuda/comm_cuda.cpp, wait_event)."""
    events = _wait_events.by_device
    event = events.get(device.index)
    if event is None:
        event = events[device.index] = torch.cuda.Event()
    return event


def wait(consumer, producer) -> None:
    """Work enqueued on `consumer` from now on runs after the work already on `producer`."""
    if consumer is not None and producer is not None and consumer != producer:
        event = _wait_event(producer.device)
        event.record(producer)
        consumer.wait_event(event)


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

            for _, tensor in iter_tensors(outputs[k], ""):
                if tensor.is_cuda:
                    tensor.record_stream(current)
