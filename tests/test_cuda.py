"""CUDA paths with several replicas on one GPU (skipped without a GPU): the
same scatter, stream, reduction and broadcast code as distinct GPUs."""

import copy

import pytest
import torch
from torch import nn

import dpfast
from dpfast import _C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def deep(width=256, depth=8):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def test_engine_on_explicit_lane_streams():
    n = 4
    streams = [torch.cuda.Stream() for _ in range(n)]
    buffers = [torch.randint(-8, 9, (1 << 20,), device="cuda").float() for _ in range(n)]
    expected = torch.stack(buffers).double().sum(0)
    torch.cuda.current_stream().synchronize()
    _C.reduce_add_(buffers, 0, [s.stream_id for s in streams], "chain", 1 << 16)
    torch.cuda.current_stream().wait_stream(streams[0])
    assert torch.equal(buffers[0].double(), expected)
    source = torch.randn(1 << 20, device="cuda")
    targets = [source.clone()] + [torch.zeros_like(source) for _ in range(n - 1)]
    torch.cuda.current_stream().synchronize()
    _C.broadcast_(targets, 0, [s.stream_id for s in streams], "binomial", 1 << 16)
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    for t in targets:
        assert torch.equal(t, source)


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("disable_p2p", [False, True])
def test_training_matches_reference_on_one_gpu(replicas, disable_p2p, monkeypatch):
    if disable_p2p:
        monkeypatch.setenv("DPFAST_DISABLE_P2P", "1")
    reference = deep(32, 4).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas, bucket_cap_mb=0.01)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        x = torch.randn(16, 32, dtype=torch.float64)
        for model, optimizer, inp in ((reference, opt_ref, x), (wrapped, opt, x)):  # CPU input: pinned staging
            optimizer.zero_grad()
            model(inp).square().mean().backward()
            optimizer.step()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-9, atol=1e-11)
    stats = wrapped.stats()
    assert stats["reductions"] == 4 * stats["buckets"]


def test_early_buckets_reduce_before_backward_ends():
    model = deep(1024, 12).cuda()
    wrapped = dpfast.DataParallel(model, device_ids=[0] * 4, bucket_cap_mb=4)
    x = torch.randn(256, 1024, device="cuda")
    for _ in range(2):
        wrapped(x).sum().backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        wrapped(x).sum().backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    reduce_starts = [e.time_range.start for e in kernels if "add_inplace_kernel" in e.name]
    compute_ends = [e.time_range.end for e in kernels
                    if "gemm" in e.name.lower() or "gelu" in e.name.lower() or "sgemm" in e.name.lower()]
    assert reduce_starts and compute_ends
    assert min(reduce_starts) < max(compute_ends), "no bucket reduction started before backward's last kernel ended"
    assert wrapped.stats()["early_reductions"] > 0


def test_fp16_autocast_and_grad_scaler():
    reference = deep(64, 3).cuda()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=[0, 0])
    scaler = torch.amp.GradScaler("cuda")
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = wrapped(x)
    assert out.dtype == torch.float16
    scaler.scale(out.float().square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    # An overflow: the step is skipped on the root, and the replicas stay equal to it.
    before = [p.detach().clone() for p in wrapped.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        out = wrapped(x)
    scaler.scale(out.float().sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    for b, p in zip(before, wrapped.parameters()):
        assert torch.equal(b, p.detach())
    torch.testing.assert_close(wrapped(x), wrapped.module(x))


class _LSTMModel(nn.Module):
    def __init__(self, flatten_in_forward):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.flatten_in_forward = flatten_in_forward

    def forward(self, x):
        if self.flatten_in_forward:
            self.rnn.flatten_parameters()
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("flatten_in_forward", [False, True])
def test_cudnn_rnn_replicas_keep_flat_weights_and_train_correctly(flatten_in_forward):
    """NOTE [RNN replicas]: no 'not part of single contiguous chunk of memory' warning from the
    replicas, and replicas that call flatten_parameters() in forward still see every step."""
    import warnings

    torch.manual_seed(0)
    reference = _LSTMModel(flatten_in_forward).cuda()
    root = copy.deepcopy(reference)
    root.rnn.flatten_parameters()  # the root's own layout is the user's business, as on one device
    wrapped = dpfast.DataParallel(root, device_ids=[0] * 4)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(12, 5, 8, device="cuda")
            for model, opt in zip((reference, wrapped), opts):
                opt.zero_grad()
                model(x).square().sum().backward()
                opt.step()
            torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-4, atol=1e-5)
    assert not [w for w in caught if "contiguous chunk of memory" in str(w.message)]
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_cudnn_rnn_two_forwards_one_backward_without_copying_replica_weights():
    """Two forwards before one backward (a siamese step) with flatten_parameters() in forward: the
    replicas keep their weights where the flat group put them (no re-flatten, no re-pointing per
    call), and every replica's share of both forwards reaches the root."""
    torch.manual_seed(0)
    reference = _LSTMModel(True).cuda()
    root = copy.deepcopy(reference)
    root.rnn.flatten_parameters()
    wrapped = dpfast.DataParallel(root, device_ids=[0] * 4)
    for _ in range(3):
        a, b = torch.randn(12, 5, 8, device="cuda"), torch.randn(12, 5, 8, device="cuda")
        for model in (reference, wrapped):
            model.zero_grad()
            (model(a).square().sum() + model(b).square().sum()).backward()
        for p, q in zip(reference.parameters(), wrapped.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4)
    assert wrapped._runtime.replicas.repoint_count == 0
