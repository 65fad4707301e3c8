"""Persistent per-replica workers.

nn.DataParallel starts a new thread per replica on every call. dpfast keeps
one daemon thread per replica (1..n-1) for the wrapper's lifetime; replica 0
runs on the calling thread. Each job carries the caller's thread-local state
into the worker: ATen's, as PyTorch's autograd engine carries it into its own
threads (grad and inference mode, autocast, dispatch and function modes, the
profiler's callbacks; not saved-tensor hooks: NOTE [Thread-local state of
replicas] in csrc/bindings.cpp), and the lane's CUDA stream. An exception in a replica
is re-raised in the caller, naming the replica and its device, after every
other replica of the call has finished, so the wrapper is ready for the next
call. Jobs and their completions are handed over through the engine's spinning
event and semaphore (NOTE [Spinning hand-offs] in csrc/handoff.h,
DPFAST_SPIN_US).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch._utils import ExceptionWrapper, KeyErrorMessage

from . import _C
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


def python_modes_active() -> bool:
    """Whether a Python dispatch or function mode is active on this thread (FlopCounterMode, a
    torch.device context). Such a mode keeps state of its own (FlopCounterMode's module tracker:
    which module runs now, set by global hooks), which replicas running side by side on several
    threads would interleave: the replicas then run one after another on the caller's thread,
    forward and backward, as the module does alone."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._len_torch_function_stack() > 0


def cpu_lane_threads(devices: List[torch.device]) -> Optional[int]:
    """NOTE [CPU threads]: CPU replicas run side by side, forward and backward, each on a thread of
    its own, and every one of those threads has an intra-op pool as large as the caller's: N of
    them oversubscribe the cores N times. Each worker gets an equal share of the caller's intra-op
    threads instead. The caller's own count stays as the user set it, except where it shares
    (caller_shares: idle OpenMP threads sleep, or its idle team can be paused; caller_lane_threads).
    None: not all CPU lanes."""
    if any(d.type != "cpu" for d in devices):
        return None
    return max(1, torch.get_num_threads() // max(1, len(devices)))


# OMP_WAIT_POLICY as dpfast finds it when imported. The OpenMP runtime reads it once, when torch
# loads it: set after `import torch`, it changes nothing there, and this reads it wrong.
_IDLE_THREADS_SLEEP = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def idle_threads_sleep() -> bool:
    """Whether the OpenMP runtime's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE) rather than
    spin first (the default: libgomp polls for about 10 ms after each parallel region)."""
    return _IDLE_THREADS_SLEEP


_NOT_LOOKED_UP = object()
_pause_team = _NOT_LOOKED_UP
# The lookup's ctypes objects, kept: a ctypes library and structure type each make a class, whose
# cycles would be garbage for the collector right after a wrapper's first call (PyTorch's own
# DataParallel test asserts that a call leaves none).
_lookup_objects: List[Any] = []


def omp_pause_setting() -> bool:
    """DPFAST_OMP_PAUSE: "1" (the default, also when empty) lets the caller pause its idle OpenMP
    team (quiet_caller_team), "0" never. Checked when a wrapper builds its runtime; read once, at
    the first lookup."""
    setting = os.environ.get("DPFAST_OMP_PAUSE", "").strip() or "1"
    if setting not in ("0", "1"):
        raise ValueError(f"dpfast.DataParallel: DPFAST_OMP_PAUSE: expected '1' or '0', but got {setting!r}")
    return setting == "1"


def _omp_pause() -> Optional[Callable[[int], int]]:
    """omp_pause_resource_all as torch's own CPU library binds it, where that is libgomp's (pip's
    torch on Linux), or None: another OpenMP runtime (whose pause may reach other threads' teams),
    none, not Linux, or DPFAST_OMP_PAUSE=0. Looked up once."""
    global _pause_team
    if _pause_team is not _NOT_LOOKED_UP:
        return _pause_team
    _pause_team = None
    if not omp_pause_setting() or sys.platform != "linux" or "OpenMP not found" in torch.__config__.parallel_info():
        return None
    try:
        import ctypes

        # dlsym on torch's library searches it and what it was linked with: the runtime torch calls
        # (auditwheel may have renamed it, libgomp-<hash>.so.1), whatever else the process loaded.
        libtorch_cpu = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        library = ctypes.CDLL(libtorch_cpu, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        _lookup_objects.append(library)
        pause = library.omp_pause_resource_all

        class _DlInfo(ctypes.Structure):
            _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                        ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]
        info = _DlInfo()
        process = ctypes.CDLL(None)
        _lookup_objects.extend((_DlInfo, process))
        dladdr = process.dladdr
        dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
        if not dladdr(ctypes.cast(pause, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
            return None
        if "libgomp" not in os.path.basename(info.dli_fname.decode(errors="replace")):
            return None  # libomp, Intel's libiomp5: their pause is not known to stay with the calling thread
    except (OSError, AttributeError):  # no such library, or a runtime older than OpenMP 5.0
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    _pause_team = pause
    return pause


def caller_shares(num_lanes: int, after_sleep: bool = False) -> bool:
    """NOTE [CPU threads]: whether the caller runs its replica on its share of the threads beside
    num_lanes - 1 workers: where idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE), or where every
    replica gets one thread (no more threads than lanes) and libgomp's pause can send the caller's
    idle team away while its replica runs (its threads spin for ~10 ms otherwise; with larger shares
    the caller's replica needs a team, which the pause would end, and workers with teams of their
    own make libgomp's threads outnumber the cores, where it throttles the spinning by itself),
    except in a step whose caller slept before it (``after_sleep``: caller_slept, NOTE [Idle
    caller])."""
    if _IDLE_THREADS_SLEEP:
        return True
    return torch.get_num_threads() <= num_lanes and not after_sleep and _omp_pause() is not None


# NOTE [Idle caller]
# The pause ends the caller's idle OpenMP team, and the caller's next region on every thread (the
# loss, the optimizer step) starts it again. Where the caller's thread had slept before the step
# (waiting for a data loader's batch; time.sleep), that first region after the pause took 10-17 ms
# on the 2-core VM instead of 2 ms, and a step 2.6-3.8x the bare module's with 10 ms of sleep between
# steps (1.6-1.8x without the pause); after as long a time busy on the caller: 2.1-2.4 ms
# (bench/results/20261128-cpu-handoff-spin.txt). So a step whose caller slept for more than
# IDLE_CALLER_S since the end of its previous forward or backward through a wrapper does not pause
# its team: the caller keeps its count, and the replicas' backward passes run in turn (NOTE
# [Parallel backward]). Slept: off its core (wall time less the thread's CPU time) for more than
# IDLE_CALLER_S, having blocked at least once (a voluntary context switch, where Linux counts them
# per thread): a thread only preempted by other processes, whose cores were never idle, did not.
# Decided at each forward's parallel_apply (the first forward of a thread counts as after a sleep)
# and kept for the routing of that forward's backward.
IDLE_CALLER_S = 0.002
_CALLER = threading.local()  # .busy_mark: (wall clock, thread CPU time, blocks) at the end of its last step


try:
    from resource import RUSAGE_THREAD, getrusage
except ImportError:  # not Linux: voluntary context switches are not counted per thread
    RUSAGE_THREAD = getrusage = None


def _blocks() -> int:
    """The calling thread's voluntary context switches so far (-1 where they are not counted)."""
    return -1 if getrusage is None else getrusage(RUSAGE_THREAD).ru_nvcsw


def note_caller_busy() -> None:
    """The calling thread's replicas are done (a forward's, a backward's): the time it sleeps before
    its next step counts from here."""
    _CALLER.busy_mark = (time.perf_counter(), time.thread_time(), _blocks())


def caller_slept() -> bool:
    """NOTE [Idle caller]: whether the calling thread slept since note_caller_busy."""
    mark = getattr(_CALLER, "busy_mark", None)
    if mark is None:
        return True
    off_core_s = (time.perf_counter() - mark[0]) - (time.thread_time() - mark[1])
    return off_core_s > IDLE_CALLER_S and _blocks() != mark[2]


def quiet_caller_team() -> None:
    """Right after the caller took its share: under the default wait policy, ends its idle OpenMP
    team's threads (omp_pause_resource_all(omp_pause_soft), which libgomp applies to the calling
    thread's team: 0.1-0.2 ms, and the user's next region on every thread starts them again, 0.3-1.5
    ms on the 2-core VM), so that they do not spin on the cores the replicas run on. Called before
    the workers are handed their jobs: the pause waits for each team thread to leave, and with the
    workers already computing on the other cores its p90 was 0.5-1.2 ms on the idle 2-core VM,
    against 0.13-0.15 ms (bench/results/20261128-cpu-pause-order.txt)."""
    if not _IDLE_THREADS_SLEEP:
        pause = _omp_pause()
        if pause is not None:
            pause(1)  # omp_pause_soft


def caller_lane_threads(devices: List[torch.device], after_sleep: bool = False) -> Optional[int]:
    """NOTE [CPU threads]: the caller's intra-op threads while its replica runs beside the workers'
    (replica 0's forward in parallel_apply, its part of a routed backward up to the end-of-backward
    callback): what the workers' shares leave of its own count, at least one; it goes back to its
    own count afterwards, so the loss, the optimizer step and the user's code keep every thread
    (in backward, the nodes that run after the routing node, another model's in the same loss
    included, run on the share; a backward that raises gives it back as the error leaves it).
    Only where caller_shares(): under libgomp's default policy, with its idle team left spinning,
    a caller on its share made the step 1.29-1.36x slower than one keeping its count
    (bench/results/20261127-cpu-omp-wait-policy.txt). None: leave the caller's count as it is (so
    also where the lanes are not all CPU). ``after_sleep``: as for caller_shares."""
    share = cpu_lane_threads(devices)
    if share is None or not caller_shares(len(devices), after_sleep):
        return None
    return max(1, torch.get_num_threads() - (len(devices) - 1) * share)


# NOTE [CPU threads]: the caller's own count while a routed backward runs replica 0's part on its
# share, per thread (one backward may run several wrappers' nodes; each reducer has its own end).
_SHARED_OUT = threading.local()


def share_out_caller_threads(count: Optional[int]) -> None:
    """From a routed backward's node: the calling thread runs on ``count`` intra-op threads until
    give_back_caller_threads(), never on more than it had. The first share of a backward holds."""
    if count is None or getattr(_SHARED_OUT, "own", None) is not None:
        return
    own = torch.get_num_threads()
    if count < own:
        _SHARED_OUT.own = own
        torch.set_num_threads(count)
        quiet_caller_team()


def give_back_caller_threads() -> None:
    """The calling thread's own count again: at the end of a backward (whichever reducer's end comes
    first: the graph has run by then); where a backward raised, when its graph task drops the end it
    never ran (reducer._EndOfBackward), and failing that at the next forward outside a backward."""
    own = getattr(_SHARED_OUT, "own", None)
    if own is not None:
        _SHARED_OUT.own = None
        torch.set_num_threads(own)


def restore_default_threads(jobs: List["_Job"]) -> None:
    """torch.set_num_threads also sets the process-wide default that threads started later begin
    with: after a worker took its share, the caller sets it back to its own count (its own pool
    stays as it is)."""
    if any(job.set_threads for job in jobs):
        torch.set_num_threads(torch.get_num_threads())


def spin_setting() -> Optional[int]:
    """DPFAST_SPIN_US: how long a thread waiting for a hand-off polls before it sleeps (NOTE
    [Spinning hand-offs] in csrc/handoff.h), or None where it is not set (WorkerPool decides: see
    its _refresh_spin). Read when a pool starts."""
    text = os.environ.get("DPFAST_SPIN_US", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SPIN_US:
        raise ValueError(f"dpfast.DataParallel: DPFAST_SPIN_US: expected a whole number of microseconds from 0 to "
                         f"{MAX_SPIN_US}, but got {text!r}")
    return value


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Covers the waits inside a step (a replica's forward or backward against another's, the caller's
# work between forward and backward) on the machines measured; a thread idle for longer sleeps.
# Only where every waiter has a core of its own (WorkerPool._refresh_spin).
DEFAULT_SPIN_US = 1000
MAX_SPIN_US = 1_000_000


class _Done:
    """A job's completion: set() once, by the thread that ran it; wait() from any thread, any
    number of times. The wait spins before it sleeps, and returns to Python every 0.1 s so that
    Ctrl-C reaches a caller waiting for a replica that hangs."""
    __slots__ = ("_event", "_spin_us")

    def __init__(self, spin: int):
        self._event = _C.SpinEvent()
        self._spin_us = spin

    def set(self) -> None:
        self._event.set()

    def wait(self) -> None:
        while not self._event.wait(self._spin_us, 0.1):
            pass


class _Inbox:
    """A worker's jobs, in order. get() takes a queued job first and waits for the semaphore only
    when there is none, so a put() cut short between its two steps (a KeyboardInterrupt) leaves a
    count above the jobs, which costs a spurious wake-up, never a job the worker does not see."""
    __slots__ = ("_jobs", "_ready", "spin_us")

    def __init__(self, spin: int):
        self._jobs: collections.deque = collections.deque()
        self._ready = _C.SpinSemaphore()
        self.spin_us = spin  # the pool may change it (WorkerPool._refresh_spin); read at each wait

    def put(self, job: Optional["_Job"]) -> None:
        self._jobs.append(job)
        self._ready.release()

    def get(self, done: Optional[_Done] = None) -> Optional["_Job"]:
        """Sets ``done`` (the last job's), then takes the next job. Where it has to wait, the set
        comes after the GIL is released, in the same call as the wait: the caller it wakes finds
        the GIL free instead of sleeping on it (NOTE [Spinning hand-offs])."""
        while True:
            if self._jobs:
                if done is not None:
                    done.set()
                return self._jobs.popleft()
            self._ready.set_then_acquire(None if done is None else done._event, self.spin_us)
            done = None


class _Job:
    __slots__ = ("fn", "where", "detail", "threads", "set_threads", "state", "done", "result", "error", "error_text")

    def __init__(self, fn: Callable[[], Any], where: Tuple[str, str], threads: Optional[int] = None,
                 spin: int = 0, state: Optional[Any] = None):
        """``where``: how an error names the replica ("in replica k on device d"), and a line the
        message ends with ("" for none); _Runtime.where makes both."""
        self.fn, self.threads = fn, threads
        self.where, self.detail = where
        self.set_threads = False
        self.state = state  # the submitter's thread-local state (NOTE [Thread-local state of replicas])
        self.done = _Done(spin)
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.error_text = ""  # the replica's traceback, formatted

    def run(self, signal: bool = True) -> None:
        """``signal``: set ``done`` at the end (a worker sets it itself, as late as it can)."""
        try:
            if self.state is None:
                self.result = self.fn()
            else:
                with _C.ThreadStateScope(self.state):
                    self.result = self.fn()
        except BaseException as error:  # KeyboardInterrupt inside a replica's forward included
            self.keep_error(error)
        finally:
            self.fn = self.state = None  # drop references to the replica's inputs
            if signal:
                self.done.set()

    def keep_error(self, error: BaseException) -> None:
        """The replica's exception, its traceback formatted now and dropped, as nn.DataParallel's
        ExceptionWrapper keeps it: the traceback's frames hold the replica's activations (memory
        an out-of-memory retry needs back at once), and this job in them would hold them in a
        cycle until the garbage collector ran."""
        try:
            wrapped = ExceptionWrapper(exc_info=(type(error), error, error.__traceback__), where=self.where)
            self.error_text = wrapped.exc_msg
        except BaseException as failure:  # an exception that cannot be printed: the caller must not wait forever
            self.error_text = (f"{type(error).__name__} (its traceback could not be formatted: "
                               f"{type(failure).__name__})\n")
        error.__traceback__ = None
        self.error = error

    def reraise(self) -> None:
        """Raises the replica's exception in the caller, its type kept, naming the replica and
        device as nn.DataParallel does ("Caught X in replica k on device d", then the replica's
        traceback)."""
        error, self.error = self.error, None
        message = f"Caught {type(error).__name__} {self.where}.\nOriginal {self.error_text}"
        if self.detail:  # after nn.DataParallel's own wording, which callers may match
            message = f"{message.rstrip()}\n({self.detail})"
        if isinstance(error, KeyError):
            message = KeyErrorMessage(message)
        try:
            replacement = type(error)(message)
        except Exception:  # a type whose constructor takes more than a message
            replacement = _same_type_with_message(error, message)
        try:
            raise replacement
        finally:  # the raised exception's traceback holds this frame: no cycle through its locals
            del error, replacement


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


def _worker_loop(jobs: _Inbox) -> None:
    done = None
    while True:
        job = jobs.get(done)
        done = None
        if job is None:
            return
        try:
            if job.threads is not None and torch.get_num_threads() != job.threads:
                torch.set_num_threads(job.threads)  # this thread's own intra-op pool (OpenMP, MKL)
                job.set_threads = True
        except BaseException as error:  # the caller gets it as the replica's error, and waits no longer
            job.fn = None
            job.keep_error(error)
        else:
            job.run(signal=False)
        done, job = job.done, None  # the caller owns the result; keep nothing alive until the next call


@contextlib.contextmanager
def _caller_share(caller_threads: Optional[int]):
    """The block on the caller's share of its intra-op threads (NOTE [CPU threads]), its idle
    team ended first."""
    own = None if caller_threads is None else torch.get_num_threads()
    if own is None or own == caller_threads:
        yield
        return
    try:
        torch.set_num_threads(caller_threads)
        quiet_caller_team()
        yield
    finally:
        torch.set_num_threads(own)


_FORKED_AWAY: List[_Inbox] = []  # see WorkerPool._start


class WorkerPool:
    """One persistent daemon thread per replica 1..n-1."""

    def __init__(self, num_workers: int, name: str = "dpfast-replica", cpu_lanes: bool = True):
        """``cpu_lanes``: the replicas compute on the CPU, beside the caller's intra-op threads
        (_refresh_spin counts those)."""
        self._num_workers, self._name, self._cpu_lanes = num_workers, name, cpu_lanes
        self._start()

    def _start(self) -> None:
        # A forked child (a DataLoader worker, say) has none of its parent's threads: the pool
        # remembers whose threads it holds and starts its own in a new process.
        setting = spin_setting()  # before anything changes: a bad setting leaves the pool as it was
        if getattr(self, "_pid", None) not in (None, os.getpid()):
            # The parent's inboxes stay alive in the child: a condition variable that a thread
            # which did not survive the fork waited on must never be destroyed (glibc would wait
            # for it).
            _FORKED_AWAY.extend(self._queues)
        self._pid = os.getpid()
        self._spin_setting = setting
        self._spin_us = 0 if setting is None else setting
        self._spin_threads: Optional[int] = None  # the intra-op thread count _spin_us was decided for
        self._cores = _usable_cores()
        self._queues: List[_Inbox] = []
        self._threads: List[threading.Thread] = []
        self._submitted: List[_Job] = []
        self._closing = threading.Lock()
        name = self._name
        for k in range(self._num_workers):
            q = _Inbox(self._spin_us)
            t = threading.Thread(target=_worker_loop, args=(q,), name=f"{name}-{k + 1}", daemon=True)
            t.start()
            self._queues.append(q)
            self._threads.append(t)
        self._refresh_spin()

    def _refresh_spin(self) -> None:
        """NOTE [Spinning hand-offs]: without DPFAST_SPIN_US, waits spin for DEFAULT_SPIN_US where
        the workers and the caller fit on the cores this process may use, one each, and sleep at
        once otherwise. For CPU replicas the caller counts as its intra-op threads (the user's
        count: the loss, the optimizer step and the user's code run on them between the
        hand-offs): a spinning waiter on a core that an OpenMP thread of the caller needed held
        that thread off. On the 2-core VM, 2 replicas with the caller on 2 threads and 3 ms between
        steps (a data loader) took 2.4-2.9x the bare module's step spinning and 1.2-1.3x sleeping;
        with the caller on one thread the two were within noise
        (bench/results/20261128-cpu-handoff-spin.txt). For GPU replicas the caller counts as one
        thread (its intra-op threads wait for the GPU). Decided again when that count changes, at
        the next forward."""
        if self._spin_setting is not None:
            return
        threads = 1
        if self._cpu_lanes:
            threads = getattr(_SHARED_OUT, "own", None) or torch.get_num_threads()  # not a backward's share
        if threads == self._spin_threads:
            return
        self._spin_threads = threads
        self._spin_us = DEFAULT_SPIN_US if self._num_workers + threads <= self._cores else 0
        for q in self._queues:
            q.spin_us = self._spin_us

    @property
    def threads(self) -> List[threading.Thread]:
        return list(self._threads)

    def run(self, fns: List[Callable[[], Any]], wheres: List[Tuple[str, str]], worker_threads: Optional[int] = None,
            caller_threads: Optional[int] = None) -> List[Any]:
        """fns[0] on the calling thread, fns[k] on worker k; results in order. ``worker_threads``:
        the workers' intra-op threads, ``caller_threads``: the caller's while fns[0] runs (NOTE
        [CPU threads]); None leaves them as they are."""
        if self._pid != os.getpid():
            self._start()
        if len(fns) - 1 > len(self._queues):
            raise RuntimeError(f"dpfast: expected at most {len(self._queues) + 1} replicas, but got {len(fns)}")
        self._refresh_spin()
        serial = python_modes_active()
        state = _C.CapturedThreadState() if len(fns) > 1 and not serial else None
        jobs = [_Job(fn, where, worker_threads if k else None, self._spin_us, state if k else None)
                for k, (fn, where) in enumerate(zip(fns, wheres))]
        if serial:  # python_modes_active: one after another, here
            for job in jobs:
                job.run()
        else:
            # The caller's idle team ends before the workers have work: ending it waits for each of
            # its threads to leave, which on busy cores takes milliseconds (NOTE [CPU threads]).
            with _caller_share(caller_threads):
                for k, job in enumerate(jobs[1:]):
                    self._queues[k].put(job)
                jobs[0].run()
        for job in jobs[1:]:
            job.done.wait()
        note_caller_busy()
        restore_default_threads(jobs)
        for job in jobs:
            if job.error is not None:
                job.reraise()
        return [job.result for job in jobs]

    def submit(self, fns: List[Callable[[], Any]], wheres: List[Tuple[str, str]], workers: List[int],
               worker_threads: Optional[int] = None) -> List[_Job]:
        """fns[j] on worker workers[j] (1-based, as run() numbers them), without waiting: the jobs,
        to wait for with ``job.done``. On a closed pool (the wrapper is gone, its graph is not),
        each runs at once on the calling thread."""
        if self._pid != os.getpid():
            self._start()
        state = _C.CapturedThreadState()
        jobs = [_Job(fn, where, worker_threads, self._spin_us, state) for fn, where in zip(fns, wheres)]
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
