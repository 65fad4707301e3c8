"""bench/ on the CPU with tiny sizes: the benchmark's record, chart and table,
the engine micro-benchmark's checks, the cost model's table, and that a wrong
result fails a run instead of producing a time."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import comm, model, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BENCH = ["--quick", "--devices", "cpu,cpu", "--size", "tiny", "--batch-size", "8", "--steps", "2",
              "--warmup", "1", "--no-progress"]
TINY_COMM = ["--quick", "--devices", "cpu,cpu", "--max-bytes", "65536", "--factor", "16", "--iters", "2",
             "--warmup", "1", "--copy-bytes", str(2**20), "--no-progress"]


def call(main, argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def files(folder, suffix):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffix))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    threads = torch.get_num_threads()
    status, stdout, stderr = call(run.main, TINY_BENCH + ["--out", out])
    assert status == 0, stderr
    assert torch.get_num_threads() == threads  # the run's --cpu-threads 1 does not leak into this process
    [json_path] = files(out, ".json")
    with open(json_path) as f:
        record = json.load(f)
    return {"out": out, "stdout": stdout, "json_path": json_path, "record": record}


def test_bench_json_has_every_field(bench_run):
    record = bench_run["record"]
    for key in ("schema", "label", "date", "machine", "devices", "device_type", "device_label", "size", "steps",
                "warmup", "quick", "method", "chart", "workloads"):
        assert key in record, key
    for key in ("hostname", "cpu", "cpu_count", "python", "torch", "torch_cuda", "dpfast_cuda_built",
                "cuda_available", "gpus", "nvidia_driver", "git"):
        assert key in record["machine"], key
    assert set(record["machine"]["git"]) == {"commit", "dirty"}
    assert "CPU replicas" in record["device_label"] and record["machine"]["torch_threads"] == 1
    assert [w["workload"] for w in record["workloads"]] == ["mlp", "cnn", "transformer"]
    for workload in record["workloads"]:
        for key in ("size", "description", "config", "batch_size", "param_count", "param_bytes", "num_param_tensors",
                    "num_modules", "input_bytes", "output_bytes", "systems", "not_run"):
            assert key in workload, key
        assert [s["kind"] for s in workload["systems"]] == ["bare", "chunks", "dpfast", "dpfast", "dpfast"]
        assert [s["loss_on_replicas"] for s in workload["systems"]] == [False, False, False, False, True]
        assert {n["system"] for n in workload["not_run"]} == {"nn.DataParallel", "DDP"}
        for system in workload["systems"]:
            for key in ("system", "loss_on_replicas", "devices", "num_replicas", "step_time_us", "step_time_samples_us", "phases_us",
                        "phase_timing", "throughput_samples_per_s", "speedup_vs_bare", "time_vs_chunks", "correctness",
                        "backward_wall_us", "backward_compute_us", "reduce_work_us", "reduce_overlap_fraction",
                        "reduce_overlap_note", "memory", "dpfast_stats"):
                assert key in system, key
            assert set(system["phases_us"]) == set(run.PHASES)
            assert len(system["step_time_samples_us"]) == 2
            assert system["step_time_us"] > 0 and system["throughput_samples_per_s"] > 0
            assert system["correctness"]["checked_steps"] == run.CHECK_STEPS
            assert system["correctness"]["max_grad_relative_error"] <= system["correctness"]["tolerance"]
            assert {"torch_peak_allocated_bytes", "nvml_used_bytes", "process_peak_rss_bytes"} <= set(system["memory"])
        bare, chunks, one, replicas, loss_on_replicas = workload["systems"]
        assert loss_on_replicas["phases_us"]["gather"] is None  # outputs stay on the replicas
        assert bare["speedup_vs_bare"] == 1.0
        # dpfast's own cost where its replicas share a device: against the same split run in turn
        assert chunks["system"] == "bare on 2 chunks in turn" and chunks["time_vs_chunks"] is None
        assert one["time_vs_chunks"] is None
        assert replicas["time_vs_chunks"] == replicas["step_time_us"] / chunks["step_time_us"]
        assert replicas["num_replicas"] == 2
        assert replicas["phases_us"]["scatter"] is not None and replicas["phases_us"]["reduce"] is not None
        assert replicas["reduce_overlap_fraction"] == 0.0  # the CPU runs the reduction in program order
        assert replicas["reduce_work_us"] > 0 and replicas["backward_compute_us"] > 0


def test_bench_writes_the_chart(bench_run):
    [png] = files(bench_run["out"], ".png")
    assert bench_run["record"]["chart"] == png
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_prints_the_table(bench_run):
    stdout = bench_run["stdout"]
    assert "CPU replicas" in stdout
    for column in ("step ms", "samples/s", "speed-up", "vs chunks", "scatter", "reduce", "overlap", "peak MiB"):
        assert column in stdout
    for row in ("mlp (b=8)", "cnn (b=8)", "transformer (b=8)", "bare", "dpfast x1", "dpfast x2 (CPU replicas)"):
        assert row in stdout
    assert "nn.DataParallel: not run: needs 2+ distinct GPUs" in stdout
    assert "DDP: not run" in stdout


def test_bench_fails_loudly_on_a_wrong_result(tmp_path):
    # Through the command line: the exit status is what a script sees.
    result = subprocess.run([sys.executable, "-m", "bench", *TINY_BENCH, "--workloads", "mlp", "--inject-fault",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "WRONG RESULT: dpfast x1: step 1 differs from the bare module" in result.stderr
    assert "step ms" not in result.stdout  # no time printed for it
    assert os.listdir(tmp_path) == []


def test_comm_rows_are_correct(tmp_path):
    status, stdout, stderr = call(comm.main, TINY_COMM + ["--out", str(tmp_path)])
    assert status == 0, stderr
    [json_path] = files(str(tmp_path), ".json")
    with open(json_path) as f:
        record = json.load(f)
    rows = record["rows"]
    assert {r["op"] for r in rows} == {"reduce_add", "broadcast", "scatter", "copy", "add"}
    assert [r["bytes"] for r in rows if r["op"] == "reduce_add"] == [4096, 65536]
    for row in rows:
        assert {"bytes", "ndev", "time_us", "algbw_GBps", "busbw_GBps", "wrong"} <= set(row)
        assert row["wrong"] == 0 and row["time_us"] > 0
    assert record["status"] == "ok"
    assert "busbw_GBps" in stdout and "torch.cuda.comm: not run" in stdout


def test_comm_fails_loudly_on_a_wrong_result(tmp_path):
    status, stdout, stderr = call(comm.main, TINY_COMM + ["--ops", "reduce_add", "--inject-fault",
                                                          "--out", str(tmp_path)])
    assert status == 1
    assert "WRONG RESULTS" in stderr
    with open(files(str(tmp_path), ".json")[0]) as f:
        record = json.load(f)
    assert record["status"].startswith("failed") and all(r["wrong"] == 1 for r in record["rows"])


def test_model_prints_its_table(bench_run, tmp_path):
    status, stdout, _ = call(model.main, ["--bench-json", bench_run["json_path"], "--links", "pcie4,nvlink-h100",
                                          "--out", str(tmp_path)])
    assert status == 0
    for column in ("link", "nn.DP ms", "dpfast ms", "measured dpfast"):
        assert column in stdout
    rows = [line.split() for line in stdout.splitlines() if line.startswith("cnn (tiny)")]
    for link in ("pcie4", "nvlink-h100"):
        assert sorted(int(row[3]) for row in rows if row[2] == link) == list(model.GPU_COUNTS)
    # The benchmark measured 2 replicas sharing the CPU: prediction and measurement side by side.
    [shared] = [row for row in rows if row[2:4] == ["one", "device"]]
    assert shared[4] == "2" and shared[-1] != "-"
    assert len(files(str(tmp_path), ".png")) == 1


def test_model_runs_without_a_benchmark(tmp_path):
    status, stdout, _ = call(model.main, ["--links", "pcie4", "--out", str(tmp_path)])
    assert status == 0
    assert "resnet50-like (assumed)" in stdout


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(REPO, "bench", "gpu_check.sh")], check=True)


def test_hidden_fraction_counts_overlapping_spans_once_and_cuts_at_the_end_of_backward():
    from bench.run import hidden_fraction

    assert hidden_fraction(100.0, []) == (None, 0.0)
    # Spans 0-40 and 30-60 merge into 0-60, all before backward ended at 100: fully hidden.
    assert hidden_fraction(100.0, [(30.0, 60.0), (0.0, 40.0)]) == (1.0, 60.0)
    # 80-120 is half hidden, 150-170 not at all: (20 + 0) / (40 + 20).
    fraction, total = hidden_fraction(100.0, [(150.0, 170.0), (80.0, 120.0)])
    assert total == 60.0 and abs(fraction - 20.0 / 60.0) < 1e-12


def test_gpu_numerics_tool_runs_on_cpu_replicas_and_finds_dpfast_equal_to_the_same_chunks():
    result = subprocess.run([sys.executable, "tools/gpu_numerics.py", "--device", "cpu", "--size", "tiny",
                             "--steps", "1", "--tf32", "off", "--sync", "no"], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            # One intra-op thread everywhere: CPU workers take a share of the caller's
                            # threads (NOTE [CPU threads]), and a GEMM split another way rounds otherwise.
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "step 1" in line]
    assert len(lines) == 3  # mlp, cnn, transformer
    # CPU: the same arithmetic, summed in another order: the tree adds (g0 + g1) + (g2 + g3) where
    # autograd adds the chunks' gradients one by one, a float32 rounding apart (a missing or
    # doubled chunk would be tens of percent).
    errors = [float(line.split("grads dpfast/chunked ")[1].split()[0]) for line in lines]
    assert all(error < 1e-6 for error in errors), lines


def test_step_calls_tool_times_the_engine_calls_and_the_hand_offs():
    result = subprocess.run([sys.executable, "tools/step_calls.py", "--workload", "mlp:tiny:16", "--replicas", "2",
                             "--steps", "5"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO, "DPFAST_SPIN_US": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[:48].strip(): line[48:].split() for line in result.stdout.splitlines()[2:]}
    # Calls every step makes once per replica set: the parameter sync and the bucket reductions.
    assert float(rows["replicas._C.coalesce_into"][0]) >= 1 and float(rows["reducer._C.reduce_add_"][0]) >= 1
    assert all(float(median_us) > 0 for _, median_us in rows.values())
    assert "DPFAST_SPIN_US 0" in result.stdout


def test_step_timeline_tool_marks_every_thread_and_compares_replicas_alone_and_side_by_side():
    result = subprocess.run([sys.executable, "tools/step_timeline.py", "--workload", "mlp:tiny:16", "--replicas", "2",
                             "--steps", "12"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    first = lines.index(next(line for line in lines if line.split()[:1] == ["at_us"])) + 1
    points = [line.split(None, 2) for line in lines[first:lines.index("", first)]]
    at_us = [int(at) for at, _, _ in points]
    assert at_us == sorted(at_us) and at_us[0] == 0
    labels = {(thread, label) for _, thread, label in points}
    # The caller's phases and both threads' jobs (the worker's forward and its part of the backward)
    for point in ["replica sync ends", "job handed to a worker", "loss.backward() called", "end of backward ends",
                  "optimizer step done"]:
        assert ("MainThread", point) in labels, point
    assert ("dpfast-replica-1", "job start") in labels and ("dpfast-replica-1", "job end (2)") in labels
    jobs = [line.split() for line in lines if line.startswith(("MainThread ", "dpfast-replica-1 "))]
    assert len(jobs) == 3 and all(0 < float(cpu) <= float(wall) * 1.05 for _, _, cpu, wall in jobs), jobs
    side = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"]) and len(line.split()) == 5]
    assert [row[1] for row in side] == ["caller", "dpfast-replica-1"]
    for _, _, alone_us, side_us, ratio in side:
        assert float(alone_us) > 0 and abs(float(side_us) / float(alone_us) - float(ratio)) < 0.01


def test_omp_team_step_tool_trains_every_system_to_the_bare_modules_weights(tmp_path):
    """The experiment of tools/omp_team_step.py: replicas on the caller's OpenMP team, convolutions
    included (oneDNN, called inside the region, must not wait for threads that never come), with
    every system's weights checked against the bare module's after the same steps."""
    result = subprocess.run([sys.executable, "tools/omp_team_step.py", "--workload", "vgg:tiny:4", "--rounds", "1",
                             "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": REPO, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[:18].strip(): line[18:].split() for line in result.stdout.splitlines()[2:] if line.strip()}
    assert list(rows) == ["bare", "team", "dpfast", "dpfast 1 thread", "dpfast on team"]
    assert rows["bare"][1] == "1.00" and float(rows["bare"][2]) == 0.0
    for label, (ms, ratio, diff) in rows.items():
        assert float(ms) > 0 and float(diff) <= 1e-3, label
        assert abs(float(ms) / float(rows["bare"][0]) - float(ratio)) < 0.01, label


@pytest.mark.parametrize("policy,expected", [("", "spin first (default policy)"), ("passive", "sleep (OMP_WAIT_POLICY=PASSIVE)")])
def test_info_prints_the_build_and_how_cpu_replicas_will_use_the_threads(policy, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, "-m", "dpfast.info"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**env, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    assert "dpfast._C" in result.stdout and f"idle OpenMP threads {expected}" in result.stdout


def test_omp_wait_policy_tool_runs_both_policies_in_processes_of_their_own():
    result = subprocess.run([sys.executable, "tools/omp_wait_policy.py", "--configs", "mlp:tiny:16", "--rounds", "1",
                             "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    # Each child checked that dpfast saw its policy (the parent's own setting is not passed on).
    assert [row[:2] for row in rows] == [["mlp:tiny:16", "default"], ["mlp:tiny:16", "passive"]]
    assert all(float(value) > 0 for row in rows for value in row[2:])


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_exact_float32_turns_tf32_off_and_restores_it_whichever_api_the_process_used(api):
    code = f"""
import torch
from bench import common
if "{api}" == "legacy":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
else:
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
with common.exact_float32():
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "tf32"
if "{api}" == "legacy":
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
"""
    # A fresh process: these settings are process-wide, and torch remembers which API was used.
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_handoff_ab_runs_and_every_way_gives_the_same_gradients():
    result = subprocess.run([sys.executable, "tools/handoff_ab.py", "--workload", "mlp:tiny:16", "--rounds", "1",
                             "--steps", "2", "--gap-ms", "1"], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "default" in result.stdout and "no-pause" in result.stdout and "same gradients: True" in result.stdout


def test_autograd_nodes_ab_runs_and_both_node_kinds_give_the_same_gradients():
    result = subprocess.run([sys.executable, "tools/autograd_nodes_ab.py", "mlp:tiny:16", "1"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python nodes" in result.stdout and "C++ nodes" in result.stdout
    assert "same gradients: True" in result.stdout
