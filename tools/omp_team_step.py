"""An experiment for issue #4's CPU goal: CPU replicas run on the caller's own OpenMP team.

dpfast runs CPU replicas 1..n-1 on Python worker threads, and shares out the caller's intra-op
threads around them (NOTE [CPU threads]): the caller's idle OpenMP team either spins on the cores
the replicas need or is paused, and the next parallel region of the user's code (the loss's
log_softmax, the optimizer) starts it again. This tool measures the alternative: the replicas run
*on* the caller's team. One OpenMP region of n threads (ATen's own runtime, at::parallel_for),
thread k takes the GIL and runs replica k's forward, then, in a second region, its part of the
backward. Inside a region every ATen, oneDNN and MKL call runs on one thread, and no thread is
started, paused or left spinning against the replicas.

Each region's thread sets its own OpenMP thread count to 1 first: oneDNN, called inside a region
with the team's count, waited forever in a convolution's backward (a barrier for threads that
never came).

The "team" step here is hand-written (replica 1..n-1 are deep copies whose weights are copied in
before each forward, and whose gradients are added into the module's after backward), so it is a
bound on what dpfast could reach that way, not dpfast. Beside it, the bare module on the full
batch, dpfast as it is, and dpfast with the caller on one intra-op thread, interleaved round by
round; every system's weights after the timed steps are checked against the bare module's
(float32: the summation order differs).

    PYTHONPATH=. python tools/omp_team_step.py [--workload vgg:tiny:8] [--rounds 6] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

import dpfast
from bench import workloads

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

// fns[k]() on thread k of one OpenMP region of the caller's team; each call takes the GIL.
// The callables catch their own errors (the Python side records them).
void run_on_team(std::vector<py::object> fns) {
  const int64_t n = static_cast<int64_t>(fns.size());
  py::gil_scoped_release release;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    omp_set_num_threads(1);  // this thread's nested calls (oneDNN's included) on one thread
    for (int64_t k = begin; k < end; ++k) {
      py::gil_scoped_acquire acquire;
      fns[k]();
    }
  });
}
"""


def _team_extension():
    return cpp_extension.load_inline("dpfast_omp_team_step", cpp_sources=_SOURCE, functions=["run_on_team"],
                                     extra_cflags=["-O2", "-fopenmp"], extra_ldflags=["-fopenmp"])


class TeamStep:
    """A hand-written data-parallel training step with its replicas on the caller's OpenMP team."""

    def __init__(self, module, replicas: int, lr: float, extension):
        self.module, self.run = module, extension.run_on_team
        self.copies = [copy.deepcopy(module) for _ in range(replicas - 1)]
        self.params = list(module.parameters())
        self.copy_params = [list(c.parameters()) for c in self.copies]
        for params in self.copy_params:
            for p in params:
                p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.SGD(self.params, lr=lr)
        self.errors = []

    def _on_team(self, fns):
        def guarded(fn):
            def run():
                try:
                    fn()
                except BaseException as error:  # raised on the caller, after the region
                    self.errors.append(error)
            return run
        self.run([guarded(fn) for fn in fns])
        if self.errors:
            raise self.errors.pop()

    def __call__(self, x, y):
        self.optimizer.zero_grad()
        with torch.no_grad():
            for params in self.copy_params:
                torch._foreach_copy_(params, self.params)
        replicas = [self.module] + self.copies
        chunks = x.chunk(len(replicas))
        outputs = [None] * len(replicas)

        def forward(k):
            def run():
                outputs[k] = replicas[k](chunks[k])
            return run
        self._on_team([forward(k) for k in range(len(replicas))])
        stand_ins = [o.detach().requires_grad_() for o in outputs]  # the gather
        F.cross_entropy(torch.cat(stand_ins), y).backward()

        def backward(k):
            def run():
                torch.autograd.backward(outputs[k], stand_ins[k].grad)
            return run
        self._on_team([backward(k) for k in range(len(replicas))])
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            for params in self.copy_params:
                torch._foreach_add_(grads, [p.grad for p in params])
                torch._foreach_zero_([p.grad for p in params])
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vgg:tiny:8", metavar="NAME:SIZE:BATCH")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    name, size, batch = args.workload.split(":")
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(int(batch), 0)
    replicas, lr = torch.get_num_threads(), 0.01
    extension = _team_extension()

    def training(model, one_thread=False):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            own = torch.get_num_threads()
            if one_thread:
                torch.set_num_threads(1)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            torch.set_num_threads(own)
        return step

    bare = workload.build(0)
    team = TeamStep(workload.build(0), replicas, lr, extension)
    wrapped = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
    wrapped_one = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
    systems = {"bare": (training(bare), bare), "team": (lambda: team(x, y), team.module),
               "dpfast": (training(wrapped), wrapped.module),
               "dpfast 1 thread": (training(wrapped_one, one_thread=True), wrapped_one.module)}
    times = {label: [] for label in systems}
    for _ in range(args.rounds):
        for label, (step, _) in systems.items():
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[label].append((time.perf_counter() - start) / args.steps * 1e3)
    # Every system took the same number of steps from the same weights on the same batch.
    reference = [p.detach() for p in bare.parameters()]
    base = statistics.median(times["bare"])
    print(f"{args.workload}, {replicas} replicas (the caller's intra-op threads), torch {torch.__version__}; "
          f"medians of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'system':<18} {'ms/step':>8} {'/bare':>6} {'max |w - w_bare|':>17}")
    for label, (_, module) in systems.items():
        diff = max((p.detach() - q).abs().max().item() for p, q in zip(module.parameters(), reference))
        median = statistics.median(times[label])
        print(f"{label:<18} {median:>8.2f} {median / base:>6.2f} {diff:>17.2e}")
        if diff > 1e-3:
            raise SystemExit(f"{label}: weights differ from the bare module's by {diff:.2e}")


if __name__ == "__main__":
    main()
