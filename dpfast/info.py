"""``python -m dpfast.info``: what was built and what this machine offers."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from . import _C
    from .workers import _omp_pause, idle_threads_sleep

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dpfast_cuda_built": bool(_C.cuda_built()),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "peer_access": [],
        "intra_op_threads": torch.get_num_threads(),
        "omp_idle_threads_sleep": idle_threads_sleep(),  # OMP_WAIT_POLICY=PASSIVE (NOTE [CPU threads])
        "omp_pause": _omp_pause() is not None,  # libgomp's omp_pause_resource_all, unless DPFAST_OMP_PAUSE=0
    }
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": props.name,
                                    "memory_GiB": round(props.total_memory / 2**30, 1),
                                    "capability": f"{props.major}.{props.minor}"})
        info["peer_access"] = [[bool(_C.can_access_peer(i, j)) for j in range(n)] for i in range(n)]
    return info


def main() -> int:
    info = collect()
    print(f"python              {info['python']} ({sys.executable})")
    print(f"torch               {info['torch']} (CUDA {info['torch_cuda']})")
    print(f"dpfast._C           {'CUDA' if info['dpfast_cuda_built'] else 'CPU-only'} build")
    print(f"CUDA available      {info['cuda_available']}")
    if info["omp_idle_threads_sleep"]:
        sharing = "sleep (OMP_WAIT_POLICY=PASSIVE): CPU replicas share out the caller's threads"
    elif info["omp_pause"]:
        sharing = ("spin first (default policy); CPU replicas share out the caller's threads and pause its idle "
                   "team where each replica gets one thread and the caller has more (DPFAST_OMP_PAUSE=0: never)")
    else:
        sharing = "spin first (default policy): for CPU replicas, torch.set_num_threads(1) or OMP_WAIT_POLICY=PASSIVE"
    print(f"intra-op threads    {info['intra_op_threads']}; idle OpenMP threads {sharing}")
    if not info["devices"]:
        print("visible GPUs        none (CPU replicas: device_ids=['cpu'] * N)")
    for d in info["devices"]:
        print(f"cuda:{d['index']:<15}{d['name']}, {d['memory_GiB']} GiB, sm_{d['capability'].replace('.', '')}")
    if info["peer_access"]:
        n = len(info["peer_access"])
        print("peer access (row reads column):")
        print("        " + " ".join(f"{j:>4}" for j in range(n)))
        for i, row in enumerate(info["peer_access"]):
            print(f"  {i:>4}  " + " ".join(f"{'yes' if v else 'no':>4}" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
