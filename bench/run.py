"""``python -m bench``: the time of a training step, phase by phase, for the bare
module, dpfast, nn.DataParallel and DDP, on whatever this machine has.

Method
- Every system trains the same model (same seed, same initial weights) on the
  same random batch with SGD. Before anything is timed, its first
  CHECK_STEPS steps are compared with the bare module's on the same batches
  (loss and every root gradient, relative to the largest reference value),
  with TF32 off (common.exact_float32); a difference above --tolerance
  raises WrongResult and the run exits with status 2 without reporting any
  time.
- Step times are medians over --steps steps after --warmup steps. On the CPU
  they are time.perf_counter; on CUDA, CUDA events on the output device's
  current stream (dpfast and nn.DataParallel join their streams back into it
  before backward and the optimizer step return).
- Phases come from dpfast's phase_timer hook (scatter, param_sync, forward,
  gather, reduce), from the same hook on a subclass of nn.DataParallel, and
  from marks around the loss, backward and optimizer step. "backward" excludes
  "reduce" (which runs inside backward's wall time); "other" is what is left
  of the step (Python and wrapper code outside the named phases). On the CPU
  the phases are timed in the timed steps themselves. On CUDA, timing a phase
  needs every device synchronised at its boundaries, which would remove any
  overlap, so phases are timed in separate steps and the step time is never
  taken from those.
- "reduce" is dpfast's reduce phase: the reduction work left when backward
  ends. Buckets whose gradients are complete earlier are reduced from inside
  backward and count in "backward". How much of the reduction overlapped
  backward: backward's compute time is measured in extra steps under
  no_sync() (no reduction), the whole reduction's work alone (reduce_work:
  the same buckets through the engine's reduce_add_, nothing else running),
  and overlap = max(0, reduce_work + backward_compute - backward_wall) /
  reduce_work, clamped to [0, 1]; left out (None, with a note) where the
  reduction is too short to tell from the noise of backward's time. On CUDA
  the reported overlap is traced instead, and the timing estimate only
  stays in the note. This holds where the lanes share one GPU: events of
  different devices cannot be compared. The reducer records CUDA events
  (NOTE [Reduction trace]). Each bucket's span runs from the moment every
  lane's gradients of it are in to the root's last add. Another event marks
  when the replicas' backward work is all enqueued. overlap is the share of
  the spans' time that lies before that work ends (a span cut by it counts
  in part), as the median of up to 5 extra steps. Beside it,
  exposed_after_backward_us_traced is what the caller waits for once that
  work is done. On the CPU overlap is 0
  by construction: the engine runs in program order on the thread that runs
  backward.
- Speed-up is the bare module's median step time over the system's, in the
  same process run.
- On the CPU, ops run on one intra-op thread by default (--cpu-threads):
  each CPU replica is a thread of its own, and with several threads per op
  the times swing by orders of magnitude as soon as another process shares
  the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

if not __package__:  # run as a script (python bench/run.py): make the relative imports below work (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import dpfast  # noqa: E402
from dpfast import splits  # noqa: E402

from . import common  # noqa: E402
from .common import Clock, PhaseTimer, WrongResult, fmt  # noqa: E402
from .workloads import SIZES, WORKLOADS, Workload, make_workload  # noqa: E402

PHASES = ("scatter", "param_sync", "forward", "gather", "loss", "backward", "reduce", "optimizer", "other")
WRAPPER_FORWARD_PHASES = ("scatter", "param_sync", "forward", "gather")
CHECK_STEPS = 2  # the second step checks that the replicas saw the optimizer's update
SEED = 0
LEARNING_RATE = 0.01
MiB = 2**20


# -- systems ---------------------------------------------------------------------------------------

@dataclass
class System:
    label: str
    kind: str  # "bare", "chunks", "dpfast", "nn.DataParallel" or "ddp"
    devices: List[torch.device]
    loss_on_replicas: bool = False  # dpfast with gather=False and dpfast.ParallelCriterion
    chunks: int = 1  # "chunks": the batch's pieces, run one after the other


def plan_systems(devices: List[torch.device]) -> Tuple[List[System], List[dict]]:
    """The systems this device list allows, and a line for each that it does not."""
    unique = common.distinct(devices)
    n = len(devices)
    where = "CPU replicas" if devices[0].type == "cpu" else ("on one GPU" if len(unique) == 1 else "GPUs")
    systems = [System("bare", "bare", devices[:1])]
    if len(unique) == 1 and n > 1:
        # Replicas sharing one device: what the split alone costs there (dpfast's own cost is the rest).
        systems.append(System(f"bare on {n} chunks in turn", "chunks", devices[:1], chunks=n))
    if len(unique) == 1:
        systems.append(System("dpfast x1", "dpfast", devices[:1]))
    if n > 1:
        systems.append(System(f"dpfast x{n} ({where})", "dpfast", list(devices)))
        # Outputs never gathered: the output device's peak memory with and without it.
        systems.append(System(f"dpfast x{n} ({where}), loss on replicas", "dpfast", list(devices),
                              loss_on_replicas=True))
    gpus = [d for d in unique if d.type == "cuda"]
    not_run = []
    if len(gpus) >= 2 and len(unique) == n:
        systems.append(System(f"nn.DataParallel x{n}", "nn.DataParallel", list(devices)))
        systems.append(System(f"DDP x{n} (one process per GPU)", "ddp", list(devices)))
    else:
        reason = "needs 2+ distinct GPUs" if len(gpus) < 2 else "needs each GPU listed once"
        not_run.append({"system": "nn.DataParallel", "reason": f"not run: {reason}"})
        not_run.append({"system": "DDP", "reason": f"not run: {reason} (one process per GPU)"})
    return systems, not_run


class PhasedDataParallel(nn.DataParallel):
    """nn.DataParallel reporting the same phases as dpfast to a phase_timer.
    Its gradient reduction runs inside autograd (ReduceAddCoalesced) and cannot
    be timed apart from backward."""

    phase_timer = None

    def _phase(self, name):
        return self.phase_timer.phase(name) if self.phase_timer is not None else contextlib.nullcontext()

    def scatter(self, *args, **kwargs):
        with self._phase("scatter"):
            return super().scatter(*args, **kwargs)

    def replicate(self, *args, **kwargs):
        with self._phase("param_sync"):
            return super().replicate(*args, **kwargs)

    def parallel_apply(self, *args, **kwargs):
        with self._phase("forward"):
            return super().parallel_apply(*args, **kwargs)

    def gather(self, *args, **kwargs):
        with self._phase("gather"):
            return super().gather(*args, **kwargs)


class Chunked(nn.Module):
    """The module on the batch's chunks (dpfast's split) one after the other, outputs joined."""

    def __init__(self, module: nn.Module, chunks: int):
        super().__init__()
        self.module, self.chunks = module, chunks

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        sizes = splits.chunk_sizes_for(inputs.shape[0], self.chunks, None, None)
        return torch.cat([self.module(piece) for piece in inputs.split(sizes) if piece.shape[0]])


def wrap(system: System, module: nn.Module) -> nn.Module:
    if system.kind == "bare":
        return module
    if system.kind == "chunks":
        return Chunked(module, system.chunks)
    if system.kind == "dpfast":
        return dpfast.DataParallel(module, device_ids=system.devices, gather=not system.loss_on_replicas)
    if system.kind == "nn.DataParallel":
        return PhasedDataParallel(module, device_ids=[d.index for d in system.devices])
    raise ValueError(f"unknown system kind {system.kind!r}")


def release_memory(devices: Sequence[torch.device]) -> None:
    gc.collect()
    if devices[0].type == "cuda":
        torch.cuda.empty_cache()


def set_phase_timer(model: nn.Module, timer: Optional[PhaseTimer]) -> None:
    if hasattr(model, "phase_timer"):
        model.phase_timer = timer


def inject_fault(model: nn.Module) -> None:
    """For the tests: make the system return a wrong output, to prove that the
    check fails the run. (A constant shift would not change cross-entropy.)"""
    model.register_forward_hook(lambda module, inputs, output: output * 1.5)


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=0.9)


# -- correctness -----------------------------------------------------------------------------------

def relative_error(value: Optional[torch.Tensor], reference: Optional[torch.Tensor]) -> float:
    """max |value - reference| / max |reference|; inf where one is missing or not finite."""
    if value is None or reference is None:
        return 0.0 if value is None and reference is None else math.inf
    value = value.detach().float().cpu()
    reference = reference.detach().float().cpu()
    if value.shape != reference.shape or not torch.isfinite(value).all():
        return math.inf
    scale = max(reference.abs().max().item(), 1e-12)
    return (value - reference).abs().max().item() / scale


def reference_steps(workload: Workload, batches, device: torch.device) -> List[dict]:
    """Loss and gradients of the bare module over the check batches, on one device."""
    module = workload.build(SEED).to(device)
    optimizer = make_optimizer(module)
    steps = []
    for inputs, targets in batches:
        outputs = module(inputs.to(device))
        loss = workload.loss(outputs, targets.to(device))
        loss.backward()
        steps.append({"loss": loss.detach().cpu(), "output_bytes": outputs.numel() * outputs.element_size(),
                      "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in module.parameters()]})
        optimizer.step()
        optimizer.zero_grad()
    return steps


def step_errors(loss: torch.Tensor, module: nn.Module, reference: dict) -> Tuple[float, float]:
    loss_error = relative_error(loss, reference["loss"])
    grad_error = max((relative_error(p.grad, g) for p, g in zip(module.parameters(), reference["grads"])), default=0.0)
    return loss_error, grad_error


def verify(label: str, errors: List[Tuple[float, float]], tolerance: float) -> dict:
    """Raises WrongResult when a checked step is off; else the record of the check."""
    for step, (loss_error, grad_error) in enumerate(errors, start=1):
        if not (loss_error <= tolerance and grad_error <= tolerance):
            raise WrongResult(f"{label}: step {step} differs from the bare module on the same batch: loss relative "
                              f"error {loss_error:.3g}, largest gradient relative error {grad_error:.3g} "
                              f"(tolerance {tolerance:g})")
    return {"checked_steps": len(errors), "tolerance": tolerance,
            "max_loss_relative_error": max(e[0] for e in errors),
            "max_grad_relative_error": max(e[1] for e in errors)}


def check_steps(model: nn.Module, module: nn.Module, optimizer, workload: Workload, batches, reference) -> list:
    errors = []
    for (inputs, targets), expected in zip(batches, reference):
        loss = workload.loss(model(inputs), targets)
        loss.backward()
        errors.append(step_errors(loss, module, expected))
        optimizer.step()
        optimizer.zero_grad()
    return errors


# -- timing ----------------------------------------------------------------------------------------

@dataclass
class StepTime:
    total_us: float
    backward_wall_us: float  # backward as the caller sees it, the reduction included
    phases_us: Dict[str, float]


def train_step(model, optimizer, workload: Workload, inputs, targets, clock: Clock,
               timer: Optional[PhaseTimer] = None) -> Tuple[torch.Tensor, StepTime]:
    t_start = clock.mark()
    outputs = model(inputs)
    t_forward = clock.mark()
    loss = workload.loss(outputs, targets)
    t_loss = clock.mark()
    loss.backward()
    t_backward = clock.mark()
    optimizer.step()
    optimizer.zero_grad()
    t_end = clock.mark()

    phases = timer.take_us() if timer is not None else {}
    forward_call_us = clock.elapsed_us(t_start, t_forward)
    if not any(name in phases for name in WRAPPER_FORWARD_PHASES):
        phases["forward"] = forward_call_us
    phases["loss"] = clock.elapsed_us(t_forward, t_loss)
    backward_wall_us = clock.elapsed_us(t_loss, t_backward)
    phases["backward"] = backward_wall_us - phases.get("reduce", 0.0)
    phases["optimizer"] = clock.elapsed_us(t_backward, t_end)
    total_us = clock.elapsed_us(t_start, t_end)
    phases["other"] = total_us - sum(phases.values())
    return loss.detach(), StepTime(total_us, backward_wall_us, phases)


def backward_compute_samples_us(model, workload: Workload, inputs, targets, clock: Clock, steps: int,
                                bar) -> List[float]:
    """Wall times of backward with the gradient reduction switched off (no_sync)."""
    times = []
    with model.no_sync():
        for _ in range(steps):
            loss = workload.loss(model(inputs), targets)
            start = clock.mark()
            loss.backward()
            # Without a reduction nothing joins the replicas' streams back into the current one.
            common.synchronize(clock.devices)
            times.append(clock.elapsed_us(start, clock.mark()))
            bar.update()
    return times


def reduce_work_us(model, devices: List[torch.device], iters: int) -> float:
    """The time the engine needs for one step's gradient reduction with nothing else running:
    reduce_add_ over buckets laid out as the wrapper's reducer lays them out."""
    total_us = 0.0
    for numel, dtype_name in model.stats()["bucket_layout"]:
        buffers = [torch.zeros(numel, dtype=getattr(torch, dtype_name), device=d) for d in devices]
        link = dpfast.devices.link_model(devices)  # the plan the wrapper's reducer uses
        total_us += common.timed_loop_us(lambda b=buffers: dpfast._C.reduce_add_(b, 0, [], "auto", 0, True, *link),
                                         devices, iters, warmup=1)
    return total_us


def median_deviation(samples: Sequence[float]) -> float:
    center = common.median(samples)
    return common.median([abs(x - center) for x in samples])


def overlap_estimate(device: torch.device, work_us: float, compute_samples_us: List[float],
                     wall_samples_us: List[float]) -> Tuple[Optional[float], str]:
    """The fraction of the reduction's work hidden under backward, and how it was found."""
    if device.type == "cpu":
        return 0.0, "CPU: the engine runs in program order on the thread that runs backward; nothing overlaps"
    # The hidden time is a difference of two medians: each carries its samples' spread.
    noise_us = median_deviation(compute_samples_us) + median_deviation(wall_samples_us)
    if noise_us > 0.5 * work_us:
        return None, (f"not measurable: the reduction's work ({work_us:.0f} us) is within the timing noise of "
                      f"backward ({noise_us:.0f} us)")
    hidden_us = work_us + common.median(compute_samples_us) - common.median(wall_samples_us)
    return min(1.0, max(0.0, hidden_us / work_us)), "(reduce_work + backward_compute - backward_wall) / reduce_work"


def hidden_fraction(compute_end_us: float, spans_us: List[Tuple[float, float]]) -> Tuple[Optional[float], float]:
    """(share of the reduction's wall-clock spans that lies before the replicas' backward work
    ended, the spans' total length); overlapping spans count once. None without spans."""
    merged: List[List[float]] = []
    for start, end in sorted(spans_us):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    total = sum(end - start for start, end in merged)
    if total <= 0:
        return None, 0.0
    hidden = sum(max(0.0, min(end, compute_end_us) - start) for start, end in merged)
    return hidden / total, total


def traced_overlap(model, workload: Workload, inputs, targets, steps: int) -> dict:
    """NOTE [Reduction trace]: CUDA events from inside dpfast's reducer, over `steps` backward
    passes on lanes of one GPU: the share of the reduction's spans that lies before the replicas'
    backward work ended, and the time from then to the end of the end-of-backward step (what the
    caller waits for)."""
    fractions, tails_us, spans_us = [], [], []
    traced = []  # every reducer given a trace list, so that each is reset
    try:
        for _ in range(steps):
            loss = workload.loss(model(inputs), targets)
            reducer = model._runtime.reducer  # the one this forward's backward reduces through
            reducer.trace = []
            traced.append(reducer)
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
            loss.backward()
            torch.cuda.synchronize()
            model.module.zero_grad()
            at_us = lambda event: origin.elapsed_time(event) * 1e3  # noqa: E731 (ms -> us)
            compute_ends = [at_us(e) for kind, *rest in reducer.trace if kind == "compute_end" for e in rest[0]]
            finish_ends = [at_us(rest[0]) for kind, *rest in reducer.trace if kind == "finish_end"]
            spans = [(max(at_us(e) for e in rest[1]), at_us(rest[2])) for kind, *rest in reducer.trace
                     if kind == "bucket"]
            if not compute_ends or not finish_ends:  # nothing reduced at this backward's end
                continue
            fraction, span_us = hidden_fraction(max(compute_ends), spans)
            if fraction is not None:
                fractions.append(fraction)
            tails_us.append(max(finish_ends) - max(compute_ends))
            spans_us.append(span_us)
    finally:
        for reducer in traced:
            reducer.trace = None
    return {"reduce_hidden_fraction_traced": common.median(fractions) if fractions else None,
            "reduce_span_us_traced": common.median(spans_us) if spans_us else None,
            "exposed_after_backward_us_traced": common.median(tails_us) if tails_us else None}


def steps_per_system(system: System, args) -> int:
    """Progress-bar units: check, warm-up and timed steps, plus the extra steps a system needs."""
    cuda = system.devices[0].type == "cuda"
    count = CHECK_STEPS + args.warmup + args.steps * (2 if cuda else 1)
    if system.kind == "dpfast" and len(system.devices) > 1:
        count += args.steps
    return count


def time_steps(model, optimizer, workload: Workload, inputs, targets, system: System, args,
               bar) -> Tuple[List[StepTime], List[StepTime]]:
    """The timed steps, and the steps the phases come from (the same ones on the CPU)."""
    cuda = system.devices[0].type == "cuda"
    clock = Clock(system.devices)
    # On the CPU the phase marks cost nothing and perturb nothing: time phases in the timed steps.
    timer = None if cuda else PhaseTimer(clock)
    set_phase_timer(model, timer)
    timed: List[StepTime] = []
    for step in range(args.warmup + args.steps):
        loss, times = train_step(model, optimizer, workload, inputs, targets, clock, timer)
        if step >= args.warmup:
            timed.append(times)
        bar.update()
    if not torch.isfinite(loss):
        raise WrongResult(f"{system.label}: the loss became {loss.item()} during the timed steps")
    phased = timed
    if cuda:
        sync_clock = Clock(system.devices, synchronize_marks=True)
        timer = PhaseTimer(sync_clock)
        set_phase_timer(model, timer)
        phased = []
        for _ in range(args.steps):
            phased.append(train_step(model, optimizer, workload, inputs, targets, sync_clock, timer)[1])
            bar.update()
    set_phase_timer(model, None)
    return timed, phased


def measure_overlap(system: System, model, module: nn.Module, workload: Workload, inputs, targets,
                    timed: List[StepTime], args, bar) -> dict:
    """Backward with and without the reduction, the reduction alone, and the overlap they imply."""
    wall_samples_us = [t.backward_wall_us for t in timed]
    record = {"backward_wall_us": common.median(wall_samples_us), "backward_compute_us": None,
              "reduce_work_us": None, "reduce_overlap_fraction": None,
              "reduce_overlap_note": {"bare": "no reduction", "dpfast": "no reduction (one replica)",
                                      "chunks": "no reduction",
                                      "nn.DataParallel": "none by design: the reduction starts after every "
                                      "replica's backward (inside autograd, not timed apart)"}[system.kind]}
    if system.kind != "dpfast" or len(system.devices) == 1:
        return record
    compute_samples_us = backward_compute_samples_us(model, workload, inputs, targets, Clock(system.devices),
                                                     args.steps, bar)
    work_us = reduce_work_us(model, system.devices, args.steps)
    overlap, note = overlap_estimate(system.devices[0], work_us, compute_samples_us, wall_samples_us)
    record.update(backward_compute_us=common.median(compute_samples_us), reduce_work_us=work_us,
                  reduce_overlap_fraction=overlap, reduce_overlap_note=note)
    if system.devices[0].type == "cuda" and len(common.distinct(system.devices)) == 1:  # NOTE [Reduction trace]
        record.update(traced_overlap(model, workload, inputs, targets, min(args.steps, 5)))
        if record["reduce_hidden_fraction_traced"] is not None:
            record["reduce_overlap_fraction"] = record["reduce_hidden_fraction_traced"]
            record["reduce_overlap_note"] = ("traced: the share of the buckets' reduction spans (CUDA events in "
                                             "the reducer) before the replicas' backward ended; " + note)
    return record


def run_in_process(system: System, workload: Workload, args, check_batches, reference, batch, bar) -> dict:
    device = system.devices[0]
    release_memory(system.devices)  # so that NVML's view shows this system, not the previous one's cache
    module = workload.build(SEED).to(device)
    model = wrap(system, module)
    if args.inject_fault and system.kind not in ("bare", "chunks"):  # the baselines stay right
        inject_fault(model)
    optimizer = make_optimizer(module)
    common.reset_peak_memory(system.devices)

    on_device = [(x.to(device), y.to(device)) for x, y in check_batches]
    with common.exact_float32():
        errors = check_steps(model, module, optimizer, workload, on_device, reference)
    correctness = verify(system.label, errors, args.tolerance)
    bar.update(CHECK_STEPS)

    inputs, targets = batch[0].to(device), batch[1].to(device)
    timed, phased = time_steps(model, optimizer, workload, inputs, targets, system, args, bar)
    memory = common.peak_memory(system.devices)  # before measure_overlap allocates buffers of its own
    record = system_record(system, [t.total_us for t in timed], common.median_of_phases([t.phases_us for t in phased]),
                           correctness, len(batch[1]))
    record.update(measure_overlap(system, model, module, workload, inputs, targets, timed, args, bar))
    record.update(memory=memory, dpfast_stats=model.stats() if system.kind == "dpfast" else None)
    return record


def system_record(system: System, step_times_us: List[float], phases_us: Dict[str, float], correctness: dict,
                  batch_size: int) -> dict:
    step_us = common.median(step_times_us)
    return {
        "system": system.label,
        "kind": system.kind,
        "loss_on_replicas": system.loss_on_replicas,
        "devices": common.devices_json(system.devices),
        "num_replicas": len(system.devices),
        "status": "ok",
        "step_time_us": step_us,
        "step_time_samples_us": step_times_us,
        "phases_us": {name: phases_us.get(name) for name in PHASES},
        "phase_timing": ("CUDA events, devices synchronised at every phase boundary, in separate steps"
                         if system.devices[0].type == "cuda" else "time.perf_counter in the timed steps"),
        "throughput_samples_per_s": batch_size / (step_us * 1e-6),
        "speedup_vs_bare": None,
        "correctness": correctness,
    }


# -- DDP: one process per GPU ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, job: dict, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(job["devices"][rank])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        workload = make_workload(job["workload"], job["size"])
        module = workload.build(SEED).to(device)
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
        if job["inject_fault"]:
            inject_fault(model)
        optimizer = make_optimizer(module)
        common.reset_peak_memory([device])
        per_rank = job["batch_size"] // world
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        errors = []
        with common.exact_float32():
            for seed, expected in zip(job["check_seeds"], job["reference"]):
                inputs, targets = workload.make_batch(job["batch_size"], seed)
                loss = workload.loss(model(inputs[shard].to(device)), targets[shard].to(device))
                loss.backward()  # DDP averages the gradients: the gradient of the whole batch's mean loss
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                errors.append(step_errors(mean_loss / world, module, expected))
                optimizer.step()
                optimizer.zero_grad()
        inputs, targets = workload.make_batch(job["batch_size"], job["batch_seed"])
        inputs, targets = inputs[shard].to(device), targets[shard].to(device)
        clock = Clock([device])
        timed = []
        for step in range(job["warmup"] + job["steps"]):
            loss, times = train_step(model, optimizer, workload, inputs, targets, clock)
            if step >= job["warmup"]:
                timed.append(times)
        results.put({"rank": rank, "errors": errors, "final_loss": loss.item(),
                     "step_times_us": [t.total_us for t in timed],
                     "phases_us": common.median_of_phases([t.phases_us for t in timed]),
                     "memory": common.peak_memory([device])})
    finally:
        dist.destroy_process_group()


def run_ddp(system: System, workload: Workload, args, check_seeds, reference, batch_seed, bar) -> dict:
    import torch.multiprocessing as mp

    world = len(system.devices)
    if args.batch_size % world:
        return {"system": system.label, "status": "not run",
                "reason": f"not run: batch size {args.batch_size} is not divisible by {world} processes (the check "
                          f"needs equal shards)"}
    job = {"devices": common.devices_json(system.devices), "workload": workload.name, "size": workload.size,
           "batch_size": args.batch_size, "check_seeds": check_seeds, "reference": reference,
           "batch_seed": batch_seed, "warmup": args.warmup, "steps": args.steps, "inject_fault": args.inject_fault}
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(world, free_port(), job, results), nprocs=world, join=True,
                       start_method="spawn")
    by_rank = sorted((results.get() for _ in range(world)), key=lambda r: r["rank"])
    bar.update(steps_per_system(system, args))
    correctness = verify(system.label, by_rank[0]["errors"], args.tolerance)
    if not all(math.isfinite(r["final_loss"]) for r in by_rank):
        raise WrongResult(f"{system.label}: the loss became non-finite during the timed steps")
    # The slowest rank sets the pace of a synchronous step.
    step_times_us = [max(times) for times in zip(*(r["step_times_us"] for r in by_rank))]
    record = system_record(system, step_times_us, by_rank[0]["phases_us"], correctness, args.batch_size)
    memory = {key: {} for key in ("torch_peak_allocated_bytes", "torch_peak_reserved_bytes", "nvml_used_bytes")}
    for r in by_rank:
        for key in memory:
            if isinstance(r["memory"][key], dict):
                memory[key].update(r["memory"][key])
    record.update({"phase_timing": "CUDA events on rank 0 (the all-reduce overlaps backward and is part of it)",
                   "backward_wall_us": by_rank[0]["phases_us"]["backward"], "backward_compute_us": None,
                   "reduce_work_us": None, "reduce_overlap_fraction": None,
                   "reduce_overlap_note": "DDP's all-reduce runs inside backward and is not timed apart",
                   "memory": memory, "dpfast_stats": None})
    return record


# -- one workload ----------------------------------------------------------------------------------

def model_facts(workload: Workload, batch, reference: List[dict]) -> dict:
    """What the cost model (bench/model.py) needs besides the times."""
    module = workload.build(SEED)
    params = list(module.parameters())
    return {
        "param_count": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "num_param_tensors": len(params),
        "num_modules": sum(1 for _ in module.modules()),
        "input_bytes": batch[0].numel() * batch[0].element_size(),
        "output_bytes": reference[0]["output_bytes"],
    }


def bench_workload(workload: Workload, systems: List[System], not_run: List[dict], args, bar) -> dict:
    check_seeds = [1000 + step for step in range(CHECK_STEPS)]
    check_batches = [workload.make_batch(args.batch_size, seed) for seed in check_seeds]
    batch_seed = 1
    batch = workload.make_batch(args.batch_size, batch_seed)
    with common.exact_float32():
        reference = reference_steps(workload, check_batches, systems[0].devices[0])
    record = {"workload": workload.name, "size": workload.size, "description": workload.description,
              "config": workload.config, "batch_size": args.batch_size, **model_facts(workload, batch, reference),
              "systems": [], "not_run": list(not_run)}
    for system in systems:
        bar.set_postfix_str(f"{workload.name}: {system.label}")
        if system.kind == "ddp":
            result = run_ddp(system, workload, args, check_seeds, reference, batch_seed, bar)
        else:
            result = run_in_process(system, workload, args, check_batches, reference, batch, bar)
        if result["status"] == "ok":
            record["systems"].append(result)
        else:
            record["not_run"].append({"system": result["system"], "reason": result["reason"]})
    bare_us = record["systems"][0]["step_time_us"]
    chunks_us = next((r["step_time_us"] for r in record["systems"] if r["kind"] == "chunks"), None)
    for result in record["systems"]:
        result["speedup_vs_bare"] = bare_us / result["step_time_us"]
        # dpfast's own cost where replicas share a device: its step over the same split run in turn
        result["time_vs_chunks"] = (result["step_time_us"] / chunks_us
                                    if chunks_us and result["kind"] == "dpfast" and len(result["devices"]) > 1
                                    else None)
    return record


# -- output ----------------------------------------------------------------------------------------

def peak_memory_label(memory: dict) -> str:
    torch_peaks = memory["torch_peak_allocated_bytes"]
    if torch_peaks:
        return "/".join(f"{b / 2**20:.0f}" for b in torch_peaks.values())
    if "process_peak_rss_bytes" in memory:
        return f"{memory['process_peak_rss_bytes'] / 2**20:.0f} (RSS)"
    return "-"


def format_results(record: dict) -> str:
    headers = ["workload", "system", "step ms", "samples/s", "speed-up", "vs chunks", "scatter", "sync", "fwd", "gather", "loss",
               "bwd", "reduce", "overlap", "opt", "other", "peak MiB"]
    rows = []
    for w in record["workloads"]:
        for s in w["systems"]:
            ms = {name: (None if v is None else v / 1e3) for name, v in s["phases_us"].items()}
            rows.append([f"{w['workload']} (b={w['batch_size']})", s["system"], fmt(s["step_time_us"] / 1e3),
                         fmt(s["throughput_samples_per_s"], 0), fmt(s["speedup_vs_bare"]) + "x",
                         "-" if s.get("time_vs_chunks") is None else fmt(s["time_vs_chunks"]) + "x",
                         *(fmt(ms[p]) for p in ("scatter", "param_sync", "forward", "gather", "loss", "backward",
                                                "reduce")),
                         fmt(s["reduce_overlap_fraction"]), fmt(ms["optimizer"]), fmt(ms["other"]),
                         peak_memory_label(s["memory"])])
    lines = [f"devices: {record['device_label']}", "phases: medians in ms; peak MiB: torch allocator per device "
             "(RSS: the process's peak resident memory on the host)", common.format_table(headers, rows)]
    not_run = {(n["system"], n["reason"]) for w in record["workloads"] for n in w["not_run"]}
    lines += [f"{system}: {reason}" for system, reason in sorted(not_run)]
    return "\n".join(lines)


def write_chart(record: dict, path: str) -> Optional[str]:
    """A stacked bar of the phases per system, one panel per workload; None when matplotlib is missing."""
    plt = common.pyplot()
    if plt is None:
        return None
    workloads = record["workloads"]
    figure, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.2 + 0.55 * sum(len(w["systems"]) for w in workloads)
                                                             + 0.6 * len(workloads)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for axis, w in zip(axes[:, 0], workloads):
        labels = [s["system"] for s in w["systems"]]
        left = [0.0] * len(labels)
        for color, phase in zip(colors, PHASES):
            widths = [max(0.0, s["phases_us"][phase] or 0.0) / 1e3 for s in w["systems"]]
            axis.barh(labels, widths, left=left, color=color, label=phase)
            left = [a + b for a, b in zip(left, widths)]
        axis.invert_yaxis()
        axis.set_title(f"{w['workload']}: {w['description']}, batch {w['batch_size']}", fontsize=9)
        axis.set_xlabel("median time per phase (ms)")
    axes[0, 0].legend(ncol=len(PHASES), fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.15))
    figure.suptitle(f"dpfast benchmark: {record['device_label']}", fontsize=10, y=0.995)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- command line ----------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", help="comma-separated devices, e.g. 0,1 or cuda:0,cuda:0 or cpu,cpu,cpu,cpu "
                        "(default: all GPUs; one GPU: it 4 times; no GPU: 4 CPU replicas)")
    parser.add_argument("--quick", action="store_true", help="a short configuration (under a minute on 2 CPU cores)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: "
                        + ", ".join(WORKLOADS))
    parser.add_argument("--size", choices=SIZES,
                        help="model size (default: base on GPU, small on CPU; --quick: small on GPU, tiny on CPU)")
    parser.add_argument("--batch-size", type=int, help="global batch size (default: per workload and size)")
    parser.add_argument("--steps", type=int, help="timed steps per system (default 30; --quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 5; --quick 2)")
    parser.add_argument("--tolerance", type=float, help="largest relative error of the checked loss and gradients "
                        "(default 1e-3 on CPU; 2e-2 on CUDA, where cuDNN picks other convolution algorithms for other batch sizes; the checked steps run with TF32 off)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch intra-op threads for CPU devices (default 1: each CPU replica is a thread of "
                             "its own, and single-threaded ops keep the times steady on shared cores; 0: torch's "
                             "default)")
    parser.add_argument("--out", default=common.DEFAULT_OUT_DIR, help="folder for the JSON and PNG "
                        "(default bench/results/)")
    parser.add_argument("--label", help="file-name label (default: cpu-quick, gpu1, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--inject-fault", action="store_true",
                        help="for tests: make every system but the baselines (bare, chunks) return a wrong output; the run must fail")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: expected at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size: expected at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    devices = common.parse_devices(args.devices) if args.devices else common.default_devices()
    cuda = devices[0].type == "cuda"
    args.size = args.size or {(True, True): "small", (True, False): "base", (False, True): "tiny",
                              (False, False): "small"}[(cuda, args.quick)]
    args.steps = args.steps or (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.tolerance = args.tolerance or (2e-2 if cuda else 1e-3)
    args.label = args.label or common.card_label(devices) + ("-quick" if args.quick else "")
    threads = torch.get_num_threads()
    if not cuda and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    try:
        return run_benchmark(args, devices)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def run_benchmark(args: argparse.Namespace, devices: List[torch.device]) -> int:
    workloads = [make_workload(name.strip(), args.size) for name in args.workloads.split(",") if name.strip()]
    systems, not_run = plan_systems(devices)
    started = common.now()
    device_label = common.describe_devices(devices)
    print(f"dpfast benchmark: {device_label}; {args.size} models, {args.steps} timed steps after {args.warmup} "
          f"warm-up steps; intra-op threads: {torch.get_num_threads()}", flush=True)

    record = {"schema": "dpfast-bench", "schema_version": common.SCHEMA_VERSION, "label": args.label,
              "date": started.isoformat(timespec="seconds"), "machine": common.machine_record(),
              "devices": common.devices_json(devices), "device_type": devices[0].type,
              "device_label": device_label, "size": args.size, "steps": args.steps, "warmup": args.warmup,
              "quick": args.quick, "method": __doc__.split("Method\n", 1)[1].strip(), "workloads": []}
    total_steps = len(workloads) * sum(steps_per_system(s, args) for s in systems)
    bar = common.progress(total_steps, "bench", enabled=not args.no_progress)
    try:
        for workload in workloads:
            batch_args = argparse.Namespace(**vars(args))
            batch_args.batch_size = args.batch_size or workload.default_batch_size
            record["workloads"].append(bench_workload(workload, systems, not_run, batch_args, bar))
    except WrongResult as error:
        bar.close()
        print(f"\nWRONG RESULT: {error}\nThe benchmark stopped; no times are reported for a wrong result.",
              file=sys.stderr, flush=True)
        return 2
    bar.close()

    print(format_results(record))
    json_path = common.result_path(args.out, started, args.label, ".json")
    chart_path = write_chart(record, common.result_path(args.out, started, args.label, ".png"))
    record["chart"] = chart_path or "not written: matplotlib is not installed"
    common.write_json(json_path, record)
    print(f"wrote {json_path}" + (f" and {chart_path}" if chart_path else " (no chart: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
