"""``python -m bench.model``: predicted step time of nn.DataParallel and of
dpfast on 2, 4 and 8 GPUs, from single-device compute times.

Inputs: a benchmark JSON (``--bench-json``; the bare module's phases and the
model's sizes, per workload) or, without one, a ResNet-50-like example set by
arguments; optionally a ``bench.comm`` JSON for the engine's efficiency and
the device's memory bandwidth. Host-side Python costs are measured here, on
this host, in a second or two.

Notation
  n        GPUs, one replica each
  S        parameter bytes, in buckets s_b: nn.DataParallel 10 MiB,
           dpfast 1 MiB first, then --bucket-cap-mb (25 MiB)
  X, Y     input and output bytes of the global batch
  B, a     link bandwidth per direction and per-hop latency (--links)
  M        device memory bandwidth, bytes read + written
  e        engine efficiency: the ideal time of the engine's largest
           reduce_add_ in a bench.comm JSON over its measured time (on lanes
           sharing one device: the ideal is (n-1) 3 S / M), assumed to carry
           over to links; 0.9 without a JSON
  F, W, O  forward (with the loss), backward and optimizer time of the bare
           module on one device for the global batch
  h_t      start and join one Python thread      } measured on this host
  h_w      one hand-off to a persistent worker   }
  h_r(n)   nn.DataParallel's replicate() Python loop for n replicas, its
           broadcast made free (measured on the workload's module)

Assumptions: compute divides evenly (each replica F/n and W/n: optimistic
where per-kernel overheads dominate, as for small per-GPU batches, where a
replica's time stays near F); inputs start on GPU0; NCCL inside a node runs
reduce and broadcast as a pipelined chain at the link's effective rate.

Transfers
  out0(x)  = (n-1)/n x / B + a      pieces leaving (scatter) or entering
                                    (gather) GPU0 share its link
  nccl(s)  = s / B + (n-1) a + L    one NCCL reduce or broadcast, L = 10 us
  tree(s)  = the engine's plan (csrc/plan.h NOTE [Tree shape], chain or
             binomial, whichever is cheaper) at B' = min(e B, M / 3):
               chain     (k + n - 2)(s / (k B') + a), k chunks
               binomial  ceil(log2 n) s / B' + k ceil(log2 n) a
             (an add reads two buffers and writes one: 3 s of memory traffic)

nn.DataParallel, every step: scatter, broadcast the parameters, copy every
module per replica in Python, a new thread per replica, forward, gather on
GPU0, backward, then the reduction (no overlap), optimizer step:
  T_dp  = out0(X) + sum_b nccl(s_b) + h_r(n) + n h_t + F/n + out0(Y)
          + W/n + sum_b nccl(s_b) + O

dpfast: persistent replicas and workers, the broadcast and the reduction by
the engine's pipelined trees; buckets are reduced while backward goes on:
  T_dpf = out0(X) + sum_b tree(s_b) + (n-1) h_w + F/n + out0(Y) + W/n + R + O
  R     = max(tree(s_last), sum_b tree(s_b) - W/n)    with overlap
  R     = sum_b tree(s_b)                             without (column "no ovl")

n replicas sharing one device (what a one-GPU or CPU benchmark measures): no
compute speed-up, and every hop runs through the same memory, one after the
other (broadcast hop 2 s / M, reduce hop 3 s / M):
  T_shared = F + W + O + (n-1) h_w + sum_b (n-1)(5 s_b / M + 2 a)
"""

from __future__ import annotations

import argparse
import importlib
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn

from dpfast import _C

from . import common
from .common import fmt
from .workloads import make_workload

MiB = 2**20
GPU_COUNTS = (2, 4, 8)
DP_BUCKET_BYTES = 10 * MiB  # torch.cuda.comm's broadcast_coalesced and reduce_add_coalesced
DPFAST_FIRST_BUCKET_BYTES = 1 * MiB
NCCL_LAUNCH_US = 10.0
DEFAULT_ENGINE_EFFICIENCY = 0.9
DEFAULT_GPU_MEMORY_GBPS = 3000.0  # H100 device-to-device copy, read + write (shared/perf-facts.md)
DEFAULT_CPU_MEMORY_GBPS = 20.0  # a host memcpy, read + write; assumed, measure with bench.comm
SHARED_DEVICE_HOP_LATENCY_US = 5.0


@dataclass
class Link:
    name: str
    description: str
    bandwidth_GBps: float
    hop_latency_us: float


LINKS = {
    "pcie4": Link("pcie4", "PCIe Gen4 x16, peer copies measured", 25.0, 5.0),
    "pcie5": Link("pcie5", "PCIe Gen5 x16, peer copies measured", 55.0, 5.0),
    "nvlink-h100": Link("nvlink-h100", "H100 NVLink4, NCCL effective", 370.0, 3.0),
}


@dataclass
class WorkloadTimes:
    name: str
    batch_size: int
    param_bytes: int
    input_bytes: int
    output_bytes: int
    forward_us: float  # the loss included
    backward_us: float
    optimizer_us: float
    module: nn.Module  # for measuring nn.DataParallel's replicate() here
    source: str
    measured: List[dict] = field(default_factory=list)  # multi-replica systems of the bench JSON


@dataclass
class HostCosts:
    thread_start_us: float
    worker_handoff_us: float


# -- host costs, measured here ---------------------------------------------------------------------

def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def measure_host_costs(repeats: int = 200) -> HostCosts:
    def start_and_join():
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()

    requests, replies = queue.SimpleQueue(), queue.SimpleQueue()

    def worker():
        while requests.get() is not None:
            replies.put(True)

    persistent = threading.Thread(target=worker, daemon=True)
    persistent.start()

    def handoff():
        requests.put(True)
        replies.get()

    costs = HostCosts(_median_us(start_and_join, repeats), _median_us(handoff, repeats))
    requests.put(None)
    persistent.join()
    return costs


def dp_replicate_python_us(module: nn.Module, n: int, repeats: int = 5) -> float:
    """nn.DataParallel's replicate() for n replicas with its broadcast made free (every
    "device" gets the root's tensors): the Python work it repeats every step."""
    # importlib: torch.nn.parallel.replicate the attribute is the function, not its module.
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")
    original = replicate_module._broadcast_coalesced_reshape
    replicate_module._broadcast_coalesced_reshape = lambda tensors, devices, detach=False: [
        list(tensors) for _ in devices]
    try:
        return _median_us(lambda: replicate_module.replicate(module, list(range(n))), repeats)
    finally:
        replicate_module._broadcast_coalesced_reshape = original


# -- the formulas of the docstring -----------------------------------------------------------------

def bucket_sizes(total_bytes: int, cap_bytes: int, first_cap_bytes: Optional[int] = None) -> List[int]:
    sizes, left = [], total_bytes
    cap = first_cap_bytes or cap_bytes
    while left > 0:
        sizes.append(min(cap, left))
        left -= sizes[-1]
        cap = cap_bytes
    return sizes


def transfer_us(nbytes: float, bandwidth_GBps: float) -> float:
    return nbytes / (bandwidth_GBps * 1e3)  # GB/s = 1e3 bytes/us


def out_of_gpu0_us(nbytes: int, n: int, link: Link) -> float:
    return (n - 1) / n * transfer_us(nbytes, link.bandwidth_GBps) + link.hop_latency_us


def nccl_us(nbytes: int, n: int, link: Link) -> float:
    return transfer_us(nbytes, link.bandwidth_GBps) + (n - 1) * link.hop_latency_us + NCCL_LAUNCH_US


def tree_us(nbytes: int, n: int, link: Link, efficiency: float, memory_GBps: float) -> float:
    bandwidth = min(efficiency * link.bandwidth_GBps, memory_GBps / 3)
    return _C.plan_for(nbytes, n, "auto", 0, bandwidth, link.hop_latency_us)[2]


def predict_dp_us(w: WorkloadTimes, n: int, link: Link, host: HostCosts, replicate_us: float) -> float:
    buckets = sum(nccl_us(s, n, link) for s in bucket_sizes(w.param_bytes, DP_BUCKET_BYTES))
    return (out_of_gpu0_us(w.input_bytes, n, link) + buckets + replicate_us + n * host.thread_start_us
            + w.forward_us / n + out_of_gpu0_us(w.output_bytes, n, link) + w.backward_us / n + buckets
            + w.optimizer_us)


def predict_dpfast_us(w: WorkloadTimes, n: int, link: Link, host: HostCosts, efficiency: float, memory_GBps: float,
                      bucket_cap_bytes: int, overlap: bool) -> float:
    trees = [tree_us(s, n, link, efficiency, memory_GBps)
             for s in bucket_sizes(w.param_bytes, bucket_cap_bytes, DPFAST_FIRST_BUCKET_BYTES)]
    # Buckets fill from the last layers: the one holding the first layers is reduced last.
    reduce_us = max(trees[-1], sum(trees) - w.backward_us / n) if overlap and trees else sum(trees)
    return (out_of_gpu0_us(w.input_bytes, n, link) + sum(trees) + (n - 1) * host.worker_handoff_us
            + w.forward_us / n + out_of_gpu0_us(w.output_bytes, n, link) + w.backward_us / n + reduce_us
            + w.optimizer_us)


def predict_shared_device_us(w: WorkloadTimes, n: int, host: HostCosts, memory_GBps: float,
                             bucket_cap_bytes: int) -> float:
    comm = sum((n - 1) * (transfer_us(5 * s, memory_GBps) + 2 * SHARED_DEVICE_HOP_LATENCY_US)
               for s in bucket_sizes(w.param_bytes, bucket_cap_bytes, DPFAST_FIRST_BUCKET_BYTES))
    return w.forward_us + w.backward_us + w.optimizer_us + (n - 1) * host.worker_handoff_us + comm


# -- inputs ----------------------------------------------------------------------------------------

def workloads_from_bench(path: str) -> List[WorkloadTimes]:
    record = common.read_json(path)
    where = f"{path} ({record['device_label']})"
    result = []
    for w in record["workloads"]:
        bare = next(s for s in w["systems"] if s["kind"] == "bare")
        phases = bare["phases_us"]
        result.append(WorkloadTimes(
            name=f"{w['workload']} ({w['size']})", batch_size=w["batch_size"], param_bytes=w["param_bytes"],
            input_bytes=w["input_bytes"], output_bytes=w["output_bytes"],
            forward_us=phases["forward"] + phases["loss"], backward_us=phases["backward"],
            optimizer_us=phases["optimizer"], module=make_workload(w["workload"], w["size"]).build(0), source=where,
            measured=[{"kind": s["kind"], "n": s["num_replicas"], "shared": len(set(s["devices"])) == 1,
                       "step_us": s["step_time_us"]} for s in w["systems"] if s["num_replicas"] > 1]))
    return result


def resnet50_like_module(num_blocks: int = 16) -> nn.Module:
    """About ResNet-50's module and tensor count (161 parameter tensors) for h_r(n)."""
    blocks = [nn.Sequential(*(m for _ in range(3) for m in (nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),
                                                             nn.ReLU())))
              for _ in range(num_blocks)]
    return nn.Sequential(nn.Conv2d(3, 4, 7), nn.BatchNorm2d(4), *blocks, nn.Linear(4, 1000))


def workload_from_args(args) -> WorkloadTimes:
    return WorkloadTimes(name="resnet50-like (assumed)", batch_size=args.batch_size,
                         param_bytes=int(args.param_mb * 1e6), input_bytes=int(args.input_mb * 1e6),
                         output_bytes=int(args.output_mb * 1e6), forward_us=args.forward_ms * 1e3,
                         backward_us=args.backward_ms * 1e3, optimizer_us=args.optimizer_ms * 1e3,
                         module=resnet50_like_module(), source="arguments (defaults: ResNet-50 on one H100, assumed)")


def engine_numbers_from_comm(path: str) -> Dict[str, float]:
    """Memory bandwidth (the copy ceiling, read + written) and the engine's efficiency:
    the ideal time of its largest reduce_add_ on lanes sharing that memory over the measured time."""
    record = common.read_json(path)
    copy = next(r for r in record["rows"] if r["op"] == "copy")
    memory_GBps = copy["busbw_GBps"]
    reduces = [r for r in record["rows"] if r["op"] == "reduce_add" and r["impl"] == "dpfast"]
    largest = max(reduces, key=lambda r: r["bytes"])
    ideal_us = (largest["ndev"] - 1) * transfer_us(3 * largest["bytes"], memory_GBps)
    return {"memory_GBps": memory_GBps, "efficiency": min(1.0, ideal_us / largest["time_us"]),
            "from": f"{path}: reduce_add of {largest['bytes']} bytes over {largest['ndev']} lanes"}


# -- output ----------------------------------------------------------------------------------------

def measured_step(w: WorkloadTimes, kind: str, n: int, shared: bool) -> Optional[float]:
    for m in w.measured:
        if m["kind"] == kind and m["n"] == n and m["shared"] == shared:
            return m["step_us"]
    return None


def build_rows(workloads: List[WorkloadTimes], links: List[Link], args, host: HostCosts, engine: dict) -> List[dict]:
    rows = []
    cap = int(args.bucket_cap_mb * MiB)
    for w in workloads:
        bare_us = w.forward_us + w.backward_us + w.optimizer_us
        for n in sorted({m["n"] for m in w.measured if m["shared"]}):
            rows.append({"workload": w.name, "link": "one device", "n": n, "bare_us": bare_us, "ideal_us": bare_us,
                         "dp_us": None, "dpfast_us": predict_shared_device_us(w, n, host, engine["memory_GBps"], cap),
                         "dpfast_no_overlap_us": None, "measured_dp_us": None,
                         "measured_dpfast_us": measured_step(w, "dpfast", n, shared=True)})
        replicate_us = {n: dp_replicate_python_us(w.module, n) for n in GPU_COUNTS}
        for link in links:
            for n in GPU_COUNTS:
                measured_here = link.name == args.measured_link
                rows.append({
                    "workload": w.name, "link": link.name, "n": n, "bare_us": bare_us,
                    "ideal_us": (w.forward_us + w.backward_us) / n + w.optimizer_us,
                    "dp_us": predict_dp_us(w, n, link, host, replicate_us[n]),
                    "dpfast_us": predict_dpfast_us(w, n, link, host, engine["efficiency"], args.memory_GBps, cap, True),
                    "dpfast_no_overlap_us": predict_dpfast_us(w, n, link, host, engine["efficiency"],
                                                              args.memory_GBps, cap, False),
                    "dp_replicate_python_us": replicate_us[n],
                    "measured_dp_us": measured_step(w, "nn.DataParallel", n, False) if measured_here else None,
                    "measured_dpfast_us": measured_step(w, "dpfast", n, False) if measured_here else None})
    return rows


def format_prediction_table(rows: List[dict]) -> str:
    def ms(value):
        return fmt(None if value is None else value / 1e3)

    headers = ["workload", "link", "n", "bare ms", "ideal ms", "nn.DP ms", "dpfast ms", "no ovl ms", "DP/dpfast",
               "measured DP", "measured dpfast"]
    table = [[r["workload"], r["link"], r["n"], ms(r["bare_us"]), ms(r["ideal_us"]), ms(r["dp_us"]),
              ms(r["dpfast_us"]), ms(r["dpfast_no_overlap_us"]),
              fmt(r["dp_us"] / r["dpfast_us"]) + "x" if r["dp_us"] else "-",
              ms(r["measured_dp_us"]), ms(r["measured_dpfast_us"])] for r in rows]
    return common.format_table(headers, table)


def write_chart(rows: List[dict], links: List[Link], path: str) -> Optional[str]:
    plt = common.pyplot()
    if plt is None:
        return None
    names = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    colors = dict(zip((link.name for link in links), plt.get_cmap("tab10").colors))
    for axis, name in zip(axes[0], names):
        mine = [r for r in rows if r["workload"] == name]
        for link in links:
            points = [r for r in mine if r["link"] == link.name]
            ns = [r["n"] for r in points]
            axis.plot(ns, [r["dp_us"] / 1e3 for r in points], "--o", color=colors[link.name],
                      label=f"nn.DataParallel, {link.name}")
            axis.plot(ns, [r["dpfast_us"] / 1e3 for r in points], "-o", color=colors[link.name],
                      label=f"dpfast, {link.name}")
            measured = [(r["n"], r[key] / 1e3, marker) for r in points
                        for key, marker in (("measured_dp_us", "x"), ("measured_dpfast_us", "*")) if r[key]]
            for n, value, marker in measured:
                axis.plot([n], [value], marker, color="black", markersize=10)
        ideal = [r for r in mine if r["link"] == links[0].name]
        axis.plot([r["n"] for r in ideal], [r["ideal_us"] / 1e3 for r in ideal], ":", color="black",
                  label="ideal (compute / n)")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("GPUs")
        axis.set_ylabel("predicted step time (ms)")
        axis.set_xticks(list(GPU_COUNTS))
        axis.set_yscale("log")
    axes[0, 0].legend(fontsize=6)
    figure.suptitle("cost model: nn.DataParallel (dashed) vs dpfast (solid); black markers: measured", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0],
                                     epilog="Formulas: see the module docstring (python -c 'import bench.model; "
                                            "help(bench.model)').")
    parser.add_argument("--bench-json", help="a benchmark JSON (python -m bench): compute times and sizes per workload")
    parser.add_argument("--comm-json", help="a bench.comm JSON: memory bandwidth and engine efficiency")
    parser.add_argument("--links", default=",".join(LINKS), help="comma-separated, from: " + ", ".join(LINKS))
    parser.add_argument("--measured-link", choices=sorted(LINKS),
                        help="the link of the machine that produced --bench-json, to put its multi-GPU "
                             "measurements beside that link's predictions")
    parser.add_argument("--memory-GBps", type=float, default=DEFAULT_GPU_MEMORY_GBPS,
                        help="GPU memory bandwidth, read + written (default 3000: H100)")
    parser.add_argument("--efficiency", type=float, help=f"engine efficiency (default: from --comm-json, else "
                        f"{DEFAULT_ENGINE_EFFICIENCY})")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="dpfast's bucket_cap_mb")
    example = parser.add_argument_group("the example workload, without --bench-json (ResNet-50 on one H100, assumed)")
    example.add_argument("--param-mb", type=float, default=102.2)
    example.add_argument("--batch-size", type=int, default=256)
    example.add_argument("--input-mb", type=float, default=154.1)
    example.add_argument("--output-mb", type=float, default=1.0)
    example.add_argument("--forward-ms", type=float, default=30.0)
    example.add_argument("--backward-ms", type=float, default=60.0)
    example.add_argument("--optimizer-ms", type=float, default=1.5)
    parser.add_argument("--out", default=common.DEFAULT_OUT_DIR, help="folder for the PNG and JSON")
    parser.add_argument("--label", default="model", help="file-name label")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    links = [LINKS[name.strip()] for name in args.links.split(",") if name.strip()]
    workloads = workloads_from_bench(args.bench_json) if args.bench_json else [workload_from_args(args)]
    measured_on_cpu = bool(args.bench_json) and common.read_json(args.bench_json)["device_type"] == "cpu"
    engine = (engine_numbers_from_comm(args.comm_json) if args.comm_json else
              {"memory_GBps": DEFAULT_CPU_MEMORY_GBPS if measured_on_cpu else args.memory_GBps,
               "efficiency": DEFAULT_ENGINE_EFFICIENCY, "from": "assumed"})
    if args.efficiency is not None:
        engine.update(efficiency=args.efficiency, **{"from": "--efficiency"})
    if not 0 < engine["efficiency"] <= 1:
        raise SystemExit(f"engine efficiency: expected a value in (0, 1], but got {engine['efficiency']}")
    host = measure_host_costs()
    started = common.now()
    rows = build_rows(workloads, links, args, host, engine)

    print("cost model (formulas: bench/model.py docstring); times per training step")
    print(f"compute: {workloads[0].source}")
    print(f"host, measured here: thread start+join {host.thread_start_us:.1f} us, worker hand-off "
          f"{host.worker_handoff_us:.1f} us; nn.DataParallel replicate() Python loop per workload in the JSON")
    print(f"engine efficiency {engine['efficiency']:.2f} ({engine['from']}); GPU memory {args.memory_GBps:g} GB/s; "
          f"shared-device rows use {engine['memory_GBps']:.1f} GB/s")
    print("links: " + "; ".join(f"{link.name} = {link.description}, {link.bandwidth_GBps:g} GB/s, "
                                f"{link.hop_latency_us:g} us/hop" for link in links))
    print(format_prediction_table(rows))
    multi_gpu_measured = any(m["n"] > 1 and not m["shared"] for w in workloads for m in w.measured)
    if multi_gpu_measured and not args.measured_link:
        print("note: the JSON has multi-GPU measurements; name the machine's link with --measured-link to show them")
    if not any(r["measured_dp_us"] or r["measured_dpfast_us"] for r in rows):
        print("note: no measurement to compare with (run python -m bench first and pass --bench-json)")

    chart = write_chart([r for r in rows if r["link"] != "one device"], links,
                        common.result_path(args.out, started, args.label, ".png"))
    json_path = common.result_path(args.out, started, args.label, ".json")
    common.write_json(json_path, {
        "schema": "dpfast-model", "schema_version": common.SCHEMA_VERSION, "date": started.isoformat(timespec="seconds"),
        "formulas": __doc__.strip(), "inputs": {"bench_json": args.bench_json, "comm_json": args.comm_json,
                                               "workloads": [w.source for w in workloads][:1]},
        "host": vars(host), "engine": engine, "memory_GBps": args.memory_GBps,
        "links": [vars(link) for link in links], "rows": rows,
        "chart": chart or "not written: matplotlib is not installed"})
    print(f"wrote {json_path}" + (f" and {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
