"""Gradient buckets: each reduced exactly once per backward, early where
possible, none inside no_sync(), the accumulated sum after it."""

import copy
import warnings

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


def _set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad = flag


def test_gan_style_freezing_every_step_needs_no_rebuild_and_matches():
    """CycleGAN and most GAN loops freeze the discriminator for the generator's step and unfreeze
    it for its own, every step: the replicas follow requires_grad in place."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)).double()
    wrapped_gen = dpfast.DataParallel(copy.deepcopy(gen), device_ids=CPU4)
    wrapped_disc = dpfast.DataParallel(copy.deepcopy(disc), device_ids=CPU4, bucket_cap_mb=0.0002)
    systems = []
    for g, d in ((gen, disc), (wrapped_gen, wrapped_disc)):
        systems.append((g, d, torch.optim.SGD(g.parameters(), lr=0.05), torch.optim.SGD(d.parameters(), lr=0.05)))
    for step in range(4):
        z, real = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
        for g, d, opt_g, opt_d in systems:
            fake = g(z)
            _set_requires_grad(d, False)
            opt_g.zero_grad()
            (-d(fake).mean()).backward()
            opt_g.step()
            _set_requires_grad(d, True)
            opt_d.zero_grad()
            (d(fake.detach()).mean() - d(real).mean()).backward()
            opt_d.step()
        for reference, wrapped in ((gen, wrapped_gen), (disc, wrapped_disc)):
            for p, q in zip(reference.parameters(), wrapped.module.parameters()):
                torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    assert wrapped_disc.stats()["replica_builds"] == 1
    assert wrapped_disc._runtime.reducer_build == 1  # one reducer for all steps, after the first unfreezing


@pytest.mark.parametrize("routed", ["0", "1"])
@pytest.mark.parametrize("grad_before", ["none", "zeros", "values"])
def test_a_parameter_frozen_between_forward_and_backward_gets_nothing(monkeypatch, routed, grad_before):
    """autograd skips a leaf that no longer requires grad when backward reaches it: its .grad
    stays as it was (None, or the values it held), as on one device and under nn.DataParallel,
    whose replicas' gradients reach the root's leaf through Broadcast's backward."""
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", routed)
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    x0, x = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    for model in (reference, wrapped):
        if grad_before != "none":  # a .grad before: the root's lane may be its view (NOTE [Root gradients in the bucket])
            model(x0).sum().backward()
            if grad_before == "zeros":
                for p in model.parameters():
                    p.grad.zero_()
        out = model(x)
        frozen = model.module[2] if model is wrapped else model[2]
        frozen.weight.requires_grad_(False)
        out.sum().backward()
        frozen.weight.requires_grad_(True)
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # The dropped shares do not come back in the next step.
    for model in (reference, wrapped):
        model.zero_grad()
        model(x0).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_frozen_parameter_does_not_hold_its_bucket_back():
    wrapped = dpfast.DataParallel(deep(), device_ids=CPU4)  # one bucket for all parameters
    x = torch.randn(8, 8, dtype=torch.float64)
    wrapped(x).sum().backward()
    assert wrapped.stats()["early_reductions"] == 1
    first = wrapped.module[0]
    first.weight.requires_grad_(False)  # fine-tuning: the first layer frozen from now on
    wrapped.zero_grad()
    wrapped(x).sum().backward()
    stats = wrapped.stats()
    assert stats["reductions"] == 2 and stats["early_reductions"] == 2  # launched by the hooks, not at the end
    assert stats["replica_builds"] == 1
    assert first.weight.grad is None  # as on one device: a frozen parameter gets nothing
    reference = deep()
    reference[0].weight.requires_grad_(False)
    reference(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_no_sync_holds_even_when_the_reducer_is_rebuilt_inside_it():
    """A layer trained for the first time inside no_sync() rebuilds the reducer: the new one
    must hold back its reductions too, and the first backward after the block reduces the sum."""
    reference, wrapped = deep(), dpfast.DataParallel(deep(), device_ids=CPU4)
    for model in (reference, wrapped.module):
        model[0].requires_grad_(False)
    x1, x2, x3 = (torch.randn(8, 8, dtype=torch.float64) for _ in range(3))
    wrapped(x1).sum().backward()
    reference(x1).sum().backward()
    old_reducer = wrapped._runtime.reducer
    with wrapped.no_sync():
        for model in (reference, wrapped.module):
            model[0].requires_grad_(True)
        wrapped(x2).sum().backward()
        assert wrapped._runtime.reducer is not old_reducer  # rebuilt for the newly trained layer
        assert wrapped.stats()["reductions"] == 0 and wrapped._runtime.reducer.sync_enabled is False
    reference(x2).sum().backward()
    wrapped(x3).sum().backward()
    reference(x3).sum().backward()
    assert wrapped._runtime.reducer.sync_enabled is True
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_module_replaced_inside_no_sync_keeps_the_accumulated_gradients():
    """dp.module = nn.Sequential(old) inside no_sync(): the replaced runtime's pending gradients
    are reduced into the (shared) parameters, and the new one holds back its own too."""
    torch.manual_seed(0)
    base = nn.Linear(3, 2).double()
    reference = copy.deepcopy(base)
    x = torch.randn(8, 3, dtype=torch.float64)
    for _ in range(3):
        reference(x).sum().backward()
    wrapped = dpfast.DataParallel(base, device_ids=["cpu", "cpu"])
    with wrapped.no_sync():
        wrapped(x).sum().backward()
        wrapped.module = nn.Sequential(base)
        wrapped(x).sum().backward()
        assert wrapped.stats()["reductions"] == 0  # the new runtime's reducer holds back too
    wrapped(x).sum().backward()
    for p, q in zip(reference.parameters(), base.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12)


def test_a_copy_made_inside_no_sync_reduces_normally():
    wrapped = dpfast.DataParallel(deep(), device_ids=CPU4)
    x = torch.randn(8, 8, dtype=torch.float64)
    with wrapped.no_sync():
        twin = copy.deepcopy(wrapped)
    twin(x).sum().backward()
    assert twin.stats()["reductions"] == 1
    reference = deep()
    reference(x).sum().backward()
    for p, q in zip(reference.parameters(), twin.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


# NOTE [Root gradients in the bucket]

def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _root_lane_holds(wrapped, param) -> bool:
    """Whether param.grad is a view into its bucket's root lane (no copy of its own)."""
    reducer = wrapped._ensure_runtime().reducer
    i = next(j for j, p in enumerate(reducer.root_params) if p is param)
    lane = reducer.flats[reducer.bucket_of[i]][0]
    start = lane.data_ptr()
    return start <= param.grad.data_ptr() < start + lane.numel() * lane.element_size()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_root_grads_live_in_the_buckets_and_train_as_the_module(set_to_none):
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = torch.randint(-2, 3, (8, 8)).double()
        for model, o in ((reference, opt_ref), (wrapped, opt)):
            o.zero_grad(set_to_none=set_to_none)
            model(x).sum().backward()
        for p, q in zip(reference.parameters(), wrapped.module.parameters()):
            _close(q.grad, p.grad)
            assert _root_lane_holds(wrapped, q)
        opt_ref.step()
        opt.step()
    assert wrapped.stats()["early_reductions"] == wrapped.stats()["reductions"] == 4 * wrapped.stats()["buckets"]
    # The replicas' buckets were zeroed right after each reduction, ready for the next backward.
    reducer = wrapped._ensure_runtime().reducer
    assert all(torch.count_nonzero(flats[k]) == 0 for flats in reducer.flats for k in range(1, 4))


def test_gradients_accumulate_over_steps_without_zero_grad():
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    for step in range(3):
        x = torch.randint(-2, 3, (6, 8)).double()
        reference(x).sum().backward()
        wrapped(x).sum().backward()
        for p, q in zip(reference.parameters(), wrapped.module.parameters()):
            _close(q.grad, p.grad)


def test_users_post_accumulate_grad_hooks_keep_running():
    """The root's hook is chained before the user's Python hooks, those registered before the
    wrapper and after it (which replace it in the parameter's one slot: the next forward hooks
    the root again, so buckets still launch during backward)."""
    reference = deep()
    module = copy.deepcopy(reference)
    seen = []
    module[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(("before", p.grad.clone())))
    wrapped = dpfast.DataParallel(module, device_ids=CPU4, bucket_cap_mb=0.0006)
    x = torch.randint(-2, 3, (8, 8)).double()
    wrapped(x).sum().backward()
    module[-1].bias.register_post_accumulate_grad_hook(lambda p: seen.append(("after", p.grad.clone())))
    module.zero_grad()
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    assert [name for name, _ in seen] == ["before", "after", "before"]
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        _close(q.grad, p.grad)
        assert _root_lane_holds(wrapped, q)
    stats = wrapped.stats()
    assert stats["early_reductions"] == stats["reductions"] == 2 * stats["buckets"]


def test_two_wrappers_of_one_module_in_one_backward():
    reference = deep()
    module = copy.deepcopy(reference)
    first = dpfast.DataParallel(module, device_ids=CPU4, bucket_cap_mb=0.0006)
    second = dpfast.DataParallel(module, device_ids=["cpu"] * 2)
    for step in range(3):
        x, y = torch.randint(-2, 3, (8, 8)).double(), torch.randint(-2, 3, (5, 8)).double()
        module.zero_grad()
        reference.zero_grad()
        (first(x).sum() + second(y).sum()).backward()
        (reference(x).sum() + reference(y).sum()).backward()
        for p, q in zip(reference.parameters(), module.parameters()):
            _close(q.grad, p.grad)


def test_the_root_used_without_the_wrapper_gets_its_own_gradient():
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    x = torch.randint(-2, 3, (8, 8)).double()
    wrapped(x).sum().backward()
    reductions = wrapped.stats()["reductions"]
    wrapped.zero_grad()
    reference(x).sum().backward()
    wrapped.module(x).sum().backward()
    assert wrapped.stats()["reductions"] == reductions  # nothing to reduce: the root alone
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        _close(q.grad, p.grad)


def test_a_dropped_wrapper_gives_the_roots_hooks_back():
    module = deep()
    seen = []
    module[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(1))
    wrapped = dpfast.DataParallel(module, device_ids=CPU4)
    wrapped(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    assert all(dpfast._C.GradReadiness.is_root_hooked(p) for p in module.parameters())
    del wrapped
    import gc
    gc.collect()
    module.zero_grad()
    module(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    assert not any(dpfast._C.GradReadiness.is_root_hooked(p) for p in module.parameters())
    assert seen == [1, 1]  # the user's hook ran both times
    # The wrapper's hook is gone with it: the gradient stays where autograd put it.
    assert module[0].weight.grad.untyped_storage().nbytes() == module[0].weight.numel() * 8


DEVICE_IDS = [CPU4, pytest.param([0] * 4, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device_ids", DEVICE_IDS, ids=["cpu", "cuda"])
@pytest.mark.parametrize("hook", ["scale_in_place", "replace", "drop"])
def test_a_users_hook_that_changes_the_roots_gradient(device_ids, hook):
    """The user's post-accumulate-grad hook on a root parameter sees replica 0's share (as the
    README says) and runs before the bucket's reduction: what it leaves in .grad is what gets the
    replicas' shares added. A linear layer's bias under out.sum() gets one per row: chunks of 2
    rows give 2 per replica, 8 in all, exactly."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)).double()
    if device_ids != CPU4:
        module = module.cuda()
    bias = module[1].bias

    def scale_in_place(p):
        p.grad.mul_(3)

    def replace(p):
        p.grad = p.grad * 3

    def drop(p):
        p.grad = None

    bias.register_post_accumulate_grad_hook({"scale_in_place": scale_in_place, "replace": replace, "drop": drop}[hook])
    wrapped = dpfast.DataParallel(module, device_ids=device_ids, bucket_cap_mb=0.0001)
    for step in range(2):
        module.zero_grad(set_to_none=step == 0)
        wrapped(torch.randn(8, 8, dtype=torch.float64)).sum().backward()
        expected = {"scale_in_place": 3 * 2 + 6, "replace": 3 * 2 + 6, "drop": 6}[hook]
        assert torch.equal(bias.grad.cpu(), torch.full((3,), float(expected), dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_gradient_that_carries_a_graph_keeps_it_through_a_plain_backward():
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    x1, x2 = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    for model in (reference, wrapped):
        model(x1).pow(2).sum().backward(create_graph=True)
        model(x2).sum().backward()  # accumulates into .grad in place, without zero_grad
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        _close(q.grad, p.grad)
        assert q.grad.requires_grad == p.grad.requires_grad


def test_a_gradient_seen_sparse_stays_sparse_when_the_root_sits_out():
    """A raw parameter that F.embedding(sparse=True) reads (no nn.Embedding declares it): the
    wrapper learns its layout from the root's first gradient, and hands the sum back sparse even
    in a step where replica 0 had no rows."""
    class RawSparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(20, 4, dtype=torch.float64))

        def forward(self, ids):
            return nn.functional.embedding(ids, self.weight, sparse=True)

    torch.manual_seed(0)
    reference = RawSparse()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4)
    for chunk_sizes in (None, [0, 4, 4, 4]):
        wrapped.chunk_sizes = chunk_sizes
        ids = torch.randint(0, 20, (12, 3))
        for model in (reference, wrapped):
            model.zero_grad()
            model(ids).pow(2).sum().backward()
        assert wrapped.module.weight.grad.is_sparse
        _close(wrapped.module.weight.grad.to_dense(), reference.weight.grad.to_dense())


def test_dense_gradients_when_the_root_sits_out():
    """Replica 0 with no rows: the root's hook never runs, so every bucket is claimed at the end of
    backward (its root lane zeroed or filled from .grad) and adopted as .grad."""
    reference = deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006,
                                  chunk_sizes=[0, 3, 3, 2])
    for step in range(3):
        x = torch.randn(8, 8, dtype=torch.float64)
        if step != 1:  # step 1 accumulates onto step 0's gradients
            reference.zero_grad()
            wrapped.module.zero_grad(set_to_none=step == 0)
        reference(x).sum().backward()
        wrapped(x).sum().backward()
        for p, q in zip(reference.parameters(), wrapped.module.parameters()):
            _close(q.grad, p.grad)
            assert _root_lane_holds(wrapped, q)


def test_a_parameter_that_is_not_contiguous_is_held_and_still_exact():
    """A weight that is a strided slice of a bigger tensor keeps autograd's gradient in .grad (a
    bucket slice is contiguous, and the replicas' parameters too); the replicas' sum is added into
    it. (channels_last weights are held the same way: test_data_parallel checks their strides.)"""
    class Gappy(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64)[:, ::2])

        def forward(self, x):
            return x @ self.weight

    torch.manual_seed(0)
    reference, module = Gappy(), Gappy()
    with torch.no_grad():
        module.weight.copy_(reference.weight)
    wrapped = dpfast.DataParallel(module, device_ids=CPU4)
    x = torch.randn(8, 4, dtype=torch.float64)
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    _close(module.weight.grad, reference.weight.grad)
    assert not _root_lane_holds(wrapped, module.weight)


def test_a_model_converted_to_channels_last_after_training_keeps_its_gradient_layout():
    """`model.to(memory_format=torch.channels_last)` between steps, with .grad kept
    (zero_grad(set_to_none=False), gradient accumulation): the weights' new layout rebuilds the
    replicas and the buckets, so the root's .grad takes the parameter's layout as on one device
    (autograd's "grad and param do not obey the gradient layout contract" warning otherwise, every
    backward), and training goes on exactly."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    reference = Net().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 2)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    layouts = {}
    for name, model in (("reference", reference), ("wrapped", wrapped)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.to(memory_format=torch.channels_last)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*gradient layout contract.*")
            for _ in range(3):
                optimizer.zero_grad(set_to_none=False)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        module = model.module if name == "wrapped" else model
        layouts[name] = (module.conv.weight.stride(), module.conv.weight.grad.stride())
    assert layouts["wrapped"] == layouts["reference"]
    assert layouts["reference"][0] == layouts["reference"][1]  # channels_last, weight and gradient
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        _close(q, p)
        _close(q.grad, p.grad)


def test_the_old_zero_grad_idiom_detach_then_zero_works_on_bucket_gradients():
    # `p.grad.detach_(); p.grad.zero_()` (older optimizers and training loops): autograd refuses
    # detach_() on a view, so the root's .grad are aliases of their bucket, not views of it.
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    for step in range(3):
        x = torch.randn(9, 4, dtype=torch.float64)
        for model in (reference, wrapped):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.detach_()
                    p.grad.zero_()
            model(x).pow(2).sum().backward()
        for p, q in zip(reference.parameters(), wrapped.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def _integer_batches(count):
    torch.manual_seed(1)
    return [torch.randint(-3, 4, (8, 8)).double() for _ in range(count)]


def integer_deep():
    """Integer weights and inputs: every gradient is an exact sum, in any order."""
    model = deep()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    return model


@pytest.mark.parametrize("parallel_backward", ["0", "1"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("where", ["before_forward", "before_backward", "inside_block"])
def test_zero_grad_after_no_sync_drops_every_replicas_share(monkeypatch, parallel_backward, set_to_none, where):
    """A zero_grad() between no_sync() backward passes and the next backward drops what was
    accumulated on every replica, as DDP's no_sync (which keeps it all in .grad) does: the
    replicas' shares in their buckets go with replica 0's in .grad."""
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel_backward)
    reference = integer_deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    batches = _integer_batches(3)
    with wrapped.no_sync():
        wrapped(batches[0]).sum().backward()
        if where == "inside_block":
            optimizer.zero_grad(set_to_none=set_to_none)
        wrapped(batches[1]).sum().backward()
    if where == "before_forward":
        optimizer.zero_grad(set_to_none=set_to_none)
    output = wrapped(batches[2])
    if where == "before_backward":
        optimizer.zero_grad(set_to_none=set_to_none)
    output.sum().backward()
    kept = batches[1:] if where == "inside_block" else batches[2:]
    for x in kept:
        reference(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        assert torch.equal(q.grad, p.grad)
    # Cleared once, not at every step from then on.
    optimizer.zero_grad()
    reference.zero_grad()
    with wrapped.no_sync():
        wrapped(batches[0]).sum().backward()
    wrapped(batches[1]).sum().backward()
    for x in batches[:2]:
        reference(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        assert torch.equal(q.grad, p.grad)


def test_zero_grad_of_some_parameters_after_no_sync_drops_their_shares_only():
    """Two optimizers (a GAN's): clearing one's parameters leaves the other's accumulation whole."""
    reference = integer_deep()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, bucket_cap_mb=0.0006)
    first_half = [p for layer in wrapped.module[:3] for p in layer.parameters()]
    batches = _integer_batches(2)
    with wrapped.no_sync():
        wrapped(batches[0]).sum().backward()
    torch.optim.SGD(first_half, lr=0.1).zero_grad()
    wrapped(batches[1]).sum().backward()
    reference(batches[0]).sum().backward()
    for p in list(reference.parameters())[:6]:
        p.grad = None
    reference(batches[1]).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        assert torch.equal(q.grad, p.grad)


def _linear_pair(bias=True):
    torch.manual_seed(0)
    reference = nn.Linear(2, 2, bias=bias).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    return reference, copy.deepcopy(reference)


def _rows(first_chunk_zero=False):
    x = torch.randint(1, 4, (4, 2)).double()
    if first_chunk_zero:
        x[:2] = 0  # replica 0's chunk of 2 rows: its share of the weight's gradient is all zero
    return x


def _assert_grads_equal(reference, module):
    for p, q in zip(reference.parameters(), module.parameters()):
        assert torch.equal(q.grad, p.grad)


class _SkipsOnZeroRows(nn.Module):
    """Uses `extra` only where its chunk has a nonzero entry: replica 0, given zero rows, leaves
    extra's .grad None in a no_sync() block while replica 1 accumulates a share of it."""

    def __init__(self):
        super().__init__()
        self.main, self.extra = _linear_pair()[0], _linear_pair(bias=False)[0]

    def forward(self, x):
        y = self.main(x)
        return y + self.extra(x) if bool(x.any()) else y


@pytest.mark.parametrize("touch", ["clip_by_one", "scale_by_one", "zeros_for_none"])
def test_an_in_place_no_op_after_no_sync_keeps_the_replicas_shares(touch):
    """Not a clear (NOTE [Clearing an accumulation]): clip_grad_norm_ with a large bound multiplies
    every .grad by 1 in place, and replica 0's share of the weight is all zero here (its rows are
    zero), so 'all zero now' alone would read as one; a None .grad given zeros clears nothing."""
    reference = _SkipsOnZeroRows()
    module = copy.deepcopy(reference)
    wrapped = dpfast.DataParallel(module, device_ids=CPU4[:2])
    x = _rows(first_chunk_zero=True)
    with wrapped.no_sync():
        wrapped(x).sum().backward()
    assert module.extra.weight.grad is None and not module.main.weight.grad.any()
    if touch == "clip_by_one":
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1e9)
    elif touch == "scale_by_one":
        module.main.weight.grad.mul_(1.0)
    else:
        module.extra.weight.grad = torch.zeros_like(module.extra.weight)
    wrapped(x).sum().backward()
    for half in (x[:2], x[2:], x[:2], x[2:]):  # the reference on the same chunks (its branch per chunk)
        reference(half).sum().backward()
    _assert_grads_equal(reference, module)


@pytest.mark.parametrize("case", ["retained_graph_of_the_blocks_forward", "gather_false", "unfrozen_after_the_block",
                                  "create_graph_in_the_block"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_after_no_sync_is_seen_on_every_path(case, set_to_none):
    """A backward of a forward made inside the block (retain_graph), per-replica outputs
    (gather=False), a parameter frozen in the block and unfrozen after the clear (the reducer is
    rebuilt, reducing what is pending first), a block's backward with create_graph=True (the
    replicas' .grad then carry graphs, not their bucket views)."""
    # Two layers: with create_graph=True the first layer's gradient then carries a graph.
    reference = nn.Sequential(_linear_pair()[0], _linear_pair()[0])
    module = copy.deepcopy(reference)
    wrapped = dpfast.DataParallel(module, device_ids=CPU4[:2], gather=case != "gather_false")
    first, second = _rows(), _rows() + 1

    def loss(out):
        return (sum(o.sum() for o in out) if case == "gather_false" else out.sum())

    if case == "unfrozen_after_the_block":
        module[1].bias.requires_grad_(False)
    with wrapped.no_sync():
        out = wrapped(first)
        loss(out).backward(retain_graph=case == "retained_graph_of_the_blocks_forward",
                           create_graph=case == "create_graph_in_the_block")
    if case != "gather_false":
        module.zero_grad(set_to_none=set_to_none)
    if case == "retained_graph_of_the_blocks_forward":
        loss(out).backward()
        reference(first).sum().backward()
    else:
        if case == "unfrozen_after_the_block":
            module[1].bias.requires_grad_(True)
        out = wrapped(second)
        if case == "gather_false":
            module.zero_grad(set_to_none=set_to_none)  # between the forward and its backward
        loss(out).backward()
        reference(second).sum().backward()
    if case == "create_graph_in_the_block":
        for p in module.parameters():
            p.grad = p.grad.detach()
    _assert_grads_equal(reference, module)


def test_holds_values_reads_every_kind_of_gradient():
    from dpfast.reducer import _holds_values
    sparse_empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (3,))
    sparse_full = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([2.0]), (3,))
    tensors = [torch.zeros(3), torch.tensor([0.0, -1.0]), torch.zeros(2, dtype=torch.complex64),
               torch.tensor([0j, 1j]), torch.empty(0), torch.tensor([float("nan")]),
               torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.bfloat16), sparse_empty, sparse_full]
    assert _holds_values(tensors).tolist() == [False, True, False, True, False, True, False, True, False, True]


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_sparse_gradient_keeps_the_zero_valued_rows_the_replicas_looked_up(replicas):
    """NOTE [Sparse rows]: a row only replicas 1..n-1 looked up, whose gradient is exactly zero (a
    masked-out sample, a pad token), is listed in the root's sparse .grad as on one device, so
    SparseAdam steps it from its moments; the replicas' buckets are dense and lost that."""
    def train(wrap):
        torch.manual_seed(0)
        embedding = nn.Embedding(8, 2, sparse=True).double()
        model = dpfast.DataParallel(embedding, device_ids=CPU4[:replicas]) if wrap else embedding
        optimizer = torch.optim.SparseAdam(list(embedding.parameters()), lr=0.1)
        ids = torch.tensor([0, 1, 3, 5, 7, 2])
        listed = []
        for weights in ([1.0] * 6, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]):  # step 2: the last samples masked out
            optimizer.zero_grad()
            (model(ids).sum(1) * torch.tensor(weights, dtype=torch.float64)).sum().backward()
            listed.append(embedding.weight.grad.coalesce().indices()[0].tolist())
            optimizer.step()
        return embedding.weight.detach(), listed

    (expected, expected_rows), (got, got_rows) = train(False), train(True)
    assert got_rows == expected_rows == [[0, 1, 2, 3, 5, 7]] * 2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
