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


def test_aligned_chunks_take_the_packet_kernel_and_offset_views_the_element_kernel():
    """The add kernel loads 16-byte packets where both pointers allow it (every chunk the planner
    cuts of an allocation does), else one element at a time."""
    def kernel_names(buffers, chunk_bytes):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _C.reduce_add_(buffers, 0, [], "chain", chunk_bytes)
            torch.cuda.synchronize()
        return {e.name for e in prof.events() if "add_inplace" in e.name}

    aligned = [torch.ones(1 << 16, device="cuda") for _ in range(2)]
    names = kernel_names(aligned, 0)
    assert names and all("packets" in name for name in names), names
    storage = torch.ones(2, (1 << 16) + 1, device="cuda")
    offset = [storage[0, 1:], storage[1, 1:]]  # 4 bytes past a 16-byte boundary
    names = kernel_names(offset, 0)
    assert names and not any("packets" in name for name in names), names
    assert torch.equal(offset[0], torch.full_like(offset[0], 2.0))


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
    reduce_starts = [e.time_range.start for e in kernels if "add_inplace" in e.name]  # either add kernel
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


# -- the CPU suite's main behaviours, on CUDA lanes -------------------------------------------------
# Each body compares with the unwrapped module on the full batch in float64 on the CPU.

def _mlp64():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 5)).double()


def _assert_root_grads(reference, wrapped, rtol=1e-9, atol=1e-11):
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("bucket_cap_mb", [1000.0, 0.001, 0.01], ids=["one_bucket", "tiny_buckets", "param_over_cap"])
def test_no_sync_reduces_each_bucket_once_after_the_block(replicas, bucket_cap_mb):
    reference = _mlp64()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas,
                                  bucket_cap_mb=bucket_cap_mb)
    batches = [torch.randn(11, 6, dtype=torch.float64) for _ in range(3)]
    with wrapped.no_sync():
        for x in batches[:2]:
            wrapped(x.cuda()).square().sum().backward()
    assert wrapped.stats()["reductions"] == 0
    wrapped(batches[2].cuda()).square().sum().backward()
    stats = wrapped.stats()
    assert stats["reductions"] == stats["buckets"] >= 1
    for x in batches:
        reference(x).square().sum().backward()
    _assert_root_grads(reference, wrapped)
    for _ in range(2):  # and once per backward after that
        wrapped(batches[0].cuda()).sum().backward()
    assert wrapped.stats()["reductions"] == 3 * stats["buckets"]



@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("where", ["before_forward", "before_backward"])
def test_zero_grad_after_no_sync_drops_every_replicas_share(set_to_none, where):
    """NOTE [Clearing an accumulation] on the lanes' streams: the replicas' shares are zeroed on
    their comm streams before their next accumulation."""
    reference = _mlp64()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * 4, bucket_cap_mb=0.001)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    batches = [torch.randn(11, 6, dtype=torch.float64) for _ in range(2)]
    with wrapped.no_sync():
        wrapped(batches[0].cuda()).square().sum().backward()
    if where == "before_forward":
        optimizer.zero_grad(set_to_none=set_to_none)
    output = wrapped(batches[1].cuda())
    if where == "before_backward":
        optimizer.zero_grad(set_to_none=set_to_none)
    output.square().sum().backward()
    reference(batches[1]).square().sum().backward()
    _assert_root_grads(reference, wrapped)

class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.sometimes = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        y = self.trunk(x)
        if bool((x[:, 0] > 0).all()):
            y = y + self.sometimes(x)
        return y


@pytest.mark.parametrize("replicas", [2, 4])
def test_a_conditionally_skipped_branch_completes_backward_with_correct_grads(replicas):
    torch.manual_seed(0)
    reference = _Branchy().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas, bucket_cap_mb=0.0001)
    x = -torch.rand(8, 4, dtype=torch.float64)
    x[8 // replicas:2 * (8 // replicas), 0] = 1  # only the second chunk takes the branch
    chunk = 8 // replicas
    sum(reference(x[i:i + chunk]).sum() for i in range(0, 8, chunk)).backward()
    wrapped(x.cuda()).sum().backward()
    assert wrapped.module.unused.weight.grad is None
    for name in ("trunk", "sometimes"):
        for p, q in zip(getattr(reference, name).parameters(), getattr(wrapped.module, name).parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("replicas", [2, 4])
def test_training_trajectory_with_adam_and_integer_valued_reduction(replicas):
    # Integer-valued weights, inputs and gradients: the tree sum must be exact.
    lin = nn.Linear(8, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-3, 4, lin.weight.shape))
    wrapped = dpfast.DataParallel(copy.deepcopy(lin).cuda(), device_ids=[0] * replicas)
    x = torch.randint(-4, 5, (16, 8)).double()
    lin(x).sum().backward()
    wrapped(x.cuda()).sum().backward()
    assert torch.equal(wrapped.module.weight.grad.cpu(), lin.weight.grad)
    reference = _mlp64()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas, bucket_cap_mb=0.005)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, wrapped)]
    for step in range(5):
        x = torch.randn(13, 6, dtype=torch.float64)
        for model, opt, inp in ((reference, opts[0], x), (wrapped, opts[1], x.cuda())):
            opt.zero_grad()
            model(inp).square().mean().backward()
            opt.step()
        torch.testing.assert_close(wrapped(x.cuda()).cpu(), reference(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("replicas", [2, 4])
def test_average_buffers_and_buffer_broadcast_on_one_gpu(replicas):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double()
    averaged = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas, average_buffers=True)
    for _ in range(3):
        x = torch.randn(4 * replicas, 2, 4, 4, dtype=torch.float64) * 3 + 1
        reference(x)
        averaged(x.cuda()).sum().backward()
    bn, ours = reference[1], averaged.module[1]
    torch.testing.assert_close(ours.running_mean.cpu(), bn.running_mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours.running_var.cpu(), bn.running_var, rtol=1e-9, atol=1e-11)
    # The root's buffers reach the replicas: an eval forward uses the root's statistics.
    reference.eval()
    averaged.eval()
    with torch.no_grad():
        averaged.module[1].running_mean.add_(0.5)
        reference[1].running_mean.add_(0.5)
    x = torch.randn(2 * replicas, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(averaged(x.cuda()).cpu(), reference(x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("replicas", [2, 4])
def test_loss_on_replicas_with_uneven_chunks_and_scalar_outputs(replicas):
    reference = _mlp64()
    weights = [1, 3, 2, 1][:replicas]
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * replicas, gather=False,
                                  weights=weights)
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 5, (13,))
    outputs = wrapped(x.cuda())
    assert isinstance(outputs, dpfast.ReplicaOutputs) and sum(outputs.chunk_sizes) == 13
    loss = dpfast.ParallelCriterion(nn.CrossEntropyLoss())(outputs, y.cuda())
    expected = nn.functional.cross_entropy(reference(x), y)
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-10, atol=1e-12)
    loss.backward()
    expected.backward()
    _assert_root_grads(reference, wrapped)

    class LossInside(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, labels):
            return nn.functional.cross_entropy(self.inner(x), labels)

    reference.zero_grad()
    inside = LossInside(copy.deepcopy(reference))
    vector = dpfast.DataParallel(copy.deepcopy(inside).cuda(), device_ids=[0] * replicas)(x.cuda(), y.cuda())
    assert vector.shape == (replicas,)
    mean = dpfast.DataParallel(copy.deepcopy(inside).cuda(), device_ids=[0] * replicas, scalar_outputs="mean")
    loss = mean(x.cuda(), y.cuda())
    expected = inside(x, y)
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-10, atol=1e-12)
    loss.backward()
    expected.backward()
    _assert_root_grads(inside, mean)


def test_an_error_in_a_replica_is_named_and_the_wrapper_goes_on():
    class FailsOnce(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.fail = False

        def forward(self, x):
            if self.fail and x.shape[0] == 1:
                raise ValueError("bad chunk")
            return self.lin(x)

    torch.manual_seed(0)
    reference = FailsOnce().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0] * 4)
    x = torch.randn(10, 4, dtype=torch.float64)  # chunks of 3, 3, 3, 1
    wrapped(x.cuda()).sum().backward()
    wrapped.module.fail = True
    with pytest.raises(ValueError, match=r"in replica 3 on device 0"):
        wrapped(x.cuda())
    wrapped.module.fail = False
    wrapped.zero_grad()
    wrapped(x.cuda()).sum().backward()
    reference(x).sum().backward()
    _assert_root_grads(reference, wrapped)


def test_bf16_autocast_and_structured_outputs_on_one_gpu():
    class Structured(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, *, scale=1.0):
            y = self.lin(x) * scale
            return {"out": y, "pair": (y.sum(1), None), "tag": "t"}

    torch.manual_seed(0)
    model = Structured().cuda()
    wrapped = dpfast.DataParallel(model, device_ids=[0] * 4)
    x = torch.randn(10, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = wrapped(x, scale=2.0)
        expected = model(x, scale=2.0)
    assert out["out"].dtype == torch.bfloat16 and out["tag"] == "t" and out["pair"][1] is None
    torch.testing.assert_close(out["out"], expected["out"])
    torch.testing.assert_close(out["pair"][0], expected["pair"][0])


def test_reduction_trace_shows_early_buckets_hidden_under_backward():
    """NOTE [Reduction trace]: the benchmark's traced overlap, on a model whose first buckets are
    complete long before backward ends."""
    from bench.run import traced_overlap
    from bench.workloads import Workload

    model = dpfast.DataParallel(deep(1024, 12).cuda(), device_ids=[0] * 4, bucket_cap_mb=4)
    x, y = torch.randn(256, 1024, device="cuda"), torch.randn(256, 1024, device="cuda")
    workload = Workload("deep", "test", "", {}, 256, None, None)
    workload.loss = lambda out, target: (out - target).square().mean()
    for _ in range(2):
        model(x).sum().backward()
    result = traced_overlap(model, workload, x, y, steps=3)
    assert result["reduce_hidden_fraction_traced"] > 0
    assert result["reduce_span_us_traced"] > 0 and result["exposed_after_backward_us_traced"] >= 0
    assert model._runtime.reducer.trace is None


@pytest.mark.parametrize("replicas", [2, 4])
def test_root_grads_live_in_the_root_lane_and_a_term_outside_the_wrapper_is_ordered(replicas):
    """NOTE [Root gradients in the bucket]: the root's .grad are views into its lane of the
    buckets, complete on the caller's stream. A loss term on the root's weight made outside the
    wrapper, before its forward, on the default stream (its gradient accumulator then belongs to
    that stream), must reach the reduction too; and a second wrapper of the same module in the
    same backward adds its share."""
    reference = deep(64, 4).double()
    module = copy.deepcopy(reference).cuda()
    wrapped = dpfast.DataParallel(module, device_ids=[0] * replicas, bucket_cap_mb=0.02)
    other = dpfast.DataParallel(module, device_ids=[0, 0])
    for step in range(3):
        x = torch.randint(-2, 3, (16, 64)).double()
        y = torch.randint(-2, 3, (6, 64)).double()
        reference.zero_grad()
        module.zero_grad(set_to_none=step != 1)
        (reference[0].weight.square().sum() + reference(x).sum() + reference(y).sum()).backward()
        regulariser = module[0].weight.square().sum()
        (regulariser + wrapped(x.cuda()).sum() + other(y.cuda()).sum()).backward()
        for p, q in zip(reference.parameters(), module.parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-10, atol=1e-10)
    reducer = wrapped._ensure_runtime().reducer
    torch.cuda.synchronize()
    # The replicas' buckets were zeroed on their comm streams right after each reduction.
    assert all(torch.count_nonzero(f[k]) == 0 for f in reducer.flats for k in range(1, replicas))
    lanes = [(f[0].data_ptr(), f[0].data_ptr() + f[0].numel() * f[0].element_size()) for f in reducer.flats]
    assert any(lo <= module[-2].weight.grad.data_ptr() < hi for lo, hi in lanes + [
        (f[0].data_ptr(), f[0].data_ptr() + f[0].numel() * f[0].element_size())
        for f in other._ensure_runtime().reducer.flats])


def _a_child_that_uses_no_cuda():
    return None


def test_a_fork_after_the_wrapper_ran_on_cuda_starts_and_exits_cleanly():
    """The lanes' waits keep no torch.cuda.Event in Python thread-locals (csrc/comm.h, wait_lane):
    in a forked child Python clears the parent's other threads, and destroying such an event there
    aborted the child (a DataLoader worker started with fork; seen on an H200, 2026-11-27)."""
    import multiprocessing

    wrapped = dpfast.DataParallel(deep(32, 2).cuda(), device_ids=[0, 0, 0])
    for _ in range(2):
        wrapped(torch.randn(9, 32, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    child = multiprocessing.get_context("fork").Process(target=_a_child_that_uses_no_cuda)
    child.start()
    child.join(60)
    assert child.exitcode == 0


class OwnForwardDataParallel(dpfast.DataParallel):
    """transformer-xl's BalancedDataParallel, in its shape: a forward of its own that calls the
    wrapper's scatter, replicate and gather, and torch's parallel_apply, which runs the replicas on
    the devices' current streams rather than dpfast's lanes."""

    def forward(self, *inputs, **kwargs):
        inputs, kwargs = self.scatter(inputs, kwargs, self.device_ids)
        replicas = self.replicate(self.module, self.device_ids[:len(inputs)])
        outputs = torch.nn.parallel.parallel_apply(replicas, inputs, kwargs, self.device_ids[:len(inputs)])
        return self.gather(outputs, self.output_device)


class SleepsInBackward(torch.autograd.Function):
    """Identity whose backward first keeps the current stream busy (~10 ms), so that every
    gradient after it lands late on that stream."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(20_000_000)
        return grad


class LateGradients(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = deep(1024, 4)

    def forward(self, x):
        return SleepsInBackward.apply(self.body(x))


@pytest.mark.parametrize("replicas", [2, 4])
def test_a_subclass_running_replicas_on_the_current_streams_trains_as_the_module(replicas):
    """NOTE [Stream ordering]: replicate() called as nn.DataParallel's step leaves the replicas'
    weights ready on the current streams, and the reducer waits for gradients made there. The lanes
    are kept busy before each forward (the broadcast lands late), and each backward keeps the
    current stream busy before the gradients (they land late): reading weights before the lanes
    wrote them, or reducing before the gradients are in, gives other parameters."""
    reference = LateGradients().double().cuda()
    wrapped = OwnForwardDataParallel(copy.deepcopy(reference), device_ids=[0] * replicas, bucket_cap_mb=4)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for _ in range(4):
        x = torch.randn(8 * replicas, 1024, dtype=torch.float64, device="cuda")
        for model, optimizer in zip((reference, wrapped), optimizers):
            optimizer.zero_grad()
            if model is wrapped and wrapped.__dict__.get("_runtime") is not None:
                for lane in wrapped._runtime.streams:
                    with torch.cuda.stream(lane):
                        torch.cuda._sleep(20_000_000)
            model(x).square().mean().backward()
            optimizer.step()
    torch.cuda.synchronize()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_attribute_tensor_cached_by_replica_0_on_two_gpus():
    """NOTE [Attribute tensors]: PyTorch's word_language_model caches its causal mask in forward;
    replica 0 is the module, so the mask stays there, on cuda:0, and replica 1 on cuda:1 must get
    its own copy (a device mismatch otherwise)."""
    class CachesMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.src_mask = None

        def forward(self, x):
            if self.src_mask is None or self.src_mask.size(0) != x.size(1):
                self.src_mask = torch.triu(torch.full((x.size(1), x.size(1)), float("-inf"), device=x.device), 1)
            return self.proj(x) + self.src_mask.exp().sum(1).unsqueeze(-1)

    torch.manual_seed(0)
    reference = CachesMask()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference).cuda(), device_ids=[0, 1])
    for _ in range(3):
        x = torch.randn(4, 5, 4)
        torch.testing.assert_close(wrapped(x.cuda()).cpu(), reference(x))
