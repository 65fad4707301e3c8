"""dpfast's per-step overhead on CPU replicas, split into what the split itself
costs and what dpfast adds.

Three systems train the same model on the same batch, interleaved round by
round so that a noisy machine affects them alike:
- bare: the module on the full batch (the issue's baseline);
- chunks in sequence: the bare module called on each replica's chunk one
  after the other, in one step (the same arithmetic as N replicas, with no
  threads, copies or reductions: what splitting the batch costs by itself);
- dpfast: DataParallel(device_ids=["cpu"] * N), with the replicas' backward
  passes in turn (DPFAST_PARALLEL_BACKWARD=0: autograd walks their graphs one
  after the other) and side by side (=1, NOTE [Parallel backward]); the
  default, auto, picks by the thread count and whether the caller shares its
  threads (NOTE [CPU threads]: under the default OpenMP wait policy with one
  thread per replica, the caller runs its replica on one thread and pauses its
  idle team in both columns; tools/omp_wait_policy.py compares the policies);
- dpfast with one intra-op thread (torch.set_num_threads(1) around its steps,
  so auto runs the passes side by side): the replicas are the parallelism,
  against the bare module with all the threads;
- threads floor: N persistent threads with one intra-op thread each, each
  running forward and backward of its own copy of the bare module on its
  chunk, then the optimizer step on copy 0 (no copies, no reduction, no
  bookkeeping), the caller on one intra-op thread as in "1 thread": what N
  threads side by side can do on this machine, the floor under "1 thread".
  "1 thread" minus "floor" is what dpfast adds.

    PYTHONPATH=. python tools/cpu_overhead.py [--replicas 2 4] [--rounds 4] [--steps 20] [--threads T]
                                              [--configs cnn:tiny:32 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch
from torch.nn import functional as F

import dpfast
from bench import workloads

CONFIGS = [("cnn", "tiny", 128), ("cnn", "small", 16), ("mlp", "small", 128), ("transformer", "tiny", 64)]


def median_ms(step, steps: int, warmup: int = 3) -> float:
    """The median time of step() over `steps` calls after `warmup` untimed ones, in ms."""
    times = []
    for s in range(warmup + steps):
        start = time.perf_counter()
        step()
        if s >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def step_ms(model, chunks, steps: int, warmup: int = 3) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = sum(len(y) for _, y in chunks)

    def step():
        optimizer.zero_grad()
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in chunks) / batch
        loss.backward()
        optimizer.step()
    return median_ms(step, steps, warmup)


class ThreadsFloor:
    """N persistent threads, thread k running forward and backward of models[k] on chunk k with
    one intra-op thread, then the optimizer step on models[0]: the floor column."""

    def __init__(self, models, chunks):
        self.models, self.chunks = models, chunks
        self.go = [threading.Event() for _ in models]
        self.done = [threading.Event() for _ in models]
        for k in range(len(models)):
            threading.Thread(target=self._loop, args=(k,), daemon=True).start()

    def _loop(self, k: int) -> None:
        torch.set_num_threads(1)
        while True:
            self.go[k].wait()
            self.go[k].clear()
            x, y = self.chunks[k]
            (F.cross_entropy(self.models[k](x), y, reduction="sum") / self.batch).backward()
            self.done[k].set()

    def step_ms(self, steps: int, warmup: int = 3) -> float:
        optimizer = torch.optim.SGD(self.models[0].parameters(), lr=1e-3)
        self.batch = sum(len(y) for _, y in self.chunks)

        def step():
            for model in self.models:
                model.zero_grad()
            for go in self.go:
                go.set()
            for done in self.done:
                done.wait()
                done.clear()
            optimizer.step()
        return median_ms(step, steps, warmup)


@contextlib.contextmanager
def parallel_backward(on: bool):
    previous = os.environ.get("DPFAST_PARALLEL_BACKWARD")
    os.environ["DPFAST_PARALLEL_BACKWARD"] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DPFAST_PARALLEL_BACKWARD"]
        else:
            os.environ["DPFAST_PARALLEL_BACKWARD"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="WORKLOAD:SIZE:BATCH",
                        help="e.g. cnn:tiny:32 (default: " + " ".join(f"{n}:{s}:{b}" for n, s, b in CONFIGS) + ")")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; medians of "
          f"{args.rounds} interleaved rounds of {args.steps} steps, ms per training step")
    print(f"{'workload':<22}{'N':>3}{'bare':>9}{'chunks':>9}{'in turn':>9}{'side by side':>14}{'1 thread':>10}"
          f"{'floor':>8}{'in turn/bare':>14}{'side/bare':>11}{'side/in turn':>14}{'1 thread/bare':>15}"
          f"{'floor/bare':>12}{'1 thread - floor':>18}")
    configs = CONFIGS if args.configs is None else [(n, s, int(b)) for n, s, b in
                                                    (c.split(":") for c in args.configs)]
    for name, size, batch in configs:
        workload = getattr(workloads, name)(size)
        x, y = workload.make_batch(batch, 0)
        for n in args.replicas:
            bare = workload.build(0)
            wrapped = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * n)
            chunked = list(zip(x.chunk(n), y.chunk(n)))
            floor = ThreadsFloor([workload.build(0) for _ in range(n)], chunked)
            results = {"bare": [], "chunks": [], "in_turn": [], "side_by_side": [], "one_thread": [], "floor": []}
            for _ in range(args.rounds):
                results["bare"].append(step_ms(bare, [(x, y)], args.steps))
                results["chunks"].append(step_ms(bare, chunked, args.steps))
                with parallel_backward(False):
                    results["in_turn"].append(step_ms(wrapped, [(x, y)], args.steps))
                with parallel_backward(True):
                    results["side_by_side"].append(step_ms(wrapped, [(x, y)], args.steps))
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    results["one_thread"].append(step_ms(wrapped, [(x, y)], args.steps))
                    results["floor"].append(floor.step_ms(args.steps))
                finally:
                    torch.set_num_threads(threads)
            ms = {k: statistics.median(v) for k, v in results.items()}
            print(f"{name + ':' + size + ' b' + str(batch):<22}{n:>3}{ms['bare']:>9.2f}{ms['chunks']:>9.2f}"
                  f"{ms['in_turn']:>9.2f}{ms['side_by_side']:>14.2f}{ms['one_thread']:>10.2f}{ms['floor']:>8.2f}"
                  f"{ms['in_turn'] / ms['bare']:>14.2f}{ms['side_by_side'] / ms['bare']:>11.2f}"
                  f"{ms['side_by_side'] / ms['in_turn']:>14.2f}{ms['one_thread'] / ms['bare']:>15.2f}"
                  f"{ms['floor'] / ms['bare']:>12.2f}{ms['one_thread'] - ms['floor']:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
