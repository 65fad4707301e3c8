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

"dpfast on team" is dpfast itself with its two hand-offs moved onto the team, patched in for its
steps only (_DpfastOnTeam): the forward's jobs run in one region, and the backward routes every
replica, replica 0 included, through one node whose backward runs each replica's part in one
region (replica 0's as a nested backward on the caller). It keeps all of dpfast's bookkeeping, so
it tells how much of dpfast's distance from the hand-written step the execution model is. A
prototype, not a product path: replica 0's nested backward would accumulate a root parameter
twice where the loss also uses it outside the module (weight decay written into the loss).

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
import contextlib
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


class _DpfastOnTeam:
    """dpfast's WorkerPool.run and backward.route replaced, while entered, by versions that run
    the replicas' forwards and backward parts on the caller's team (see the module docstring)."""

    def __init__(self, extension):
        from dpfast import _C, backward, workers
        self.run_on_team, self._C, self.backward, self.workers = extension.run_on_team, _C, backward, workers
        on_team = self._on_team

        class TeamBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, plan, anchor):
                ctx.plan, ctx.outputs = plan, list(plan.tensors)
                return tuple(t.detach() for t in plan.tensors)

            @staticmethod
            def backward(ctx, *grads):
                plan, reducer = ctx.plan, ctx.plan.reducer
                fns = []
                for start, end in plan.bounds:
                    pairs = [(t, g) for t, g in zip(ctx.outputs[start:end], grads[start:end]) if g is not None]
                    if pairs:
                        fns.append(backward._sub_backward([t for t, _ in pairs], [g for _, g in pairs], False, False))
                reducer._ready.note_replicas(plan.replicas)
                with reducer._lock:  # the end of backward on the caller's graph task, as run_replica_backward
                    if len(plan.window) > 1:
                        reducer._early_launch = False
                    if not reducer._callback_queued:
                        reducer._queue_end_of_backward()
                on_team(fns, [("in a replica's backward", "")] * len(fns))
                return None, None

        self.node = TeamBackward

    def _on_team(self, fns, wheres):
        state = self._C.CapturedThreadState()
        jobs = [self.workers._Job(fn, where, None, 0, state if k else None)
                for k, (fn, where) in enumerate(zip(fns, wheres))]
        self.run_on_team([lambda job=job: job.run(signal=False) for job in jobs])
        for job in jobs:
            if job.error is not None:
                job.reraise()
        return [job.result for job in jobs]

    def _run(self, fns, wheres, worker_threads=None, caller_threads=None):  # as WorkerPool.run (bound here)
        return self._on_team(fns, wheres)

    def _route(self, outputs, replica_tensors, where, replicas, threads, caller_threads, pool, reducer):
        from dpfast.scatter_gather import iter_tensors
        per_replica = [list({id(t): t for _, t in iter_tensors(out, None) if t.requires_grad}.values())
                       for out in outputs]
        plan = self.backward._Plan(per_replica, where, replicas, threads, caller_threads, pool, reducer)
        tensors = plan.tensors
        stand_ins = self.node.apply(plan, self.backward._ANCHOR)
        return {id(t): s for t, s in zip(tensors, stand_ins)}

    def __enter__(self):
        self._saved = self.workers.WorkerPool.run, self.backward.route
        self.workers.WorkerPool.run, self.backward.route = self._run, self._route
        return self

    def __exit__(self, *exc):
        self.workers.WorkerPool.run, self.backward.route = self._saved


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

    def training(model, one_thread=False, on_team=None):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            own = torch.get_num_threads()
            if one_thread:
                torch.set_num_threads(1)
            with on_team or contextlib.nullcontext():
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            torch.set_num_threads(own)
        return step

    bare = workload.build(0)
    team = TeamStep(workload.build(0), replicas, lr, extension)
    wrapped = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
    wrapped_one = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
    wrapped_team = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * replicas)
    systems = {"bare": (training(bare), bare), "team": (lambda: team(x, y), team.module),
               "dpfast": (training(wrapped), wrapped.module),
               "dpfast 1 thread": (training(wrapped_one, one_thread=True), wrapped_one.module),
               "dpfast on team": (training(wrapped_team, on_team=_DpfastOnTeam(extension)), wrapped_team.module)}
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
