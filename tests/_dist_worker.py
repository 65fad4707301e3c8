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


class BagOfWords(nn.Module):
    """A sparse embedding (gradients stay sparse across processes too) and a dense head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def make_model(kind="mlp"):
    if kind == "sparse":
        return BagOfWords().double()
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(steps, kind="mlp"):
    g = torch.Generator().manual_seed(0)
    total = sum(ROWS)
    if kind == "sparse":
        return [(torch.randint(0, 20, (total, 4), generator=g), torch.randn(total, 3, generator=g, dtype=torch.float64))
                for _ in range(steps)]
    return [(torch.randn(total, 6, generator=g, dtype=torch.float64),
             torch.randn(total, 3, generator=g, dtype=torch.float64)) for _ in range(steps)]


def freeze_for_step(model, kind, step):
    """kind "freeze": the last layer trains on even steps, the first on odd ones."""
    if kind == "freeze":
        model[0].requires_grad_(step % 2 == 1)
        model[2].requires_grad_(step % 2 == 0)


def freeze_late(model, kind, step, frozen):
    """kind "freeze_late": the first layer frozen between the forward and its backward on odd steps
    (autograd skips it: no gradient), unfrozen after."""
    if kind == "freeze_late":
        model[0].requires_grad_(not frozen or step % 2 == 0)


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1)  # momentum-free: sparse gradients and frozen steps alike


def train(model, batches, opt, kind="mlp"):
    for step, (x, y) in enumerate(batches):
        freeze_for_step(model, kind, step)
        opt.zero_grad()
        out = model(x)
        freeze_late(model, kind, step, True)
        nn.functional.mse_loss(out, y).backward()
        freeze_late(model, kind, step, False)
        opt.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--die-at-step", type=int, default=-1)
    parser.add_argument("--replicas", type=int, default=2,
                        help="CPU replicas per process (1: like DDP; 0: no device_ids, on a machine without a GPU)")
    parser.add_argument("--wrap-before-init", action="store_true", help="the wrapper made before init_process_group")
    parser.add_argument("--kind", default="mlp", choices=["mlp", "freeze", "freeze_late", "sparse"])
    parser.add_argument("--clear-after-no-sync", action="store_true",
                        help="before each step, a no_sync() backward whose accumulation zero_grad() drops")
    args = parser.parse_args()
    torch.manual_seed(100 + args.rank)  # different on each rank: construction must broadcast rank 0's
    model = make_model(args.kind)

    def wrap():
        if args.replicas == 0:
            return dpfast.DataParallel(model)
        return dpfast.DataParallel(model, device_ids=["cpu"] * args.replicas)
    wrapped = wrap() if args.wrap_before_init else None
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world, timeout=datetime.timedelta(seconds=30))
    wrapped = wrapped or wrap()
    if args.kind == "mlp":
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = make_optimizer(wrapped.parameters())
    begin = sum(ROWS[:args.rank])
    for step, (x, y) in enumerate(data(args.steps, args.kind)):
        freeze_for_step(model, args.kind, step)
        if step == args.die_at_step:
            os._exit(3)  # a rank that dies mid-run
        mine = slice(begin, begin + ROWS[args.rank])
        if args.clear_after_no_sync:
            if step % 2:  # .grad all zero through the block: replica 0's share waits in the wrapper's bucket
                opt.zero_grad(set_to_none=False)
            with wrapped.no_sync():
                nn.functional.mse_loss(wrapped(3 * x[mine]), y[mine]).backward()
        opt.zero_grad(set_to_none=not args.clear_after_no_sync or step % 2 == 0)  # both kinds of clear
        out = wrapped(x[mine])
        freeze_late(model, args.kind, step, True)
        nn.functional.mse_loss(out, y[mine]).backward()
        freeze_late(model, args.kind, step, False)
        if args.kind == "sparse":
            assert model.embed.weight.grad.is_sparse, "the embedding's gradient came back dense"
        opt.step()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
