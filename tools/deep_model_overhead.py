"""Where the time goes for a deep, narrow model on CPU replicas: the bare module
against dpfast with N CPU replicas in the same run, phase by phase, and the
backward with the reducer's per-parameter hooks removed (what the hooks and the
reduction cost).

    PYTHONPATH=. python tools/deep_model_overhead.py [--blocks 350] [--replicas 4] [--steps 15]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import time

import torch
from torch import nn

import dpfast


class PhaseTimer:
    def __init__(self):
        self.ms = collections.defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        yield
        self.ms[name].append((time.perf_counter() - start) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=350)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.blocks):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU()]
    bare = nn.Sequential(*layers)
    x = torch.randn(2 * args.replicas, 16)
    wrapped = dpfast.DataParallel(copy.deepcopy(bare), device_ids=["cpu"] * args.replicas)
    timer = PhaseTimer()
    wrapped.phase_timer = timer

    def step_ms(model):
        times = {"forward": [], "backward": []}
        for _ in range(args.steps):
            start = time.perf_counter()
            out = model(x).sum()
            mid = time.perf_counter()
            out.backward()
            times["forward"].append((mid - start) * 1e3)
            times["backward"].append((time.perf_counter() - mid) * 1e3)
        return {k: statistics.median(v[3:]) for k, v in times.items()}

    bare_ms, dp_ms = step_ms(bare), step_ms(wrapped)
    phases = {k: statistics.median(v[3:]) for k, v in timer.ms.items()}
    wrapped._ensure_runtime().reducer.remove()  # its hooks off: gradients stay in the replicas' buckets
    unhooked_ms = step_ms(wrapped)
    print(f"model: {len(list(bare.modules()))} modules, {len(list(bare.parameters()))} parameters, batch {len(x)}, "
          f"{args.replicas} CPU replicas, 1 intra-op thread, torch {torch.__version__}")
    print(f"{'':34}{'forward_ms':>12}{'backward_ms':>13}")
    print(f"{'bare module':34}{bare_ms['forward']:>12.1f}{bare_ms['backward']:>13.1f}")
    print(f"{'dpfast':34}{dp_ms['forward']:>12.1f}{dp_ms['backward']:>13.1f}")
    print(f"{'dpfast, reducer hooks removed':34}{unhooked_ms['forward']:>12.1f}{unhooked_ms['backward']:>13.1f}"
          "   (no reduction: for the hooks' share only)")
    print("dpfast phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
