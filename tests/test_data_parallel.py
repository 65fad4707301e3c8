"""dpfast.DataParallel against the unwrapped module on the full batch (float64
on CPU replicas, several replicas on one device), and nn.DataParallel's
documented behaviour."""

import collections
import copy
import dataclasses
import gc
import threading
import warnings

import pytest
import torch
from torch import nn

import dpfast

CPU4 = ["cpu"] * 4
BUCKET_CAP_MB = {"value": 25.0}


@pytest.fixture(autouse=True, params=[
    (25.0, False, "1"),      # one bucket per dtype; CPU replicas' backward passes side by side
    (0.0005, False, "1"),    # ~500-byte buckets: many tiny ones, and parameters larger than a bucket alone in theirs
    (25.0, True, "auto"),    # DPFAST_DISABLE_P2P=1: the staged path (on GPUs; the CPU has no peer reads)
    (25.0, False, "0"),      # autograd walks the CPU replicas' graphs in turn
], ids=["one_bucket", "tiny_buckets", "no_p2p", "sequential_backward"])
def bucket_setting(request, monkeypatch):
    cap, disable_p2p, parallel_backward = request.param
    BUCKET_CAP_MB["value"] = cap
    if disable_p2p:
        monkeypatch.setenv("DPFAST_DISABLE_P2P", "1")
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel_backward)
    yield cap


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def pair(factory, device_ids=CPU4, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("bucket_cap_mb", BUCKET_CAP_MB["value"])
    reference = factory().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=device_ids, **kwargs)
    return reference, wrapped


def assert_same_grads(reference, wrapped, rtol=1e-10, atol=1e-12):
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)


def assert_same_params(reference, wrapped, rtol=1e-10, atol=1e-12):
    for (name, p), q in zip(reference.state_dict().items(), wrapped.module.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("batch", [1, 3, 4, 10, 33])
def test_mlp_forward_and_grads_match_full_batch(batch):
    reference, wrapped = pair(mlp)
    x = torch.randn(batch, 6, dtype=torch.float64)
    out_ref, out = reference(x), wrapped(x)
    assert torch.allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    assert_same_grads(reference, wrapped)


def test_a_channels_last_parameter_keeps_its_layout_in_grad():
    reference, wrapped = pair(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)))
    for model in (reference, wrapped):
        model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    for model in (reference, wrapped):
        model(x).sum().backward()
    assert_same_grads(reference, wrapped)
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        assert q.grad.stride() == p.grad.stride() == p.stride()


def test_integer_valued_gradients_reduce_exactly():
    reference, wrapped = pair(lambda: nn.Linear(5, 3, bias=True))
    x = torch.randint(-3, 4, (16, 5)).double()
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                                      lambda ps: torch.optim.Adam(ps, lr=0.01)], ids=["sgd_momentum", "adam"])
def test_multi_step_trajectories_identical(make_opt):
    reference, wrapped = pair(mlp)
    opt_ref, opt = make_opt(reference.parameters()), make_opt(wrapped.parameters())
    for step in range(6):
        x, y = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
        for model, optimizer in ((reference, opt_ref), (wrapped, opt)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert_same_params(reference, wrapped, rtol=1e-9, atol=1e-11)
    assert wrapped.stats()["replica_builds"] == 1  # replicas persist across steps


def test_gradient_accumulation_and_repeated_backward():
    reference, wrapped = pair(mlp)
    for _ in range(3):
        x = torch.randn(8, 6, dtype=torch.float64)
        reference(x).sum().backward()
        wrapped(x).sum().backward()
    assert_same_grads(reference, wrapped)
    # retain_graph: a second backward through the same graph accumulates again
    x = torch.randn(8, 6, dtype=torch.float64)
    loss_ref, loss = reference(x).sum(), wrapped(x).sum()
    loss_ref.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss_ref.backward()
    loss.backward()
    assert_same_grads(reference, wrapped)


def test_two_forwards_then_one_backward():
    reference, wrapped = pair(mlp)
    a, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    (reference(a).sum() + reference(b).pow(2).sum()).backward()
    (wrapped(a).sum() + wrapped(b).pow(2).sum()).backward()
    assert_same_grads(reference, wrapped)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_conv_batchnorm_eval_matches_and_train_updates_root_stats():
    reference, wrapped = pair(ConvBN)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    wrapped(x)  # train mode: replica 0 is the root module, so its running stats move
    # nn.DataParallel keeps replica 0's statistics: those of the first chunk.
    reference(x[:2])
    torch.testing.assert_close(wrapped.module.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(wrapped.module.bn.running_var, reference.bn.running_var)
    assert wrapped.module.bn.num_batches_tracked.item() == 1
    reference.eval()
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)


class LSTMModel(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=batch_first)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.out(y)


@pytest.mark.parametrize("batch_first,dim", [(True, 0), (False, 1)])
def test_lstm_batch_first_and_dim1(batch_first, dim):
    reference, wrapped = pair(lambda: LSTMModel(batch_first), dim=dim)
    x = torch.randn(6, 5, 4, dtype=torch.float64)  # (batch, seq) or (seq, batch)
    out_ref, out = reference(x), wrapped(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out_ref.sum().backward()
    out.sum().backward()
    assert_same_grads(reference, wrapped)
    # The replicas' LSTMs run on their own weights (RNNBase caches them in _flat_weights), so
    # their gradients come through the reducer rather than straight into the root's.
    replica = wrapped._ensure_runtime().replicas.replica_modules[1][1]
    assert all(w is p for w, p in zip(replica._flat_weights, replica.parameters()))
    assert wrapped.stats()["reductions"] > 0


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.decode = nn.Linear(6, 10, bias=False)
        self.decode.weight = self.embed.weight

    def forward(self, tokens):
        return self.decode(self.embed(tokens).tanh())


def test_tied_weights():
    reference, wrapped = pair(Tied)
    tokens = torch.randint(0, 10, (9, 3))
    reference(tokens).sum().backward()
    wrapped(tokens).sum().backward()
    assert len(list(wrapped.parameters())) == 1
    assert_same_grads(reference, wrapped)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(4, 4)

    def forward(self, x):
        y = self.frozen(self.used(x))
        if x[0, 0] > 0:  # depends on the chunk: some replicas use it, others not
            y = y + self.sometimes(x)
        return y


def test_frozen_unused_and_conditionally_used_parameters():
    reference, wrapped = pair(Branchy)
    x = torch.randn(8, 4, dtype=torch.float64)
    x[0, 0], x[2, 0], x[4, 0], x[6, 0] = -1, 1, -1, -1  # only the second of four chunks takes the branch
    expected = sum(reference(x[i:i + 2]).sum() for i in range(0, 8, 2))
    expected.backward()
    wrapped(x).sum().backward()
    assert wrapped.module.unused.weight.grad is None and wrapped.module.frozen.weight.grad is None
    assert wrapped.module.sometimes.weight.grad is not None
    assert_same_grads(reference, wrapped)


Pair = collections.namedtuple("Pair", ["left", "right"])


class OrderedOut(collections.OrderedDict):
    pass


@dataclasses.dataclass
class Batch:
    features: torch.Tensor
    scale: float


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, batch, pair, *, mask=None, tag="t"):
        out = self.lin(batch.features * batch.scale) + pair.left.sum(1, keepdim=True) * pair.right
        if mask is not None:
            out = out * mask
        return OrderedOut(out=out, pair=Pair(out.sum(1), None), tag=tag, items=[out.mean(), {"k": out}])


def test_nested_inputs_and_outputs_keep_types():
    reference, wrapped = pair(Structured)
    b = 7
    features, left = torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)
    mask = torch.randint(0, 2, (b, 1)).double()
    args = (Batch(features, 0.5), Pair(left, torch.tensor(2.0, dtype=torch.float64)))
    out = wrapped(*args, mask=mask, tag="x")
    ref = reference(*args, mask=mask, tag="x")
    assert type(out) is OrderedOut and type(out["pair"]) is Pair and out["pair"].right is None
    assert out["tag"] == "x"
    torch.testing.assert_close(out["out"], ref["out"])
    torch.testing.assert_close(out["items"][1]["k"], ref["out"])
    assert out["items"][0].shape == (4,)  # one scalar per replica, as a vector


def test_scalar_outputs_become_a_vector_without_warning():
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).pow(2).mean()

    _, wrapped = pair(Loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = wrapped(torch.randn(8, 3, dtype=torch.float64))
    assert loss.shape == (4,)
    loss.mean().backward()
    assert wrapped.module.lin.weight.grad is not None


def test_small_batch_uses_fewer_replicas():
    reference, wrapped = pair(mlp)
    x = torch.randn(5, 6, dtype=torch.float64)  # torch.chunk: 2 + 2 + 1, three replicas
    assert wrapped(x).shape == (5, 3)
    wrapped(x).sum().backward()
    reference(x).sum().backward()
    assert_same_grads(reference, wrapped)


def test_root_changes_are_seen_by_replicas():
    reference, wrapped = pair(mlp)
    x = torch.randn(8, 6, dtype=torch.float64)

    def check():
        torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)

    check()
    version = wrapped.module[0].weight._version
    for model in (reference, wrapped.module):  # WGAN weight clipping, through .data: no version bump
        for p in model.parameters():
            p.data.clamp_(-0.1, 0.1)
    assert wrapped.module[0].weight._version == version
    check()
    with torch.no_grad():
        for model in (reference, wrapped.module):
            model[0].bias.add_(1.0)
    check()
    state = {k: v + 0.5 for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    wrapped.module.load_state_dict(state)
    check()
    # A forward hook and a pre-hook registered after wrapping.
    for model in (reference, wrapped.module):
        model[2].register_forward_hook(lambda m, i, o: o * 2)
        model[0].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    check()
    # Structure: a new head for fine-tuning.
    torch.manual_seed(1)
    head = nn.Linear(16, 3).double()
    reference[4] = head
    wrapped.module[4] = copy.deepcopy(head)
    check()
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    assert_same_grads(reference, wrapped)
    assert wrapped.stats()["replica_builds"] == 2


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.act = nn.Tanh()
        self.register_buffer("shift", torch.zeros(3))

    def forward(self, x):
        return self.act(self.lin(x)) + sum(self._buffers.values(), torch.zeros(()))  # whatever buffers it has


class _TanhTimesThree(nn.Tanh):
    def forward(self, x):
        return 3 * torch.tanh(x)


@pytest.mark.parametrize("change,rebuilds", [
    # Structure (NOTE [Replica dictionaries]): a different object, name, order or shape rebuilds.
    (lambda m: setattr(m.lin, "bias", nn.Parameter(m.lin.bias.detach().clone())), True),  # equal values, new object
    (lambda m: m.register_buffer("extra", torch.ones(3)), True),
    (lambda m: delattr(m, "shift"), True),
    (lambda m: setattr(m, "act", nn.Tanh()), True),
    (lambda m: m.lin._parameters.update({"weight": m.lin._parameters.pop("weight")}), True),  # another order
    (lambda m: m._buffers.update({"offset": m._buffers.pop("shift")}), True),  # the same object, another name
    (lambda m: setattr(m.act, "__class__", _TanhTimesThree), True),  # another class: another forward
    (lambda m: setattr(m.lin.weight, "data", torch.zeros(3, 4, dtype=torch.float32)), True),  # another dtype
    (lambda m: setattr(m.lin.weight, "data", torch.zeros(4, 4, dtype=torch.float64)), True),  # another shape
    (lambda m: m.shift.requires_grad_(), True),  # a buffer's requires_grad is structure
    # Not structure: no rebuild.
    (lambda m: m.lin.weight.requires_grad_(False), False),  # followed in place (GANs, every step)
    (lambda m: setattr(m.lin, "_parameters", type(m.lin._parameters)(m.lin._parameters)), False),  # equal copy
    (lambda m: setattr(m.lin.weight, "data", torch.ones(3, 4, dtype=torch.float64)), False),  # values only
    (lambda m: setattr(m.act, "inplace_flag", True), False),  # a plain attribute: copied every call
])
def test_what_rebuilds_the_replicas_and_what_does_not(change, rebuilds):
    """Each kind of change made on the root between calls is seen by the replicas: the replicas
    are rebuilt exactly when the structure changed, and the outputs and gradients match the
    module run alone after the same change."""
    reference, wrapped = pair(WithBuffer)
    x = torch.randn(8, 4, dtype=torch.float64)
    wrapped(x)
    for model in (reference, wrapped.module):
        change(model)
    weight = reference.lin.weight
    if weight.shape[0] != 3 or weight.dtype != torch.float64:
        # A weight of another shape, or float32 beside a float64 bias: the module's own error, as run alone.
        with pytest.raises(RuntimeError):
            reference(x)
        with pytest.raises(RuntimeError, match="replica 0"):
            wrapped(x)
        assert wrapped.stats()["replica_builds"] == 2
        return
    out = wrapped(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    assert wrapped.stats()["replica_builds"] == (2 if rebuilds else 1)
    if out.requires_grad:
        out.pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        assert_same_grads(reference, wrapped)


def test_an_ordered_dict_of_children_reordered_rebuilds_the_replicas():
    """Modules unpickled from torch < 2.0 hold OrderedDicts, whose move_to_end() order is not their
    storage order: the structure check compares the order they iterate in (a reordered Sequential
    runs its layers in the new order in every replica)."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    seq._modules = collections.OrderedDict(seq._modules)
    wrapped = dpfast.DataParallel(seq, device_ids=CPU4)
    x = torch.randn(8, 4, dtype=torch.float64)
    wrapped(x)
    seq._modules.move_to_end("0")  # now Tanh, Linear, Linear
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), seq(x), rtol=1e-12, atol=1e-12)
    assert wrapped.stats()["replica_builds"] == 2
    for _ in range(3):  # and built in that order, no rebuild at every call
        wrapped(x)
    assert wrapped.stats()["replica_builds"] == 2


class _KeyThatReplacesTheDict(str):
    """A parameter name whose == replaces its module's _parameters dictionary, once."""
    __hash__ = str.__hash__
    module = None

    def __eq__(self, other):
        module, type(self).module = type(self).module, None
        if module is not None:
            module.__dict__["_parameters"] = dict(module.__dict__["_parameters"])
        return str.__eq__(self, other)


class _SumOfParameters(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(8):
            self.register_parameter(f"w{i}", nn.Parameter(torch.full((1,), float(i), dtype=torch.float64)))

    def forward(self, x):
        return x * sum(self._parameters.values())


def test_the_structure_check_survives_python_code_that_replaces_the_dictionary_it_walks():
    """The check compares names by == where they are not the same object: Python code, which may
    replace the very dictionary being walked (it is held, not borrowed)."""
    model = _SumOfParameters()
    wrapped = dpfast.DataParallel(model, device_ids=CPU4)
    x = torch.ones(8, 1, dtype=torch.float64)
    wrapped(x)
    items = list(model._parameters.items())
    model._parameters.clear()
    for i, (name, p) in enumerate(items):  # the same names and objects; one name an equal str of another object
        model._parameters[_KeyThatReplacesTheDict(name) if i == 0 else name] = p
    _KeyThatReplacesTheDict.module = model
    torch.testing.assert_close(wrapped(x), x * 28.0)
    assert wrapped.stats()["replica_builds"] == 1


@pytest.mark.parametrize("where", ["root", "submodule"])
def test_torch_fx_graph_modules_run_in_every_replica(where):
    """torch.fx.symbolic_trace (and torchvision's create_feature_extractor, built on it) gives each
    GraphModule a class of its own that holds its forward: replicas share the root's class."""
    torch.manual_seed(0)
    reference = mlp().double()
    traced = torch.fx.symbolic_trace(copy.deepcopy(reference))
    model = traced if where == "root" else nn.Sequential(traced)
    wrapped = dpfast.DataParallel(model, device_ids=CPU4)
    x = torch.randn(8, 6, dtype=torch.float64)
    out = wrapped(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), traced.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # A graph edited and recompiled on the root reaches the replicas (its class's forward).
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), nn.Tanh):
            with traced.graph.inserting_after(node):
                doubled = traced.graph.call_function(torch.mul, (node, 2.0))
            node.replace_all_uses_with(doubled)
            doubled.args = (node, 2.0)
    traced.recompile()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), traced(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(traced(x), reference(x))


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.temperature = 1.0

    def forward(self, x):
        return self.drop(self.lin(x)) / self.temperature


def test_modes_and_plain_attributes_are_seen_by_replicas():
    reference, wrapped = pair(Tempered)
    x = torch.randn(8, 4, dtype=torch.float64)
    wrapped.eval()
    reference.eval()
    torch.testing.assert_close(wrapped(x), reference(x))
    wrapped.train()
    wrapped.module.drop.p = 0.0
    reference.drop.p = 0.0
    wrapped.module.temperature = 0.5
    reference.temperature = 0.5
    torch.testing.assert_close(wrapped(x), reference(x))
    wrapped.module.drop.p = 1.0  # every replica now drops everything
    assert torch.count_nonzero(wrapped(x)) == 0
    wrapped.module.drop.p = 0.0
    wrapped.module.drop.eval()  # mode of one submodule
    assert not wrapped.module.drop.training and wrapped.module.training
    torch.testing.assert_close(wrapped(x), reference(x))


def test_trust_version_counters_mode_skips_unchanged_and_sees_optimizer_steps():
    reference, wrapped = pair(mlp, trust_version_counters=True)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    x = torch.randn(8, 6, dtype=torch.float64)
    wrapped(x)
    count = wrapped.stats()["broadcasts"]
    wrapped(x)
    assert wrapped.stats()["broadcasts"] == count  # nothing changed: no broadcast
    for model, optimizer in ((reference, opt_ref), (wrapped, opt)):
        model(x).sum().backward()
        optimizer.step()
    torch.testing.assert_close(wrapped(x), reference(x))


def test_checkpoints_move_both_ways_with_nn_dataparallel():
    model = mlp()
    ours = dpfast.DataParallel(copy.deepcopy(model), device_ids=CPU4)
    theirs = nn.DataParallel(copy.deepcopy(model))
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert all(k.startswith("module.") for k in ours.state_dict())
    torch.manual_seed(3)
    other = nn.DataParallel(mlp())
    ours.load_state_dict(other.state_dict())
    x = torch.randn(4, 6)
    # Their modules on the CPU, not nn.DataParallel's forward: with one GPU present, nn.DataParallel
    # moves its module to cuda:0 when it is made.
    torch.testing.assert_close(ours(x), other.module.cpu()(x))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs.module.cpu()(x), ours(x))


def test_workers_persist_and_state_is_carried():
    _, wrapped = pair(mlp)
    x = torch.randn(8, 6, dtype=torch.float64)
    wrapped(x)
    gc.collect()  # earlier tests' wrappers stop their workers when collected
    threads = threading.active_count()
    for _ in range(5):
        wrapped(x).sum().backward()
    gc.collect()
    assert threading.active_count() == threads
    with torch.no_grad():
        assert not wrapped(x).requires_grad


def test_autocast_dtype_is_carried_into_every_replica():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            seen.append((threading.current_thread().name, y.dtype, torch.get_autocast_dtype("cpu")))
            return y

    wrapped = dpfast.DataParallel(Probe(), device_ids=CPU4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(torch.randn(8, 4))
    assert out.dtype == torch.bfloat16
    assert len(seen) == 4 and {s[1] for s in seen} == {torch.bfloat16}
    assert len({s[0] for s in seen}) == 4  # four threads: the caller and three persistent workers


def test_drop_in_for_nn_dataparallel_checks():
    wrapped = dpfast.DataParallel(mlp(), device_ids=CPU4, output_device=-1)  # -1: the CPU, as in torch
    assert isinstance(wrapped, nn.DataParallel)  # user code that tests for nn.DataParallel keeps working
    assert wrapped.output_device == torch.device("cpu") and wrapped.dim == 0
    assert isinstance(wrapped.module, nn.Sequential)
    wrapped = wrapped.double()  # moving after wrapping, as DataParallel(model).cuda() does
    assert wrapped(torch.randn(4, 6, dtype=torch.float64)).dtype == torch.float64
    # Generic as nn.DataParallel is (annotations such as DataParallel[MyNet] are evaluated at runtime).
    assert dpfast.DataParallel[nn.Sequential] is not None


def test_output_device_changed_after_construction_is_read_at_the_next_forward():
    """nn.DataParallel reads output_device at every forward: a new value is used there (and
    checked), not silently ignored."""
    wrapped = dpfast.DataParallel(mlp().double(), device_ids=CPU4)
    x = torch.randn(8, 6, dtype=torch.float64)
    wrapped.output_device = -1  # the CPU, given another way: used as it is
    assert wrapped(x).device == torch.device("cpu")
    wrapped.output_device = "bogus-device"
    with pytest.raises(ValueError, match=r"output_device: expected a device such as 'cpu' or 'cuda:0', but got "
                                         r"'bogus-device'"):
        wrapped(x)
    if not torch.cuda.is_available():
        wrapped.output_device = 0
        with pytest.raises(ValueError, match=r"output_device: expected an available device, but got cuda:0"):
            wrapped(x)
    wrapped.output_device = torch.device("cpu")  # and the wrapper still works
    torch.testing.assert_close(wrapped(x), wrapped.module(x))


def test_one_device_and_no_device_run_the_module_directly():
    model = mlp()
    x = torch.randn(3, 6)
    one = dpfast.DataParallel(model, device_ids=["cpu"])
    torch.testing.assert_close(one(x), model(x))
    if not torch.cuda.is_available():
        plain = dpfast.DataParallel(model)
        assert plain.device_ids == [] and plain(x).shape == (3, 3)
        assert plain.stats()["replica_builds"] == 0
        with plain.no_sync():
            plain(x).sum().backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_backward_with_create_graph_keeps_bucket_views_working():
    """create_graph=True makes autograd accumulate out of place (replacing the replicas' bucket
    views); the next steps must still reduce correctly."""
    reference, wrapped = pair(mlp)
    for create_graph in (True, False, True):
        x = torch.randn(8, 6, dtype=torch.float64)
        for model in (reference, wrapped):
            model.zero_grad()
            model(x).pow(2).sum().backward(create_graph=create_graph)
        assert_same_grads(reference, wrapped)


def test_sparse_embedding_gradients_stay_sparse_and_match():
    """nn.Embedding(sparse=True): nn.DataParallel's reduction keeps the gradient sparse, so
    optimizers that need sparse gradients (SparseAdam) keep working."""
    reference, wrapped = pair(lambda: nn.Embedding(20, 4, sparse=True))
    opts = [torch.optim.SparseAdam(list(m.parameters()), lr=0.1) for m in (reference, wrapped)]
    for step in range(3):
        ids = torch.randint(0, 20, (12, 3))
        for model, opt in zip((reference, wrapped), opts):
            opt.zero_grad()
            model(ids).pow(2).sum().backward()
        got, want = wrapped.module.weight.grad, reference.weight.grad
        assert got.is_sparse
        torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-12)
        for opt in opts:
            opt.step()
        assert_same_params(reference, wrapped)
    wrapped.chunk_sizes = [0, 4, 4, 4]  # replica 0 (the root) sits this step out
    ids = torch.randint(0, 20, (12, 3))
    for model, opt in zip((reference, wrapped), opts):
        opt.zero_grad()
        model(ids).pow(2).sum().backward()
    assert wrapped.module.weight.grad.is_sparse
    torch.testing.assert_close(wrapped.module.weight.grad.to_dense(), reference.weight.grad.to_dense(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [lambda: nn.Embedding(20, 4, sparse=True),
                                    lambda: nn.EmbeddingBag(20, 4, mode="sum", sparse=True)])
def test_sparse_gradient_is_sparse_even_when_the_root_never_got_one(module):
    """DDP's rule: a sparse embedding's weight expects a sparse gradient, so the sum is handed
    back sparse on the very first step, when replica 0 had no rows (and no gradient) at all."""
    reference, wrapped = pair(module)
    wrapped.chunk_sizes = [0, 4, 4, 4]
    ids = torch.randint(0, 20, (12, 3))
    for model in (reference, wrapped):
        model(ids).pow(2).sum().backward()
    assert wrapped.module.weight.grad.is_sparse
    torch.testing.assert_close(wrapped.module.weight.grad.to_dense(), reference.weight.grad.to_dense(),
                               rtol=1e-12, atol=1e-12)


class _Checkpointed(nn.Module):
    """Activation checkpointing inside forward, as Hugging Face models do with
    gradient_checkpointing_enable(): the recomputation runs during backward."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_inside_replicas(use_reentrant):
    reference, wrapped = pair(lambda: _Checkpointed(use_reentrant))
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).pow(2).sum().backward()
    wrapped(x).pow(2).sum().backward()
    assert_same_grads(reference, wrapped)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


class _PackedLSTM(nn.Module):
    """The pattern nn.DataParallel's docs warn about: pack, run, pad back to total_length."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 6, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out


def test_packed_sequences_padded_to_total_length():
    reference, wrapped = pair(_PackedLSTM)
    x = torch.randn(11, 7, 5, dtype=torch.float64)
    lengths = torch.randint(1, 8, (11,))
    out_ref, out = reference(x, lengths), wrapped(x, lengths)
    assert out.shape == out_ref.shape == (11, 7, 6)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out_ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    assert_same_grads(reference, wrapped)


class _FlattensInForward(nn.Module):
    """What nn.RNNBase.flatten_parameters() does to a replica on CUDA, called at the start of
    forward as many models do: the weights are copied into a new buffer and re-pointed there."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6))
        self.bias = nn.Parameter(torch.randn(3))

    def flatten_parameters(self):
        with torch.no_grad():
            fresh = torch.cat([self.weight.reshape(-1), self.bias])
            self.weight.set_(fresh[:18].view(3, 6))
            self.bias.set_(fresh[18:])

    def forward(self, x):
        self.flatten_parameters()
        return nn.functional.linear(x, self.weight, self.bias)


def test_weights_moved_by_flatten_parameters_in_forward_still_get_the_new_values():
    reference, wrapped = pair(_FlattensInForward)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for step in range(3):
        x = torch.randn(8, 6, dtype=torch.float64)
        for model, opt in zip((reference, wrapped), opts):
            opt.zero_grad()
            out = model(x)
            out.pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)  # replicas see the step
        assert_same_params(reference, wrapped)
    assert wrapped._runtime.replicas.repoint_count > 0


class _FlattensLikeCudnn(nn.Module):
    """cuDNN's flatten moves the weights into a new buffer without bumping their version counter
    (it runs below autograd), and the forward saves them for backward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def flatten_parameters(self):
        if self.weight.data_ptr() != self.__dict__.get("flat_ptr"):  # not in "its" buffer: move it there
            with torch.no_grad():
                version = self.weight._version
                self.weight.set_(self.weight.detach().clone())
                torch._C._autograd._unsafe_set_version_counter((self.weight,), (version,))
            self.flat_ptr = self.weight.data_ptr()

    def forward(self, x):
        self.flatten_parameters()
        return torch.tanh(x @ self.weight) @ self.weight


def test_two_forwards_then_one_backward_with_weights_moved_in_forward():
    """The second call points the replica weights the first call moved back into their flat
    buffer; that must not count as an in-place change of tensors the first call's graph saved."""
    reference, wrapped = pair(_FlattensLikeCudnn, device_ids=CPU4[:2])
    wrapped(torch.randn(4, 4, dtype=torch.float64)).sum().backward()  # the root moves its weight once
    wrapped.zero_grad()
    a, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    (reference(a).sum() + reference(b).sum()).backward()
    (wrapped(a).sum() + wrapped(b).sum()).backward()
    assert_same_grads(reference, wrapped)


def test_rnn_replicas_keep_their_weights_for_the_flat_weight_check(monkeypatch):
    """RNNBase compares its weights with weak references (_flat_weight_refs) and flattens them
    again when they differ; a replica's references must be to its own weights, or every call of
    every replica would copy all its weights (on CUDA: a new cuDNN buffer per call)."""
    reinitialized = []
    original = nn.RNNBase._init_flat_weights
    monkeypatch.setattr(nn.RNNBase, "_init_flat_weights",
                        lambda self: (reinitialized.append(self), original(self))[1])
    reference, wrapped = pair(lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True))
    x = torch.randn(6, 8, 3, dtype=torch.float64)
    wrapped(x)  # the first call builds the replicas
    reinitialized.clear()
    for _ in range(2):
        out, _ = wrapped(x)
    assert reinitialized == []
    torch.testing.assert_close(out, reference(x)[0], rtol=1e-12, atol=1e-12)


def test_rnn_weights_get_a_group_in_the_layout_asked_for(monkeypatch):
    """On CUDA the layout comes from cuDNN (NOTE [RNN replicas]); here a stand-in with gaps between
    the weights, as cuDNN's alignment can leave, runs the same grouping, copy and broadcast."""
    import dpfast.replicas as replicas_module

    def layout_with_gaps(rnn):
        offsets, offset = [], 0
        for w in rnn._flat_weights:
            offset += 3  # a gap before every weight
            offsets.append(offset)
            offset += w.numel()
        return offset + 5, offsets

    monkeypatch.setattr(replicas_module, "rnn_weight_layout", layout_with_gaps)
    reference, wrapped = pair(lambda: nn.Sequential(nn.Linear(5, 5), nn.LSTM(5, 4, num_layers=2, batch_first=True)))
    for step in range(2):
        x = torch.randn(6, 7, 5, dtype=torch.float64)
        for model in (reference, wrapped):
            model.zero_grad()
            out, _ = model(x)
            out.pow(2).sum().backward()
        torch.testing.assert_close(wrapped(x)[0], reference(x)[0], rtol=1e-12, atol=1e-12)
        assert_same_grads(reference, wrapped)
        with torch.no_grad():
            for model in (reference, wrapped.module):
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)
    replicas = wrapped._runtime.replicas
    lstm = wrapped.module[1]
    rnn_group = [g for g, packed in enumerate(replicas.packed) if not packed]
    assert len(rnn_group) == 1
    g = rnn_group[0]
    assert replicas.flats[0][g].grad_fn is None  # the copy of the root's weights builds no graph
    assert replicas.flats[1][g].numel() == sum(w.numel() for w in lstm._flat_weights) + 3 * 8 + 5
    replica_lstm = replicas.replica_modules[1][replicas.modules.index(lstm)]
    base = replicas.flats[1][g].data_ptr()
    for w, offset in zip(replica_lstm._flat_weights, layout_with_gaps(lstm)[1]):
        assert w.data_ptr() == base + offset * w.element_size()


class _LayerCache:
    """An iterable output whose constructor takes its items, like Hugging Face's DynamicCache."""

    def __init__(self, layers=()):
        self.layers = [tuple(layer) for layer in layers]

    def __iter__(self):
        return iter(self.layers)


class _Opaque:
    def __init__(self, value):  # not iterable, and different per replica: one per replica, in a list
        self.value = value


class _RefusesIteration:
    """detectron2's Instances: has __iter__, which raises."""

    def __iter__(self):
        raise NotImplementedError("not iterable")


class _PerSample(collections.deque):
    """One item per sample: replicas hold different numbers, so no item-by-item gather."""


class _ReturnsCaches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return (h, _LayerCache([(h, h * 2), (h * 3, None)]), _Opaque(h.shape[0]), _RefusesIteration(),
                _PerSample(range(h.shape[0])))


def test_other_iterable_outputs_are_gathered_item_by_item_as_nn_dataparallel_does():
    reference, wrapped = pair(_ReturnsCaches)
    x = torch.randn(10, 4, dtype=torch.float64)
    _, cache_ref, _, _, _ = reference(x)
    _, cache, opaque, refuses, per_sample = wrapped(x)
    assert type(cache) is _LayerCache and len(cache.layers) == 2
    for got, want in zip(cache, cache_ref):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert isinstance(opaque, list) and [o.value for o in opaque] == [3, 3, 3, 1]  # torch.chunk sizes
    assert isinstance(refuses, list) and len(refuses) == 4
    np = pytest.importorskip("numpy")

    class SizeOut(nn.Module):  # an image size as a numpy array, equal on every replica
        def forward(self, x):
            return x * 2, np.array([3, 4])

    _, size = dpfast.DataParallel(SizeOut(), device_ids=CPU4)(x)
    assert isinstance(size, list) and all(np.array_equal(s, [3, 4]) for s in size)
    assert [list(p) for p in per_sample] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]  # nothing cut or merged


@pytest.mark.parametrize("numel,offsets,expected", [
    (12, [0, 4, 8], True),      # packed
    (16, [2, 7, 12], True),     # gaps, as alignment can leave
    (12, [0, 3, 8], False),     # overlapping pieces
    (11, [0, 4, 8], False),     # the last piece past the end
    (12, [-1, 4, 8], False),    # before the start
])
def test_a_layout_from_cudnn_is_checked_before_use(numel, offsets, expected):
    from dpfast.replicas import checked_layout

    result = checked_layout(numel, offsets, [4, 4, 4])
    assert (result == (numel, offsets)) if expected else result is None


# -- nn.DataParallel's own behaviour, where its source or its tests pin it -------------------------


class _NoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6, dtype=torch.float64).view(2, 3))

    def forward(self):
        return self.weight * 2


def test_a_forward_without_inputs_runs_one_replica():
    """nn.DataParallel turns a call without inputs into one replica's call (its test
    test_data_parallel_module_zero_inputs): the output is the module's, not N copies of it."""
    wrapped = dpfast.DataParallel(_NoInputs(), device_ids=CPU4)
    out = wrapped()
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, wrapped.module.weight * 2)
    out.sum().backward()
    assert torch.equal(wrapped.module.weight.grad, torch.full((2, 3), 2.0, dtype=torch.float64))


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1).double()

    def forward(self, x):
        return self.lin(x).sum()


def test_one_active_replica_of_several_still_goes_through_the_gather():
    """A batch of one row on several devices: nn.DataParallel replicates and gathers, so a 0-dim
    output comes back as a vector of one value; on one device it calls the module itself."""
    x = torch.randn(1, 4, dtype=torch.float64)
    several = dpfast.DataParallel(_Scalar(), device_ids=CPU4)
    assert several(x).shape == (1,)
    one = dpfast.DataParallel(_Scalar(), device_ids=["cpu"])
    assert one(x).shape == ()


class _GathersNothing(dpfast.DataParallel):
    """The pattern of PyTorch-Encoding's DataParallelModel: outputs stay on their replicas."""

    def gather(self, outputs, output_device):
        return outputs


class _OwnScatter(dpfast.DataParallel):
    def scatter(self, inputs, kwargs, device_ids):
        self.scatter_calls = getattr(self, "scatter_calls", 0) + 1
        return super().scatter(inputs, kwargs, device_ids)


class _OwnReplicate(dpfast.DataParallel):
    """Synchronized-BatchNorm's DataParallelWithCallback overrides replicate this way."""

    def replicate(self, module, device_ids):
        replicas = super().replicate(module, device_ids)
        self.replicated = len(replicas)
        return replicas


class _OwnParallelApply(dpfast.DataParallel):
    def parallel_apply(self, replicas, inputs, kwargs):
        return super().parallel_apply(replicas, inputs, kwargs)


@pytest.mark.parametrize("cls", [_OwnScatter, _OwnReplicate, _OwnParallelApply, _GathersNothing])
def test_subclasses_overriding_a_step_with_nn_dataparallels_signature(cls):
    """scatter, replicate, parallel_apply and gather are nn.DataParallel's extension points:
    overrides written for it (and super() calls from them) keep working, and training is exact."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    wrapped = cls(copy.deepcopy(reference), device_ids=CPU4[:3])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for step in range(3):
        x = torch.randn(7, 4, dtype=torch.float64)
        for opt in opts:
            opt.zero_grad()
        reference(x).pow(2).sum().backward()
        out = wrapped(x)
        if cls is _GathersNothing:
            assert isinstance(out, list) and [o.shape[0] for o in out] == [3, 3, 1]  # torch.chunk's split
            out = torch.cat(out)
        out.pow(2).sum().backward()
        assert_same_grads(reference, wrapped)
        for opt in opts:
            opt.step()
    assert_same_params(reference, wrapped)
    if cls is _OwnScatter:
        assert wrapped.scatter_calls == 3
    if cls is _OwnReplicate:
        assert wrapped.replicated == 3


def test_parallel_apply_takes_a_bare_input_as_one_argument():
    """torch.nn.parallel.parallel_apply's convention (PyTorch's test_parallel_apply feeds inputs so):
    an input that is not a list or tuple is the replica's one argument, never unpacked row by row."""
    class Rows(nn.Module):
        def forward(self, *args):
            return torch.stack([a.sum() for a in args])

    for module, x0, x1 in ((nn.Linear(4, 2).double(),) + tuple(torch.randn(2, 4, dtype=torch.float64).unbind(0)),
                           (Rows(), torch.randn(2, 4), torch.randn(3, 4))):
        wrapped = dpfast.DataParallel(module, device_ids=CPU4[:2])
        replicas = wrapped.replicate(wrapped.module, wrapped.device_ids)
        outputs = wrapped.parallel_apply(replicas, [x0, x1])
        for out, x in zip(outputs, (x0, x1)):
            torch.testing.assert_close(out, module(x), rtol=0, atol=0)
        tupled = wrapped.parallel_apply(replicas, [(x0,), [x1]])
        torch.testing.assert_close(tupled[1], module(x1), rtol=0, atol=0)


def test_a_forward_leaves_no_reference_cycles():
    """nn.DataParallel's test_data_parallel_model_no_refcycles: nothing for the cycle collector
    after a forward and backward (recursive closures in scatter and gather would leave some)."""
    wrapped = dpfast.DataParallel(nn.Linear(4, 2).double(), device_ids=CPU4)
    wrapped(torch.randn(8, 4, dtype=torch.float64)).sum().backward()  # build everything first
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            wrapped(torch.randn(8, 4, dtype=torch.float64)).sum().backward()
        assert gc.collect() == 0
    finally:
        gc.enable()


class _KeysInAnyOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x):
        a, b = self.lin(x), x.sum(1)
        return {"a": a, "b": b} if x.sum() > 0 else {"b": b, "a": a}


def test_dict_outputs_are_gathered_by_key_and_other_keys_are_a_value_error():
    wrapped = dpfast.DataParallel(_KeysInAnyOrder(), device_ids=CPU4[:2])
    x = torch.cat([torch.ones(2, 4), -torch.ones(2, 4)]).double()
    out = wrapped(x)
    assert list(out) == ["a", "b"]
    torch.testing.assert_close(out["b"], x.sum(1))

    class OtherKeys(nn.Module):
        def forward(self, x):
            return {"a": x} if x.sum() > 0 else {"c": x}

    with pytest.raises(ValueError, match=r"outputs: expected every replica to return a dict with the keys \['a'\] "
                                         r"\(as replica 0 did\), but replica 1 returned the keys \['c'\]"):
        dpfast.DataParallel(OtherKeys(), device_ids=CPU4[:2])(x)


def test_load_state_dict_with_some_keys_prefixed_loads_those_as_nn_dataparallel():
    wrapped = dpfast.DataParallel(nn.Linear(3, 2), device_ids=CPU4)
    result = wrapped.load_state_dict({"module.weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, strict=False)
    assert torch.equal(wrapped.module.weight, torch.zeros(2, 3))
    assert result.missing_keys == ["module.bias"] and result.unexpected_keys == ["bias"]


def test_one_device_moves_the_module_there_as_nn_dataparallel():
    module = nn.Linear(3, 2).double()
    moved = []
    module.register_forward_pre_hook(lambda m, args: moved.append(m.weight.device))
    wrapped = dpfast.DataParallel(module, device_ids=["cpu"])
    assert wrapped.module.weight.device == torch.device("cpu")
    wrapped(torch.randn(2, 3, dtype=torch.float64))
    assert moved == [torch.device("cpu")]


class _LossOverItems(nn.Module):
    """The Hugging Face pattern: the loss is a sum over tokens divided by num_items_in_batch, which
    the Trainer passes with one row per GPU under nn.DataParallel (its shape (n_gpu, 1))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x, labels, num_items_in_batch=None):
        loss = nn.functional.cross_entropy(self.lin(x), labels, reduction="sum")
        return loss / num_items_in_batch


@pytest.mark.parametrize("batch,chunk_sizes", [(8, None), (3, None), (8, [0, 4, 4, 0])])
def test_a_tensor_with_one_row_per_replica_gives_each_replica_its_row(batch, chunk_sizes):
    """nn.DataParallel chunks every tensor on its own, so the Trainer's (n_gpu, 1) num_items_in_batch
    reaches each replica as one row; the mean of the gathered losses is the full-batch loss."""
    torch.manual_seed(0)
    reference = _LossOverItems()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, chunk_sizes=chunk_sizes)
    x, labels = torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,))
    running = 4 if chunk_sizes is None and batch >= 4 else (batch if chunk_sizes is None else 2)
    per_gpu = torch.tensor(float(batch) / running, dtype=torch.float64)
    losses = wrapped(x, labels, num_items_in_batch=per_gpu.reshape(1).expand(4, -1).reshape(4, 1))
    assert losses.shape == (running, 1)
    expected = reference(x, labels, num_items_in_batch=torch.tensor(float(batch), dtype=torch.float64))
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-12, atol=1e-12)
    losses.mean().backward()
    expected.backward()
    assert_same_grads(reference, wrapped)


class _ZeroGradInForward(nn.Module):
    def __init__(self, set_to_none):
        super().__init__()
        self.lin = nn.Linear(4, 2).double()
        self.set_to_none = set_to_none

    def forward(self, x):
        self.zero_grad(set_to_none=self.set_to_none)  # nn.DataParallel's replicas ignore this (with a warning)
        return self.lin(x)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_inside_forward_does_not_lose_the_replicas_gradients(set_to_none):
    reference, wrapped = pair(lambda: _ZeroGradInForward(set_to_none))
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64)
        reference.zero_grad()
        wrapped.zero_grad()
        reference(x).pow(2).sum().backward()
        wrapped(x).pow(2).sum().backward()
        assert_same_grads(reference, wrapped)


class _Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
        self.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return (x.to(torch.complex128) @ self.weight).abs() + self.bias


def test_complex_parameters_train_like_the_full_batch():
    reference, wrapped = pair(_Complex)
    opts = [torch.optim.Adam(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64)
        for model, opt in zip((reference, wrapped), opts):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
        assert_same_grads(reference, wrapped)
        for opt in opts:
            opt.step()
    assert_same_params(reference, wrapped)


@pytest.mark.parametrize("cls", [_OwnScatter, _OwnReplicate, _OwnParallelApply])
@pytest.mark.parametrize("batch", [9, 2, 0])
def test_subclass_steps_take_torch_chunks_split_into_fewer_pieces(cls, batch):
    # nn.DataParallel splits with torch.chunk: 9 rows over 4 devices is 3 pieces of 3, 2 rows is 2
    # pieces, and an empty batch one empty piece per device; it then runs that many replicas.
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    wrapped = cls(copy.deepcopy(reference), device_ids=CPU4)
    x = torch.randn(batch, 4, dtype=torch.float64)
    out = wrapped(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-10, atol=1e-12)
    if batch:
        reference(x).pow(2).sum().backward()
        out.pow(2).sum().backward()
        assert_same_grads(reference, wrapped)
    pieces, _ = wrapped.scatter((x,), {}, wrapped.device_ids)
    assert [p[0].shape[0] for p in pieces] == [c.shape[0] for c in x.chunk(4)]


@pytest.mark.parametrize("option", [{"gather": False}, {"scalar_outputs": "mean"}, {"average_buffers": True}])
def test_options_that_a_subclass_overriding_a_step_cannot_honour_are_refused(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"dpfast.DataParallel: {name}: expected .* in a subclass that overrides "
                                         rf"scatter, replicate, parallel_apply or gather"):
        _GathersNothing(nn.Linear(4, 2), device_ids=CPU4, **option)


def test_an_empty_batch_with_scalar_outputs_mean_gives_the_modules_value():
    model = _Scalar()
    wrapped = dpfast.DataParallel(copy.deepcopy(model), device_ids=CPU4, scalar_outputs="mean")
    x = torch.zeros(0, 4, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), model(x).reshape(1))


class _HooksItselfOnce(nn.Module):
    """Installs a forward hook in its first forward, behind a flag on itself (transformers' pattern)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x):
        if not getattr(self, "hooked", False):
            self.lin.register_forward_hook(lambda module, args, out: out * 2)
            self.hooked = True
        return self.lin(x)


def test_a_hook_installed_in_forward_is_installed_once_per_module():
    """NOTE [Replica hooks]: the replicas' installs stay with them; the root keeps one hook, and
    user hooks registered on the root between calls reach every replica."""
    reference, wrapped = pair(_HooksItselfOnce)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(wrapped(x), reference(x))
    assert len(wrapped.module.lin._forward_hooks) == 1
    handle = wrapped.module.lin.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    torch.testing.assert_close(wrapped(x), reference(x + 1))
    handle.remove()
    torch.testing.assert_close(wrapped(x), reference(x))


# -- patterns from real projects that write tensors in place ------------------------------------------
class _EmaCodebook(nn.Module):
    """A VQ-VAE-style EMA codebook (a running normaliser, a MoCo queue): a buffer updated in place
    in forward, next to weights that backward needs."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(4, 8)
        self.hidden = nn.Linear(8, 8)  # its weight is saved before the update (for h's gradient)
        self.decode = nn.Linear(8, 3)
        self.register_buffer("codebook", torch.zeros(8, 8))

    def forward(self, x):
        h = self.hidden(torch.tanh(self.encode(x)))
        with torch.no_grad():
            self.codebook.mul_(0.9).add_(h.t() @ h, alpha=0.1)
        return self.decode(h)


class _NormalisesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        x /= 255.0  # in place, on the input
        return self.body(x)


class _MaxNorm(nn.Linear):
    """braindecode/EEGNet's max-norm constraint: the weight's .data re-assigned in forward."""

    def forward(self, x):
        self.weight.data = torch.renorm(self.weight.data, p=2, dim=0, maxnorm=0.5)
        return super().forward(x)


@pytest.mark.parametrize("n", [2, 4])
def test_a_buffer_updated_in_place_in_forward_leaves_saved_weights_valid(n):
    # Every replica tensor has a version counter of its own (as torch.cuda.comm's coalesced
    # broadcast gives): one flat buffer's shared counter made this backward fail.
    torch.manual_seed(0)
    reference = _EmaCodebook().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * n)
    for _ in range(2):
        x = torch.randn(8, 4, dtype=torch.float64)
        reference(x).pow(2).sum().backward()
        wrapped(x).pow(2).sum().backward()
        assert_same_grads(reference, wrapped)


@pytest.mark.parametrize("n", [2, 4])
def test_a_forward_that_writes_its_input_in_place(n):
    # Chunks on the input's device after the first alias it with version counters of their own:
    # one replica's in-place write no longer invalidates what another saved (it failed, racily).
    torch.manual_seed(0)
    reference = _NormalisesInput().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * n)
    x = torch.randn(8, 4, dtype=torch.float64) * 255
    x_reference, x_wrapped = x.clone(), x.clone()
    for _ in range(3):
        reference.zero_grad()
        wrapped.zero_grad()
        out = wrapped(x_wrapped.clone())
        out.sum().backward()
        reference(x_reference.clone()).sum().backward()
        assert_same_grads(reference, wrapped)
    wrapped(x_wrapped)
    reference(x_reference)
    torch.testing.assert_close(x_wrapped, x_reference)  # the caller's input is written, as the module does


def test_a_weight_whose_data_is_reassigned_in_forward_follows_the_root():
    torch.manual_seed(0)
    reference = nn.Sequential(_MaxNorm(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, wrapped)]
    for _ in range(4):
        x = torch.randn(9, 4, dtype=torch.float64)
        for model, optimizer in zip((reference, wrapped), optimizers):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
        assert_same_grads(reference, wrapped)  # replicas computed with the root's renormed weight
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("round_trip", ["half_float", "grad_data"])
def test_grad_data_reassigned_between_steps_keeps_the_reduction(round_trip):
    # model.half().float() (Module._apply sets p.grad.data) or p.grad.data = ... re-point the view
    # that is .grad: it goes back into the bucket at the next forward, values kept.
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    x = torch.randn(9, 4, dtype=torch.float64)
    for model in (reference, wrapped):
        model(x).sum().backward()
    if round_trip == "half_float":
        wrapped.module.float().double()
        reference.float().double()
    else:
        for p in wrapped.module.parameters():
            p.grad.data = p.grad.data.clone()
    for step in range(3):
        for model in (reference, wrapped):
            if step:
                model.zero_grad()
            model(x * (step + 2)).sum().backward()
        assert_same_grads(reference, wrapped)


def test_backward_with_create_graph_differentiates_through_every_replicas_share():
    # A penalty on p.grad after loss.backward(create_graph=True) (gradient-norm regularisers,
    # MAML): its gradient must see every replica's share, as nn.DataParallel's ReduceAddCoalesced
    # gives; then a plain step reduces as usual (the replicas' views are back in .grad).
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    x = torch.randn(9, 4, dtype=torch.float64)
    results = []
    for model in (reference, wrapped):
        inputs = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Using backward() with create_graph=True ..."
            model(inputs).pow(2).sum().backward(create_graph=True)
        params = list(model.parameters())
        grads = [p.grad.detach().clone() for p in params]
        penalty = sum(p.grad.pow(2).sum() for p in params)
        input_grad, = torch.autograd.grad(penalty, inputs, retain_graph=True)
        penalty.backward()  # into .grad: the replicas' parameters' shares are reduced as usual
        results.append((grads, penalty.detach(), input_grad, [p.grad.detach().clone() for p in params]))
        model.zero_grad(set_to_none=True)
    for got, want in zip(results[1][0] + results[1][3], results[0][0] + results[0][3]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-10, atol=1e-12)  # d penalty / d input
    for model in (reference, wrapped):
        model(x).sum().backward()
    assert_same_grads(reference, wrapped)


def test_create_graph_inside_no_sync_then_a_plain_backward_counts_each_share_once():
    # The no_sync step leaves the replicas' graph-carrying .grad in place (its values in the
    # buckets too); the next, plain, backward adds into it in place: its values replace the
    # bucket's instead of being added to them a second time.
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    x1, x2 = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # create_graph=True's warning; routed windows' (see below)
        with wrapped.no_sync():
            wrapped(x1).pow(2).sum().backward(create_graph=True)
        reference(x1).pow(2).sum().backward(create_graph=True)
        wrapped(x2).pow(2).sum().backward()
        reference(x2).pow(2).sum().backward()
    assert_same_grads(reference, wrapped)


def test_create_graph_where_replicas_backward_ran_on_workers_warns_then_walks_in_turn(monkeypatch):
    # A penalty's backward would reach a replica's forward graph twice (through its gradient and
    # through ReplicaBackward), in two graph tasks: that step's .grad carries replica 0's graph only,
    # values exact, and a warning says so; from the next step the replicas' passes run in turn and
    # the penalty's gradient into .grad is exact.
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", "1")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3)
    x = torch.randn(9, 3, dtype=torch.float64)

    def step(model, penalty_too=True):
        model(x).pow(2).sum().backward(create_graph=True)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        penalty = sum(p.grad.pow(2).sum() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        if penalty_too:
            penalty.backward()
        penalties = [p.grad.clone() if penalty_too else None for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return grads, penalties

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward")
        want = step(reference)
        with pytest.warns(UserWarning, match=r"create_graph=True.*replica 0's graph only"):
            got = step(wrapped, penalty_too=False)
        for g, w in zip(got[0], want[0]):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        got = step(wrapped)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_lazily_conjugated_input_reaches_every_replica_conjugated():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(torch.complex128)
    wrapped = dpfast.DataParallel(copy.deepcopy(layer), device_ids=["cpu"] * 3)
    x = torch.randn(9, 3, dtype=torch.complex128)
    for lazy in (x.conj(), torch._neg_view(x)):
        torch.testing.assert_close(wrapped(lazy), layer(lazy.resolve_conj().resolve_neg()), rtol=1e-12, atol=1e-12)


def test_a_zero_size_buffer_is_not_taken_for_a_moved_weight():
    # Re-pointing it every call would also keep every bucket for the end of backward when a window
    # has two forwards (note_weights_moved).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    module.register_buffer("nothing", torch.empty(0, dtype=torch.float64))
    wrapped = dpfast.DataParallel(module, device_ids=["cpu"] * 3)
    x = torch.randn(9, 4, dtype=torch.float64)
    for _ in range(3):
        wrapped(x).sum().backward()
    replicas = wrapped._runtime.replicas
    assert replicas.repoint_count == 0 and not replicas.weights_moved(3)


class _MarkedByReplication(nn.Module):
    """Synchronized-BatchNorm-PyTorch's pattern: replication callbacks mark each replica
    (__data_parallel_replicate__), and a marked module's forward waits for its peers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self._is_parallel = False
        self.seen = []  # shared by the replicas (a plain attribute)

    def __data_parallel_replicate__(self, ctx, copy_id):
        self._is_parallel = True
        self._copy_id = copy_id

    def forward(self, x):
        if self._is_parallel:
            self.seen.append(self._copy_id)
        return self.linear(x)


def _execute_replication_callbacks(modules):
    for copy_id, module in enumerate(modules):
        for m in module.modules():
            if hasattr(m, "__data_parallel_replicate__"):
                m.__data_parallel_replicate__(None, copy_id)


class _WithCallback(dpfast.DataParallel):
    def replicate(self, module, device_ids):
        modules = super().replicate(module, device_ids)
        _execute_replication_callbacks(modules)
        return modules


def _wrap_with_callbacks(module, how: str, replicas: int):
    """Synchronized-BatchNorm's two ways: DataParallelWithCallback (a subclass), or
    patch_replication_callback(data_parallel) (replicate patched on the instance)."""
    if how == "subclass":
        return _WithCallback(module, device_ids=["cpu"] * replicas)
    wrapped = dpfast.DataParallel(module, device_ids=["cpu"] * replicas)
    plain_replicate = wrapped.replicate

    def replicate(mod, device_ids):
        modules = plain_replicate(mod, device_ids)
        _execute_replication_callbacks(modules)
        return modules
    wrapped.replicate = replicate
    return wrapped


@pytest.mark.parametrize("how", ["subclass", "instance_patch"])
def test_replication_callbacks_mark_the_replicas_for_the_call_and_leave_the_module_alone(how):
    # nn.DataParallel hands the callbacks copies; here replica 0 is the module, so what they wrote on
    # it is put back after the call: the module run alone later must not wait for replicas.
    torch.manual_seed(0)
    module = _MarkedByReplication().double()
    wrapped = _wrap_with_callbacks(module, how, replicas=3)
    x = torch.randn(9, 4, dtype=torch.float64)
    out = wrapped(x)
    assert sorted(module.seen) == [0, 1, 2]
    assert module._is_parallel is True  # until the end of backward: a checkpoint may recompute replica 0
    out.sum().backward()
    assert module._is_parallel is False and not hasattr(module, "_copy_id")
    with torch.no_grad():
        out = wrapped(x)  # no backward to come: put back at once
    assert sorted(module.seen) == [0, 0, 1, 1, 2, 2] and module._is_parallel is False
    reference = copy.deepcopy(module)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    module(x)
    assert len(module.seen) == 6  # alone, it does not take itself for a replica
    wrapped(x)  # a forward whose backward never comes: put back at the next call
    wrapped(x).sum().backward()
    assert module._is_parallel is False and len(module.seen) == 12


class _FeaturesAndLogits(_MarkedByReplication):
    """deeplab-xception / CSAILVision's shape: (features, logits), the loss on the logits alone."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        features = super().forward(x)
        return features, self.head(features.detach())


@pytest.mark.parametrize("how", ["subclass", "instance_patch"])
def test_replication_marks_are_put_back_when_the_loss_skips_the_first_output(how):
    torch.manual_seed(0)
    module = _FeaturesAndLogits().double()
    wrapped = _wrap_with_callbacks(module, how, replicas=2)
    features, logits = wrapped(torch.randn(6, 4, dtype=torch.float64))
    assert module._is_parallel is True
    logits.sum().backward()  # features carry a graph too, but are not in this loss
    assert module._is_parallel is False and not hasattr(module, "_copy_id")
    assert module.head.weight.grad is not None and module.linear.weight.grad is None


class _NamedtupleMadePerCall(nn.Module):
    """pytorch/examples fast_neural_style's Vgg16: the output's namedtuple class is made in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        outputs = collections.namedtuple("Outputs", ["first", "second"])
        h = torch.relu(self.a(x))
        return outputs(h, self.b(h))


def test_namedtuple_outputs_of_one_name_and_fields_from_classes_made_per_call():
    torch.manual_seed(0)
    reference, wrapped = pair(_NamedtupleMadePerCall)
    x = torch.randn(9, 4, dtype=torch.float64)
    out, want = wrapped(x), reference(x)
    assert type(out).__name__ == "Outputs" and out._fields == ("first", "second")
    for got, expected in zip(out, want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    sum(t.pow(2).sum() for t in out).backward()
    sum(t.pow(2).sum() for t in want).backward()
    assert_same_grads(reference, wrapped)


def test_replication_marks_stay_through_a_checkpoints_recomputation_in_backward():
    # The module checkpointed inside replica 0 recomputes during backward: it must see the marks
    # its forward saw, or its saved tensors differ from the forward's without an error.
    class Branchy(_MarkedByReplication):
        def forward(self, x):
            h = self.linear(x)
            return h * 2 if self._is_parallel else h

    class Outer(nn.Module):
        def __init__(self, checkpointed):
            super().__init__()
            self.inner, self.checkpointed = Branchy(), checkpointed

        def forward(self, x):
            if self.checkpointed:
                return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
            return self.inner(x)

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        wrapped = _WithCallback(Outer(checkpointed).double(), device_ids=["cpu"] * 3)
        wrapped(torch.randn(9, 4, dtype=torch.float64)).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in wrapped.module.parameters()])
    for with_checkpoint, without in zip(grads[1], grads[0]):
        torch.testing.assert_close(with_checkpoint, without, rtol=1e-12, atol=1e-12)


def test_the_functional_form_matches_the_module_and_keeps_nothing_between_calls():
    """dpfast.data_parallel, as torch.nn.parallel.data_parallel: inputs as a tensor or a tuple,
    module_kwargs, grads summed into the module's .grad, no threads left behind, and the module
    checked (never moved) against device_ids[0]."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x, scale=1.0):
            return self.linear(x) * scale

    torch.manual_seed(0)
    reference = Scaled().double()
    module = copy.deepcopy(reference)
    x = torch.randint(-3, 4, (10, 5)).double()
    gc.collect()
    threads = threading.active_count()
    for inputs in (x, (x,)):
        module.zero_grad()
        reference.zero_grad()
        out = dpfast.data_parallel(module, inputs, CPU4, module_kwargs={"scale": 2.0})
        expected = reference(x, scale=2.0)
        assert torch.equal(out, expected)
        out.sum().backward()
        expected.sum().backward()
        for p, q in zip(reference.parameters(), module.parameters()):
            assert torch.equal(q.grad, p.grad)
    del out
    gc.collect()
    assert threading.active_count() == threads  # every call's workers are gone
    assert torch.equal(dpfast.data_parallel(module, x, ["cpu"]), reference(x))
    with pytest.raises(TypeError, match=r"module_kwargs: expected a dict or None, but got list"):
        dpfast.data_parallel(module, x, CPU4, module_kwargs=[{}])
    with pytest.raises(RuntimeError, match=r"module must have its parameters and buffers on device cpu"):
        dpfast.data_parallel(Scaled().to("meta"), x, CPU4)
    assert callable(dpfast.data_parallel) and "data_parallel" in dpfast.__all__


# -- NOTE [Graph-carrying entries]: computed parameters (MAML's fast weights), buffers that require grad --


def _clone_module(module, memo=None):
    """learn2learn's clone_module, as MAML calls it for every task: a shallow copy of every module's
    __dict__ with its parameters replaced by clones (non-leaf tensors that carry the graph back to
    the originals). A shallow copy of a wrapper is a wrapper that shares its __dict__'s values."""
    memo = {} if memo is None else memo
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters, clone._buffers, clone._modules = (dict(module._parameters), dict(module._buffers),
                                                         dict(module._modules))
    for key, p in module._parameters.items():
        if p is not None:
            clone._parameters[key] = memo.setdefault(id(p), p.clone())
    for key, child in module._modules.items():
        clone._modules[key] = _clone_module(child, memo)
    return clone


def _update_module(module, updates):
    """learn2learn's update_module: every parameter entry becomes `p + update` (a computed tensor)."""
    new = {id(p): p + u for p, u in zip(module.parameters(), updates)}
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None and id(p) in new:
                m._parameters[key] = new[id(p)]
    return module


def test_computed_parameters_and_buffers_that_require_grad_get_every_replicas_gradient():
    """A computed tensor in `_parameters` (`_parameters[k] = p * 1.5`) and a buffer that requires
    grad: every replica reads them through the graph, so the gradient of the leaf behind them is the
    full batch's (nn.DataParallel's Broadcast is differentiable), not replica 0's share."""
    reference, wrapped = pair(WithBuffer)
    x = torch.randn(9, 4, dtype=torch.float64)
    leaves = []
    for model in (reference, wrapped.module):
        leaf = model.lin.weight
        model.lin._parameters["weight"] = leaf * 1.5
        model.shift.requires_grad_()
        leaves.append((leaf, model.shift))
    for _ in range(2):  # the second call: the same entries, replicas not rebuilt
        out = wrapped(x)
        torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
        out.pow(2).sum().backward(retain_graph=True)
        reference(x).pow(2).sum().backward(retain_graph=True)
        for want, got in zip(*leaves):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wrapped.module.lin.bias.grad, reference.lin.bias.grad, rtol=1e-10, atol=1e-12)


def test_maml_with_learn2learn_style_clones_of_the_wrapper():
    """MAML as learn2learn writes it, around a wrapped model: per task, clone the wrapper (a
    shallow copy with computed parameters), adapt it with torch.autograd.grad(create_graph=True),
    and add the adapted clone's query loss to the meta-loss. The meta-gradients and three meta-steps
    match the bare model's; each clone builds a runtime of its own, so the wrapper itself keeps
    working and the clones' threads go with them."""
    reference, wrapped = pair(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for step in range(3):
        for model, optimizer in zip((reference, wrapped), optimizers):
            generator = torch.Generator().manual_seed(step)
            batches = [torch.randn(7, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
            optimizer.zero_grad()
            meta_loss = 0
            for support, query in (batches[:2], batches[2:]):
                learner = _clone_module(model)
                inner = learner(support).pow(2).mean()
                grads = torch.autograd.grad(inner, list(learner.parameters()), create_graph=True)
                learner = _update_module(learner, [-0.5 * g for g in grads])
                meta_loss = meta_loss + learner(query).pow(2).mean()
            meta_loss.backward()
            optimizer.step()
    assert_same_params(reference, wrapped)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)  # the wrapper's own runtime
    gc.collect()  # earlier tests' wrappers in reference cycles take their threads with them now, not below
    threads = threading.active_count()
    for _ in range(5):  # clones of a wrapper that has run: its runtime is in the __dict__ they copy
        clone = _clone_module(wrapped)
        torch.testing.assert_close(clone(x), reference(x), rtol=1e-12, atol=1e-12)
        assert clone._runtime is not wrapped._runtime
    del clone
    gc.collect()
    assert threading.active_count() == threads
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)
    wrapped(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert_same_grads(reference, wrapped)


class WritesGraphCarryingEntries(nn.Module):
    """Writes, in place in forward, a buffer computed from a parameter (so it requires grad and is
    not a leaf), a leaf buffer that requires grad (under no_grad) and a fast weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.base = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.register_buffer("scale", self.base * 1.0)
        self.register_buffer("running", torch.zeros(4, dtype=torch.float64).requires_grad_())
        self.fast = nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.w0 = self.fast._parameters.pop("weight")
        self.fast._parameters["weight"] = self.w0 * 2.0

    def forward(self, x):
        self.scale.mul_(0.9)
        with torch.no_grad():
            self.running.add_(x.mean(0))
        self.fast.weight.add_(1.0)
        return (self.lin(x) * self.scale + self.running) @ self.fast.weight.t()


def test_in_place_writes_to_graph_carrying_entries_stay_with_their_replica():
    """NOTE [Graph-carrying entries]: as under nn.DataParallel, each replica but the first reads a
    copy of its own, so its in-place write neither reaches another replica (the writes raced on one
    tensor and compounded: outputs off by up to 3.7) nor the root, which keeps replica 0's. The
    reference runs each chunk on a module of its own, chunk 0 on the root."""
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for trial in range(3):
        torch.manual_seed(trial)
        copies = [WritesGraphCarryingEntries() for _ in range(3)]
        for c in copies[1:]:
            c.load_state_dict(copies[0].state_dict())
        torch.manual_seed(trial)
        module = WritesGraphCarryingEntries()
        wrapped = dpfast.DataParallel(module, device_ids=CPU4[:3], bucket_cap_mb=BUCKET_CAP_MB["value"])
        want = torch.cat([c(chunk) for c, chunk in zip(copies, x.chunk(3))])
        out = wrapped(x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.scale, copies[0].scale, rtol=0, atol=0)
        torch.testing.assert_close(module.running, copies[0].running, rtol=0, atol=0)
        want.pow(2).sum().backward()
        out.pow(2).sum().backward()
        for name in ("base", "w0", "lin.weight"):
            expected = sum(c.get_parameter(name).grad for c in copies)
            torch.testing.assert_close(module.get_parameter(name).grad, expected, rtol=1e-10, atol=1e-12)


class CountsRareRows(nn.Module):
    """Re-assigns a buffer (out of place) only where its chunk has a row over 1."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=torch.float64)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        if (x[:, 0] > 1).any():
            self.seen = self.seen + 1
        return self.lin(x) + self.seen


def test_a_buffer_a_replica_reassigns_in_forward_is_the_roots_again_at_the_next_call():
    """nn.DataParallel's replicas are new every call, so a replica's `self.seen = self.seen + 1`
    is lost at the next one; dpfast's kept replica 1 read its own `seen` from then on, even after
    the root's was changed."""
    reference, wrapped = pair(CountsRareRows, device_ids=CPU4[:2])
    rare = torch.tensor([[0.0, 0, 0], [0, 0, 0], [2, 0, 0], [0, 0, 0]], dtype=torch.float64)  # replica 1's chunk
    plain = torch.zeros(4, 3, dtype=torch.float64)
    want = torch.cat([copy.deepcopy(reference)(chunk) for chunk in rare.chunk(2)])
    torch.testing.assert_close(wrapped(rare), want, rtol=0, atol=0)
    assert wrapped.module.seen.item() == 0  # replica 0's chunk has no rare row
    torch.testing.assert_close(wrapped(plain), reference(plain), rtol=0, atol=0)
    with torch.no_grad():
        wrapped.module.seen.fill_(100)
        reference.seen.fill_(100)
    torch.testing.assert_close(wrapped(plain), reference(plain), rtol=0, atol=0)
    assert wrapped.stats()["replica_builds"] == 1


class ReassignsAnAverage(nn.Module):
    """Keeps an average of its outputs by re-assigning a buffer in forward (out of place), as the
    popular EMA vector-quantizer code does, and a second buffer registered in two modules."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("average", torch.zeros(3))
        shared = torch.ones(3)
        self.register_buffer("shared", shared)
        self.head = nn.Module()
        self.head.register_buffer("shared", shared)

    def forward(self, x):
        y = self.lin(x) + self.average + self.shared
        with torch.no_grad():
            self.average = 0.5 * self.average + y.mean(0)
        return y


def test_a_buffer_the_root_reassigns_with_a_like_tensor_is_followed_without_a_rebuild():
    """NOTE [Replaced buffers]: the root (replica 0) re-assigns `average` every call, and the
    replicas read the new tensor's values at the next call, as nn.DataParallel's fresh replicas
    would, without rebuilding (which doubled a ResNet-18's step). Anything else still rebuilds: a
    new dtype, a tensor registered in two modules replaced in one of them."""
    torch.manual_seed(0)
    module = ReassignsAnAverage().double()
    reference = copy.deepcopy(module)
    wrapped = dpfast.DataParallel(module, device_ids=CPU4[:3], bucket_cap_mb=BUCKET_CAP_MB["value"])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, wrapped)]
    for step in range(4):
        x = torch.randn(9, 4, dtype=torch.float64)
        copies = [reference] + [copy.deepcopy(reference) for _ in range(2)]  # the state at the call's start
        want = torch.cat([c(chunk) for c, chunk in zip(copies, x.chunk(3))])
        out = wrapped(x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.average, reference.average, rtol=1e-12, atol=1e-12)
        for m, y, optimizer in ((reference, want, optimizers[0]), (wrapped, out, optimizers[1])):
            optimizer.zero_grad()
            y.pow(2).sum().backward()
            if m is reference:  # the copies' shares
                for p, *shares in zip(reference.parameters(), *(c.parameters() for c in copies[1:])):
                    p.grad += sum(q.grad for q in shares)
            optimizer.step()
        assert_same_params(reference, wrapped)
    assert wrapped.stats()["replica_builds"] == 1
    module.average = torch.full((3,), 7.0, dtype=torch.float64)  # between steps, by the user
    reference.average = module.average.clone()
    x = torch.randn(6, 4, dtype=torch.float64)
    copies = [reference] + [copy.deepcopy(reference) for _ in range(2)]
    torch.testing.assert_close(wrapped(x), torch.cat([c(chunk) for c, chunk in zip(copies, x.chunk(3))]))
    assert wrapped.stats()["replica_builds"] == 1
    for change in (lambda m: setattr(m, "average", torch.ones(3)),  # another dtype
                   lambda m: setattr(m.head, "shared", torch.full((3,), 2.0, dtype=torch.float64))):  # one of two
        builds = wrapped.stats()["replica_builds"]
        change(module)
        change(reference)
        x = torch.randn(6, 4, dtype=torch.float64)
        copies = [reference] + [copy.deepcopy(reference) for _ in range(2)]
        torch.testing.assert_close(wrapped(x), torch.cat([c(chunk) for c, chunk in zip(copies, x.chunk(3))]))
        assert wrapped.stats()["replica_builds"] > builds


class TimesAGrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("grid", torch.arange(9.0).view(3, 3))

    def forward(self, x):
        return self.lin(x) @ self.grid


def test_a_buffer_replaced_by_a_view_of_itself_is_broadcast_under_trusted_version_counters():
    """NOTE [Replaced buffers] with trust_version_counters=True: `m.grid = m.grid.t()` is a like
    tensor at the same address with the same version counter; the replicas kept the old layout
    (outputs off by up to 4) until the versions were forgotten on the swap."""
    reference, wrapped = pair(TimesAGrid, device_ids=CPU4[:3], trust_version_counters=True)
    x = torch.randn(9, 3, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)
    for m in (wrapped.module, reference):
        m.grid = m.grid.t()
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)
    assert wrapped.stats()["replica_builds"] == 1


class GrowsABuffer(nn.Module):
    """Resizes an empty buffer in forward (as FakeQuantize and its observers do in their first
    forward), then reads the buffers and parameters that sit beside it in the replicas' flat buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(0))
        self.register_buffer("offset", torch.arange(3.0))
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        self.seen.resize_(3).copy_(x.detach().mean(0)[:3])
        return self.lin(x) + self.offset + self.seen


class GrowsPastItsGroup(nn.Module):
    """An int32 buffer (a dtype group of its own, as FakeQuantize's zero_point) that forward grows
    from 1 element to one per feature, on the replicas that run it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def forward(self, x):
        if self.zero_point.numel() != x.size(1):
            self.zero_point.resize_(x.size(1)).zero_()
        return self.lin(x)


def test_a_buffer_grown_past_its_flat_buffer_goes_back_in_the_roots_shape():
    """Replica 0 (the root) sits the steps out, so only the replicas grow the buffer: each next call
    puts theirs back in the root's shape, and they grow it again, step after step."""
    torch.manual_seed(0)
    reference = GrowsPastItsGroup().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4[:3], chunk_sizes=[0, 3, 3])
    for _ in range(3):
        x = torch.randn(6, 8, dtype=torch.float64)
        torch.testing.assert_close(wrapped(x), reference.lin(x), rtol=1e-12, atol=1e-12)
        assert wrapped.module.zero_point.shape == (1,)


def test_a_buffer_resized_in_forward_stays_off_its_neighbours():
    """NOTE [Exact storages]: each replica runs as a copy of the module on its chunk (nn.DataParallel's
    replicas are separate tensors); a replica buffer that grows must not write over the replica's
    other buffers and weights, which share its flat buffer."""
    reference, wrapped = pair(GrowsABuffer)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):  # the first call grows the buffers; the second rebuilds for the new shape
        expected = torch.cat([copy.deepcopy(reference)(chunk) for chunk in x.chunk(4)])
        out = wrapped(x)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        reference(x[:2])  # the root ran replica 0's chunk: the same state as the wrapped module
        torch.testing.assert_close(wrapped.module.seen, reference.seen, rtol=0, atol=0)
        out.sum().backward()


@pytest.mark.parametrize("parallel_backward", ["1", "0"])
def test_dispatch_modes_reach_every_replica_and_saved_tensor_hooks_replica_0(parallel_backward, monkeypatch):
    """NOTE [Thread-local state of replicas]: replicas 1..n-1 run on workers under the caller's
    thread-local state, as PyTorch's autograd engine runs its own threads: a dispatch mode
    (FlopCounterMode) counts every replica's operations, forward and backward (before, replica
    0's only: a quarter of the FLOPs with 4 replicas), replicas one after another while it is on.
    Saved-tensor hooks stay replica 0's, as under nn.DataParallel (a checkpoint pairs what it
    packs by order)."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel_backward)
    module = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(module), device_ids=CPU4)
    x = torch.randn(8, 16, dtype=torch.float64)
    packed = collections.Counter()

    def pack(tensor):
        packed[threading.current_thread().name] += 1
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x).sum().backward()
        alone = packed.pop(threading.current_thread().name)  # the module's, on its chunk or the batch
        wrapped(x).sum().backward()
    assert packed.pop(threading.current_thread().name) >= alone  # replica 0's (and the gather's)
    assert not packed  # no worker's
    for _ in range(2):
        counts = []
        for model in (module, wrapped):
            counter = FlopCounterMode(display=False)
            with counter:
                model(x).sum().backward()
            counts.append(counter.get_total_flops())
            # Its module tracker books each operation to the module running now: replicas side by
            # side on several threads booked matmuls to Tanh. Under a Python mode they take turns.
            assert not any(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                           if name.endswith(".1")), counter.get_flop_counts()
        assert counts[0] == counts[1] > 0


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, num_heads=2, batch_first=True)

    def forward(self, x, attn_mask=None):
        return self.attention(x, x, x, attn_mask=attn_mask, need_weights=False)[0]


@pytest.mark.parametrize("batch", [7, 8])
def test_an_input_with_rows_per_sample_is_split_by_sample(batch):
    """MultiheadAttention's 3-D attn_mask has batch x heads rows, batch-major: each replica gets its
    samples' rows (nn.DataParallel's torch.chunk gives the same where the batch divides evenly), and
    the outputs and gradients are the module's on the whole batch."""
    reference, wrapped = pair(SelfAttention, device_ids=["cpu"] * 3)
    x = torch.randn(batch, 5, 8, dtype=torch.float64)
    mask = torch.randn(batch * 2, 5, 5, dtype=torch.float64)
    out = wrapped(x, attn_mask=mask)
    torch.testing.assert_close(out, reference(x, attn_mask=mask), rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    reference(x, attn_mask=mask).pow(2).sum().backward()
    assert_same_grads(reference, wrapped)
    with pytest.raises(ValueError, match=r"a whole multiple of it \(rows per sample\), or one row per replica, "
                                         rf"but inputs\[0\] has {batch} and kwargs\['attn_mask'\] has 5"):
        wrapped(x, attn_mask=mask[:5])
    with pytest.raises(ValueError, match=rf"but kwargs\['attn_mask'\] has 1 and kwargs\['x'\] has {batch}"):
        wrapped(attn_mask=mask[:1], x=x)  # one row shared by every sample: not taken for the batch
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)  # after the errors


class OverridesReplicate(dpfast.DataParallel):
    """Synchronized-BatchNorm's DataParallelWithCallback, in its shape: one step overridden."""

    def replicate(self, module, device_ids):
        return super().replicate(module, device_ids)


@pytest.mark.parametrize("wrapper_type", [dpfast.DataParallel, OverridesReplicate])
def test_one_device_runs_what_has_no_replicas_as_nn_dataparallel(wrapper_type):
    """On one device nn.DataParallel runs the module itself, so a lazy module before its first
    forward and a TorchScript module run there; so they do here, with nothing built for them (a
    subclass that overrides a step too)."""
    lazy = nn.Sequential(nn.LazyLinear(3))
    wrapped = wrapper_type(lazy, device_ids=["cpu"])
    x = torch.randn(4, 5)
    out = wrapped(x)
    assert lazy[0].weight.shape == (3, 5) and wrapped.__dict__.get("_runtime") is None
    torch.testing.assert_close(out, lazy(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.Sequential(nn.Linear(5, 3), nn.Tanh()))
    torch.testing.assert_close(wrapper_type(scripted, device_ids=["cpu"])(x), scripted(x))


def is_parallel(model):
    """yolov5's check (utils/torch_utils.py): by exact type, so it does not see dpfast's wrapper."""
    return type(model) in (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)


def de_parallel(model):
    return model.module if is_parallel(model) else model


class Detector(nn.Module):
    """A detection model in yolov5's shape: its head last in `model`, with attributes read off it."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 3))
        self.model[-1].nl = 3  # detection layers
        self.stride = torch.tensor([8.0, 16.0, 32.0])

    def forward(self, x):
        return self.model(x)

    def fuse(self):
        return self


def test_the_modules_attributes_read_through_the_wrapper_as_fsdp_does():
    """Code that unwraps by exact type (yolov5's de_parallel) gets the wrapper back and reads the
    module's attributes on it: they are read from the module, as FSDP and torch.compile's wrapper
    forward them (nn.DataParallel raises AttributeError). The wrapper's own attributes come first,
    writes stay on the wrapper, and training still goes through the replicas."""
    reference, wrapped = pair(Detector)
    model = de_parallel(wrapped)
    assert model is wrapped
    assert model.model[-1].nl == 3 and model.model is wrapped.module.model
    assert int(model.stride.max()) == 32 and model.model is wrapped.module.model
    with pytest.raises(AttributeError, match=r"'DataParallel' object has no attribute 'fuse'"):
        model.fuse  # the module's methods are not forwarded
    model.nc, model.names = 3, ["a", "b", "c"]  # train.py attaches these to the wrapper
    assert model.nc == 3 and not hasattr(wrapped.module, "nc")
    assert wrapped.dim == 0 and wrapped.training and isinstance(wrapped.module, Detector)  # its own first
    assert not hasattr(wrapped, "anchors")
    with pytest.raises(AttributeError, match=r"'DataParallel' object has no attribute 'anchors'"):
        wrapped.anchors
    assert not hasattr(wrapped, "__array__")  # dunder names are not forwarded
    x = torch.randn(10, 6, dtype=torch.float64)
    out = wrapped(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    assert_same_grads(reference, wrapped)
    assert wrapped.stats()["replica_builds"] == 1


class _CachesMask(nn.Module):
    """PyTorch's word_language_model TransformerModel: a causal mask made in forward the first
    time, kept in a plain attribute and reused while the length fits."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.src_mask = None

    def forward(self, x):
        if self.src_mask is None or self.src_mask.size(0) != x.size(1):
            self.src_mask = torch.triu(torch.full((x.size(1), x.size(1)), float("-inf"), dtype=x.dtype), 1)
        return self.proj(x) + self.src_mask.exp().sum(1).unsqueeze(-1)


def test_attribute_tensor_cached_by_replica_0_matches_reference():
    reference, wrapped = pair(_CachesMask, device_ids=["cpu"] * 2)
    for _ in range(3):
        x = torch.randn(4, 5, 4, dtype=torch.float64)
        torch.testing.assert_close(wrapped(x), reference(x))
    assert wrapped.module.src_mask is not None  # replica 0 is the module: its write stays


def test_attribute_tensor_on_the_root_device_gets_a_copy_on_another_replica_device():
    """NOTE [Attribute tensors]: a replica on another device than the root's reads a copy of a
    tensor that the root's forward cached in a plain attribute, on its own device, made again only
    when the root's tensor is replaced or written. With one machine's CPU as the only device here,
    replica 1's device is set to meta around refresh_attributes, the step that makes it."""
    _, wrapped = pair(_CachesMask, device_ids=["cpu"] * 2)
    wrapped(torch.randn(4, 5, 4, dtype=torch.float64))
    root = wrapped.module
    root.graph_carrying = root.proj.weight * 2  # a graph's tensor: left as it is
    root.__dict__["weight_alias"] = root.proj.weight  # the module's own tensor, past nn.Module.__setattr__
    replicas = wrapped._runtime.replicas
    j = replicas.modules.index(root)
    replicas.devices[1] = torch.device("meta")
    try:
        replicas.refresh_attributes(2)
        replica = replicas.replica_modules[1][j]
        first = replica.__dict__["src_mask"]
        assert first.device.type == "meta" and first.shape == root.src_mask.shape
        assert replica.__dict__["graph_carrying"] is root.graph_carrying
        assert replica.__dict__["weight_alias"].device.type == "cpu"  # one of the module's own: not copied
        replicas.refresh_attributes(2)
        assert replica.__dict__["src_mask"] is first  # the same tensor: no copy per call
        with torch.no_grad():
            root.src_mask.add_(1.0)  # written in place: copied again
        replicas.refresh_attributes(2)
        second = replica.__dict__["src_mask"]
        assert second is not first and second.device.type == "meta"
        root.src_mask = torch.zeros(3, 3, dtype=torch.float64)  # replaced: copied again
        replicas.refresh_attributes(2)
        assert replica.__dict__["src_mask"].shape == (3, 3) and replica.__dict__["src_mask"].device.type == "meta"
        root.elsewhere = torch.zeros(2, device="meta")  # not on the root's device: as it is
        replicas.refresh_attributes(2)
        assert replica.__dict__["elsewhere"] is root.elsewhere
    finally:
        replicas.devices[1] = torch.device("cpu")
    replicas.refresh_attributes(2)
    assert replicas.replica_modules[1][j].__dict__["src_mask"] is root.src_mask  # one device: shared, as before


def test_loops_over_modules_call_the_modules_methods_once():
    """The wrapper is one of model.modules() (as nn.DataParallel's is): the module's methods are
    not read through it, so the k-fold idiom `model.apply(reset)` with `hasattr(m,
    "reset_parameters")` resets the module once, and the same seed gives nn.DataParallel's weights."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.resets = 0

        def reset_parameters(self):
            self.resets += 1

    def reset(m):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()

    weights = []
    for wrapper_type in (nn.DataParallel, dpfast.DataParallel):
        net = Net()
        wrapped = wrapper_type(net, device_ids=["cpu"] * 2) if wrapper_type is dpfast.DataParallel else wrapper_type(net)
        torch.manual_seed(0)
        wrapped.apply(reset)
        assert net.resets == 1
        weights.append(net.fc.weight.detach().clone())
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)


def test_device_ids_minus_one_without_cuda_runs_the_module_as_nn_data_parallel(monkeypatch):
    """nn.DataParallel without CUDA ignores device_ids; mmcv's MMDataParallel(model,
    device_ids=[-1]) then runs its own CPU branch, which tests `not self.device_ids`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = mlp()
    wrapped = dpfast.DataParallel(module, device_ids=[-1])
    assert wrapped.device_ids == nn.DataParallel(module, device_ids=[-1]).device_ids == []
    x = torch.randn(5, 6)
    torch.testing.assert_close(wrapped(x), module(x), rtol=0, atol=0)
    assert dpfast.DataParallel(module, device_ids=["cpu"] * 2).device_ids == [torch.device("cpu")] * 2


def test_copy_of_a_wrapper_whose_replicate_was_patched_on_the_instance():
    """Synchronized-BatchNorm's patch_replication_callback puts a closure over the wrapper's
    replicate in its __dict__; EMA code and AveragedModel deep-copy the wrapper, closure and all,
    so the copy's forward calls the original's replicate with the copy's module. Under
    nn.DataParallel that replicates whatever module it is given: the copy runs."""
    calls = []

    def patch_replication_callback(data_parallel):
        old_replicate = data_parallel.replicate

        def new_replicate(module, device_ids):
            modules = old_replicate(module, device_ids)
            calls.append([id(m) for m in modules])
            return modules
        data_parallel.replicate = new_replicate

    reference, wrapped = pair(mlp, device_ids=["cpu"] * 2)
    patch_replication_callback(wrapped)
    x = torch.randn(6, 6, dtype=torch.float64)
    wrapped(x).sum().backward()
    ema = copy.deepcopy(wrapped)
    with torch.no_grad():
        ema.module[0].weight.add_(1.0)
        out = ema(x)
        expected = copy.deepcopy(reference)
        expected[0].weight.add_(1.0)
        torch.testing.assert_close(out, expected(x), rtol=1e-12, atol=1e-12)
    assert calls[-1][0] == id(ema.module)  # the copy's replicas, the copy's module first
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)  # the original's unchanged
    assert calls[-1][0] == id(wrapped.module)
    with pytest.raises(ValueError, match=r"replicate: module: expected the wrapped module"):
        wrapped.replicate(mlp(), 2)  # another module, outside a forward: still refused


@pytest.mark.parametrize("make_output", [
    lambda a, b: (t for t in (a, b)),
    lambda a, b: map(torch.neg, (a, b)),
    lambda a, b: iter([a, b]),
], ids=["generator", "map", "list_iterator"])
def test_one_shot_iterator_outputs_give_their_items_gathered(make_output):
    """A generator or map cannot be made again from its items, and reading them uses it up: the
    items come back gathered, in a list (they were lost before: the replicas' used-up iterators
    came back)."""
    class Yields(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            out = self.fc(x)
            return make_output(out, out * 2)

    reference, wrapped = pair(Yields, device_ids=["cpu"] * 2)
    x = torch.randn(5, 3, dtype=torch.float64)
    out = wrapped(x)
    expected = list(reference(x))
    assert isinstance(out, list) and len(out) == 2
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    sum(t.sum() for t in out).backward()
    sum(t.sum() for t in reference(x)).backward()
    assert_same_grads(reference, wrapped)


def test_iterators_of_different_lengths_are_named():
    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return (self.fc(row) for row in x)  # one item per sample: 3 and 2 on 5 rows

    wrapped = dpfast.DataParallel(Uneven(), device_ids=["cpu"] * 2)
    with pytest.raises(TypeError, match=r"outputs: expected every replica to return an iterator of 3 items \(as "
                                        r"replica 0 did\), but replica 1 returned one of 2"):
        wrapped(torch.randn(5, 3))


def test_sizes_that_differ_between_replicas_come_back_one_per_replica():
    """A torch.Size output (logging a chunk's shape): kept where every replica agrees, and where
    they differ, as other values that differ, one per replica (its constructor takes no list)."""
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), x.shape

    wrapped = dpfast.DataParallel(Shapes(), device_ids=["cpu"] * 2)
    out, shapes = wrapped(torch.randn(5, 4))
    assert out.shape == (5, 2) and shapes == [torch.Size([3, 4]), torch.Size([2, 4])]
    out, shape = wrapped(torch.randn(6, 4))
    assert shape == torch.Size([3, 4])


def test_a_tuple_subclass_that_takes_other_items_keeps_its_gathered_tensors():
    class Pair(tuple):
        def __new__(cls, first, second):
            return super().__new__(cls, (first, second))

    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return Pair(self.fc(x), x.sum())

    wrapped = dpfast.DataParallel(Pairs(), device_ids=["cpu"] * 2)
    x = torch.randn(5, 4)
    out = wrapped(x)
    assert type(out) is tuple and out[0].shape == (5, 2) and out[1].shape == (2,)


class _FailsInBackward(torch.autograd.Function):
    armed = False

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        if _FailsInBackward.armed:
            raise RuntimeError("out of memory (injected)")
        return grad


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_FailsInBackward.apply(torch.tanh(self.a(x)))), self.c(x)


@pytest.mark.parametrize("retained", [False, True], ids=["second_loss", "retained_graph"])
def test_a_backward_after_one_that_raised_without_a_forward_between_reduces_every_replica(retained):
    """One forward, two losses (or a retained graph backwarded again): the first backward raises
    part-way, after some replicas' gradients were in their buckets; the next backward, with no
    forward between, got no end of its own, and .grad kept replica 0's share alone (autograd
    walking the replicas in turn). What the failed backward left is dropped as it raises."""
    reference, wrapped = pair(_TwoHeads, device_ids=["cpu"] * 2)
    x = torch.randn(8, 4, dtype=torch.float64)
    first, second = wrapped(x)
    _FailsInBackward.armed = True
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            (first.square().sum() + (second.square().sum() if retained else 0)).backward(retain_graph=retained)
    finally:
        _FailsInBackward.armed = False
    wrapped.zero_grad()
    (first.square().sum() + second.square().sum() if retained else second.square().sum()).backward()
    ref_first, ref_second = reference(x)
    (ref_first.square().sum() + ref_second.square().sum() if retained else ref_second.square().sum()).backward()
    assert_same_grads(reference, wrapped)
    wrapped.zero_grad()
    reference.zero_grad()
    for model in (wrapped, reference):  # and the next step
        sum(o.square().sum() for o in model(x)).backward()
    assert_same_grads(reference, wrapped)
