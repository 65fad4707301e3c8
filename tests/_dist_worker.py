"""One rank of tests/test_distributed.py: trains a small model with
dpfast.DataParallel on 2 CPU replicas under torch.distributed (gloo) and
saves its parameters. Run by the test, never collected by pytest."""

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpfast  # noqa: E402

ROWS = [5, 7]  # uneven batches across the two ranks


def make_model():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(steps):
    g = torch.Generator().manual_seed(0)
    total = sum(ROWS)
    return [(torch.randn(total, 6, generator=g, dtype=torch.float64),
             torch.randn(total, 3, generator=g, dtype=torch.float64)) for _ in range(steps)]


def train(model, batches, opt):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--die-at-step", type=int, default=-1)
    parser.add_argument("--replicas", type=int, default=2, help="CPU replicas per process (1: like DDP)")
    args = parser.parse_args()
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world, timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(100 + args.rank)  # different on each rank: construction must broadcast rank 0's
    model = make_model()
    wrapped = dpfast.DataParallel(model, device_ids=["cpu"] * args.replicas)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    begin = sum(ROWS[:args.rank])
    for step, (x, y) in enumerate(data(args.steps)):
        if step == args.die_at_step:
            os._exit(3)  # a rank that dies mid-run
        mine = slice(begin, begin + ROWS[args.rank])
        opt.zero_grad()
        nn.functional.mse_loss(wrapped(x[mine]), y[mine]).backward()
        opt.step()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
