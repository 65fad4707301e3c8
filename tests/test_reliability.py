"""Reliability (issue 6), on CPU replicas: bad input gets a clear error before
any device work; a replica that fails (any exception, in forward or backward,
an out-of-memory included) leaves the wrapper training on with correct
gradients and nothing leaked; long runs do not grow; copies, pickles, forked
DataLoader workers, checkpoints in a new process and interpreter exit work.

Complements tests/test_errors.py (which it does not repeat) and
tests/test_fuzz.py (scatter/gather fuzzing). tools/soak.py is the long
version of the soak test here; the CI one runs the same loop for 300 steps.
Every subprocess and every fork has a hard timeout.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import faulthandler
import gc
import importlib.util
import inspect
import io
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import dpfast
from dpfast import scatter_gather
from conftest import routed

REPO = Path(__file__).resolve().parents[1]
CPU4 = ["cpu"] * 4
CPU = torch.device("cpu")
WORKER_PREFIX = "dpfast-replica"


# -- helpers ---------------------------------------------------------------------------------------

def live_tensors() -> int:
    """torch.Tensor objects alive in this process, after a full collection."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def worker_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)}


def replica_thread_name(k: int) -> str:
    """The thread replica k runs on: the caller's for replica 0, worker k's otherwise."""
    return threading.current_thread().name if k == 0 else f"{WORKER_PREFIX}-{k}"


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Flaky(nn.Module):
    """An MLP whose forward raises on the replicas named in fail_on (by thread name)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.fail_on = frozenset()
        self.make_error = None
        self.fail_backward_on = frozenset()  # raise in the backward of these replicas instead
        self.max_rows = None  # {thread name: rows}: raise torch.OutOfMemoryError on a chunk with more rows
        self.before = {}  # {thread name: callable}: run first in that replica's forward

    def forward(self, x):
        me = threading.current_thread().name
        if me in self.before:
            self.before[me]()
        if me in self.fail_on:
            raise self.make_error()
        if self.max_rows is not None and me in self.max_rows and x.size(0) > self.max_rows[me]:
            raise torch.OutOfMemoryError(f"CPU out of memory. Tried to allocate {x.size(0) * 64} MiB (this replica "
                                         f"has room for {self.max_rows[me]} rows)")
        h = self.body(x)
        if me in self.fail_backward_on:
            h = FailInBackward.apply(h, self.make_error)
        return self.head(h)


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, make_error):
        ctx.make_error = make_error
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.make_error()


def make_pair(factory=Flaky, device_ids=CPU4, **kwargs):
    """(reference, wrapper): the unwrapped module in float64, and a wrapped copy of it."""
    torch.manual_seed(0)
    reference = factory().double()
    return reference, dpfast.DataParallel(copy.deepcopy(reference), device_ids=device_ids, **kwargs)


class Trainer:
    """The reference and the wrapper trained side by side with SGD (momentum) on the same batches."""

    def __init__(self, reference, wrapper, batch=10, seed=1):
        self.reference, self.wrapper = reference, wrapper
        self.opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        self.opt = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9)
        self.data = torch.Generator().manual_seed(seed)
        self.batch = batch

    def batch_xy(self, batch=None):
        batch = batch or self.batch
        return (torch.randn(batch, 6, generator=self.data, dtype=torch.float64),
                torch.randn(batch, 3, generator=self.data, dtype=torch.float64))

    def step(self, batch=None):
        x, y = self.batch_xy(batch)
        for model, optimizer in ((self.reference, self.opt_ref), (self.wrapper, self.opt)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    def assert_in_step(self):
        for (name, p), q in zip(self.reference.named_parameters(), self.wrapper.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


# == bad input ====================================================================================

@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices as far as device parsing can tell, on a machine without any: an error
    that must come before any device work cannot be reached through a CUDA call."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def small():
    return nn.Linear(4, 2).double()


CONSTRUCTOR_CASES = [
    # (id, keyword arguments, needs fake CUDA, error, message)
    ("device_type_not_cpu_or_cuda", dict(device_ids=["meta"]), False, ValueError,
     r"device_ids\[0\]: expected a CPU or CUDA device, but got meta"),
    ("unparsable_device_string", dict(device_ids=["cpu", "cuda:zero"]), False, ValueError,
     r"device_ids\[1\]: expected a device such as 'cpu' or 'cuda:0', but got 'cuda:zero'"),
    ("none_in_device_list", dict(device_ids=["cpu", None]), False, TypeError,
     r"device_ids\[1\]: expected a CUDA index, 'cpu', 'cuda:N' or a torch.device, but got None \(NoneType\)"),
    ("device_ids_a_float", dict(device_ids=3.5), False, TypeError,
     r"device_ids: expected a list of devices, but got 3.5 \(float\)"),
    ("device_ids_a_single_device", dict(device_ids=torch.device("cpu")), False, TypeError,
     r"device_ids: expected a list of devices, but got device\(type='cpu'\) \(device\); write \[device"),
    ("device_ids_a_single_index", dict(device_ids=0), False, TypeError,
     r"device_ids: expected a list of devices, but got 0 \(int\); write \[0\]"),
    ("negative_cuda_index", dict(device_ids=[-2]), False, (ValueError, TypeError),
     r"device_ids\[0\]: expected .*but got -2"),
    ("output_device_unknown", dict(device_ids=["cpu"], output_device="tpu"), False, ValueError,
     r"output_device: expected a device such as 'cpu' or 'cuda:0', but got 'tpu'"),
    ("output_device_a_float", dict(device_ids=["cpu"], output_device=2.5), False, TypeError,
     r"output_device: expected a CUDA index, 'cpu', 'cuda:N' or a torch.device, but got 2.5 \(float\)"),
    ("dim_a_bool", dict(device_ids=CPU4, dim=True), False, TypeError,
     r"dim: expected an int, but got True \(bool\)"),
    ("dim_none", dict(device_ids=CPU4, dim=None), False, TypeError,
     r"dim: expected an int, but got None \(NoneType\)"),
    ("mix_cpu_then_cuda", dict(device_ids=["cpu", 0]), True, ValueError,
     r"device_ids: expected devices of one type, but got a mix of CPU and CUDA \(device_ids\[1\] is cuda:0, "
     r"device_ids\[0\] is cpu\)"),
    ("mix_cuda_then_cpu", dict(device_ids=[0, "cuda:1", torch.device("cpu")]), True, ValueError,
     r"device_ids: expected devices of one type, but got a mix of CPU and CUDA \(device_ids\[0\] is cuda:0, "
     r"device_ids\[2\] is cpu\)"),
    ("cuda_index_out_of_range", dict(device_ids=[0, 99]), True, ValueError,
     r"device_ids\[1\]: expected a CUDA index in \[0, \d+\), but got 99"),
]


@pytest.mark.parametrize("kwargs,needs_cuda,error,pattern", [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_bad_constructor_arguments(kwargs, needs_cuda, error, pattern, request):
    if needs_cuda and not torch.cuda.is_available():
        request.getfixturevalue("fake_cuda")
    elif needs_cuda and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices or none")
    threads = worker_threads()
    with pytest.raises(error, match=pattern):
        dpfast.DataParallel(small(), **kwargs)
    assert worker_threads() == threads


def test_a_buffer_on_another_device_is_named():
    """Parameters on device_ids[0] but one buffer elsewhere: caught at construction or, since the
    module may still move after wrapping (as with nn.DataParallel), at the first forward."""
    module = small()
    module.register_buffer("scale", torch.ones(2, device="meta"))
    threads = worker_threads()
    with pytest.raises(RuntimeError, match=r"module must have its parameters and buffers on device cpu "
                                           r"\(device_ids\[0\]\) but found one of them on device: meta"):
        wrapper = dpfast.DataParallel(module, device_ids=CPU4)
        wrapper(torch.zeros(8, 4, dtype=torch.float64))
    assert worker_threads() == threads


@dataclasses.dataclass
class Example:
    features: torch.Tensor
    label: torch.Tensor


class TakesAnything(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.lin.weight.sum()


INPUT_CASES = [
    # (id, wrapper keyword arguments, args, kwargs, error, message)
    ("batch_mismatch_nested_dict_list", {}, ({"a": torch.zeros(8, 4), "b": [torch.zeros(8, 1), torch.zeros(5, 1)]},),
     {}, ValueError, r"inputs: expected every input tensor to have the same size along dim 0 \(the batch\), a whole multiple of it \(rows per sample\), or one row per replica, but "
                     r"inputs\[0\]\['a'\] has 8 and inputs\[0\]\['b'\]\[1\] has 5"),
    ("batch_mismatch_dataclass_fields", {}, (Example(torch.zeros(8, 4), torch.zeros(7)),), {}, ValueError,
     r"but inputs\[0\].features has 8 and inputs\[0\].label has 7"),
    ("batch_mismatch_dim1", {"dim": 1}, (torch.zeros(2, 8, 4),), {"mask": torch.zeros(2, 6)}, ValueError,
     r"same size along dim 1 \(the batch\), a whole multiple of it \(rows per sample\), or one row per replica, but inputs\[0\] has 8 and kwargs\['mask'\] has 6"),
    ("negative_dim_out_of_range", {"dim": -3}, (torch.zeros(8, 4),), {}, ValueError,
     r"dim: expected a dimension in \[-2, 2\) of every input tensor, but got dim=-3 and inputs\[0\] has shape "
     r"\(8, 4\)"),
    ("dim_out_of_range_for_a_later_input", {"dim": 1}, (torch.zeros(8, 4),), {"lengths": torch.zeros(8)},
     ValueError, r"dim: expected a dimension in \[-1, 1\) of every input tensor, but got dim=1 and "
                 r"kwargs\['lengths'\] has shape \(8,\)"),
]


@pytest.mark.parametrize("wrapper_kwargs,args,kwargs,error,pattern", [c[1:] for c in INPUT_CASES],
                         ids=[c[0] for c in INPUT_CASES])
def test_bad_inputs_are_named_and_no_replica_runs(wrapper_kwargs, args, kwargs, error, pattern):
    module = TakesAnything()
    wrapper = dpfast.DataParallel(module, device_ids=CPU4, **wrapper_kwargs)
    good = torch.zeros(8, 4) if wrapper_kwargs.get("dim", 0) in (0, -2) else torch.zeros(2, 8, 4)
    wrapper(good)  # a good call first: the workers and replicas exist
    calls, broadcasts = module.calls, wrapper.stats()["broadcasts"]
    with pytest.raises(error, match=pattern):
        wrapper(*args, **kwargs)
    assert module.calls == calls, "a replica ran on bad input"
    assert wrapper.stats()["broadcasts"] == broadcasts, "parameters were broadcast for bad input"
    wrapper(good)  # and the wrapper still works


def test_bad_input_on_the_first_call_builds_no_replicas_and_starts_no_workers():
    """'Raised before any device work': replicas are a copy of the model on every device."""
    wrapper = dpfast.DataParallel(TakesAnything(), device_ids=CPU4)
    threads = worker_threads()
    with pytest.raises(ValueError, match=r"inputs: expected every input tensor to have the same size"):
        wrapper(torch.zeros(8, 4), torch.zeros(6, 4))
    assert wrapper.stats()["replica_builds"] == 0, "the replicas were built before the inputs were checked"
    assert worker_threads() == threads, "workers were started before the inputs were checked"


@pytest.mark.parametrize("sizes,pattern", [
    ([2, 2, 3], r"dpfast.scatter: expected chunk sizes that sum to the size of dim 0 \(6\), but they sum to 7"),
    ([2, 2], r"dpfast.scatter: expected one chunk size per lane \(3 lanes\), but got 2 chunk sizes"),
    ([4, 4, -2], r"dpfast.scatter: expected non-negative chunk sizes, but chunk_sizes\[2\] is -2"),
], ids=["sum", "count", "negative"])
def test_scatter_chunk_sizes_that_do_not_add_up(sizes, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        scatter_gather.scatter({"x": torch.zeros(6, 2)}, [CPU] * 3, sizes, 0)


needs_chunk_sizes = pytest.mark.skipif("chunk_sizes" not in inspect.signature(dpfast.DataParallel).parameters,
                                       reason="this dpfast has no chunk_sizes option")


@needs_chunk_sizes
def test_wrapper_chunk_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match=r"chunk_sizes: expected one entry per device \(4\), but got 3"):
        dpfast.DataParallel(small(), device_ids=CPU4, chunk_sizes=[2, 2, 2])
    module = TakesAnything()
    wrapper = dpfast.DataParallel(module, device_ids=CPU4, chunk_sizes=[2, 2, 2, 1])
    with pytest.raises(ValueError, match=r"chunk_sizes: expected sizes that sum to the batch size \(8\), but they "
                                         r"sum to 7"):
        wrapper(torch.zeros(8, 4))
    assert module.calls == 0


class Disagreeing(nn.Module):
    """Returns `first` on replica 0 and `other` on the others: outputs gather cannot join."""

    def __init__(self, first, other):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.first, self.other = first, other

    def forward(self, x):
        y = self.lin(x)
        make = self.other if threading.current_thread().name.startswith(WORKER_PREFIX) else self.first
        return make(y)


GATHER_CASES = [
    # (id, replica 0's output, the other replicas', what the message must mention)
    ("tensor_then_int", lambda y: y, lambda y: 3, r"(?is)outputs.*expected.*tensor.*but.*int"),
    ("none_then_tensor", lambda y: None, lambda y: y, r"(?is)outputs.*expected.*but.*(None|tensor)"),
    ("lists_of_different_lengths", lambda y: [y, y], lambda y: [y], r"(?is)outputs.*expected.*but.*(1|2)"),
    ("dicts_with_different_keys", lambda y: {"a": y}, lambda y: {"b": y}, r"(?is)outputs.*expected.*keys.*but"),
]


@pytest.mark.parametrize("first,other,pattern", [c[1:] for c in GATHER_CASES], ids=[c[0] for c in GATHER_CASES])
def test_outputs_gather_cannot_join_get_a_clear_error(first, other, pattern):
    """A non-tensor (or a different structure) where gather needs a tensor: a clear error naming
    the outputs, not an AttributeError, a KeyError or silently dropped values."""
    wrapper = dpfast.DataParallel(Disagreeing(first, other), device_ids=["cpu"] * 3)
    with pytest.raises((TypeError, ValueError), match=pattern):
        wrapper(torch.zeros(6, 2))


# == a replica that fails =========================================================================

class TwoArgumentError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code, self.detail = code, detail


FORWARD_FAILURES = [
    # (id, error factory, failing replicas): batch 10 on 4 replicas is chunks of 3, 3, 3 and 1 rows
    ("value_error_replica_2", lambda: ValueError("bad value"), {2}),
    ("keyboard_interrupt_replica_3", lambda: KeyboardInterrupt(), {3}),
    ("system_exit_replica_1", lambda: SystemExit(3), {1}),
    ("memory_error_replica_0", lambda: MemoryError("no memory"), {0}),
    ("out_of_memory_replica_2", lambda: torch.OutOfMemoryError("CPU out of memory. Tried to allocate 1 GiB"), {2}),
    ("assertion_replicas_1_and_3", lambda: AssertionError("shapes"), {1, 3}),
    ("runtime_error_every_replica", lambda: RuntimeError("everywhere"), {0, 1, 2, 3}),
]


@pytest.mark.parametrize("make_error,failing", [c[1:] for c in FORWARD_FAILURES],
                         ids=[c[0] for c in FORWARD_FAILURES])
def test_forward_failure_is_named_and_training_goes_on_without_leaks(make_error, failing):
    reference, wrapper = make_pair()
    trainer = Trainer(reference, wrapper, batch=10)
    trainer.step()
    trainer.step()  # workers, replicas, reducer, optimizer state: all exist now
    workers = worker_threads()
    threads, tensors = threading.active_count(), live_tensors()

    first = min(failing)
    rows = [3, 3, 3, 1][first]
    wrapper.module.fail_on = frozenset(replica_thread_name(k) for k in failing)
    wrapper.module.make_error = make_error
    expected = type(make_error())
    x = trainer.batch_xy()[0]
    with pytest.raises(expected) as info:
        wrapper(x)
    message = str(info.value)
    del info, x
    assert f"in replica {first} on device cpu.\nOriginal Traceback" in message  # nn.DataParallel's wording
    assert message.endswith(f"(replica {first} ran a batch chunk of {rows} rows)")
    original = str(make_error())
    assert original in message
    wrapper.module.fail_on = frozenset()

    for _ in range(3):
        trainer.step()
    trainer.assert_in_step()
    assert worker_threads() == workers and all(t.is_alive() for t in workers)
    assert threading.active_count() == threads
    assert live_tensors() == tensors, "tensors leaked by the failed call"


def test_replica_error_whose_constructor_takes_two_arguments_keeps_its_type():
    """ExceptionWrapper.reraise rebuilds the error as type(message), which fails for an exception
    whose constructor takes other arguments; it then raises a RuntimeError and the type is lost."""
    reference, wrapper = make_pair()
    wrapper.module.fail_on = frozenset({replica_thread_name(2)})
    wrapper.module.make_error = lambda: TwoArgumentError(7, "detail")
    with pytest.raises(Exception) as info:
        wrapper(torch.randn(10, 6, dtype=torch.float64))
    assert "in replica 2 on device cpu" in str(info.value)
    assert isinstance(info.value, TwoArgumentError), (
        f"the replica raised TwoArgumentError, the caller got {type(info.value).__name__}")


@pytest.mark.parametrize("make_error", [lambda: RuntimeError("backward failed"),
                                        lambda: torch.OutOfMemoryError("CPU out of memory in backward")],
                         ids=["runtime_error", "out_of_memory"])
def test_backward_failure_in_a_replica_leaves_correct_gradients_for_the_next_steps(make_error):
    """The most common out-of-memory is in backward. After it, zero_grad() and the next steps
    must give the gradients of the unwrapped module."""
    reference, wrapper = make_pair()
    trainer = Trainer(reference, wrapper, batch=10)
    trainer.step()
    tensors = live_tensors()
    wrapper.module.fail_backward_on = frozenset({replica_thread_name(2)})
    wrapper.module.make_error = make_error
    x, y = trainer.batch_xy()
    trainer.opt.zero_grad()
    with pytest.raises(type(make_error())):
        nn.functional.mse_loss(wrapper(x), y).backward()
    del x, y
    wrapper.module.fail_backward_on = frozenset()
    trainer.step()
    trainer.assert_in_step()
    trainer.step()
    trainer.assert_in_step()
    assert live_tensors() == tensors


@pytest.mark.parametrize("spin", ["0", "5000"])
def test_spin_setting_is_checked_and_any_value_trains_exactly(spin, monkeypatch):
    """DPFAST_SPIN_US (NOTE [Spinning hand-offs] in csrc/handoff.h): a bad value is named at the
    first forward, which starts nothing; 0 (sleep at once) and a long spin both train exactly."""
    reference, wrapper = make_pair()
    for bad in ["-3", "1e3", "1000001"]:
        monkeypatch.setenv("DPFAST_SPIN_US", bad)
        with pytest.raises(ValueError, match=r"DPFAST_SPIN_US: expected a whole number of microseconds from 0 to "
                                             rf"1000000, but got '{bad}'"):
            wrapper(torch.randn(8, 6, dtype=torch.float64))
        assert wrapper.__dict__.get("_runtime") is None  # nothing built
    monkeypatch.setenv("DPFAST_SPIN_US", spin)
    trainer = Trainer(reference, wrapper, batch=8)
    for _ in range(3):
        trainer.step()
    trainer.assert_in_step()


def test_waits_spin_only_where_the_workers_and_the_callers_threads_fit_on_the_cores(monkeypatch):
    """NOTE [Spinning hand-offs]: without DPFAST_SPIN_US a pool of CPU replicas spins where its
    workers and the caller's intra-op threads have a core each, and sleeps at once otherwise,
    decided again when the caller's count changes; for GPU replicas the caller counts as one
    thread; a set DPFAST_SPIN_US holds whatever the count."""
    from dpfast.workers import DEFAULT_SPIN_US, WorkerPool

    own = torch.get_num_threads()
    monkeypatch.delenv("DPFAST_SPIN_US", raising=False)
    pool = WorkerPool(1)
    try:
        pool._cores = 2  # as on a 2-core machine, whatever this one has
        for threads, spin in ((1, DEFAULT_SPIN_US), (2, 0), (1, DEFAULT_SPIN_US)):
            torch.set_num_threads(threads)
            assert pool.run([lambda: 0, lambda: 1], [("a", ""), ("b", "")]) == [0, 1]
            assert pool._spin_us == spin and pool._queues[0].spin_us == spin
    finally:
        torch.set_num_threads(own)
        pool.close()
    pool = WorkerPool(1, cpu_lanes=False)
    try:
        pool._cores = 2
        for threads in (1, 2):
            torch.set_num_threads(threads)
            pool.run([lambda: 0, lambda: 1], [("a", ""), ("b", "")])
            assert pool._spin_us == DEFAULT_SPIN_US
    finally:
        torch.set_num_threads(own)
        pool.close()
    monkeypatch.setenv("DPFAST_SPIN_US", "300")
    pool = WorkerPool(1)
    try:
        pool._cores = 2
        for threads in (1, 2):
            torch.set_num_threads(threads)
            pool.run([lambda: 0, lambda: 1], [("a", ""), ("b", "")])
            assert pool._spin_us == 300 and pool._queues[0].spin_us == 300
    finally:
        torch.set_num_threads(own)
        pool.close()
    # A wrapper whose caller uses every core it may: its workers' waits sleep at once.
    monkeypatch.delenv("DPFAST_SPIN_US")
    reference, wrapper = make_pair(device_ids=["cpu"] * 2)
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        trainer = Trainer(reference, wrapper, batch=8)
        trainer.step()
        trainer.assert_in_step()
        assert wrapper._runtime.pool._spin_us == 0
    finally:
        torch.set_num_threads(own)


def test_a_job_queued_without_its_wake_up_still_runs_before_the_next():
    """A KeyboardInterrupt between a put()'s two steps (queue the job, wake the worker) leaves a
    job the semaphore does not count: the worker takes queued jobs first, so both run, in order,
    and the pool goes on."""
    from dpfast.workers import WorkerPool, _Job

    pool = WorkerPool(1)
    try:
        ran = []
        stray = _Job(lambda: ran.append("stray"), ("in a stray job", ""), spin=0)
        pool._queues[0]._jobs.append(stray)  # queued, no release()
        assert pool.run([lambda: ran.append("caller"), lambda: ran.append("worker")], [("a", ""), ("b", "")]) == [None, None]
        stray.done.wait()
        assert ran.index("stray") < ran.index("worker") and "caller" in ran
        assert pool.run([lambda: 1, lambda: 2], [("a", ""), ("b", "")]) == [1, 2]  # and it goes on
    finally:
        pool.close()


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs Python's default SIGINT handler")
def test_ctrl_c_while_waiting_for_the_replicas():
    """A real SIGINT reaches the caller while it waits for a slow replica: KeyboardInterrupt, and
    the next steps are correct (the slow replica finishes its abandoned job first)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    reference, wrapper = make_pair()
    trainer = Trainer(reference, wrapper, batch=8)
    trainer.step()
    workers = worker_threads()
    main = threading.main_thread().ident
    slow = replica_thread_name(1)

    def interrupt_then_finish():
        time.sleep(0.2)  # the caller is waiting for this replica by now
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.3)

    wrapper.module.before = {slow: interrupt_then_finish}
    try:
        with pytest.raises(KeyboardInterrupt):
            wrapper(torch.randn(8, 6, dtype=torch.float64))
    finally:
        wrapper.module.before = {}
    for _ in range(2):
        trainer.step()
    trainer.assert_in_step()
    assert worker_threads() == workers


def test_out_of_memory_names_device_and_chunk_and_a_smaller_batch_works():
    reference, wrapper = make_pair()
    trainer = Trainer(reference, wrapper, batch=8)
    trainer.step()  # 2 rows per replica
    tensors = live_tensors()
    # Replica 2's device has room for 2 rows only (a GPU with less free memory).
    wrapper.module.max_rows = {replica_thread_name(2): 2}
    x = trainer.batch_xy(12)[0]  # 3 rows per replica
    with pytest.raises(torch.OutOfMemoryError) as info:
        wrapper(x)
    message = str(info.value)
    del info, x
    assert "in replica 2 on device cpu" in message and message.endswith("(replica 2 ran a batch chunk of 3 rows)")
    assert "Tried to allocate" in message  # the original message is kept
    trainer.step(8)  # the next step with a smaller batch works, with correct gradients
    trainer.assert_in_step()
    assert live_tensors() == tensors


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.outputs = []

    def forward(self, x):
        y = self.lin(x) * 2
        self.outputs.append(weakref.ref(y))
        return y


def test_workers_do_not_keep_the_last_outputs_alive():
    """After the caller drops the gathered output, no replica's output may stay alive: a worker
    holding its last job keeps one chunk of output (and, with grad, its graph) until the next call."""
    wrapper = dpfast.DataParallel(Recorder().double(), device_ids=CPU4)
    with torch.no_grad():
        out = wrapper(torch.randn(8, 6, dtype=torch.float64))
    del out
    gc.collect()
    alive = sum(ref() is not None for ref in wrapper.module.outputs)
    assert alive == 0, f"{alive} of {len(wrapper.module.outputs)} replica outputs are still alive"


# == long runs ====================================================================================

def load_soak_tool():
    spec = importlib.util.spec_from_file_location("dpfast_tools_soak", REPO / "tools" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOAK_STEPS = 300


def test_soak_no_growth_of_tensors_threads_or_memory():
    """tools/soak.py's loop, short: 300 training steps (uneven and small batches, eval steps, a
    replica failure every 50 steps), measured every 50 steps after a 20-step warmup."""
    soak = load_soak_tool()
    result = soak.soak(SOAK_STEPS, replicas=4, check_every=50, warmup=20, fail_every=50, eval_every=10)
    rows = result["rows"]
    assert len(rows) == SOAK_STEPS // 50 + 1
    problems = soak.growth_problems(rows, tensor_slack=0, thread_slack=0, rss_bound_mib=32.0)
    table = "\n".join(f"{r['step']:>5} {r['tensors']:>7} {r['threads']:>4} {r['rss_mib']:>8.1f}" for r in rows)
    assert not problems, "\n".join(problems) + "\n" + table
    assert result["failures_injected"] == SOAK_STEPS // 50 + (20 // 50)
    assert result["failures_seen"] == result["failures_injected"]
    assert result["max_param_diff"] < 1e-9
    assert result["replica_builds"] == 1


def test_soak_tool_command_line(capsys):
    soak = load_soak_tool()
    assert soak.main(["--steps", "20", "--replicas", "3", "--check-every", "10", "--warmup", "5",
                      "--fail-every", "7"]) == 0
    out = capsys.readouterr().out
    assert "live tensors" in out and "RSS MiB" in out and "OK: no growth" in out


# == copies, pickles, forks =======================================================================

def clone(wrapper, how):
    if how == "deepcopy":
        return copy.deepcopy(wrapper)
    if how == "pickle":
        return pickle.loads(pickle.dumps(wrapper))
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_trains_like_the_original(how):
    _, wrapper = make_pair(mlp)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=data, dtype=torch.float64), torch.randn(10, 3, generator=data,
                                                                                  dtype=torch.float64)
    nn.functional.mse_loss(wrapper(x), y).backward()
    opt.step()
    opt.zero_grad()
    workers = worker_threads()
    twin = clone(wrapper, how)
    assert type(twin) is type(wrapper) and twin.device_ids == wrapper.device_ids and twin.dim == wrapper.dim
    for p, q in zip(wrapper.parameters(), twin.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    assert torch.equal(twin(x), wrapper(x))
    for _ in range(2):
        x, y = torch.randn(10, 6, generator=data, dtype=torch.float64), torch.randn(10, 3, generator=data,
                                                                                      dtype=torch.float64)
        for model, optimizer in ((wrapper, opt), (twin, twin_opt)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for p, q in zip(wrapper.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert workers <= worker_threads() and all(t.is_alive() for t in workers)  # the original's are untouched
    assert len(worker_threads() - workers) == 3  # the copy has workers of its own


def test_a_dropped_wrapper_stops_its_workers_and_frees_its_replicas():
    """A sweep that builds one wrapper per trial must not accumulate threads and replica memory.
    (The runtime's finalizer is registered with a callable that reaches the wrapper, through
    the reducer's phase callback, so the wrapper can never be collected.)"""
    before = worker_threads()
    wrapper = dpfast.DataParallel(mlp().double(), device_ids=CPU4)
    wrapper(torch.randn(8, 6, dtype=torch.float64)).sum().backward()
    mine = worker_threads() - before
    assert len(mine) == 3
    alive = weakref.ref(wrapper)
    reducer = weakref.ref(wrapper._runtime.reducer)  # its C++ hooks call back into it: no cycle may keep it
    replica_param = weakref.ref(wrapper._runtime.replicas.replica_tensors[1][0])
    del wrapper
    gc.collect()
    assert alive() is None, "the wrapper is still referenced after the user dropped it"
    assert reducer() is None and replica_param() is None, "the reducer or the replicas outlive the wrapper"
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in mine), "its worker threads are still running"


def test_dataloader_with_forked_workers_after_the_wrapper_ran():
    faulthandler.dump_traceback_later(120, exit=True)  # the last resort should the parent hang
    try:
        reference, wrapper = make_pair(mlp)
        trainer = Trainer(reference, wrapper, batch=8)
        trainer.step()  # the workers exist and have run
        workers = worker_threads()
        data = torch.Generator().manual_seed(5)
        dataset = torch.utils.data.TensorDataset(torch.randn(48, 6, generator=data, dtype=torch.float64),
                                                 torch.randn(48, 3, generator=data, dtype=torch.float64))
        loader = torch.utils.data.DataLoader(dataset, batch_size=12, num_workers=2,
                                             multiprocessing_context="fork", timeout=30)
        for _ in range(2):
            for x, y in loader:
                for model, optimizer in ((reference, trainer.opt_ref), (wrapper, trainer.opt)):
                    optimizer.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    optimizer.step()
        trainer.assert_in_step()
        assert worker_threads() == workers
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_a_forked_child_can_use_the_wrapper():
    """A process forked after the wrapper ran (multiprocessing with fork, a DataLoader worker
    that calls the model) has none of the parent's worker threads: a call must not wait for
    them forever."""
    _, wrapper = make_pair(mlp)
    x = torch.randn(8, 6, dtype=torch.float64)
    expected = wrapper(x).detach()
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        with torch.no_grad():
            send.send(wrapper(x).tolist())  # plain values: a tensor's shared storage dies with the child

    process = ctx.Process(target=child, daemon=True)
    process.start()
    process.join(5)
    hung = process.is_alive()
    if hung:
        process.kill()
        process.join(5)
    assert not hung, "the forked child hung in the wrapper's forward (its workers are not there)"
    assert process.exitcode == 0
    assert receive.poll(5) and torch.equal(torch.tensor(receive.recv(), dtype=expected.dtype), expected)


# == checkpoints in a new process, interpreter exit ===============================================

CHECKPOINT_SCRIPT = """
import os, sys, time
import torch
from torch import nn
import dpfast

mode, checkpoint, final, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 3)).double()
wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * 4)
opt = torch.optim.Adam(wrapper.parameters(), lr=0.01)
schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

def step(i):
    data = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=data, dtype=torch.float64)
    y = torch.randn(16, 3, generator=data, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.mse_loss(wrapper(x), y).backward()
    opt.step()
    schedule.step()

def state():
    return {"model": wrapper.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict()}

if mode == "through":  # never stops: k steps, a checkpoint on the way, one more step
    for i in range(k):
        step(i)
    torch.save(state(), checkpoint + ".tmp")
    os.replace(checkpoint + ".tmp", checkpoint)
    step(k)
else:  # another process (started alongside, to overlap the imports): load the checkpoint, one more step
    deadline = time.monotonic() + 100
    while not os.path.exists(checkpoint):
        if time.monotonic() > deadline:
            sys.exit("no checkpoint appeared")
        time.sleep(0.02)
    saved = torch.load(checkpoint)
    wrapper.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    schedule.load_state_dict(saved["schedule"])
    step(k)
torch.save(state(), final)
print("done")
"""


def assert_bit_identical(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_bit_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bit_identical(u, v, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def start_script(source: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(source), *map(str, args)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_all(procs: dict, timeout: float) -> dict:
    """{name: (returncode, stdout, stderr)}; fails the test naming every process that had not
    exited within `timeout` seconds (all of them are killed)."""
    deadline = time.monotonic() + timeout
    results, hung = {}, []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung.append(name)
        results[name] = (proc.returncode, out, err)
    if hung:
        pytest.fail(f"did not exit within {timeout} s (a hang): {hung}; stderr: "
                    f"{[results[n][2][-2000:] for n in hung]}")
    return results


def test_checkpoint_round_trip_in_a_new_process_is_bit_identical(tmp_path):
    """k steps, save model + optimizer + scheduler, then a new process loads and does step k+1:
    bit-identical (float64, deterministic algorithms, BatchNorm buffers, Adam state) to the
    process that never stopped."""
    k = 4
    checkpoint, through, resumed = tmp_path / "k.pt", tmp_path / "through.pt", tmp_path / "resumed.pt"
    results = finish_all({"resume": start_script(CHECKPOINT_SCRIPT, "resume", checkpoint, resumed, k),
                          "through": start_script(CHECKPOINT_SCRIPT, "through", checkpoint, through, k)}, 120)
    for name, (code, out, err) in results.items():
        assert code == 0 and "done" in out, f"{name}: exit status {code}\n{err[-3000:]}"
    a, b = torch.load(through), torch.load(resumed)
    saved = torch.load(checkpoint)
    assert not torch.equal(saved["model"]["module.0.weight"], a["model"]["module.0.weight"])  # the step did something
    assert a["model"]["module.1.num_batches_tracked"].item() == k + 1
    assert_bit_identical(a, b)


EXIT_SCRIPT = """
import signal, sys, threading, time
import torch
from torch import nn
import dpfast

scenario = sys.argv[1]
# A shell that starts this test in the background leaves SIGINT ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.slow = False

    def forward(self, x):
        me = threading.current_thread().name
        if self.slow and me == "dpfast-replica-1":  # Ctrl-C reaches the caller, this replica keeps running
            time.sleep(0.2)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(1.5)
        return self.lin(x)

net = Net()
wrapper = dpfast.DataParallel(net, device_ids=["cpu"] * 4)
cycle = [wrapper]
cycle.append(cycle)  # and kept alive by a reference cycle too
opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
wrapper(torch.randn(8, 6)).sum().backward()
opt.step()
if scenario == "busy":
    net.slow = True
    try:
        wrapper(torch.randn(8, 6))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
print("done", flush=True)
"""

EXIT_SCENARIOS = ["plain", "busy"]


def test_interpreter_exit_with_a_wrapper_alive_does_not_hang():
    """Two interpreters at once, each exits without any cleanup: after a training step; and while
    a replica is still running its forward (Ctrl-C reached the caller, which then ends)."""
    results = finish_all({name: start_script(EXIT_SCRIPT, name) for name in EXIT_SCENARIOS}, 60)
    for name, (code, out, err) in results.items():
        assert code == 0 and "done" in out, f"{name}: exit status {code}, stdout {out!r}\n{err[-3000:]}"
        assert "Fatal Python error" not in err and "Traceback" not in err, f"{name}:\n{err[-3000:]}"
    assert "interrupted" in results["busy"][1]


class _KeepsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x):
        self.last = self.lin(x)  # a module that keeps its output (a debugging aid, a forward hook)
        return self.last


class _OverridesGather(dpfast.DataParallel):
    def gather(self, outputs, output_device):
        return super().gather(outputs, output_device)


@pytest.mark.parametrize("cls", [dpfast.DataParallel, _OverridesGather])
def test_a_wrapper_dropped_between_forward_and_backward_still_reduces(cls):
    """nn.DataParallel keeps nothing between calls, so `DataParallel(m)(x).sum().backward()` or a
    helper that wraps per call gives full gradients; the graph keeps dpfast's reducer alive for as
    long as it lives (retain_graph included), and everything goes with it."""
    torch.manual_seed(0)
    reference = _KeepsOutput()
    module = copy.deepcopy(reference)
    x = torch.randn(8, 4, dtype=torch.float64)
    before = worker_threads()
    wrapped = cls(module, device_ids=["cpu"] * 4)
    loss = wrapped(x).sum()
    runtime = weakref.ref(wrapped._runtime)
    del wrapped
    gc.collect()
    assert worker_threads() == before  # the workers went with the wrapper
    for _ in range(2):
        loss.backward(retain_graph=True)
        reference(x).sum().backward()
        torch.testing.assert_close(module.lin.weight.grad, reference.lin.weight.grad, rtol=1e-12, atol=1e-12)
    del loss
    module.last = None  # the module's own reference to the graph
    gc.collect()
    assert runtime() is None  # and the reducer with the graph
    module.zero_grad()
    reference.zero_grad()
    module(x).sum().backward()  # the module itself is left as it was: no hook of dpfast's on it
    reference(x).sum().backward()
    torch.testing.assert_close(module.lin.weight.grad, reference.lin.weight.grad, rtol=1e-12, atol=1e-12)


def test_a_module_that_keeps_its_output_is_freed_with_its_wrapper():
    """With gather=False the outputs' nodes are the module's own: nothing of dpfast's goes there,
    or a module keeping its output would hold its wrapper's runtime in a cycle through C++."""
    for gather in (True, False):
        wrapped = dpfast.DataParallel(_KeepsOutput(), device_ids=["cpu"] * 4, gather=gather)
        out = wrapped(torch.randn(8, 4, dtype=torch.float64))
        module = weakref.ref(wrapped.module)
        del wrapped, out
        gc.collect()
        assert module() is None, f"gather={gather}"


def test_replicas_rebuilt_between_forward_and_backward_still_reduce_the_first_forward():
    """A structure change between two forwards of one backward rebuilds the replicas; the first
    forward's graph still reaches its reducer (it holds it), so no replica's share is lost."""
    torch.manual_seed(0)
    reference = nn.Linear(4, 2).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 4)
    x1, x2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    out1 = wrapped(x1)
    wrapped.module.register_buffer("added", torch.zeros(1, dtype=torch.float64))  # a new structure
    reference.register_buffer("added", torch.zeros(1, dtype=torch.float64))
    out2 = wrapped(x2)
    assert wrapped.stats()["replica_builds"] == 2
    (out1.sum() + out2.sum()).backward()
    (reference(x1).sum() + reference(x2).sum()).backward()
    torch.testing.assert_close(wrapped.module.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    wrapped.zero_grad()
    reference.zero_grad()
    wrapped(x1).sum().backward()  # and the next step reduces on the new replicas alone
    reference(x1).sum().backward()
    torch.testing.assert_close(wrapped.module.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)


class _RecordThreadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seen, x):
        ctx.seen = seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen[threading.current_thread().name] = torch.get_num_threads()
        return None, grad


class RecordsIntraOpThreads(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = {}  # {thread name: torch.get_num_threads() there}, shared by the replicas
        self.seen_in_backward = {}

    def forward(self, x):
        self.seen[threading.current_thread().name] = torch.get_num_threads()
        return _RecordThreadsInBackward.apply(self.seen_in_backward, self.linear(x))


@contextlib.contextmanager
def callers_threads(monkeypatch, threads: int, *, idle_threads_sleep: bool, parallel_backward: str = "auto"):
    """For the NOTE [CPU threads] tests: the caller on ``threads`` intra-op threads (its own count
    again afterwards), dpfast reading OMP_WAIT_POLICY as PASSIVE or not, and
    DPFAST_PARALLEL_BACKWARD."""
    from dpfast import workers as dp_workers

    monkeypatch.setattr(dp_workers, "_IDLE_THREADS_SLEEP", idle_threads_sleep)
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel_backward)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads,replicas,caller,workers", [(8, 4, 2, [2, 2, 2]), (7, 2, 4, [3]), (1, 3, 1, [1, 1])])
def test_cpu_replicas_share_out_the_callers_threads_and_give_them_back(threads, replicas, caller, workers,
                                                                       monkeypatch):
    """NOTE [CPU threads]: where idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE), each worker
    gets an equal share of the caller's intra-op threads, and the caller runs replica 0 (forward,
    and its part of the routed backward) on what is left; after the backward the caller's count,
    and the default of a thread started later, are its own again."""
    with callers_threads(monkeypatch, threads, idle_threads_sleep=True):
        model = RecordsIntraOpThreads()
        wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * replicas)
        caller_name = threading.current_thread().name
        for _ in range(2):
            out = wrapper(torch.randn(8, 4))
            assert torch.get_num_threads() == threads  # the loss runs on every thread
            out.sum().backward()
            assert torch.get_num_threads() == threads
            for seen in (model.seen, model.seen_in_backward):
                assert seen.pop(caller_name) == caller
                assert sorted(seen.values()) == workers
                seen.clear()
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [threads]


@pytest.mark.parametrize("pause_setting", ["1", "0"])
def test_under_the_default_wait_policy_the_callers_idle_team_is_paused_where_it_shares(pause_setting, monkeypatch):
    """NOTE [CPU threads]: under the default wait policy, with one thread per worker (2 threads, 2
    replicas), the caller runs replica 0 on its share and pauses its idle OpenMP team each time it
    takes it (forward, and the routed backward), through libgomp's omp_pause_resource_all where
    torch runs on libgomp; DPFAST_OMP_PAUSE=0 turns that off, and the caller keeps its count.
    Training stays exact either way. (No step here counts as after a sleep of the caller: NOTE
    [Idle caller], tested below.)"""
    from dpfast import workers as dp_workers

    monkeypatch.setattr(dp_workers, "IDLE_CALLER_S", math.inf)
    dp_workers.note_caller_busy()  # the first forward of a thread counts as after a sleep
    monkeypatch.setattr(dp_workers, "_pause_team", dp_workers._NOT_LOOKED_UP)  # looked up again, with the setting
    monkeypatch.setenv("DPFAST_OMP_PAUSE", pause_setting)
    real = dp_workers._omp_pause()
    if pause_setting == "1" and real is None:
        pytest.skip("torch here does not run on libgomp (or its omp_pause_resource_all is missing)")
    calls = []
    if real is not None:
        def counted(kind):
            calls.append(kind)
            return real(kind)  # the real pause: the caller's team is started again by its next region
        monkeypatch.setattr(dp_workers, "_pause_team", counted)
    with callers_threads(monkeypatch, 2, idle_threads_sleep=False):
        torch.manual_seed(0)
        reference = nn.Linear(6, 3).double()  # integer-valued inputs: the gradients sum exactly
        model = RecordsIntraOpThreads()
        model.linear = copy.deepcopy(reference)
        wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * 2)
        caller_name = threading.current_thread().name
        for _ in range(2):
            x = torch.randint(-3, 4, (10, 6)).double()
            reference.zero_grad()
            wrapper.zero_grad()
            wrapper(x).sum().backward()
            reference(x).sum().backward()
            for p, q in zip(reference.parameters(), model.linear.parameters()):
                assert torch.equal(p.grad, q.grad)
            assert torch.get_num_threads() == 2
        sharing = pause_setting == "1"
        assert model.seen[caller_name] == (1 if sharing else 2)
        assert model.seen_in_backward[caller_name] == (1 if sharing else 2)
        assert calls == ([1] * 4 if sharing else [])  # omp_pause_soft, forward and backward of both steps


def test_a_caller_that_slept_is_told_from_one_that_worked(monkeypatch):
    """NOTE [Idle caller]: time off its core since note_caller_busy (wall time less the thread's CPU
    time), having blocked, decides: a busy thread preempted for longer than the limit (a loaded
    machine) did not sleep; a thread that never finished a step counts as having slept."""
    from dpfast import workers as dp_workers

    limit = 0.01
    monkeypatch.setattr(dp_workers, "IDLE_CALLER_S", limit)
    dp_workers.note_caller_busy()
    end = time.perf_counter() + 3 * limit
    while time.perf_counter() < end:  # busy for longer than the limit
        pass
    busy = dp_workers.caller_slept()
    dp_workers.note_caller_busy()
    time.sleep(10 * limit)
    slept = dp_workers.caller_slept()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(dp_workers.caller_slept()))
    thread.start()
    thread.join()
    assert (busy, slept, seen) == (False, True, [True])


def test_a_step_after_the_caller_slept_does_not_pause_its_team(monkeypatch):
    """NOTE [Idle caller]: with 2 threads and 2 replicas under the default wait policy, a step that
    follows the previous one at once runs the caller on its share and pauses its team (forward and
    routed backward); a step after the caller slept (a data loader's wait) keeps its count, pauses
    nothing and walks the replicas' graphs in turn; the step after that shares again. Exact
    throughout."""
    from dpfast import workers as dp_workers

    if dp_workers._omp_pause() is None:
        pytest.skip("torch here does not run on libgomp (or its omp_pause_resource_all is missing)")
    real = dp_workers._omp_pause()
    calls = []
    monkeypatch.setattr(dp_workers, "_pause_team", lambda kind: (calls.append(kind), real(kind))[1])
    monkeypatch.setattr(dp_workers, "IDLE_CALLER_S", 0.05)  # a margin for a loaded machine
    with callers_threads(monkeypatch, 2, idle_threads_sleep=False):
        torch.manual_seed(0)
        reference = nn.Linear(6, 3).double()
        model = RecordsIntraOpThreads()
        model.linear = copy.deepcopy(reference)
        wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * 2)
        caller_name = threading.current_thread().name

        def step():
            x = torch.randint(-3, 4, (10, 6)).double()
            reference.zero_grad()
            wrapper.zero_grad()
            calls.clear()
            out = wrapper(x)
            went_through_route = routed(out)
            out.sum().backward()
            reference(x).sum().backward()
            for p, q in zip(reference.parameters(), model.linear.parameters()):
                assert torch.equal(p.grad, q.grad)
            assert torch.get_num_threads() == 2
            return went_through_route, len(calls), model.seen[caller_name], model.seen_in_backward[caller_name]

        step()  # the first forward counts as after a sleep
        assert step() == (True, 2, 1, 1)
        time.sleep(0.5)
        assert step() == (False, 0, 2, 2)
        assert step() == (True, 2, 1, 1)


def test_a_bad_omp_pause_setting_names_the_variable(monkeypatch):
    """Named when a wrapper builds its runtime, whether or not its caller would pause; empty is the
    default."""
    from dpfast import workers as dp_workers

    monkeypatch.setenv("DPFAST_OMP_PAUSE", "")
    assert dp_workers.omp_pause_setting() is True
    monkeypatch.setenv("DPFAST_OMP_PAUSE", "yes")
    wrapper = dpfast.DataParallel(nn.Linear(4, 2), device_ids=["cpu"] * 2)
    with pytest.raises(ValueError, match=r"DPFAST_OMP_PAUSE: expected '1' or '0', but got 'yes'"):
        wrapper(torch.randn(4, 4))
    monkeypatch.setenv("DPFAST_OMP_PAUSE", "0")
    assert wrapper(torch.randn(4, 4)).shape == (4, 2)  # and the wrapper works once it is set right


def test_under_the_default_wait_policy_the_caller_keeps_its_threads_and_walks_the_graphs(monkeypatch):
    """NOTE [CPU threads]: where idle OpenMP threads spin (OMP_WAIT_POLICY unset), the workers take a
    share of the caller's 8 threads (2 each of 4 replicas) and the caller keeps its 8, forward and
    backward, where autograd walks every replica's graph on the caller's thread (auto)."""
    with callers_threads(monkeypatch, 8, idle_threads_sleep=False):
        model = RecordsIntraOpThreads()
        wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * 4)
        wrapper(torch.randn(8, 4)).sum().backward()
        caller_name = threading.current_thread().name
        assert model.seen.pop(caller_name) == 8 and sorted(model.seen.values()) == [2, 2, 2]
        assert model.seen_in_backward == {caller_name: 8}
        assert torch.get_num_threads() == 8


def test_a_backward_that_raises_gives_the_callers_threads_back(monkeypatch):
    """NOTE [CPU threads]: a backward that raises in replica 0's part never reaches its end, where
    the caller's threads go back: they go back as its graph task, with the end-of-backward callback
    it never ran, is dropped, before the user's code sees the error; and the next forward of any
    wrapper (the functional form makes a new one each call) would put them back too."""
    with callers_threads(monkeypatch, 4, idle_threads_sleep=True, parallel_backward="1"):
        model = RecordsIntraOpThreads()
        caller_name = threading.current_thread().name

        def fail_in_the_caller(grad):
            if threading.current_thread().name == caller_name:
                raise RuntimeError("replica 0's backward failed")
        out = dpfast.data_parallel(model, torch.randn(8, 4), ["cpu"] * 2)
        hook = model.linear.weight.register_hook(fail_in_the_caller)  # the root's weight: replica 0's graph
        with pytest.raises(RuntimeError, match="replica 0's backward failed"):
            out.sum().backward()
        assert torch.get_num_threads() == 4  # back as the error left the backward
        hook.remove()
        model.seen.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hook warning, for the hook gone by now
            dpfast.data_parallel(model, torch.randn(8, 4), ["cpu"] * 2).sum().backward()
        assert torch.get_num_threads() == 4
        assert model.seen.pop(caller_name) == 2 and list(model.seen.values()) == [2]


def test_two_wrappers_in_one_backward_give_the_callers_threads_back(monkeypatch):
    """NOTE [CPU threads]: two wrappers' routed nodes in one backward (each reducer with an end of
    its own) share the caller's threads once and give back its own count, not the other's share;
    a count the user lowered between forward and backward is never raised."""
    with callers_threads(monkeypatch, 8, idle_threads_sleep=True):
        first = dpfast.DataParallel(RecordsIntraOpThreads(), device_ids=["cpu"] * 2)
        second = dpfast.DataParallel(RecordsIntraOpThreads(), device_ids=["cpu"] * 4)
        (first(torch.randn(8, 4)).sum() + second(torch.randn(8, 4)).sum()).backward()
        assert torch.get_num_threads() == 8
        caller_name = threading.current_thread().name
        assert {first.module.seen_in_backward[caller_name], second.module.seen_in_backward[caller_name]} <= {2, 4}
        out = first(torch.randn(8, 4))
        torch.set_num_threads(1)
        first.module.seen_in_backward.clear()
        out.sum().backward()
        assert first.module.seen_in_backward[caller_name] == 1 and torch.get_num_threads() == 1


def test_backward_failure_then_zero_grad_that_keeps_the_gradient_tensors():
    """NOTE [Root gradients in the bucket]: buckets reduced before the failure already hold every
    replica's share in .grad; zero_grad(set_to_none=False) zeroes those views in place (after the
    reductions, on CUDA), and the next steps are exact."""
    reference, wrapper = make_pair()
    trainer = Trainer(reference, wrapper, batch=10)
    trainer.step()
    wrapper.module.fail_backward_on = frozenset({replica_thread_name(3)})
    wrapper.module.make_error = lambda: RuntimeError("backward failed")
    x, y = trainer.batch_xy()
    with pytest.raises(RuntimeError, match="backward failed"):
        nn.functional.mse_loss(wrapper(x), y).backward()
    wrapper.module.fail_backward_on = frozenset()
    for _ in range(2):
        x, y = trainer.batch_xy()
        for model, optimizer in ((reference, trainer.opt_ref), (wrapper, trainer.opt)):
            optimizer.zero_grad(set_to_none=False)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        trainer.assert_in_step()


NO_CYCLES_SCRIPT = """
import gc
import torch
from torch import nn
import dpfast
gc.collect()
model = dpfast.DataParallel(nn.Linear(1, 1), device_ids=["cpu"] * 2)
model(torch.randn(2, 1))
first = gc.collect()
model(torch.randn(2, 1)).sum().backward()
print("cycles", first, gc.collect())
"""


def test_the_first_call_in_a_process_leaves_no_reference_cycles():
    """PyTorch's test_data_parallel_model_no_refcycles, in a new process so that the first call
    does its one-time lookups there: the collector finds nothing after a forward, nor after a
    training step."""
    code, out, err = finish_all({"cycles": start_script(NO_CYCLES_SCRIPT)}, 120)["cycles"]
    assert code == 0, err[-3000:]
    assert out.split() == ["cycles", "0", "0"], out


class AllocatesThenFails(nn.Module):
    def __init__(self, alive: list):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.alive = alive

    def forward(self, x):
        activation = self.linear(x).exp()
        self.alive.append(weakref.ref(activation))
        raise RuntimeError("out of memory (simulated)")


def test_a_replicas_error_frees_every_replicas_activations_at_once():
    """As on one device and under nn.DataParallel (which keeps the replica's traceback as text):
    once the caller has handled a replica's error, nothing of the failed forward is alive, with the
    garbage collector off (an out-of-memory retry needs that memory back at once)."""
    alive = []
    wrapped = dpfast.DataParallel(AllocatesThenFails(alive), device_ids=CPU4)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"Caught RuntimeError in replica \d on device cpu[\s\S]*"
                                                   r"out of memory \(simulated\)"):
                wrapped(torch.randn(8, 4))
            assert len(alive) == 4 and [ref() for ref in alive] == [None] * 4
            alive.clear()
    finally:
        gc.enable()
