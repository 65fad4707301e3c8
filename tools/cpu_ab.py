"""One workload's step time on CPU replicas against the bare module, for comparing two trees.

In one process: the bare module on the full batch, dpfast with 2 CPU replicas as it is (the caller on
torch's default thread count), and dpfast with the whole step under torch.set_num_threads(1); each
--rounds times, interleaved, 20 timed steps after 3 warm-up steps, medians. TREE (an environment
variable) puts another checkout's dpfast (and bench) first on the path; run the two trees' processes
one after the other, several times, and compare the ratios (this VM's run-to-run noise is 10-30 %).

    TREE=/path/to/checkout python tools/cpu_ab.py vgg:tiny:8 [rounds]
"""

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.environ.get("TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import dpfast  # noqa: E402
from bench import workloads  # noqa: E402


def step_ms(model, x, y, steps: int = 20, warmup: int = 3) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    name, size, batch = sys.argv[1].split(":")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    workload = getattr(workloads, name)(size)
    x, y = workload.make_batch(int(batch), 0)
    bare = workload.build(0)
    wrapped = dpfast.DataParallel(workload.build(0), device_ids=["cpu"] * 2)
    results = {"bare": [], "dpfast": [], "1thread": []}
    for _ in range(rounds):
        results["bare"].append(step_ms(bare, x, y))
        results["dpfast"].append(step_ms(wrapped, x, y))
        with one_thread():
            results["1thread"].append(step_ms(wrapped, x, y))
    base = statistics.median(results["bare"])
    print(sys.argv[1], " ".join(f"{k}={statistics.median(v):.2f}ms({statistics.median(v) / base:.2f}x)"
                                for k, v in results.items()))


if __name__ == "__main__":
    main()
