"""Gradient buckets: each reduced exactly once per backward, early where
possible, none inside no_sync(), the accumulated sum after it."""

import copy

import pytest
import torch
from torch import nn

import dpfast

CPU4 = ["cpu"] * 4


def deep():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)]).double()


@pytest.mark.parametrize("cap_mb,expected_buckets", [(25.0, 1), (0.0002, 12), (0.0006, 6)])
def test_each_bucket_reduced_once_per_backward(cap_mb, expected_buckets):
    wrapped = dpfast.DataParallel(deep(), device_ids=CPU4, bucket_cap_mb=cap_mb)
    for step in range(3):
        wrapped(torch.randn(8, 8, dtype=torch.float64)).sum().backward()
        stats = wrapped.stats()
        assert stats["buckets"] == expected_buckets
        assert stats["reductions"] == expected_buckets * (step + 1)
    # Every parameter is used on every replica: every bucket launched from the hooks, during backward.
    assert stats["early_reductions"] == stats["reductions"]


def test_buckets_are_in_reverse_registration_order():
    wrapped = dpfast.DataParallel(deep(), device_ids=CPU4, bucket_cap_mb=0.0006)
    wrapped(torch.randn(4, 8, dtype=torch.float64))
    reducer = wrapped._ensure_runtime().reducer
    first_bucket = reducer.buckets[0]
    assert max(first_bucket) == len(reducer.root_params) - 1  # the last layer's parameters fill first


def test_no_sync_accumulates_and_reduces_once():
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    batches = [torch.randn(8, 8, dtype=torch.float64) for _ in range(3)]
    with wrapped.no_sync():
        for x in batches[:2]:
            wrapped(x).sum().backward()
    assert wrapped.stats()["reductions"] == 0
    # Inside no_sync the root holds only replica 0's share; the replicas keep theirs.
    assert wrapped.module[0].weight.grad is not None
    wrapped(batches[2]).sum().backward()
    assert wrapped.stats()["reductions"] == wrapped.stats()["buckets"]
    for x in batches:
        reference(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_unused_parameters_do_not_stop_the_reduction():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x, use_b=False):
            return self.b(self.a(x)) if use_b else self.a(x)

    torch.manual_seed(0)
    reference = Skip().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0001)
    x = torch.randn(8, 4, dtype=torch.float64)
    wrapped(x).sum().backward()
    reference(x).sum().backward()
    assert wrapped.module.b.weight.grad is None
    torch.testing.assert_close(wrapped.module.a.weight.grad, reference.a.weight.grad)
    wrapped(x, use_b=True).sum().backward()
    reference(x, use_b=True).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_link_model_follows_the_lane_topology():
    cpu = torch.device("cpu")
    same = dpfast.devices.link_model([cpu] * 4)
    assert same == (dpfast.devices.SAME_DEVICE_BANDWIDTH_GBPS["cpu"], dpfast.devices.HOP_LATENCY_US)
    # Lanes on one device: a 25 MB bucket in one or few chunks; over PCIe-like links, many.
    few = dpfast._C.plan_for(25 * 2**20, 4, "auto", 0, 1000.0, 5.0)[1]
    many = dpfast._C.plan_for(25 * 2**20, 4, "auto", 0, *dpfast.devices.link_model(
        [torch.device("cuda", 0), torch.device("cuda", 1)]))[1]
    assert few >= 10 * many
