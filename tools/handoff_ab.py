"""How the caller and the workers should wait and share the cores, on CPU replicas, in one process
(NOTE [Spinning hand-offs] in csrc/handoff.h, NOTE [CPU threads] and NOTE [Idle caller] in
dpfast/workers.py).

Wrappers of the same module, one per system, each with its own worker pool, and the bare module on
the full batch, interleaved round by round in alternating order, --steps timed steps a round,
medians. The systems (--systems, comma-separated; "bare" always runs):
- "default": dpfast as it is;
- "spin": DPFAST_SPIN_US=1000: waits spin for 1 ms whatever the thread counts (the default before
  2026-11-28 where the replicas' threads fit on the cores, the caller's intra-op threads not
  counted);
- "sleep": DPFAST_SPIN_US=0: every wait sleeps at once;
- "always-pause": the caller pauses its idle OpenMP team at every step where it shares its threads,
  whether or not it slept before the step (the behaviour before NOTE [Idle caller]);
- "no-pause": the team is never paused (as DPFAST_OMP_PAUSE=0: the caller keeps its thread count
  while its replica runs and, with more than one thread, the replicas' backward passes run in
  turn). Where the pause does not apply (one thread, OMP_WAIT_POLICY=PASSIVE, not libgomp) the last
  two are "default" again.
N CPU replicas, the wrappers' caller on --threads intra-op threads (0: torch's default; the bare
module always on torch's default, its fastest here), --gap-ms of sleep between steps outside the
timed part (a data loader's wait). Each cell is the median step and its ratio to the bare
module's; "a - default" is the median of the per-round differences, with the count of rounds where
it is positive (this VM's noise moves single rounds by more than most differences). Every system
must give the same gradients as the default, up to float rounding (a caller on more threads sums in
another order); the tool checks it and exits non-zero otherwise.

    PYTHONPATH=. python tools/handoff_ab.py [--workload vgg:tiny:8] [--replicas 2] [--threads 1] [--gap-ms 0]
                                            [--systems default,spin,sleep] [--rounds 20] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time

import torch
from torch.nn import functional as F

import dpfast
from dpfast import workers
from bench import workloads

SYSTEMS = ("default", "spin", "sleep", "always-pause", "no-pause")
SPIN_US = {"spin": "1000", "sleep": "0"}  # DPFAST_SPIN_US when the system's pool starts
_PAUSE = workers._omp_pause()  # looked up once; None where it does not apply
_IDLE_CALLER_S = workers.IDLE_CALLER_S


@contextlib.contextmanager
def _settings(key: str):
    """The process-wide settings of system ``key`` while its steps run."""
    workers._pause_team = None if key == "no-pause" else _PAUSE
    workers.IDLE_CALLER_S = math.inf if key == "always-pause" else _IDLE_CALLER_S
    try:
        yield
    finally:
        workers._pause_team = _PAUSE
        workers.IDLE_CALLER_S = _IDLE_CALLER_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vgg:tiny:8", metavar="NAME:SIZE:BATCH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="the wrappers' caller's intra-op threads (0: torch's default)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="sleep between steps, not timed")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"from {', '.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    chosen = [key for key in args.systems.split(",") if key]
    if any(key not in SYSTEMS for key in chosen):
        parser.error(f"--systems: expected names from {', '.join(SYSTEMS)}, but got {args.systems!r}")
    systems_run = ["bare", "default"] + [key for key in chosen if key != "default"]
    name, size, batch = args.workload.split(":")
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(int(batch), 0)
    default_threads = torch.get_num_threads()
    wrapper_threads = args.threads or default_threads

    def step(module, optimizer) -> None:
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()

    def make(key: str):
        module = workload.build(0)
        if key != "bare":
            module = dpfast.DataParallel(module, device_ids=["cpu"] * args.replicas)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.0)  # lr 0: every round trains the same weights
        if key != "bare":  # its pool starts now, with this spin
            saved = os.environ.pop("DPFAST_SPIN_US", None)
            if key in SPIN_US:
                os.environ["DPFAST_SPIN_US"] = SPIN_US[key]
            torch.set_num_threads(wrapper_threads)
            try:
                with _settings(key):
                    step(module, optimizer)
            finally:
                torch.set_num_threads(default_threads)
                os.environ.pop("DPFAST_SPIN_US", None)
                if saved is not None:
                    os.environ["DPFAST_SPIN_US"] = saved
        return module, optimizer

    systems = {key: make(key) for key in systems_run}

    def run(key: str, steps: int) -> float:
        module, optimizer = systems[key]
        torch.set_num_threads(default_threads if key == "bare" else wrapper_threads)
        times = []
        try:
            with _settings(key):
                for _ in range(steps):
                    if args.gap_ms:
                        time.sleep(args.gap_ms / 1e3)
                    start = time.perf_counter()
                    step(module, optimizer)
                    times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(default_threads)
        return statistics.median(times) * 1e3

    for key in systems_run:
        run(key, 5)
    results = {key: [] for key in systems_run}
    for r in range(args.rounds):
        for key in (systems_run if r % 2 == 0 else list(reversed(systems_run))):
            results[key].append(run(key, args.steps))

    def grads(key: str):
        module, optimizer = systems[key]
        torch.set_num_threads(wrapper_threads)
        try:
            with _settings(key):
                optimizer.zero_grad()
                F.cross_entropy(module(x), y).backward()
        finally:
            torch.set_num_threads(default_threads)
        return [p.grad.clone() for p in module.parameters()]

    reference = grads("default")
    same = all(all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(reference, grads(key)))
               for key in systems_run[2:])
    bare = statistics.median(results["bare"])

    def difference(key: str) -> str:
        diff_us = [(p - q) * 1e3 for p, q in zip(results[key], results["default"])]
        return f"{key} - default: {statistics.median(diff_us):.0f} us ({sum(d > 0 for d in diff_us)}/{len(diff_us)} > 0)"

    spins = ", ".join(f"{key} {systems[key][0]._runtime.pool._spin_us}" for key in systems_run[1:])
    print(f"{args.workload}, {args.replicas} CPU replicas, the wrappers' caller on {wrapper_threads} intra-op "
          f"thread(s) (spin_us: {spins}), the bare module on {default_threads}, {args.gap_ms:g} ms between steps, "
          f"{args.rounds} rounds of {args.steps} steps, torch {torch.__version__}")
    print("  ".join(f"{key} {statistics.median(v):.3f} ms ({statistics.median(v) / bare:.2f}x)"
                    for key, v in results.items())
          + "  | " + "  ".join(difference(key) for key in systems_run[2:]) + f"  | same gradients: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
