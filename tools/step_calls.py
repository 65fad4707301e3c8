"""Where a CPU-replica step's fixed cost goes: each engine call's time inside the step, and the
hand-offs between the caller and the workers.

Inside a step, right after the replicas' compute has evicted the caches, a call costs several times
what it costs in a timeit loop; this measures the calls where they run. It wraps dpfast._C's
functions as the front end calls them (the module attributes dpfast/*.py imported) and the
workers' completion event, trains for --steps, and prints per call: calls per step and the median
microseconds, then the median hand-off time from a worker's completion (measured just before it
sets the event) to the waiting caller running again. A trivial ATen call made first thing in a step
and then again shows the cold-call effect by itself.

    PYTHONPATH=. python tools/step_calls.py [--workload vgg:tiny:8] [--replicas 2] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.nn import functional as F

import dpfast
from dpfast import backward, reducer, replicas, scatter_gather, workers
from bench import workloads

TIMES = collections.defaultdict(list)


class _TimedEngine:
    """dpfast._C as one front-end module sees it, every call timed under `label.name`."""

    def __init__(self, engine, label: str):
        self._engine, self._label = engine, label

    def __getattr__(self, name):
        value = getattr(self._engine, name)
        if not callable(value) or isinstance(value, type):
            return value

        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return value(*args, **kwargs)
            finally:
                TIMES[f"{self._label}._C.{name}"].append(time.perf_counter_ns() - start)
        return timed


def _time_hand_offs() -> None:
    set_event, wait = workers._Done.set, workers._Done.wait
    last_set = {}

    def timed_set(self):
        last_set[id(self)] = time.perf_counter_ns()
        set_event(self)

    def timed_wait(self):
        began = time.perf_counter_ns()
        wait(self)
        at = last_set.pop(id(self), None)
        if at is not None and at >= began:  # the worker finished while the caller waited for it
            TIMES["hand-off: worker done -> caller running"].append(time.perf_counter_ns() - at)
    workers._Done.set, workers._Done.wait = timed_set, timed_wait

    get = workers._Inbox.get

    def timed_get(self, done=None):  # a worker sets done inside get(): time it from the call
        if done is not None:
            last_set[id(done)] = time.perf_counter_ns()
        return get(self, done)
    workers._Inbox.get = timed_get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vgg:tiny:8", metavar="NAME:SIZE:BATCH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the caller (README's advice: 1)")
    args = parser.parse_args()
    name, size, batch = args.workload.split(":")
    batch = int(batch)
    for module, label in ((replicas, "replicas"), (reducer, "reducer"), (scatter_gather, "scatter_gather"),
                          (backward, "backward")):
        module._C = _TimedEngine(module._C, label)
    _time_hand_offs()
    torch.set_num_threads(args.threads)
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(batch, 0)
    model = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * args.replicas)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_times = []
    for step in range(args.steps + 10):
        if step == 10:
            TIMES.clear()
        start = time.perf_counter()
        first = time.perf_counter_ns()
        torch.empty(0)
        second = time.perf_counter_ns()
        torch.empty(0)
        TIMES["torch.empty(0), first call of the step"].append(second - first)
        TIMES["torch.empty(0), called again"].append(time.perf_counter_ns() - second)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").div(batch).backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    print(f"{args.workload}, {args.replicas} CPU replicas, {args.threads} intra-op thread(s), torch {torch.__version__}, "
          f"DPFAST_SPIN_US {model._runtime.pool._spin_us}; median step {statistics.median(step_times[10:]) * 1e3:.2f} ms")
    print(f"{'call':<48}{'per step':>9}{'median_us':>11}")
    for label, times in sorted(TIMES.items()):
        print(f"{label:<48}{len(times) / args.steps:>9.1f}{statistics.median(times) / 1e3:>11.1f}")


if __name__ == "__main__":
    main()
