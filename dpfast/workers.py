"""Persistent per-replica workers.

nn.DataParallel starts a new thread per replica on every call. dpfast keeps
one daemon thread per replica (1..n-1) for the wrapper's lifetime; replica 0
runs on the calling thread. Each job carries the caller's thread-local state
into the worker: grad mode, inference mode, autocast (enabled flag *and*
dtype, per device type) and the lane's CUDA stream. An exception in a replica
is re-raised in the caller, naming the replica and its device, after every
other replica of the call has finished, so the wrapper is ready for the next
call.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, List, Optional

import torch
from torch._utils import ExceptionWrapper

from . import streams as lane_streams

_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")


def capture_thread_state() -> dict:
    autocast = {}
    for device_type in _AUTOCAST_DEVICE_TYPES:
        if torch.is_autocast_enabled(device_type):
            autocast[device_type] = torch.get_autocast_dtype(device_type)
    return {
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "autocast": autocast,
        "autocast_cache": torch.is_autocast_cache_enabled(),
    }


@contextlib.contextmanager
def thread_state(state: dict, stream=None):
    with contextlib.ExitStack() as stack:
        if state["inference"]:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(state["grad"]))
        for device_type, dtype in state["autocast"].items():
            stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype,
                                               cache_enabled=state["autocast_cache"]))
        stack.enter_context(lane_streams.on(stream))
        yield


class _Job:
    __slots__ = ("fn", "where", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], where: str):
        self.fn, self.where = fn, where
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[ExceptionWrapper] = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException:  # KeyboardInterrupt inside a replica's forward included
            self.error = ExceptionWrapper(where=self.where)
        finally:
            self.fn = None  # drop references to the replica's inputs
            self.done.set()


def _worker_loop(jobs: "queue.SimpleQueue[Optional[_Job]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()


class WorkerPool:
    """One persistent daemon thread per replica 1..n-1."""

    def __init__(self, num_workers: int, name: str = "dpfast-replica"):
        self._queues: List["queue.SimpleQueue[Optional[_Job]]"] = []
        self._threads: List[threading.Thread] = []
        for k in range(num_workers):
            q: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
            t = threading.Thread(target=_worker_loop, args=(q,), name=f"{name}-{k + 1}", daemon=True)
            t.start()
            self._queues.append(q)
            self._threads.append(t)

    @property
    def threads(self) -> List[threading.Thread]:
        return list(self._threads)

    def run(self, fns: List[Callable[[], Any]], wheres: List[str]) -> List[Any]:
        """fns[0] on the calling thread, fns[k] on worker k; results in order."""
        if len(fns) - 1 > len(self._queues):
            raise RuntimeError(f"dpfast: expected at most {len(self._queues) + 1} replicas, but got {len(fns)}")
        jobs = [_Job(fn, where) for fn, where in zip(fns, wheres)]
        for k, job in enumerate(jobs[1:]):
            self._queues[k].put(job)
        jobs[0].run()
        for job in jobs[1:]:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                job.error.reraise()
        return [job.result for job in jobs]

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        self._queues, self._threads = [], []
