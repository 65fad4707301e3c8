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

import _thread
import contextlib
import os
import queue
import threading
from typing import Any, Callable, List, Optional

import torch
from torch._utils import ExceptionWrapper, KeyErrorMessage

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


def thread_state(state: dict, stream=None):
    """The caller's thread-local state (capture_thread_state) for a block on this thread."""
    if (stream is None and not state["autocast"] and not state["inference"]
            and torch.is_grad_enabled() == state["grad"] and not torch.is_inference_mode_enabled()
            and not any(torch.is_autocast_enabled(t) for t in _AUTOCAST_DEVICE_TYPES)):
        # Already this thread's state (the common case, and replica 0's on the caller's thread):
        # entering the contexts cost about 30 us per replica and step.
        return contextlib.nullcontext()
    return _entered_state(state, stream)


@contextlib.contextmanager
def _entered_state(state: dict, stream=None):
    with contextlib.ExitStack() as stack:
        if state["inference"]:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(state["grad"]))
        for device_type, dtype in state["autocast"].items():
            stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype,
                                               cache_enabled=state["autocast_cache"]))
        stack.enter_context(lane_streams.on(stream))
        yield


def cpu_lane_threads(devices: List[torch.device]) -> Optional[int]:
    """NOTE [CPU threads]: CPU replicas run side by side, forward and backward, each on a thread of
    its own, and every one of those threads has an intra-op pool as large as the caller's: N of
    them oversubscribe the cores N times. The workers get an equal share of the caller's threads
    (the caller's own pool is the user's setting, and stays as it is). None: not all CPU lanes."""
    if any(d.type != "cpu" for d in devices):
        return None
    return max(1, torch.get_num_threads() // max(1, len(devices)))


def restore_default_threads(jobs: List["_Job"]) -> None:
    """torch.set_num_threads also sets the process-wide default that threads started later begin
    with: after a worker took its share, the caller sets it back to its own count (its own pool
    stays as it is)."""
    if any(job.set_threads for job in jobs):
        torch.set_num_threads(torch.get_num_threads())


class _Done:
    """A job's completion: set() once, by the thread that ran it; wait() from any thread, any
    number of times. A lock made held and released by set(): a step makes three of these, and a
    threading.Event (a Condition and two locks) cost about 50 us a step of the caller's time on a
    2-core CPU, where this costs a few."""
    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self) -> None:
        with self._lock:
            pass


class _Job:
    __slots__ = ("fn", "where", "threads", "set_threads", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], where: str, threads: Optional[int] = None):
        self.fn, self.where, self.threads = fn, where, threads
        self.set_threads = False
        self.done = _Done()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as error:  # KeyboardInterrupt inside a replica's forward included
            self.error = error
        finally:
            self.fn = None  # drop references to the replica's inputs
            self.done.set()

    def reraise(self) -> None:
        """Raises the replica's exception in the caller, its type kept, naming the replica and
        device as nn.DataParallel does ("Caught X in replica k on device d", then the replica's
        traceback)."""
        error = self.error
        formatted = ExceptionWrapper(exc_info=(type(error), error, error.__traceback__), where=self.where)
        message = f"Caught {type(error).__name__} {self.where}.\nOriginal {formatted.exc_msg}"
        if isinstance(error, KeyError):
            message = KeyErrorMessage(message)
        try:
            replacement = type(error)(message)
        except Exception:  # a type whose constructor takes more than a message
            replacement = _same_type_with_message(error, message)
        raise replacement


def _same_type_with_message(error: BaseException, message: str) -> BaseException:
    """An exception that is an instance of error's type, carries its args and attributes, and
    prints `message`: a subclass made on the fly, for types whose constructor wants more than a
    message. Falls back to the original object with a note."""
    cls = type(error)
    try:
        subclass = type(cls.__name__, (cls,), {"__str__": lambda self: message, "__module__": cls.__module__})
        replacement = subclass.__new__(subclass, *error.args)
        replacement.__dict__.update(error.__dict__)
        return replacement
    except Exception:
        error.add_note(message)
        return error


def _worker_loop(jobs: "queue.SimpleQueue[Optional[_Job]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        if job.threads is not None and torch.get_num_threads() != job.threads:
            torch.set_num_threads(job.threads)  # this thread's own intra-op pool (OpenMP, MKL)
            job.set_threads = True
        job.run()
        job = None  # the caller owns the result; keep nothing alive until the next call


class WorkerPool:
    """One persistent daemon thread per replica 1..n-1."""

    def __init__(self, num_workers: int, name: str = "dpfast-replica"):
        self._num_workers, self._name = num_workers, name
        self._start()

    def _start(self) -> None:
        # A forked child (a DataLoader worker, say) has none of its parent's threads: the pool
        # remembers whose threads it holds and starts its own in a new process.
        self._pid = os.getpid()
        self._queues: List["queue.SimpleQueue[Optional[_Job]]"] = []
        self._threads: List[threading.Thread] = []
        self._submitted: List[_Job] = []
        self._closing = threading.Lock()
        name = self._name
        for k in range(self._num_workers):
            q: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
            t = threading.Thread(target=_worker_loop, args=(q,), name=f"{name}-{k + 1}", daemon=True)
            t.start()
            self._queues.append(q)
            self._threads.append(t)

    @property
    def threads(self) -> List[threading.Thread]:
        return list(self._threads)

    def run(self, fns: List[Callable[[], Any]], wheres: List[str], worker_threads: Optional[int] = None
            ) -> List[Any]:
        """fns[0] on the calling thread, fns[k] on worker k; results in order. ``worker_threads``:
        the workers' intra-op threads (NOTE [CPU threads]); the caller's are left alone."""
        if self._pid != os.getpid():
            self._start()
        if len(fns) - 1 > len(self._queues):
            raise RuntimeError(f"dpfast: expected at most {len(self._queues) + 1} replicas, but got {len(fns)}")
        jobs = [_Job(fn, where, worker_threads if k else None) for k, (fn, where) in enumerate(zip(fns, wheres))]
        for k, job in enumerate(jobs[1:]):
            self._queues[k].put(job)
        jobs[0].run()
        for job in jobs[1:]:
            job.done.wait()
        restore_default_threads(jobs)
        for job in jobs:
            if job.error is not None:
                job.reraise()
        return [job.result for job in jobs]

    def submit(self, fns: List[Callable[[], Any]], wheres: List[str], workers: List[int],
               worker_threads: Optional[int] = None) -> List[_Job]:
        """fns[j] on worker workers[j] (1-based, as run() numbers them), without waiting: the jobs,
        to wait for with ``job.done``. On a closed pool (the wrapper is gone, its graph is not),
        each runs at once on the calling thread."""
        if self._pid != os.getpid():
            self._start()
        jobs = [_Job(fn, where, worker_threads) for fn, where in zip(fns, wheres)]
        with self._closing:  # not behind close()'s stop marks, whatever thread runs close()
            queued = max(workers, default=0) <= len(self._queues)
            if queued:
                for worker, job in zip(workers, jobs):
                    self._queues[worker - 1].put(job)
                self._submitted.extend(jobs)
        if not queued:
            for job in jobs:
                job.run()
        return jobs

    def drain(self) -> None:
        """Waits for every job submitted so far (their errors are their submitter's to report)."""
        jobs, self._submitted = self._submitted, []
        for job in jobs:
            job.done.wait()

    def close(self) -> None:
        if self._pid != os.getpid():
            return  # another process's threads
        with self._closing:
            queues, threads = self._queues, self._threads
            self._queues, self._threads = [], []
        for q in queues:
            q.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
