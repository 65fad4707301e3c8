"""Per-call cost of keeping replicas consistent (dpfast) against nn.DataParallel's
per-call ``replicate``, on a model with more than 1000 submodules.

Data movement is left out of both sides so that the Python work is compared:
nn.DataParallel's broadcast is replaced by handing every device the root's
tensors (free), and dpfast's parameter broadcast is skipped. Both numbers are
medians over repeated calls in the same process.

    python tools/replication_cost.py [--blocks 300] [--replicas 4] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
import importlib

replicate_module = importlib.import_module("torch.nn.parallel.replicate")

import dpfast  # noqa: E402


def deep_model(blocks: int) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU()]
    return nn.Sequential(*layers)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=350)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    model = deep_model(args.blocks)
    num_modules = len(list(model.modules()))
    num_tensors = len(list(model.parameters())) + len(list(model.buffers()))

    # nn.DataParallel's replicate, its broadcast made free (the root's tensors for every device).
    original = replicate_module._broadcast_coalesced_reshape
    replicate_module._broadcast_coalesced_reshape = lambda tensors, devices, detach=False: [
        list(tensors) for _ in devices]
    try:
        dp_ms = median_ms(lambda: replicate_module.replicate(model, list(range(args.replicas))), args.repeats)
    finally:
        replicate_module._broadcast_coalesced_reshape = original

    wrapper = dpfast.DataParallel(model, device_ids=["cpu"] * args.replicas)
    wrapper(torch.randn(args.replicas, 16))  # builds the replicas once
    replicas = wrapper._ensure_runtime().replicas

    def dpfast_checks():
        if replicas.structure_changed():
            raise AssertionError("structure must not change between calls here")
        replicas.refresh_attributes(args.replicas)

    checks_ms = median_ms(dpfast_checks, args.repeats)
    sync_ms = median_ms(lambda: replicas.sync(args.replicas), args.repeats)

    print(f"model: {num_modules} modules, {num_tensors} parameters and buffers; {args.replicas} replicas; "
          f"torch {torch.__version__}, CPU")
    print(f"{'per call':<52}{'time_ms':>10}{'vs nn.DataParallel':>22}")
    print(f"{'nn.DataParallel replicate (broadcast made free)':<52}{dp_ms:>10.2f}{1.0:>21.2f}x")
    print(f"{'dpfast structure check + attribute refresh':<52}{checks_ms:>10.2f}{checks_ms / dp_ms:>21.2f}x")
    print(f"{'dpfast full sync (+ coalesce and CPU broadcast)':<52}{sync_ms:>10.2f}{sync_ms / dp_ms:>21.2f}x")


if __name__ == "__main__":
    main()
