"""``python -m bench.comm``: the engine's collectives timed the way nccl-tests
times them, each timing beside a correctness check.

Rows: op, impl, bytes, ndev, time_us, algbw_GBps, busbw_GBps, wrong.
- time_us: mean of --iters back-to-back calls after --warmup calls; the
  devices are synchronised only around the loop.
- dpfast's reduce_add and broadcast run as the wrapper runs them: one CUDA
  stream per lane, and the planner's link model for these devices
  (dpfast.devices.link_model: lanes sharing one GPU are planned for its
  memory, not for a link between GPUs). Results before 2026-11-27 10:00 UTC
  ran every lane on the current stream with the 25 GB/s link model.
- algbw = bytes / time. busbw (nccl-tests doc/PERFORMANCE.md): reduce and
  broadcast: busbw = algbw (all the data crosses the root's link once);
  scatter: algbw x (n-1)/n (the root's own piece does not move).
- wrong: elements that differ from the expected result in a separate checked
  call. Inputs are small integers, so float32 sums are exact and the check is
  equality. Any wrong element makes the run exit with status 1.
- The same ops through torch.cuda.comm where they can run (CUDA, each GPU
  listed once), and a large copy on devices[0] as the ceiling: the card's
  memory bandwidth (busbw counts bytes read plus written), or the host's
  memcpy on the CPU. Beside it, torch's in-place add of the same size
  (busbw: two buffers read, one written): the ceiling of one reduction step.
Several lanes on one device (CPU replicas, or one GPU listed N times) measure
the engine's overhead and the device's memory bandwidth, not a link; scatter
to lanes on the source's own device returns views and moves nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

from dpfast import _C
from dpfast import streams as lane_streams
from dpfast.devices import link_model

from . import common
from .common import fmt

OPS = ("reduce_add", "broadcast", "scatter")
KiB, MiB, GiB = 2**10, 2**20, 2**30
CPU_MAX_BYTES = 4 * MiB  # CPU "devices" share the host's memory: larger sizes only take longer


def sweep_sizes(min_bytes: int, max_bytes: int, factor: int) -> List[int]:
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def pattern(numel: int, device: torch.device) -> torch.Tensor:
    """Small integers (-8..8) as float32: sums over up to millions of lanes stay exact."""
    return (torch.arange(numel, device=device) % 17 - 8).to(torch.float32)


def count_wrong(values: torch.Tensor, expected: torch.Tensor) -> int:
    return int((values != expected.to(values.device)).sum().item())


def make_row(op: str, impl: str, nbytes: int, ndev: int, time_us: float, bus_factor: float, wrong: int,
             note: str = "") -> dict:
    algbw = nbytes / (time_us * 1e3)  # bytes per us / 1e3 = GB/s
    return {"op": op, "impl": impl, "bytes": nbytes, "ndev": ndev, "time_us": time_us, "algbw_GBps": algbw,
            "busbw_GBps": algbw * bus_factor, "wrong": wrong, "note": note}


class OpBench:
    """One op at one size: how to time it and how to check it."""

    def __init__(self, op: str, impl: str, devices: List[torch.device], numel: int, fault: bool):
        self.op, self.impl, self.devices, self.numel, self.fault = op, impl, devices, numel, fault
        self.n = len(devices)
        # The engine as the wrapper drives it: a stream per lane and the planner's link model for
        # these devices (lanes sharing one GPU: its memory, not a link between GPUs).
        self.lanes = lane_streams.make_lane_streams(devices)
        self.link = link_model(devices)

    def engine(self, op, buffers: List[torch.Tensor]) -> None:
        """One engine call on the lanes, ordered after and before the caller's current streams."""
        lane_streams.wait_for_callers(self.lanes)
        op(buffers, 0, lane_streams.ids(self.lanes), "auto", 0, True, *self.link)
        lane_streams.callers_wait_for(self.lanes)

    def corrupt(self, result: torch.Tensor) -> None:
        if self.fault:  # for the tests: the check must see a wrong element
            result.view(-1)[0] += 1

    # Each op: (timed call, checked call returning the wrong count, bus factor, note).
    def reduce_add(self):
        if self.impl == "dpfast":
            # Zeros stay zeros: back-to-back timed calls keep the values (and the time) stable.
            buffers = [torch.zeros(self.numel, device=d) for d in self.devices]

            def check():
                inputs = [pattern(self.numel, d) * (k + 1) for k, d in enumerate(self.devices)]
                self.engine(_C.reduce_add_, inputs)
                self.corrupt(inputs[0])
                return count_wrong(inputs[0], pattern(self.numel, self.devices[0]) * (self.n * (self.n + 1) // 2))

            return (lambda: self.engine(_C.reduce_add_, buffers)), check, 1.0, ""
        inputs = [pattern(self.numel, d) * (k + 1) for k, d in enumerate(self.devices)]

        def check():
            result = torch.cuda.comm.reduce_add(inputs, destination=self.devices[0].index)
            self.corrupt(result)
            return count_wrong(result, pattern(self.numel, self.devices[0]) * (self.n * (self.n + 1) // 2))

        return (lambda: torch.cuda.comm.reduce_add(inputs, destination=self.devices[0].index)), check, 1.0, ""

    def broadcast(self):
        source = pattern(self.numel, self.devices[0])
        if self.impl == "dpfast":
            buffers = [source] + [torch.zeros(self.numel, device=d) for d in self.devices[1:]]

            def check():
                for b in buffers[1:]:
                    b.zero_()
                self.engine(_C.broadcast_, buffers)
                self.corrupt(buffers[-1])
                return sum(count_wrong(b, source) for b in buffers)

            return (lambda: self.engine(_C.broadcast_, buffers)), check, 1.0, ""

        def check():
            copies = torch.cuda.comm.broadcast(source, devices=[d.index for d in self.devices])
            self.corrupt(copies[-1])
            return sum(count_wrong(c, source) for c in copies)

        return (lambda: torch.cuda.comm.broadcast(source, devices=[d.index for d in self.devices])), check, 1.0, ""

    def scatter(self):
        source = pattern(self.numel, self.devices[0])
        chunk_sizes = [self.numel // self.n] * self.n
        note = ("pieces on the source's device are views: only the call's overhead is timed"
                if len(common.distinct(self.devices)) == 1 else "")
        if self.impl == "dpfast":
            def call():
                return _C.scatter(source, self.devices, chunk_sizes, 0)
        else:
            def call():
                return torch.cuda.comm.scatter(source, devices=[d.index for d in self.devices], chunk_sizes=chunk_sizes)

        def check():
            pieces = [p.clone() for p in call()]
            self.corrupt(pieces[-1])
            return sum(count_wrong(p, expected) for p, expected in zip(pieces, source.split(chunk_sizes)))

        return call, check, (self.n - 1) / self.n, note

    def run(self, iters: int, warmup: int) -> dict:
        timed_call, check, bus_factor, note = getattr(self, self.op)()
        time_us = common.timed_loop_us(timed_call, self.devices, iters, warmup)
        wrong = check()
        return make_row(self.op, self.impl, self.numel * 4, self.n, time_us, bus_factor, wrong, note)


def copy_ceiling(device: torch.device, nbytes: int, iters: int, warmup: int, fault: bool) -> dict:
    """One large copy on one device; busbw counts the bytes read plus written."""
    numel = nbytes // 4
    source = pattern(numel, device)
    destination = torch.empty_like(source)
    time_us = common.timed_loop_us(lambda: destination.copy_(source), [device], iters, warmup)
    destination.zero_()
    destination.copy_(source)
    if fault:
        destination[0] += 1
    what = "memory bandwidth ceiling of the card" if device.type == "cuda" else "memcpy ceiling of the host"
    return make_row("copy", "torch", nbytes, 1, time_us, 2.0, count_wrong(destination, source), what)


def add_ceiling(device: torch.device, nbytes: int, iters: int, warmup: int, fault: bool) -> dict:
    """torch's own in-place add on one device: the fastest one step of a reduction (3 bytes of
    memory traffic per byte added) can go; busbw counts the bytes read plus written."""
    numel = nbytes // 4
    source = pattern(numel, device)
    destination = torch.zeros_like(source)
    time_us = common.timed_loop_us(lambda: destination.add_(source), [device], iters, warmup)
    destination.copy_(source)
    destination.add_(source)
    if fault:
        destination[0] += 1
    return make_row("add", "torch", nbytes, 1, time_us, 3.0, count_wrong(destination, 2 * source),
                    "one in-place add of torch: a reduction step's ceiling")


def torch_comm_reason(devices: Sequence[torch.device]) -> Optional[str]:
    """Why torch.cuda.comm cannot run here, or None."""
    if devices[0].type != "cuda":
        return "not run: torch.cuda.comm needs CUDA devices"
    if len(common.distinct(devices)) != len(devices):
        return "not run: torch.cuda.comm needs each GPU listed once (its reduce_add rejects repeated devices)"
    if len(devices) < 2:
        return "not run: needs 2+ GPUs"
    return None


def format_rows(rows: List[dict]) -> str:
    headers = ["op", "impl", "bytes", "ndev", "time_us", "algbw_GBps", "busbw_GBps", "wrong"]
    return common.format_table(headers, [[r["op"], r["impl"], r["bytes"], r["ndev"], fmt(r["time_us"], 1),
                                          fmt(r["algbw_GBps"], 3), fmt(r["busbw_GBps"], 3), r["wrong"]]
                                         for r in rows])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.comm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", help="lanes, e.g. 0,1,2,3 or cuda:0,cuda:0 or cpu,cpu,cpu,cpu "
                        "(default: all GPUs; one GPU: it 4 times; no GPU: 4 CPU lanes)")
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--min-bytes", type=int, default=4 * KiB)
    parser.add_argument("--max-bytes", type=int, help=f"default 1 GiB on CUDA, {CPU_MAX_BYTES // MiB} MiB on the CPU; "
                        "--quick: 1 MiB")
    parser.add_argument("--factor", type=int, default=4, help="size step (default 4; nccl-tests -f)")
    parser.add_argument("--iters", type=int, help="timed calls per size (default 20; --quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; --quick 1)")
    parser.add_argument("--copy-bytes", type=int, help="size of the ceiling copy (default 1 GiB on CUDA, 64 MiB "
                        "on the CPU; --quick: 256 MiB and 8 MiB)")
    parser.add_argument("--out", default=common.DEFAULT_OUT_DIR, help="folder for the JSON (default bench/results/)")
    parser.add_argument("--label", help="file-name label (default: comm-cpu-quick, comm-gpu1, ...)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--inject-fault", action="store_true",
                        help="for tests: corrupt one element of every checked result; the run must fail")
    args = parser.parse_args(argv)
    if args.factor < 2:
        parser.error("--factor: expected at least 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    devices = common.parse_devices(args.devices) if args.devices else common.default_devices()
    cuda = devices[0].type == "cuda"
    if args.max_bytes is None:
        args.max_bytes = MiB if args.quick else (GiB if cuda else CPU_MAX_BYTES)
    if not cuda and args.max_bytes > CPU_MAX_BYTES:
        print(f"CPU lanes: sizes capped at {CPU_MAX_BYTES // MiB} MiB", file=sys.stderr)
        args.max_bytes = CPU_MAX_BYTES
    iters = args.iters or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    copy_bytes = args.copy_bytes or {(True, True): 256 * MiB, (True, False): GiB, (False, True): 8 * MiB,
                                     (False, False): 64 * MiB}[(cuda, args.quick)]
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: expected names from {OPS}, but got {unknown}")
    # Whole float32 elements, divisible by the number of lanes so that scatter's pieces are equal.
    sizes = [max(1, b // (4 * len(devices))) * 4 * len(devices)
             for b in sweep_sizes(args.min_bytes, args.max_bytes, args.factor)]
    impls = ["dpfast"] + (["torch.cuda.comm"] if torch_comm_reason(devices) is None else [])
    started = common.now()
    label = args.label or "comm-" + common.card_label(devices) + ("-quick" if args.quick else "")
    print(f"engine micro-benchmark: {common.describe_devices(devices)}; {iters} timed calls per size", flush=True)

    rows = []
    bar = common.progress(len(ops) * len(impls) * len(sizes) + 1, "comm", enabled=not args.no_progress)
    for op in ops:
        for impl in impls:
            for nbytes in sizes:
                rows.append(OpBench(op, impl, devices, nbytes // 4, args.inject_fault).run(iters, warmup))
                bar.update()
    rows.append(copy_ceiling(devices[0], copy_bytes, iters, warmup, args.inject_fault))
    rows.append(add_ceiling(devices[0], copy_bytes, iters, warmup, args.inject_fault))
    bar.update()
    bar.close()

    print(format_rows(rows))
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        print(f"note: {note}")
    reason = torch_comm_reason(devices)
    if reason:
        print(f"torch.cuda.comm: {reason}")
    wrong_rows = [r for r in rows if r["wrong"]]
    record = {"schema": "dpfast-comm", "schema_version": common.SCHEMA_VERSION, "label": label,
              "date": started.isoformat(timespec="seconds"), "machine": common.machine_record(),
              "devices": common.devices_json(devices), "device_label": common.describe_devices(devices),
              "iters": iters, "warmup": warmup, "torch_cuda_comm": reason or "run", "method": __doc__.strip(),
              "status": "failed: wrong results" if wrong_rows else "ok", "rows": rows}
    path = common.result_path(args.out, started, label, ".json")
    common.write_json(path, record)
    print(f"wrote {path}")
    if wrong_rows:
        print(f"\nWRONG RESULTS in {len(wrong_rows)} rows (" + ", ".join(
            f"{r['impl']} {r['op']} {r['bytes']} bytes: {r['wrong']} wrong" for r in wrong_rows[:5])
              + "); the times of these rows mean nothing.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
