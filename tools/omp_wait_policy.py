"""CPU replicas under OpenMP's two wait policies: what libgomp's spinning idle threads cost them.

After each parallel region, an OpenMP thread of the caller's intra-op team that has no work left
spins (libgomp's default: about 300,000 polls, some 10 ms on the 2-core VM here) before it sleeps.
The bare module never notices: its next region finds the team awake. CPU replicas do: while the
caller runs replica 0 on its share of the threads and the workers run theirs (NOTE [CPU threads]
in dpfast/workers.py), the caller's idle team spins on a core that a replica needs, after every
region the user's own code ran on all threads (the loss, the optimizer step).
OMP_WAIT_POLICY=PASSIVE makes idle threads sleep at once; it is read when the OpenMP runtime
loads, so each policy runs in processes of its own, alternated round by round.

Each child process times, interleaved: the bare module on the full batch, dpfast's default
(DataParallel(device_ids=["cpu"] * N) on torch's intra-op threads: under PASSIVE, and under the
default policy where every replica gets one thread and libgomp's omp_pause_resource_all is found,
the caller runs replica 0 on its share and the backward passes run side by side, NOTE [CPU threads]),
dpfast without the pause (as DPFAST_OMP_PAUSE=0: the caller keeps its threads under the default
policy), and dpfast with torch.set_num_threads(1) around its steps (the README's other advice). The table gives medians over rounds, and dpfast's ratios to the bare module
under the same policy and under the default policy (what a user runs without dpfast).

    PYTHONPATH=. python tools/omp_wait_policy.py [--configs vgg:tiny:8 ...] [--replicas 2] [--rounds 6] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

POLICIES = ("default", "passive")
COLUMNS = ("bare", "dpfast", "no_pause", "one_thread")


def child(configs, replicas: int, steps: int) -> None:
    import torch

    import dpfast
    from bench import workloads
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_overhead import step_ms

    for config in configs:
        name, size, batch = config.split(":")
        workload = getattr(workloads, name)(size)
        x, y = workload.make_batch(int(batch), 0)
        bare = workload.build(0)
        wrapped = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
        result = {"config": config, "idle_threads_sleep": dpfast.workers.idle_threads_sleep(),
                  "pause_found": dpfast.workers._omp_pause() is not None,
                  "bare": step_ms(bare, [(x, y)], steps), "dpfast": step_ms(wrapped, [(x, y)], steps)}
        pause = dpfast.workers._pause_team
        dpfast.workers._pause_team = None  # as DPFAST_OMP_PAUSE=0
        try:
            result["no_pause"] = step_ms(wrapped, [(x, y)], steps)
        finally:
            dpfast.workers._pause_team = pause
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result["one_thread"] = step_ms(wrapped, [(x, y)], steps)
        finally:
            torch.set_num_threads(threads)
        print(json.dumps(result), flush=True)


def run_child(policy: str, configs, replicas: int, steps: int) -> list:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--replicas", str(replicas),
                          "--steps", str(steps), "--configs", *configs], env=env, cwd=root, capture_output=True,
                         text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vgg:tiny:8", "cnn:tiny:32"], metavar="WORKLOAD:SIZE:BATCH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.configs, args.replicas, args.steps)
        return
    import torch
    times = {}  # (config, policy, column) -> [ms per round]
    pause_found = False
    for _ in range(args.rounds):
        for policy in POLICIES:
            for result in run_child(policy, args.configs, args.replicas, args.steps):
                if result["idle_threads_sleep"] != (policy == "passive"):  # what dpfast read in the child
                    raise RuntimeError(f"a {policy} child process found idle_threads_sleep() "
                                       f"{result['idle_threads_sleep']}")
                pause_found = result["pause_found"]
                for column in COLUMNS:
                    times.setdefault((result["config"], policy, column), []).append(result[column])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {args.replicas} CPU replicas; "
          f"medians of {args.rounds} rounds (a process per policy and round) of {args.steps} steps, ms per step; "
          f"libgomp's omp_pause_resource_all {'found' if pause_found else 'not found'}")
    print(f"{'workload':<22}{'policy':>9}{'bare':>8}{'dpfast':>8}{'no pause':>10}{'1 thread':>10}{'dpfast/bare':>13}"
          f"{'no pause/bare':>15}{'1 thread/bare':>15}{'dpfast/bare(default)':>22}")
    for config in args.configs:
        default_bare = statistics.median(times[(config, "default", "bare")])
        for policy in POLICIES:
            ms = {c: statistics.median(times[(config, policy, c)]) for c in COLUMNS}
            print(f"{config:<22}{policy:>9}{ms['bare']:>8.2f}{ms['dpfast']:>8.2f}{ms['no_pause']:>10.2f}"
                  f"{ms['one_thread']:>10.2f}{ms['dpfast'] / ms['bare']:>13.2f}{ms['no_pause'] / ms['bare']:>15.2f}"
                  f"{ms['one_thread'] / ms['bare']:>15.2f}{ms['dpfast'] / default_bare:>22.2f}", flush=True)


if __name__ == "__main__":
    main()
