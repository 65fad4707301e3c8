"""How long NOTE [CPU threads]'s pause of the caller's idle OpenMP team takes inside CPU-replica steps.

The pause (dpfast.workers.quiet_caller_team, libgomp's omp_pause_resource_all) waits for each of the
caller's idle team threads to leave; where the cores are busy that wait grows. This times every call
by where it was made (the forward's share, the routed backward's share-out) and the step, after
--warmup steps, with the caller on torch's default thread count. TREE (an environment variable)
puts another checkout of dpfast first on the path, to compare two trees process by process.

    PYTHONPATH=. python tools/pause_timing.py [--workload vgg:tiny:8] [--replicas 2] [--steps 200]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

if os.environ.get("TREE"):
    sys.path.insert(0, os.environ["TREE"])

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import dpfast  # noqa: E402
from dpfast import workers  # noqa: E402
from bench import workloads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vgg:tiny:8", metavar="NAME:SIZE:BATCH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    name, size, batch = args.workload.split(":")
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(int(batch), 0)
    times_ns = collections.defaultdict(list)
    pause = workers.quiet_caller_team

    def timed_pause():
        start = time.perf_counter_ns()
        pause()
        times_ns[sys._getframe(1).f_code.co_name].append(time.perf_counter_ns() - start)
    workers.quiet_caller_team = timed_pause

    model = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * args.replicas)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for _ in range(args.warmup):
        step()
    times_ns.clear()
    step_ns = []
    for _ in range(args.steps):
        start = time.perf_counter_ns()
        step()
        step_ns.append(time.perf_counter_ns() - start)
    print(f"{args.workload}, {args.replicas} CPU replicas, {torch.get_num_threads()} intra-op threads, dpfast from "
          f"{os.path.dirname(dpfast.__file__)}; median step {statistics.median(step_ns) / 1e6:.2f} ms")
    for where, values in times_ns.items():
        values = sorted(values)
        print(f"pause from {where:<28} {len(values) / args.steps:4.1f}/step  median {statistics.median(values) / 1e3:7.1f} us"
              f"  p90 {values[int(0.9 * (len(values) - 1))] / 1e3:7.1f} us")
    if not times_ns:
        print("no pause: the caller does not share its threads here (NOTE [CPU threads])")


if __name__ == "__main__":
    main()
