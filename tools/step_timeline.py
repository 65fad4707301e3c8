"""One CPU-replica training step as a timeline, and what running replicas side by side costs the
machine by itself.

Two parts, for the question "where do a step's milliseconds over the bare module go":

1. Timeline. Trains --steps steps of DataParallel(device_ids=["cpu"] * N) and prints, per thread,
   the median time from the step's start at which each point is reached (the caller's phases,
   each job's start and end on each thread, the waits), then each thread's jobs with their thread
   CPU time beside their wall time: a job whose CPU time is close to its wall time was computing,
   not waiting for the GIL or for another thread.
2. Side by side. Each replica's forward and backward on its chunk (a loss of its own, no gather,
   no reduction), run through the wrapper's own threads: one replica alone while the other threads
   idle, then all at once. "side/alone" above 1 is what the machine loses by running the replicas'
   compute at the same time (shared caches and memory bandwidth, the GIL between the threads'
   Python), before dpfast adds any bookkeeping; it bounds what any thread-based replication can
   reach on this machine.

    PYTHONPATH=. python tools/step_timeline.py [--workload vgg:tiny:8] [--replicas 2] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time

import torch
from torch.nn import functional as F

import dpfast
from dpfast import reducer, replicas, workers
from bench import workloads

# (perf_counter seconds, thread name, label) of the step being recorded
MARKS: list = []
# thread name -> [(thread CPU seconds, wall seconds)] of each job it ran, in order
JOBS: dict = collections.defaultdict(list)


def mark(label: str) -> None:
    MARKS.append((time.perf_counter(), threading.current_thread().name, label))


def _instrument() -> None:
    """Marks at the points of a step, by wrapping the front end's functions (nothing else changes)."""
    run = workers._Job.run

    def timed_run(self, signal=True):
        mark("job start")
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return run(self, signal)
        finally:
            JOBS[threading.current_thread().name].append((time.thread_time() - cpu, time.perf_counter() - wall))
            mark("job end")
    workers._Job.run = timed_run

    wait = workers._Done.wait

    def timed_wait(self):
        mark("wait for a worker")
        wait(self)
        mark("waited")
    workers._Done.wait = timed_wait

    put = workers._Inbox.put

    def timed_put(self, job):
        mark("job handed to a worker")
        put(self, job)
    workers._Inbox.put = timed_put

    data_parallel = sys.modules["dpfast.data_parallel"]
    for cls, name, label in ((data_parallel.DataParallel, "forward", "wrapper forward"),
                             (replicas.ReplicaSet, "sync", "replica sync"),
                             (data_parallel.DataParallel, "gather", "gather"),
                             (reducer.GradReducer, "_end_of_backward", "end of backward")):
        setattr(cls, name, _between(getattr(cls, name), label))


def _between(fn, label: str):
    def marked(*args, **kwargs):
        mark(f"{label} starts")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{label} ends")
    return marked


def timeline(model, x, y, steps: int, warmup: int = 10) -> float:
    """Trains, keeping the marks of the steps after the warm-up; prints the timeline. Returns the
    median step time in ms."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    recorded, step_times = [], []
    for step in range(warmup + steps):
        MARKS.clear()
        mark("step starts")
        optimizer.zero_grad()
        mark("zero_grad done")
        output = model(x)
        mark("forward returned")
        loss = F.cross_entropy(output, y)
        mark("loss.backward() called")
        loss.backward()
        mark("backward returned")
        optimizer.step()
        mark("optimizer step done")
        if step >= warmup:
            recorded.append(list(MARKS))
            step_times.append(MARKS[-1][0] - MARKS[0][0])
    offsets = collections.defaultdict(list)
    for marks in recorded:
        start, seen = marks[0][0], collections.Counter()
        for at, thread, label in marks:
            key = (thread, label, seen[thread, label])
            seen[thread, label] += 1
            offsets[key].append((at - start) * 1e6)
    # Points reached in at least 90 % of the steps, in the order of their median time
    rows = sorted((statistics.median(times), key) for key, times in offsets.items() if len(times) >= 0.9 * steps)
    print(f"{'at_us':>9}  {'thread':<18} point")
    for at_us, (thread, label, occurrence) in rows:
        print(f"{at_us:>9.0f}  {thread:<18} {label}{f' ({occurrence + 1})' if occurrence else ''}")
    print(f"\n{'thread':<18} {'job':>4} {'cpu_us':>9} {'wall_us':>9}  (median over the steps; jobs in step order)")
    for thread, jobs in JOBS.items():
        per_step = len(jobs) // (warmup + steps)
        for j in range(per_step):
            kept = jobs[warmup * per_step + j::per_step]
            print(f"{thread:<18} {j + 1:>4} {statistics.median(c for c, _ in kept) * 1e6:>9.0f} "
                  f"{statistics.median(w for _, w in kept) * 1e6:>9.0f}")
    return statistics.median(step_times) * 1e3


def side_by_side(model, x, y, rounds: int) -> None:
    """Each replica's forward and backward on its chunk, alone and all at once, on the wrapper's
    threads (replica 0 on the caller)."""
    runtime = model._runtime
    replica_modules = [mods[0] for mods in runtime.replicas.replica_modules]
    xs, ys = x.chunk(len(replica_modules)), y.chunk(len(replica_modules))

    def train(k):
        def run():
            start = time.perf_counter()
            F.cross_entropy(replica_modules[k](xs[k]), ys[k]).backward()
            return time.perf_counter() - start
        return run

    def idle():
        return 0.0
    n = len(replica_modules)
    wheres = [(f"in replica {k}", "") for k in range(n)]
    threads = torch.get_num_threads()
    alone, together = [[] for _ in range(n)], [[] for _ in range(n)]
    for _ in range(rounds):  # interleaved, so that a noisy machine affects both alike
        for k in range(n):
            alone[k].append(runtime.pool.run([train(j) if j == k else idle for j in range(n)], wheres, threads)[k])
        for k, seconds in enumerate(runtime.pool.run([train(j) for j in range(n)], wheres, threads)):
            together[k].append(seconds)
    alone, together = [statistics.median(a) for a in alone], [statistics.median(t) for t in together]
    print(f"\n{'replica':<8} {'thread':<18} {'alone_us':>9} {'side_us':>9} {'side/alone':>10}  "
          f"(forward and backward of the replica's chunk, {threads} intra-op thread(s) each, median of {rounds})")
    names = ["caller"] + [t.name for t in runtime.pool.threads]
    for k in range(n):
        print(f"{k:<8} {names[k]:<18} {alone[k] * 1e6:>9.0f} {together[k] * 1e6:>9.0f} {together[k] / alone[k]:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vgg:tiny:8", metavar="NAME:SIZE:BATCH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the caller")
    args = parser.parse_args()
    name, size, batch = args.workload.split(":")
    torch.set_num_threads(args.threads)
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(int(batch), 0)
    model = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * args.replicas)
    _instrument()
    print(f"{args.workload}, {args.replicas} CPU replicas, caller on {args.threads} intra-op thread(s), "
          f"torch {torch.__version__}\n")
    step_ms = timeline(model, x, y, args.steps)
    print(f"\nmedian step {step_ms:.2f} ms")
    side_by_side(model, x, y, rounds=max(args.steps // 4, 3))


if __name__ == "__main__":
    main()
