"""Beyond nn.DataParallel: loss on the replicas, uneven splits, scalar means,
whole-batch BatchNorm statistics, mixed precision, device choice, checkpoints."""

import collections
import copy
import types
import warnings

import pytest
import torch
from torch import nn

import dpfast
from dpfast import devices as dp_devices

CPU4 = ["cpu"] * 4


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 7)).double()


def assert_same_grads(reference, wrapped):
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("criterion", [
    nn.MSELoss(), nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(ignore_index=2, weight=torch.rand(7, dtype=torch.float64) + 0.5),
    nn.NLLLoss(ignore_index=0), nn.CrossEntropyLoss(label_smoothing=0.1),
], ids=["mse", "ce", "ce_sum", "ce_weight_ignore", "nll_ignore", "ce_smoothing"])
def test_loss_on_replicas_equals_full_batch_loss_with_uneven_chunks(criterion):
    reference = classifier()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, gather=False, weights=[1, 3, 2, 1])
    x = torch.randn(13, 5, dtype=torch.float64)
    if isinstance(criterion, nn.MSELoss):
        y = torch.randn(13, 7, dtype=torch.float64)
        fix = (lambda out: out)
    else:
        y = torch.randint(0, 7, (13,))
        fix = (lambda out: out.log_softmax(1)) if isinstance(criterion, nn.NLLLoss) else (lambda out: out)
    outputs = wrapped(x)
    assert isinstance(outputs, dpfast.ReplicaOutputs) and outputs.chunk_sizes == [2, 5, 4, 2]
    parallel = dpfast.ParallelCriterion(criterion)
    loss = parallel(dpfast.ReplicaOutputs([fix(o) for o in outputs], outputs.chunk_sizes, outputs.devices,
                                          outputs.output_device, outputs.dim), y)
    expected = criterion(fix(reference(x)), y)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    assert_same_grads(reference, wrapped)


def test_replica_outputs_gather_and_none_reduction():
    reference = classifier()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, gather=False)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 7, (9,))
    outputs = wrapped(x)
    torch.testing.assert_close(outputs.gather(), reference(x))
    per_sample = dpfast.ParallelCriterion(nn.CrossEntropyLoss(reduction="none"))(outputs, y)
    torch.testing.assert_close(per_sample, nn.CrossEntropyLoss(reduction="none")(reference(x), y))
    with pytest.raises(TypeError, match=r"ParallelCriterion: outputs: expected the ReplicaOutputs"):
        dpfast.ParallelCriterion(nn.MSELoss())(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"reduction: expected 'mean', 'sum' or 'none', but got 'max'"):
        dpfast.ParallelCriterion(nn.MSELoss(), reduction="max")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU code run where there is no GPU")
@pytest.mark.parametrize("device_ids", [None, [0, 1]])
def test_gather_false_without_a_gpu_gives_the_modules_output_as_one_replicas(device_ids):
    """GPU code on a machine without one runs the module directly, as nn.DataParallel does; with
    gather=False its output still comes as ReplicaOutputs, so ParallelCriterion works (the
    README's balanced-memory example as written)."""
    reference = classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wrapper's own 'no GPU' warning
        wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=device_ids, gather=False)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 7, (9,))
    outputs = wrapped(x)
    assert isinstance(outputs, dpfast.ReplicaOutputs) and outputs.chunk_sizes == [9]
    torch.testing.assert_close(outputs.gather(), reference(x))
    loss = dpfast.ParallelCriterion(nn.CrossEntropyLoss())(outputs, y)
    expected = nn.CrossEntropyLoss()(reference(x), y)
    assert torch.equal(loss, expected)
    loss.backward()
    expected.backward()
    assert_same_grads(reference, wrapped)

@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [0, 5, 5, 3], [13, 0, 0, 0], [3, 0, 10, 0]])
def test_explicit_chunk_sizes_and_empty_replicas(sizes):
    reference = classifier()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, chunk_sizes=sizes)
    calls = collections.Counter()
    wrapped.module.register_forward_pre_hook(lambda m, i: calls.update([i[0].shape[0]]))
    x = torch.randn(13, 5, dtype=torch.float64)
    out = wrapped(x)
    torch.testing.assert_close(out, reference(x))
    assert sorted(calls.elements()) == sorted(s for s in sizes if s)  # a replica with 0 rows does not run
    out.square().sum().backward()
    reference(x).square().sum().backward()
    assert_same_grads(reference, wrapped)


def test_chunk_sizes_with_keyword_only_inputs():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, *, features, scale=1.0):
            return self.lin(features) * scale

    torch.manual_seed(0)
    reference = Kw().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, chunk_sizes=[1, 3, 3, 3])
    x = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(wrapped(features=x, scale=2.0), reference(features=x, scale=2.0))


def test_bad_splits_are_named():
    with pytest.raises(ValueError, match=r"chunk_sizes: expected one entry per device \(4\), but got 3"):
        dpfast.DataParallel(classifier(), device_ids=CPU4, chunk_sizes=[1, 2, 3])
    with pytest.raises(ValueError, match=r"chunk_sizes: expected non-negative numbers, but chunk_sizes\[1\] is -2"):
        dpfast.DataParallel(classifier(), device_ids=CPU4, chunk_sizes=[1, -2, 3, 4])
    with pytest.raises(ValueError, match=r"weights: expected at least one positive weight"):
        dpfast.DataParallel(classifier(), device_ids=CPU4, weights=[0, 0, 0, 0])(torch.randn(4, 5).double())
    with pytest.raises(ValueError, match=r"chunk_sizes, weights: expected at most one of them"):
        dpfast.DataParallel(classifier(), device_ids=CPU4, weights=[1] * 4, chunk_sizes=[1] * 4)
    wrapped = dpfast.DataParallel(classifier(), device_ids=CPU4, chunk_sizes=[2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"chunk_sizes: expected sizes that sum to the batch size \(9\), but they "
                                         r"sum to 8"):
        wrapped(torch.randn(9, 5, dtype=torch.float64))
    wrapped.chunk_sizes = [3, 2, 2, 2]  # settable between calls; the wrapper works on
    assert wrapped(torch.randn(9, 5, dtype=torch.float64)).shape == (9, 7)


class LossInside(nn.Module):
    """The Hugging Face pattern: pass labels, get the loss from forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, labels):
        return nn.functional.cross_entropy(self.lin(x), labels)


def test_scalar_outputs_vector_by_default_and_weighted_mean_on_request():
    torch.manual_seed(0)
    reference = LossInside().double()
    x, labels = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    vector = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4)(x, labels)
    assert vector.shape == (4,)  # chunks of 3, 3, 3, 1
    mean = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, scalar_outputs="mean")
    loss = mean(x, labels)
    expected = reference(x, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    assert_same_grads(reference, mean)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_average_buffers_gives_whole_batch_batchnorm_statistics(momentum):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=momentum)).double()
    averaged = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, average_buffers=True,
                                   weights=[1, 2, 2, 1])
    default = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4)
    for _ in range(3):
        x = torch.randn(12, 2, 4, 4, dtype=torch.float64) * 3 + 1
        reference(x)
        averaged(x).sum().backward()  # BatchNorm's backward saved the running statistics it was given
        default(x)
    bn, ours, replica0 = reference[1], averaged.module[1], default.module[1]
    torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-10, atol=1e-12)
    assert ours.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    # By default (as nn.DataParallel) the root keeps replica 0's chunk statistics: not the whole batch's.
    assert not torch.allclose(replica0.running_var, bn.running_var)


@pytest.mark.parametrize("sizes", [[0, 8], [0, 8, 0], [0, 3, 5]], ids=["one_other", "one_other_of_three", "two_others"])
def test_average_buffers_where_replica_0_gets_no_rows(sizes):
    """The replicas that ran make the whole batch's update, also where that is one replica other
    than the root: its update is the whole batch's, and becomes the root's."""
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(4).double()
    averaged = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * len(sizes), chunk_sizes=sizes,
                                   average_buffers=True)
    for _ in range(2):
        x = torch.randn(8, 4, dtype=torch.float64) * 3 + 2
        reference(x)
        averaged(x)
    torch.testing.assert_close(averaged.module.running_mean, reference.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(averaged.module.running_var, reference.running_var, rtol=1e-10, atol=1e-12)
    assert averaged.module.num_batches_tracked.item() == reference.num_batches_tracked.item() == 2


def test_average_buffers_records_only_inside_the_wrappers_forward_and_takes_batchnorm_without_a_count():
    """The averager's pre-hook stays on the root's BatchNorm: calls of the module alone (or with the
    option turned off) keep nothing. A BatchNorm with num_batches_tracked None (momentum set) works."""
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(3).double()
    averaged = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, average_buffers=True)
    averaged(torch.randn(8, 3, dtype=torch.float64))
    averager = averaged._runtime.bn_averager
    for _ in range(5):
        averaged.module(torch.randn(8, 3, dtype=torch.float64))
    averaged.average_buffers = False
    averaged(torch.randn(8, 3, dtype=torch.float64))
    assert averager.calls == {}
    untracked = nn.BatchNorm1d(3).double()
    untracked.num_batches_tracked = None
    wrapped = dpfast.DataParallel(copy.deepcopy(untracked), device_ids=CPU4, average_buffers=True)
    x = torch.randn(8, 3, dtype=torch.float64)
    untracked(x)
    wrapped(x)
    torch.testing.assert_close(wrapped.module.running_var, untracked.running_var, rtol=1e-10, atol=1e-12)


class Siamese(nn.Module):
    """One encoder (with BatchNorm) applied to both inputs of a pair in one forward."""

    def __init__(self, momentum):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=momentum))

    def forward(self, a, b):
        return (self.encoder(a) - self.encoder(b)).pow(2).sum(1)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_average_buffers_with_a_batchnorm_called_twice_in_one_forward(momentum):
    """Each call makes one update (two per forward here): the root makes each call's whole-batch
    update in turn, as the module does on the whole batch."""
    torch.manual_seed(0)
    reference = Siamese(momentum).double()
    averaged = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3, average_buffers=True)
    for _ in range(2):
        a, b = torch.randn(9, 3, dtype=torch.float64) * 2 + 1, torch.randn(9, 3, dtype=torch.float64) - 1
        reference(a, b)
        averaged(a, b).sum().backward()
    bn, ours = reference.encoder[1], averaged.module.encoder[1]
    torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-10, atol=1e-12)
    assert ours.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4


class BatchFirstCTCLoss(nn.CTCLoss):
    """CTCLoss on (batch, time, classes) outputs, so that the batch is split along dim 0."""

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return super().forward(log_probs.transpose(0, 1), targets, input_lengths, target_lengths)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ctc_loss_on_replicas_equals_the_full_batch_loss(reduction):
    """CTCLoss's mean divides each sample's loss by its target length before the mean over
    samples; the lengths are split with the batch."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 5), nn.LogSoftmax(-1)).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3, gather=False, weights=[1, 2, 3])
    x = torch.randn(7, 8, 3, dtype=torch.float64)
    targets = torch.randint(1, 5, (7, 4))
    input_lengths, target_lengths = torch.full((7,), 8), torch.tensor([4, 2, 3, 1, 4, 2, 3])
    criterion = BatchFirstCTCLoss(reduction=reduction)
    loss = dpfast.ParallelCriterion(criterion)(wrapped(x), targets, input_lengths, target_lengths)
    expected = criterion(reference(x), targets, input_lengths, target_lengths)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    by_keyword = dpfast.ParallelCriterion(criterion)(wrapped(x), targets, input_lengths, target_lengths=target_lengths)
    torch.testing.assert_close(by_keyword, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["time_first_padded", "time_first_concatenated", "batch_first_concatenated"])
def test_ctc_targets_and_lengths_split_along_the_batch_whatever_the_outputs_dim(layout, reduction):
    """log_probs (T, N, C) from a wrapper with dim=1, and targets concatenated into one 1-D tensor
    (split by each replica's summed target lengths; lengths as a tuple of ints too): CTCLoss's
    targets and lengths have their batch first whatever the outputs' dim. Both raised a split
    error before."""
    torch.manual_seed(0)
    time_first = layout.startswith("time_first")
    reference = nn.Sequential(nn.Linear(3, 5), nn.LogSoftmax(-1)).double()
    x = torch.randn(8, 7, 3, dtype=torch.float64) if time_first else torch.randn(7, 8, 3, dtype=torch.float64)
    target_lengths = torch.tensor([4, 2, 3, 1, 4, 2, 3])
    padded = torch.randint(1, 5, (7, 4))
    targets = padded if layout.endswith("padded") else torch.cat([t[:n] for t, n in zip(padded, target_lengths)])
    input_lengths = torch.full((7,), 8)
    lengths = (input_lengths, target_lengths) if time_first else (tuple(input_lengths.tolist()),
                                                                  tuple(target_lengths.tolist()))
    criterion = nn.CTCLoss(reduction=reduction) if time_first else BatchFirstCTCLoss(reduction=reduction)
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu"] * 3, gather=False, weights=[1, 2, 3],
                                  dim=1 if time_first else 0)
    loss = dpfast.ParallelCriterion(criterion)(wrapped(x), targets, *lengths)
    expected = criterion(reference(x), targets, *lengths)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    expected.sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_on_cpu_replicas_and_grad_scaler_skips_in_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    wrapped = dpfast.DataParallel(model, device_ids=CPU4)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(x)
    assert out.dtype == torch.bfloat16
    scaler.scale(out.float().square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(x)
    scaler.scale(out.float().sum() * float("inf")).backward()  # an overflow in the reduced gradients
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # step skipped on the root
    torch.testing.assert_close(wrapped(x), model(x))  # and the replicas follow the root


class FakeNvml:
    def __init__(self, devices):
        self._devices = devices

    def devices(self):
        return self._devices


def gpu(uuid, bus, free_gib, util, total_gib=80):
    return {"uuid": uuid, "pci_bus_id": bus, "free_bytes": free_gib * 2**30, "total_bytes": total_gib * 2**30,
            "utilization_percent": util}


def test_auto_device_selection_with_fake_nvml():
    physical = [gpu("GPU-a", "00000000:17:00.0", 70, 5), gpu("GPU-b", "00000000:65:00.0", 10, 0),
                gpu("GPU-c", "00000000:CA:00.0", 75, 90), gpu("GPU-d", "00000000:E3:00.0", 60, 10)]
    # CUDA_VISIBLE_DEVICES=3,0,2: torch's index 0 is physical d, 1 is a, 2 is c.
    visible = [{"uuid": "GPU-d", "pci_bus_id": "x"}, {"uuid": "GPU-a", "pci_bus_id": "y"},
               {"uuid": "GPU-c", "pci_bus_id": "z"}]
    assert dp_devices.select_devices(physical, visible) == [1, 0]  # a (most free) then d; c is busy
    # Matching by PCI bus id when torch reports no UUID (domain written without its leading zeros).
    by_bus = [{"uuid": "", "pci_bus_id": "0000:65:00.0"}, {"uuid": "", "pci_bus_id": "0000:17:00.0"}]
    assert dp_devices.select_devices(physical, by_bus) == [1]  # b has 10 of 80 GiB free: busy
    assert dp_devices.select_devices(physical, by_bus, min_free_fraction=0.1) == [1, 0]
    with pytest.raises(RuntimeError, match=r"device_ids='auto': expected at least one GPU that is not busy"):
        dp_devices.auto_device_ids(nvml_source=FakeNvml([physical[2]]), cuda_identities=[{"uuid": "GPU-c",
                                                                                            "pci_bus_id": ""}])


def test_auto_devices_fall_back_without_gpus():
    if torch.cuda.is_available():
        pytest.skip("checks the fallback on a machine without GPUs")
    with pytest.warns(UserWarning, match=r"device_ids='auto': no CUDA GPU is visible"):
        wrapped = dpfast.DataParallel(classifier(), device_ids="auto")
    assert wrapped.device_ids == [] and wrapped(torch.randn(3, 5, dtype=torch.float64)).shape == (3, 7)


def test_imbalance_warning_names_the_fix():
    small = types.SimpleNamespace(total_memory=16 * 2**30, multi_processor_count=80)
    large = types.SimpleNamespace(total_memory=80 * 2**30, multi_processor_count=132)
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.warns(UserWarning, match=r"GPU 0 has less than 75% of the total memory of GPU 1\. Give it less work "
                                         r"with weights= or chunk_sizes="):
        assert dp_devices.warn_on_imbalance(devices, False, properties=[small, large])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dp_devices.warn_on_imbalance(devices, True, properties=[small, large])
        assert not dp_devices.warn_on_imbalance(devices, False, properties=[large, large])


def test_checkpoint_helpers_both_directions():
    plain = classifier()
    wrapped = dpfast.DataParallel(classifier(), device_ids=CPU4)
    wrapped_sd = wrapped.state_dict()
    assert list(dpfast.unwrap_state_dict(wrapped_sd)) == list(plain.state_dict())
    assert list(dpfast.wrap_state_dict(plain.state_dict())) == list(wrapped_sd)
    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 7)).double()
    wrapped.load_state_dict(other.state_dict())  # a plain state_dict into the wrapper
    dpfast.load_state_dict(plain, wrapped.state_dict())  # a wrapped one into a plain module
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), other(x))
    torch.testing.assert_close(plain(x), other(x))
    bn = nn.BatchNorm1d(3)
    assert dpfast.unwrap_state_dict(dpfast.wrap_state_dict(bn.state_dict()))._metadata[""]["version"] == 2
    broken = dpfast.unwrap_state_dict(wrapped.state_dict())
    del broken["2.bias"]
    with pytest.raises(RuntimeError, match=r"dpfast.load_state_dict: state_dict: expected the keys of Sequential .* "
                                           r"but 1 are missing \['2.bias'\] and 0 are unexpected"):
        dpfast.load_state_dict(wrapped, broken)



class _HoldsModule(nn.Module):
    """A module with a child named `module` (a user's own wrapper class): its plain keys start
    with `module.` too."""

    def __init__(self, with_head: bool):
        super().__init__()
        self.module = nn.Linear(3, 2).double()
        if with_head:
            self.head = nn.Linear(2, 2).double()

    def forward(self, x):
        x = self.module(x)
        return self.head(x) if hasattr(self, "head") else x


@pytest.mark.parametrize("with_head", [True, False], ids=["and_another_child", "only_child"])
def test_plain_state_dict_of_a_module_with_a_child_named_module_loads(with_head):
    torch.manual_seed(0)
    source = _HoldsModule(with_head)
    plain = source.state_dict()
    assert all(k.startswith("module.") for k in plain) != with_head
    for load in (lambda w, sd: w.load_state_dict(sd), dpfast.load_state_dict):
        torch.manual_seed(1)
        wrapped = dpfast.DataParallel(_HoldsModule(with_head), device_ids=CPU4)
        load(wrapped, plain)
        for key, value in source.state_dict().items():
            assert torch.equal(wrapped.module.state_dict()[key], value), key
        load(wrapped, wrapped.state_dict())  # and the wrapper's own form still loads as it is
    target = _HoldsModule(with_head)
    dpfast.load_state_dict(target, dpfast.DataParallel(source, device_ids=CPU4).state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_state_dict_lets_modules_upgrade_old_checkpoints():
    """An old BatchNorm checkpoint (version 1, no num_batches_tracked) and an old weight_norm one
    (weight_g, weight_v) load through dpfast.load_state_dict as into the module itself: the keys
    are checked after the modules' own load hooks."""
    def old_batchnorm_state(module):
        state = module.state_dict()
        del state["1.num_batches_tracked"]
        state._metadata["1"]["version"] = 1
        return state

    for target in (nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)),
                   dpfast.DataParallel(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), device_ids=CPU4)):
        source = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        with torch.no_grad():
            source[1].running_mean.fill_(2.0)
        dpfast.load_state_dict(target, old_batchnorm_state(source))
        loaded = target.module if isinstance(target, dpfast.DataParallel) else target
        assert torch.equal(loaded[1].running_mean, source[1].running_mean)
    old = nn.utils.weight_norm(nn.Linear(2, 3))
    new = nn.utils.parametrizations.weight_norm(nn.Linear(2, 3))
    dpfast.load_state_dict(new, old.state_dict())
    x = torch.randn(4, 2)
    torch.testing.assert_close(new(x), old(x))


def test_a_partial_plain_checkpoint_of_a_module_with_a_child_named_module_loads_with_strict_false():
    torch.manual_seed(0)
    source = _HoldsModule(with_head=False)
    partial = dict(source.state_dict(), **{"fc.weight": torch.zeros(1)})  # a pretrained part and an extra key
    for load in (lambda w, sd: w.load_state_dict(sd, strict=False),
                 lambda w, sd: dpfast.load_state_dict(w, sd, strict=False)):
        torch.manual_seed(1)
        wrapped = dpfast.DataParallel(_HoldsModule(with_head=False), device_ids=CPU4)
        load(wrapped, partial)
        assert torch.equal(wrapped.module.module.weight, source.module.weight)


def test_chunk_sizes_and_weights_given_as_iterators_are_kept():
    wrapped = dpfast.DataParallel(nn.Linear(2, 2), device_ids=CPU4[:2], chunk_sizes=iter([1, 3]))
    assert wrapped.chunk_sizes == [1, 3] and wrapped(torch.randn(4, 2)).shape == (4, 2)
    weighted = dpfast.DataParallel(nn.Linear(2, 2), device_ids=CPU4[:2], weights=(w for w in (1, 3)))
    assert weighted.weights == [1, 3] and weighted(torch.randn(4, 2)).shape == (4, 2)

def test_wrap_state_dict_metadata_is_a_wrappers():
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    wrapped = dpfast.wrap_state_dict(module.state_dict())
    assert wrapped._metadata == dpfast.DataParallel(module, device_ids=CPU4).state_dict()._metadata
    assert wrapped._metadata == nn.DataParallel(module).state_dict()._metadata

def test_auto_moves_a_cpu_module_to_the_first_chosen_gpu_helper():
    from dpfast.data_parallel import module_device_is_cpu

    assert module_device_is_cpu(nn.Linear(3, 3))  # a multi-element parameter: no truth-value error
    assert module_device_is_cpu(nn.ReLU())
    assert not module_device_is_cpu(nn.BatchNorm1d(3, affine=False).to("meta"))


def test_a_profilers_trace_names_the_wrappers_forward():
    # The step's name is recorded only while a profiler runs (it costs ~30 us a step otherwise).
    wrapped = dpfast.DataParallel(classifier(), device_ids=["cpu"] * 2)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        wrapped(x).sum().backward()
    assert "dpfast.DataParallel.forward" in {event.name for event in profile.events()}
    wrapped.zero_grad()
    reference = classifier()
    reference(x).sum().backward()
    wrapped(x).sum().backward()  # and without a profiler, the same step
    assert_same_grads(reference, wrapped)


def test_a_hook_on_a_root_parameter_is_warned_about_once():
    # It sees replica 0's share only (nn.DataParallel's sees the sum): a silent difference otherwise.
    wrapped = dpfast.DataParallel(classifier(), device_ids=["cpu"] * 2)
    wrapped.module[0].weight.register_hook(lambda grad: grad.clamp(-0.1, 0.1))
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"hooks registered on parameters \('0.weight'\).*replica 0's share"):
        wrapped(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x).sum().backward()  # said once
    quiet = dpfast.DataParallel(classifier(), device_ids=["cpu"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(x).sum().backward()  # no hooks, no warning


@pytest.mark.parametrize("criterion, target", [
    (nn.MultiMarginLoss(), lambda n: torch.randint(0, 7, (n,))),
    (nn.MultiLabelSoftMarginLoss(), lambda n: torch.randint(0, 2, (n, 7)).double()),
    (nn.MultiLabelMarginLoss(), lambda n: torch.randint(-1, 7, (n, 7))),
    (nn.SmoothL1Loss(), lambda n: torch.randn(n, 7, dtype=torch.float64)),
], ids=["multi_margin", "multilabel_soft_margin", "multilabel_margin", "smooth_l1"])
def test_parallel_criterion_means_of_row_wise_losses_equal_the_full_batch(criterion, target):
    # torch's mean divides by the unreduced loss's size: one per row for these margin losses, not
    # one per output element (it was 1/C of the true value).
    reference = classifier()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, gather=False)
    x = torch.randn(11, 5, dtype=torch.float64)
    y = target(11)
    loss = dpfast.ParallelCriterion(criterion)(wrapped(x), y)
    expected = criterion(reference(x), y)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.backward()
    expected.backward()
    assert_same_grads(reference, wrapped)
