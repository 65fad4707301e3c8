"""Long-run soak of dpfast.DataParallel on CPU replicas: trains for many steps
and checks that live tensors, threads and process memory do not grow.

Every step is a full training step (forward, MSE loss, backward, SGD step) on
a small MLP with LayerNorm in float64, with batch sizes that cycle through
even, uneven and smaller-than-the-device-list splits (so fewer replicas run
on some steps). Every ``--fail-every`` steps one replica (in turn) raises in
its forward, and every ``--eval-every`` steps an eval-mode forward runs under
``torch.no_grad()``. An unwrapped copy of the model, trained on the same full
batches, is the reference: at the end the wrapper's parameters must match it.

Measured every ``--check-every`` steps (after ``--warmup`` steps, which set
the baseline): live torch.Tensor objects (a gc-based count), threads (all, and
dpfast's workers by name), and the process's resident memory (VmRSS). The
run fails (exit status 1) when a count grows beyond its bound.

    python tools/soak.py [--steps 10000] [--replicas 4] [--check-every 500]

tests/test_reliability.py runs the same loop for a few hundred steps in CI.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

try:
    import dpfast
except ImportError:  # run as `python tools/soak.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dpfast

WORKER_PREFIX = "dpfast-replica"


class InjectedFailure(RuntimeError):
    """What a replica raises when the soak tells it to."""


class SoakModel(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 32, out: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, out)
        self.fail_thread: Optional[str] = None  # a replica whose forward raises (by thread name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_thread is not None and threading.current_thread().name == self.fail_thread:
            raise InjectedFailure(f"injected failure on {self.fail_thread}")
        return self.head(self.body(x))


# -- measurements ---------------------------------------------------------------------------------

def live_tensors() -> int:
    """torch.Tensor objects alive in this process (after a full collection)."""
    gc.collect()
    # issubclass(type(o)) rather than isinstance: no __class__ lookups on lazy module proxies.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def rss_mib() -> float:
    """Resident set size of this process (VmRSS in /proc/self/status), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def dpfast_thread_names() -> List[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX))


def measure(step: int) -> Dict[str, float]:
    return {"step": step, "tensors": live_tensors(), "threads": threading.active_count(),
            "dpfast_threads": len(dpfast_thread_names()), "rss_mib": rss_mib()}


# -- the loop -------------------------------------------------------------------------------------

def soak(steps: int, replicas: int = 4, check_every: int = 500, warmup: int = 20, fail_every: int = 50,
         eval_every: int = 10, batch_sizes=(16, 11, 5, 3, 1), lr: float = 0.01, seed: int = 0,
         on_row: Optional[Callable[[Dict[str, float]], None]] = None) -> dict:
    """Trains for ``warmup + steps`` steps; returns {"rows": [...], "max_param_diff": float,
    "failures_injected": int, "failures_seen": int, "replica_builds": int, "seconds": float}.
    rows[0] is the baseline (after the warmup), then one row every check_every steps and one
    at the end."""
    torch.manual_seed(seed)
    reference = SoakModel().double()
    wrapper = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * replicas)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    opt = torch.optim.SGD(wrapper.parameters(), lr=lr, momentum=0.9)
    data = torch.Generator().manual_seed(seed + 1)
    rows: List[Dict[str, float]] = []
    injected = seen = 0
    caller = threading.current_thread().name  # replica 0 runs on the calling thread
    start = time.perf_counter()

    def one_step(i: int) -> None:
        nonlocal injected, seen
        batch = batch_sizes[i % len(batch_sizes)]
        x = torch.randn(batch, 8, generator=data, dtype=torch.float64)
        y = torch.randn(batch, 3, generator=data, dtype=torch.float64)
        if fail_every and i % fail_every == fail_every - 1:
            # One replica (in turn, replica 0 included) raises on a batch that reaches every
            # replica; the step is then done normally.
            k = (i // fail_every) % replicas
            wrapper.module.fail_thread = caller if k == 0 else f"{WORKER_PREFIX}-{k}"
            injected += 1
            try:
                wrapper(torch.randn(2 * replicas, 8, generator=data, dtype=torch.float64))
            except InjectedFailure as error:
                if replicas == 1 or f"in replica {k} on device cpu" in str(error):  # 1: runs the module directly
                    seen += 1
            finally:
                wrapper.module.fail_thread = None
        for model, optimizer in ((reference, opt_ref), (wrapper, opt)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if eval_every and i % eval_every == eval_every - 1:
            wrapper.eval()
            with torch.no_grad():
                wrapper(x)
            wrapper.train()

    for i in range(warmup):
        one_step(i)
    rows.append(measure(0))
    if on_row:
        on_row(rows[-1])
    for i in range(1, steps + 1):
        one_step(warmup + i - 1)
        if i % check_every == 0 or i == steps:
            rows.append(measure(i))
            if on_row:
                on_row(rows[-1])
    max_diff = max((p - q).abs().max().item() for p, q in zip(reference.state_dict().values(),
                                                                 wrapper.module.state_dict().values())
                   if p.is_floating_point())
    return {"rows": rows, "max_param_diff": max_diff, "failures_injected": injected, "failures_seen": seen,
            "replica_builds": wrapper.stats()["replica_builds"], "seconds": time.perf_counter() - start}


def growth_problems(rows: List[Dict[str, float]], tensor_slack: int = 0, thread_slack: int = 0,
                    rss_bound_mib: float = 64.0) -> List[str]:
    """What grew beyond its bound, relative to rows[0] (the baseline after the warmup)."""
    base, problems = rows[0], []
    for row in rows[1:]:
        if row["tensors"] > base["tensors"] + tensor_slack:
            problems.append(f"step {row['step']}: {row['tensors']} live tensors, baseline {base['tensors']} "
                            f"(+{row['tensors'] - base['tensors']}, bound +{tensor_slack})")
        if row["threads"] > base["threads"] + thread_slack or row["dpfast_threads"] != base["dpfast_threads"]:
            problems.append(f"step {row['step']}: {row['threads']} threads ({row['dpfast_threads']} dpfast), "
                            f"baseline {base['threads']} ({base['dpfast_threads']} dpfast)")
        if row["rss_mib"] > base["rss_mib"] + rss_bound_mib:
            problems.append(f"step {row['step']}: RSS {row['rss_mib']:.1f} MiB, baseline {base['rss_mib']:.1f} MiB "
                            f"(+{row['rss_mib'] - base['rss_mib']:.1f}, bound +{rss_bound_mib:g})")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="training steps after the warmup (default 10000)")
    parser.add_argument("--replicas", type=int, default=4, help="CPU replicas (default 4)")
    parser.add_argument("--check-every", type=int, default=500, help="steps between measurements (default 500)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the baseline is taken (default 20)")
    parser.add_argument("--fail-every", type=int, default=50,
                        help="inject a replica failure every N steps, 0 for never (default 50)")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="an eval-mode no_grad forward every N steps, 0 for never (default 10)")
    parser.add_argument("--tensor-slack", type=int, default=0, help="allowed growth of live tensors (default 0)")
    parser.add_argument("--thread-slack", type=int, default=0, help="allowed growth of threads (default 0)")
    parser.add_argument("--rss-bound-mib", type=float, default=64.0, help="allowed RSS growth in MiB (default 64)")
    parser.add_argument("--max-param-diff", type=float, default=1e-6,
                        help="allowed |wrapper - reference| of any parameter at the end (default 1e-6)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.replicas < 1 or args.check_every < 1:
        parser.error("--steps, --replicas and --check-every must be positive")

    torch.set_num_threads(1)  # the replicas are the parallelism; keeps the run steady on shared machines
    print(f"dpfast soak: {args.steps} steps (+{args.warmup} warmup), {args.replicas} CPU replicas, torch "
          f"{torch.__version__}, pid {os.getpid()}")
    print(f"{'step':>8} {'live tensors':>13} {'threads':>8} {'dpfast':>7} {'RSS MiB':>9} {'elapsed s':>10}")
    start = time.perf_counter()

    def print_row(row):
        print(f"{row['step']:>8} {row['tensors']:>13} {row['threads']:>8} {row['dpfast_threads']:>7} "
              f"{row['rss_mib']:>9.1f} {time.perf_counter() - start:>10.1f}", flush=True)

    result = soak(args.steps, args.replicas, args.check_every, warmup=args.warmup, fail_every=args.fail_every,
                  eval_every=args.eval_every, on_row=print_row)
    problems = growth_problems(result["rows"], args.tensor_slack, args.thread_slack, args.rss_bound_mib)
    if result["failures_seen"] != result["failures_injected"]:
        problems.append(f"{result['failures_injected']} replica failures injected, but only "
                        f"{result['failures_seen']} came back naming their replica")
    if not result["max_param_diff"] <= args.max_param_diff:
        problems.append(f"parameters differ from the unwrapped reference by {result['max_param_diff']:.3g} "
                        f"(bound {args.max_param_diff:g})")
    if result["replica_builds"] != 1:
        problems.append(f"replicas were built {result['replica_builds']} times, expected once")
    steps_per_s = (args.steps + args.warmup) / result["seconds"]
    print(f"{args.steps + args.warmup} steps in {result['seconds']:.1f} s ({steps_per_s:.0f} steps/s); "
          f"{result['failures_injected']} injected replica failures, {result['failures_seen']} reported with their "
          f"replica; max |param - reference| {result['max_param_diff']:.3g}; replica builds "
          f"{result['replica_builds']}")
    if problems:
        print("FAIL:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: no growth of live tensors, threads or RSS beyond the bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
