"""NOTE [Parallel backward] (dpfast/backward.py): CPU replicas' backward passes run side by side on
their workers, give the same gradients as autograd's own walk, and are left to that walk wherever
a replica's graph does not stand alone."""

import copy
import dataclasses
import gc
import threading
import time
import weakref

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import dpfast
from dpfast import _C
from conftest import graph_nodes, routed

CPU3 = ["cpu"] * 3


@pytest.fixture(autouse=True)
def parallel_backward(monkeypatch):
    """Side by side whatever this machine's thread count (a test may turn it off)."""
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "1")


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def reference_and_wrapped(device_ids=CPU3, factory=make):
    """Two equal modules from factory: one to run unwrapped, one wrapped."""
    torch.manual_seed(0)
    reference, module = factory(), factory()
    module.load_state_dict(reference.state_dict())
    return reference, dpfast.DataParallel(module, device_ids=device_ids)


def assert_same_grads(reference, module):
    """module: the wrapped module (the wrapper's .module), against the unwrapped reference."""
    for (name, p), q in zip(reference.named_parameters(), module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


class Rendezvous(torch.autograd.Function):
    """Identity whose backward waits at a barrier: it completes only when every replica's backward
    reaches it at the same time."""

    @staticmethod
    def forward(ctx, x, barrier):
        ctx.barrier = barrier
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.barrier.wait()
        return grad, None


class MeetsInBackward(nn.Module):
    def __init__(self, barrier):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()
        self.barrier = barrier

    def forward(self, x):
        return Rendezvous.apply(self.linear(x), self.barrier)


def test_replicas_backward_passes_run_at_the_same_time():
    barrier = threading.Barrier(3, timeout=20)  # one party per replica: replica 0 on the caller's thread
    model = MeetsInBackward(barrier)
    reference = MeetsInBackward(threading.Barrier(1))
    reference.load_state_dict(model.state_dict())
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    x = torch.randn(9, 4, dtype=torch.float64)
    out = wrapped(x)
    assert routed(out)
    out.pow(2).sum().backward()  # in turn, the first replica would wait at the barrier alone
    reference(x).pow(2).sum().backward()
    assert_same_grads(reference, model)


class RecordsThreads(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()
        self.threads = []

    def forward(self, x):
        out = self.linear(x)
        threads = self.threads  # a list shared by every replica (a plain attribute)
        out.register_hook(lambda grad: threads.append(threading.current_thread().name))
        return out


@pytest.mark.parametrize("sequential", [False, True])
def test_each_replica_runs_backward_on_its_worker_and_the_switch_turns_it_off(sequential, monkeypatch):
    if sequential:
        monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "0")
    model = RecordsThreads()
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    wrapped(torch.randn(9, 4, dtype=torch.float64)).sum().backward()
    caller = threading.current_thread().name
    on_workers = [name for name in model.threads if name != caller]
    assert len(model.threads) == 3
    assert len(on_workers) == (0 if sequential else 2)
    assert all(name.startswith("dpfast-replica-") for name in on_workers)


def test_gradients_match_autograd_over_steps_with_retain_graph_and_two_forwards():
    reference, wrapped = reference_and_wrapped()
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for step in range(4):
        a, b = torch.randn(9, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
        for model, optimizer in ((reference, opt_ref), (wrapped, opt)):
            optimizer.zero_grad()
            loss = model(a).pow(2).sum() + model(b).sum()  # two forwards, one backward
            loss.backward(retain_graph=True)
            loss.backward()  # the same graph again: every replica's part runs again
        assert_same_grads(reference, wrapped.module)
        opt_ref.step()
        opt.step()


@dataclasses.dataclass
class Pair:
    main: torch.Tensor
    extra: dict


class StructuredOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3).double()

    def forward(self, x):
        h = self.linear(x)
        return Pair(h, {"squared": h.pow(2), "count": x.shape[0], "argmax": h.argmax(1), "same": h})


def test_structured_outputs_are_routed_and_match():
    torch.manual_seed(0)
    reference = StructuredOutputs()
    wrapped = dpfast.DataParallel(StructuredOutputs(), device_ids=CPU3)
    wrapped.module.load_state_dict(reference.state_dict())
    x = torch.randn(10, 4, dtype=torch.float64)
    out, ref = wrapped(x), reference(x)
    assert routed(out.main)
    (out.main.sum() + out.extra["squared"].sum() + 2 * out.extra["same"].sum()).backward()
    (ref.main.sum() + ref.extra["squared"].sum() + 2 * ref.extra["same"].sum()).backward()
    assert_same_grads(reference, wrapped.module)


class Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()
        self.scale = scale  # a tensor of the caller's graph, captured as a plain attribute

    def forward(self, x):
        return self.linear(x) * self.scale


class Box:
    def __init__(self, tensor):
        self.tensor = tensor

    def __eq__(self, other):
        return False


class Boxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.linear(x), Box(self.linear(x))


def test_graphs_that_do_not_stand_alone_are_left_to_autograd():
    x = torch.randn(9, 4, dtype=torch.float64)
    # An input that requires grad: the replicas' graphs run into the caller's.
    _, wrapped = reference_and_wrapped()
    xg = x.clone().requires_grad_()
    out = wrapped(xg)
    assert not routed(out)
    out.sum().backward()
    reference = make()
    xr = x.clone().requires_grad_()
    reference(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_same_grads(reference, wrapped.module)
    # A module holding a tensor of the caller's graph.
    leaf = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref_leaf = leaf.detach().clone().requires_grad_()
    torch.manual_seed(0)
    module = Scaled(leaf * 1.5)
    torch.manual_seed(0)
    ref_module = Scaled(ref_leaf * 1.5)
    out = dpfast.DataParallel(module, device_ids=CPU3)(x)
    assert not routed(out)
    out.sum().backward()
    ref_module(x).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)
    # An output the gather does not walk by structure.
    out = dpfast.DataParallel(Boxed(), device_ids=CPU3)(x)
    assert not routed(out[0])


class FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, x):
        ctx.fail = bool((x[:, 0] == 99).any())  # a marked row in this replica's chunk
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.fail:
            raise ValueError("bad gradient")
        return grad, None


class MayFail(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()

    def forward(self, x):
        return FailsInBackward.apply(self.linear(x), x)


def test_an_error_in_a_replicas_backward_names_it_and_the_next_step_is_exact():
    reference, wrapped = reference_and_wrapped(factory=MayFail)
    model = wrapped.module
    bad = torch.randn(9, 4, dtype=torch.float64)
    bad[4, 0] = 99  # rows 3..5: replica 1
    expected = r"Caught ValueError in replica 1 on device cpu \(backward\)[\s\S]*bad gradient"
    with pytest.raises(ValueError, match=expected):
        wrapped(bad).sum().backward()
    for p in model.parameters():
        p.grad = None
    x = torch.randn(9, 4, dtype=torch.float64)
    wrapped(x).sum().backward()
    reference(x).sum().backward()
    assert_same_grads(reference, model)


def test_a_wrapper_dropped_before_backward_still_reduces_every_replica():
    reference, wrapped = reference_and_wrapped()
    module = wrapped.module
    x = torch.randn(9, 4, dtype=torch.float64)
    loss = wrapped(x).sum()
    ref = weakref.ref(wrapped)
    del wrapped
    gc.collect()
    assert ref() is None  # its workers are closed: the replicas' parts run on the caller's thread
    loss.backward()
    reference(x).sum().backward()
    assert_same_grads(reference, module)


def test_graph_reaches_only():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = (a * 2).sin() + b.detach()
    assert _C.graph_reaches_only([out], [a])
    assert not _C.graph_reaches_only([out + b], [a])  # b's accumulator is met
    assert _C.graph_reaches_only([out + b], [a, b])
    assert _C.graph_reaches_only([a], [a])  # a leaf: its own accumulator
    assert not _C.graph_reaches_only([a], [b])
    assert _C.graph_reaches_only([torch.randn(3)], [])  # no graph at all
    fresh = torch.randn(3, requires_grad=True)  # no accumulator yet: the walk makes one, and keeps it
    assert _C.graph_reaches_only([fresh], [fresh])
    assert _C.graph_reaches_any([out], [a]) and _C.graph_reaches_any([out + b], [b])
    assert not _C.graph_reaches_any([out], [b])  # b's graph was cut by detach
    assert not _C.graph_reaches_any([out], []) and not _C.graph_reaches_any([torch.randn(3)], [a])
    assert _C.graph_reaches_any([a], [a])


def test_a_wrapper_inside_a_checkpoint_and_outside_it_in_one_backward():
    """The checkpoint's recomputation is a forward inside the backward: it must not drop what the
    backward has reduced so far (as a forward after a backward that raised does)."""
    from torch.utils.checkpoint import checkpoint

    for use_reentrant in (True, False, False, False, False):  # non-reentrant: a race, if any, shows in a few
        reference, wrapped = reference_and_wrapped()
        x = torch.randn(9, 4, dtype=torch.float64)
        for model in (reference, wrapped):
            first = model(x)  # a plain forward first
            second = checkpoint(model, x.clone().requires_grad_(), use_reentrant=use_reentrant)
            (first.pow(2).sum() + second.sum()).backward()
        assert_same_grads(reference, wrapped.module)


def test_a_retained_graph_and_a_new_forward_in_one_backward():
    reference, wrapped = reference_and_wrapped()
    x, x2 = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    for model in (reference, wrapped):
        out = model(x)
        out.sum().backward(retain_graph=True)
        (out.pow(2).sum() + model(x2).sum()).backward()  # the old graph's replicas' passes and the new
    assert_same_grads(reference, wrapped.module)


def test_a_backward_of_an_earlier_graph_after_one_that_raised():
    reference, wrapped = reference_and_wrapped(factory=MayFail)
    model = wrapped.module
    x = torch.randn(9, 4, dtype=torch.float64)
    bad = x.clone()
    bad[4, 0] = 99
    good_out = wrapped(x)
    with pytest.raises(ValueError, match="bad gradient"):
        wrapped(bad).sum().backward()  # its replica 1 raises; the others' gradients are in
    for p in model.parameters():
        p.grad = None
    good_out.sum().backward()  # no forward in between: what the failed backward left is dropped
    reference(x).sum().backward()
    assert_same_grads(reference, model)


class KeepsActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 8).double()
        self.activations = []  # weak references to each replica's saved activation

    def forward(self, x):
        h = self.linear(x)
        self.activations.append(weakref.ref(h))
        return h * h  # saves h for backward


def test_replicas_graphs_are_freed_by_backward_unless_retained():
    model = KeepsActivation()
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    out = wrapped(torch.randn(9, 4, dtype=torch.float64))
    assert routed(out)
    out.sum().backward(retain_graph=True)
    assert sum(ref() is not None for ref in model.activations) == 3
    out.sum().backward()
    gc.collect()
    # The output is still held here; the replicas' graphs are not.
    assert sum(ref() is not None for ref in model.activations) == 0
    # Two forwards in one backward (a siamese model, D(real) + D(fake)): each replica's pass keeps
    # its graph for the other's, and both go with the backward all the same.
    first, second = wrapped(torch.randn(9, 4, dtype=torch.float64)), wrapped(torch.randn(9, 4, dtype=torch.float64))
    assert routed(first) and routed(second)
    (first + second).sum().backward()
    gc.collect()
    assert len(model.activations) == 9 and sum(ref() is not None for ref in model.activations) == 0


class KeepsOutput(KeepsActivation):
    def forward(self, x):
        self.last_output = super().forward(x)  # each replica's module holds its output, so its graph
        return self.last_output


@pytest.mark.parametrize("retain", [False, True])
def test_a_replicas_pass_frees_its_saved_tensors_unless_the_callers_backward_keeps_its_graph(retain):
    """As autograd does for replica 0 (the root module's graph): a module that holds its output holds
    the nodes, not the activations they saved, after a backward that keeps no graph."""
    model = KeepsOutput()
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    out = wrapped(torch.randn(9, 4, dtype=torch.float64))
    assert routed(out)
    out.sum().backward(retain_graph=retain)
    del out
    gc.collect()
    assert sum(ref() is not None for ref in model.activations) == (3 if retain else 0)


class TiedAcrossCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 4).double()
        self.head = nn.Linear(4, 2).double()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.layer(x).tanh()
        h = checkpoint(lambda h: self.layer(h).tanh(), h, use_reentrant=True)
        return self.head(h)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_gradient_after_its_buckets_reduction_is_an_error_then_the_step_is_exact(sequential, monkeypatch):
    """A weight used inside and outside a reentrant checkpoint gets gradients from two backward
    passes; the second came after the early reduction of its bucket. dpfast says so, and reduces at
    the end of backward from then on."""
    if sequential:
        monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "0")
    reference, model = TiedAcrossCheckpoint(), TiedAcrossCheckpoint()
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    x = torch.randn(9, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"received gradients from two backward passes.*run the step again"):
        wrapped(x).pow(2).sum().backward()
    for p in model.parameters():
        p.grad = None
    for _ in range(2):
        wrapped(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
    assert_same_grads(reference, model)


class TiedInsideAndAfterCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4).double()
        self.layer = nn.Linear(4, 4).double()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.first(x).tanh()
        h = checkpoint(lambda h: self.layer(h).tanh(), h, use_reentrant=True)
        return self.layer(h)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_second_gradient_before_its_bucket_completes_is_exact_and_early(sequential, monkeypatch):
    """The layer's weight gets gradients from two backward passes (outside the reentrant checkpoint,
    then inside), both before its bucket (which also holds `first`) is complete: each replica's
    parameter counts once, so the bucket waits for `first` and is reduced early, exactly."""
    if sequential:
        monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "0")
    reference, model = TiedInsideAndAfterCheckpoint(), TiedInsideAndAfterCheckpoint()
    wrapped = dpfast.DataParallel(model, device_ids=CPU3)
    for _ in range(2):
        x = torch.randn(9, 4, dtype=torch.float64)
        for m in (reference, model):
            m.zero_grad()
        wrapped(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        assert_same_grads(reference, model)
    assert wrapped.stats()["early_reductions"] == wrapped.stats()["reductions"] == 2


@pytest.mark.parametrize("setting,threads,lanes,passive,pause,expected", [
    ("auto", 1, 2, False, False, True), ("auto", 2, 2, False, False, False), ("auto", 2, 4, False, False, False),
    ("auto", 1, 1, False, False, False), ("auto", 2, 2, True, False, True), ("auto", 8, 4, True, False, True),
    ("auto", 4, 1, True, False, False), ("auto", 2, 2, False, True, True), ("auto", 3, 2, False, True, False),
    ("auto", 4, 2, False, True, False), ("1", 8, 2, False, False, True), ("0", 1, 4, True, True, False),
    (" AUTO ", 1, 3, False, False, True),
])
def test_when_the_backward_passes_run_side_by_side(setting, threads, lanes, passive, pause, expected, monkeypatch):
    """passive: OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep); pause: libgomp's
    omp_pause_resource_all found (used where the workers get one thread each)."""
    from dpfast import backward, workers

    monkeypatch.setattr(workers, "_IDLE_THREADS_SLEEP", passive)
    monkeypatch.setattr(workers, "_pause_team", (lambda kind: 0) if pause else None)
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", setting)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert backward.wanted(lanes) is expected


def test_a_bad_parallel_backward_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "yes")
    wrapped = dpfast.DataParallel(make(), device_ids=CPU3)
    with pytest.raises(ValueError, match=r"DPFAST_PARALLEL_BACKWARD: expected '1', '0' or 'auto', but got 'yes'"):
        wrapped(torch.randn(6, 4, dtype=torch.float64))
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "1")
    assert wrapped(torch.randn(6, 4, dtype=torch.float64)).shape == (6, 2)  # and the wrapper still works


def deeper():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()


@pytest.mark.parametrize("parallel", ["0", "1"])
def test_backwards_without_a_forward_between_them_reduce_every_replica(parallel, monkeypatch):
    """Two losses of one forward, and two forwards then two backwards: the second backward has no
    forward before it, so the counter learns the replicas only from their marks. With replica 1's
    autograd sequence numbers pushed ahead (a few steps on 2 rows: only replicas 0 and 1 run), its
    nodes run first; a bucket must not count as complete when replica 1 alone is in."""
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel)
    reference = deeper()
    module = deeper()
    wrapped = dpfast.DataParallel(module, device_ids=CPU3, bucket_cap_mb=0.0005)  # several buckets
    for _ in range(3):
        wrapped(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    for step in range(2):
        for m in (reference, module):
            for p in m.parameters():
                p.grad = None
        x1, x2 = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
        for model in (reference, wrapped):
            out = model(x1)
            out[:, 0].pow(2).sum().backward(retain_graph=True)
            out[:, 1].sin().sum().backward()
            a, b = model(x1), model(x2)
            a.pow(2).sum().backward()
            b.sin().sum().backward()
        assert_same_grads(reference, module)
    before = wrapped.stats()["early_reductions"]
    wrapped(torch.randn(9, 4, dtype=torch.float64)).sum().backward()  # an ordinary step reduces early again
    assert wrapped.stats()["early_reductions"] > before


class ReturnsItsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return {"log_scale": self.log_scale, "out": self.linear(x) * self.log_scale.exp()}  # the parameter first


def test_an_output_that_is_a_parameter_is_routed_and_leaves_early_reduction_on():
    wrapped = dpfast.DataParallel(ReturnsItsParameter(), device_ids=CPU3, bucket_cap_mb=0.0005)
    for step in range(4):
        out = wrapped(torch.randn(9, 4, dtype=torch.float64))
        assert routed(out["out"])  # replica k's parameter as a root: its accumulator made by the walk
        before = wrapped.stats()["early_reductions"]
        (out["out"].sum() + out["log_scale"].sum()).backward()
        assert wrapped.stats()["early_reductions"] > before, step


def test_a_retained_routed_graph_then_an_unrouted_forward_in_one_backward():
    reference, wrapped = reference_and_wrapped()
    x, x2 = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    for model in (reference, wrapped):
        out = model(x)
        out.sum().backward(retain_graph=True)
        xg = x2.clone().requires_grad_()  # not routed: its input's gradient is wanted
        (out.pow(2).sum() + model(xg).sum()).backward()
    assert_same_grads(reference, wrapped.module)


class _SavesActivations(nn.Module):
    """Grad-CAM's pattern: a forward hook keeps each replica's activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("kind", ["forward_hook", "pre_hook", "global_forward_hook", "global_pre_hook"])
def test_a_hook_that_keeps_activations_leaves_them_reachable_by_autograd_grad(kind):
    """torch.autograd.grad with respect to activations that a hook kept from each replica
    (Grad-CAM, captum's Layer methods) reaches every replica's: with such a hook on the module
    the replicas' graphs stay connected to the gathered output (not routed through the workers).
    A forward pre-hook keeping the head's inputs (layer attribution with respect to inputs) and
    torch's global hooks (register_module_forward_hook) keep them as well: autograd.grad raised
    "appears to not have been used in the graph" with those."""
    from torch.nn.modules import module as torch_module

    torch.manual_seed(0)
    reference = _SavesActivations().double()
    module = _SavesActivations().double()
    module.load_state_dict(reference.state_dict())
    kept = []

    def keep_output(m, args, output):
        if m.__class__ is nn.Sequential:
            kept.append(output)

    def keep_input(m, args):
        if m.__class__ is nn.Linear and m.in_features == 8:  # the head
            kept.append(args[0])
    handle = {"forward_hook": lambda: module.body.register_forward_hook(keep_output),
              "pre_hook": lambda: module.head.register_forward_pre_hook(keep_input),
              "global_forward_hook": lambda: torch_module.register_module_forward_hook(keep_output),
              "global_pre_hook": lambda: torch_module.register_module_forward_pre_hook(keep_input)}[kind]()
    try:
        wrapped = dpfast.DataParallel(module, device_ids=CPU3)
        x = torch.randn(9, 4, dtype=torch.float64)
        for _ in range(2):  # the first call, and one with the replicas already built
            kept.clear()
            out = wrapped(x)
            assert not routed(out)
            grads = torch.autograd.grad(out[:, 1].sum(), kept)
            acts = reference.body(x)
            expected = torch.autograd.grad(reference.head(acts)[:, 1].sum(), acts)[0]
            assert len(grads) == 3
            order = sorted(range(3), key=lambda k: kept[k].data_ptr())  # threads append in any order
            torch.testing.assert_close(torch.cat([grads[k] for k in order]), expected, rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
    kept.clear()
    assert routed(wrapped(x))  # without the hook, routed again


def test_weight_norm_and_pruning_pre_hooks_keep_the_routed_backward():
    """PyTorch's own pre-hooks that only recompute a weight (weight_norm, spectral_norm, pruning)
    keep no activations: the replicas' backward passes still run side by side, and train as the
    module."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _SavesActivations().double()
        nn.utils.weight_norm(model.head)
        nn.utils.spectral_norm(model.body[0])
        torch.nn.utils.prune.l1_unstructured(model.head, "bias", amount=0.5)
        models.append(model)
    reference, module = models
    wrapped = dpfast.DataParallel(module, device_ids=CPU3)
    x = torch.randn(9, 4, dtype=torch.float64)
    reference.eval(), wrapped.eval()  # spectral_norm's power iteration would differ per chunk
    out = wrapped(x)
    assert routed(out)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_vectorized_jacobian_through_the_wrapper():
    """torch.func's vmap in the gradient (jacobian(vectorize=True), is_grads_batched): the scatter
    in the gather's backward gives views of a batched gradient, which alias() has no rule for."""
    reference, wrapped = reference_and_wrapped()
    x = torch.randn(6, 4, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(reference, x)
    got = torch.autograd.functional.jacobian(wrapped, x, vectorize=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    x.requires_grad_()
    out = wrapped(x)
    eye = torch.eye(out.numel(), dtype=torch.float64).view(-1, *out.shape)
    (batched,) = torch.autograd.grad(out, x, eye, is_grads_batched=True)
    torch.testing.assert_close(batched.view(*out.shape, *x.shape), expected, rtol=1e-12, atol=1e-12)


class CachedWeightNorm(nn.Module):
    """A weight-normalized head behind a layer; the caller's thread arrives late, so that under
    parametrize.cached() a worker's replica fills the cache that replica 0 then reads."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 2))

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.05)
        return self.head(h)


def test_a_weight_cached_across_replicas_leaves_the_backward_to_autograd():
    """torch.nn.utils.parametrize.cached() keys its cache by the module the parametrization was
    registered on, so every replica reads whichever replica computed the weight first. Where that is
    a worker's replica, replica 0's graph runs into that replica's: its backward is not routed to the
    worker (both would walk it: "backward through the graph a second time"), and the gradients sum
    to the module's."""
    reference, wrapped = reference_and_wrapped(device_ids=["cpu"] * 2, factory=lambda: CachedWeightNorm().double())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped.module)]
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64)
        with torch.nn.utils.parametrize.cached():
            out = wrapped(x)
            assert not routed(out)
            torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
            out.pow(2).sum().backward()
            reference(x).pow(2).sum().backward()
        assert_same_grads(reference, wrapped.module)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    out = wrapped(x)  # outside cached(): routed again
    assert routed(out)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)


class TwoHeads(nn.Module):
    """A shared trunk and two heads whose losses are backwarded one after the other."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.a(h).pow(2).mean(1), self.b(h.detach()).pow(2).mean(1)


def test_two_losses_of_one_forward_backwarded_one_after_the_other():
    """pix2pixHD and GANs that compute G's and D's losses in one forward: loss_a.backward(), then
    loss_b.backward() (its part of the graph detached from the shared one), as on one device. Both
    go through the one routing node: each takes its own outputs' passes; a third backward of an
    output already taken is autograd's own error."""
    reference, wrapped = reference_and_wrapped(factory=lambda: TwoHeads().double())
    for _ in range(2):
        x = torch.randn(9, 4, dtype=torch.float64)
        reference.zero_grad()
        wrapped.module.zero_grad()
        a, b = wrapped(x)
        assert routed(a) and routed(b)
        a.mean().backward()
        b.mean().backward()
        ra, rb = reference(x)
        ra.mean().backward()
        rb.mean().backward()
        assert_same_grads(reference, wrapped.module)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        b.mean().backward()


class ExpandOnly(nn.Module):
    """A graph that saves no tensors (an expand of a parameter, then a sum): autograd lets it be
    backwarded again without retain_graph."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(3, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], 3) + x[:, :3]


def test_second_backward_of_a_graph_that_saved_nothing_as_on_one_device():
    """A second backward without retain_graph works where the graph saved no tensors, as on one
    device (the routing node keeps where each replica's graph starts after the first), and adds
    the same gradients again; where the graph saved tensors it is autograd's own error, and the
    wrapper trains on afterwards."""
    reference, wrapped = reference_and_wrapped(factory=ExpandOnly)
    x = torch.randn(6, 4, dtype=torch.float64)
    loss = wrapped(x).sum()
    assert routed(loss)
    loss.backward()
    loss.backward()
    ref_loss = reference(x).sum()
    ref_loss.backward()
    ref_loss.backward()
    assert_same_grads(reference, wrapped.module)
    assert torch.equal(wrapped.module.w.grad, torch.full((3,), 12.0, dtype=torch.float64))

    reference, wrapped = reference_and_wrapped()
    out = wrapped(x)
    assert routed(out)
    out.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    # Two forwards of one backward: their passes kept the graphs for each other, and the graphs
    # went with the outputs; a second backward is dpfast's error, saying so.
    reference, wrapped = reference_and_wrapped(factory=ExpandOnly)
    first, second = wrapped(x), wrapped(x)
    loss = (first + second).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="another forward shared that backward"):
        loss.backward()
    reference.zero_grad()
    wrapped.module.zero_grad()
    wrapped(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert_same_grads(reference, wrapped.module)
