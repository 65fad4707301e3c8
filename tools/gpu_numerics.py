"""Where dpfast's gradients on CUDA lanes differ from the bare module's, and why.

For each workload, three copies of the model train side by side on the same batches:
  bare     the module on the full batch;
  chunked  the module on the same chunks as dpfast's replicas, one after the other on one
           stream, the outputs joined (the benchmark's bench.run.Chunked): dpfast's arithmetic
           without its streams, so chunked vs bare is the error that splitting the batch
           alone makes (TF32 algorithms chosen per batch size, summation order);
  dpfast   dpfast.DataParallel with N replicas on cuda:0.
Per step it prints the largest relative gradient error (max |a - b| / max |b| per tensor, as
bench/run.py checks) of dpfast vs chunked and chunked vs bare, and the tensor where it is.
dpfast vs chunked far above chunked vs bare is a dpfast bug; --sync (a device-wide synchronize
after forward and after backward) making it vanish points at stream ordering. With TF32 off,
cuDNN runs deterministic algorithms, so dpfast vs chunked measures dpfast alone.

    python tools/gpu_numerics.py --workloads mlp,cnn,transformer --size small [--tf32 on|off] [--sync]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpfast  # noqa: E402
from bench.run import Chunked, relative_error  # noqa: E402
from bench.workloads import make_workload  # noqa: E402


def relative_errors(module_a, module_b):
    """(largest error, parameter name) of module_a's grads against module_b's, as the benchmark
    checks them (bench.run.relative_error)."""
    worst, where = 0.0, "-"
    for (name, p), q in zip(module_a.named_parameters(), module_b.parameters()):
        error = relative_error(p.grad, q.grad)
        if error > worst:
            worst, where = error, name
    return worst, where


# dpfast against the same chunks with TF32 off: above this, the run fails. With TF32 off the check
# also asks cuDNN for deterministic algorithms: without, the CNN's weight gradients differed by
# 4e-6 at step 1 on an H100 and an H200 (atomics in the convolution's backward), and on the H200
# (2026-11-27) one SGD step grew that to 1.05e-3 at step 2, for the same chunks run twice apart.
EXACT_TOLERANCE = 1e-4


def run(workload_name: str, size: str, replicas: int, steps: int, sync: bool, device: torch.device) -> float:
    """Trains the three copies side by side; the largest dpfast-vs-chunked gradient error."""
    workload = make_workload(workload_name, size)
    batch = workload.default_batch_size
    bare, chunked, root = (workload.build(0).to(device) for _ in range(3))
    in_turn = Chunked(chunked, replicas)  # the benchmark's "bare on N chunks in turn"
    wrapped = dpfast.DataParallel(root, device_ids=[device] * replicas)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (bare, chunked, root)]
    worst = 0.0
    for step in range(1, steps + 1):
        x, y = workload.make_batch(batch, 1000 + step)
        x, y = x.to(device), y.to(device)
        loss_bare = F.cross_entropy(bare(x), y)
        loss_bare.backward()
        loss_chunked = F.cross_entropy(in_turn(x), y)
        loss_chunked.backward()
        outputs = wrapped(x)
        if sync and device.type == "cuda":
            torch.cuda.synchronize()
        loss = F.cross_entropy(outputs, y)
        loss.backward()
        if sync and device.type == "cuda":
            torch.cuda.synchronize()
        dp_vs_chunked = relative_errors(root, chunked)
        worst = max(worst, dp_vs_chunked[0])
        chunked_vs_bare = relative_errors(chunked, bare)
        loss_error = abs(loss.item() - loss_chunked.item()) / abs(loss_chunked.item())
        print(f"{workload_name:<12} {size:<6} n={replicas} tf32={'on ' if torch.backends.cudnn.allow_tf32 else 'off'} "
              f"sync={'yes' if sync else 'no '} step {step}: loss dpfast/chunked {loss_error:.2e}  "
              f"grads dpfast/chunked {dp_vs_chunked[0]:.2e} ({dp_vs_chunked[1]})  "
              f"chunked/bare {chunked_vs_bare[0]:.2e} ({chunked_vs_bare[1]})", flush=True)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,transformer")
    parser.add_argument("--size", default="small")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tf32", choices=("on", "off", "both"), default="both")
    parser.add_argument("--sync", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--device", default="cuda:0", help="cuda:0, or cpu to try the tool itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_numerics: no GPU here; nothing to check")
        return 0
    worst_exact = 0.0
    for tf32 in ((True, False) if args.tf32 == "both" else (args.tf32 == "on",)):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.deterministic = not tf32
        torch.backends.cudnn.benchmark = False
        for sync in ((False, True) if args.sync == "both" else (args.sync == "yes",)):
            for name in args.workloads.split(","):
                worst = run(name, args.size, args.replicas, args.steps, sync, device)
                if not tf32:  # with TF32 the two drift apart after a step whatever dpfast does
                    worst_exact = max(worst_exact, worst)
    if worst_exact > EXACT_TOLERANCE:
        print(f"FAILED: with TF32 off, dpfast's gradients differ from the same chunks run in turn by "
              f"{worst_exact:.2e} (at most {EXACT_TOLERANCE:g} expected)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
