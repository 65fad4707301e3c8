"""Bad input gets a clear error naming the argument, the expectation and what
was given, before any device work; an error inside a replica names the
replica and device; afterwards the wrapper still works."""

import copy
import gc
import threading
import warnings

import pytest
import torch
from torch import nn

import dpfast

CPU4 = ["cpu"] * 4


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()


@pytest.mark.parametrize("device_ids,error,pattern", [
    (["tpu"], ValueError, r"device_ids\[0\]: expected a device such as 'cpu' or 'cuda:0', but got 'tpu'"),
    (["cpu", 3.5], TypeError, r"device_ids\[1\]: expected a CUDA index, 'cpu', 'cuda:N' or a torch.device, but got 3.5"),
    ("cpu", TypeError, r"device_ids: expected a list of devices, but got 'cpu' \(str\); write \['cpu'\]"),
    ([True], TypeError, r"device_ids\[0\]: expected a CUDA index"),
])
def test_bad_device_ids(device_ids, error, pattern):
    with pytest.raises(error, match=pattern):
        dpfast.DataParallel(make(), device_ids=device_ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
@pytest.mark.parametrize("device_ids", [[0, 1], [], [-1]])
def test_cuda_device_ids_without_cuda_run_the_module_directly_as_nn_dataparallel(device_ids):
    model = make()
    wrapped = dpfast.DataParallel(model, device_ids=device_ids, output_device=0)
    theirs = torch.nn.DataParallel(model, device_ids=device_ids, output_device=0)
    x = torch.randn(4, 4, dtype=torch.float64)
    assert wrapped.device_ids == theirs.device_ids == []
    torch.testing.assert_close(wrapped(x), theirs(x))
    with pytest.raises(ValueError, match=r"device_ids\[1\]: expected an available device, but got cuda:0 and CUDA is "
                                         r"not available here"):
        dpfast.DataParallel(model, device_ids=["cpu", 0])  # naming the CPU too: a mix, not GPU code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_empty_device_list_with_cuda_is_rejected():
    with pytest.raises(ValueError, match=r"device_ids: expected at least one device, but got an empty list"):
        dpfast.DataParallel(make().cuda(), device_ids=[])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixing_cpu_and_cuda_is_rejected():
    with pytest.raises(ValueError, match=r"expected devices of one type, but got a mix of CPU and CUDA"):
        dpfast.DataParallel(make().cuda(), device_ids=[0, "cpu"])


def test_module_on_the_wrong_device():
    wrapped = dpfast.DataParallel(make().to("meta"), device_ids=CPU4)  # it may still move, as with nn.DataParallel
    with pytest.raises(RuntimeError, match=r"module must have its parameters and buffers on device cpu \(device_ids\[0\]\) "
                                           r"but found one of them on device: meta"):
        wrapped(torch.randn(4, 4, dtype=torch.float64))
    wrapped.to_empty(device="cpu")
    assert wrapped(torch.randn(4, 4, dtype=torch.float64)).shape == (4, 2)


def test_module_moved_after_wrapping_is_caught_at_forward():
    wrapped = dpfast.DataParallel(make(), device_ids=CPU4)
    wrapped(torch.randn(4, 4, dtype=torch.float64))
    wrapped.module.to("meta")
    with pytest.raises(RuntimeError, match=r"module must have its parameters and buffers on device cpu"):
        wrapped(torch.randn(4, 4, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, but got Tensor"):
        dpfast.DataParallel(torch.zeros(1), device_ids=CPU4)
    with pytest.raises(TypeError, match=r"dim: expected an int, but got '0' \(str\)"):
        dpfast.DataParallel(make(), device_ids=CPU4, dim="0")
    with pytest.raises(ValueError, match=r"tree_shape: expected 'auto', 'chain' or 'binomial', but got 'ring'"):
        dpfast.DataParallel(make(), device_ids=CPU4, tree_shape="ring")
    with pytest.raises(ValueError, match=r"bucket_cap_mb: expected a positive, finite number of megabytes, but got 0"):
        dpfast.DataParallel(make(), device_ids=CPU4, bucket_cap_mb=0)


@pytest.mark.parametrize("option,error,pattern", [
    ({"bucket_cap_mb": float("inf")}, ValueError, r"bucket_cap_mb: expected a positive, finite number of megabytes, "
                                                  r"but got inf"),
    ({"bucket_cap_mb": "25"}, ValueError, r"bucket_cap_mb: expected a positive, finite number of megabytes, but got "
                                          r"'25'"),
    ({"chunk_sizes": 12}, ValueError, r"chunk_sizes: expected a sequence of one entry per device \(4\), but got 12"),
    ({"chunk_sizes": "1234"}, ValueError, r"chunk_sizes: expected a sequence of one entry per device \(4\), but got "
                                          r"'1234'"),
    ({"chunk_sizes": [1.5, 2, 2.5, 0]}, ValueError, r"chunk_sizes: expected whole numbers of rows, but got "
                                                    r"\[1.5, 2, 2.5, 0\]"),
    ({"weights": [0, 0, 0, 0]}, ValueError, r"weights: expected at least one positive weight, but got \[0, 0, 0, 0\]"),
    ({"gather": "no"}, TypeError, r"gather: expected True or False, but got 'no'"),
    ({"average_buffers": None}, TypeError, r"average_buffers: expected True or False, but got None"),
    ({"trust_version_counters": 2}, TypeError, r"trust_version_counters: expected True or False, but got 2"),
    ({"process_group": "gloo"}, TypeError, r"process_group: expected None or a torch.distributed process group"),
], ids=["bucket_inf", "bucket_str", "chunk_sizes_int", "chunk_sizes_str", "chunk_sizes_fraction", "weights_zero",
        "gather_str", "average_buffers_none", "trust_int", "process_group_str"])
def test_bad_options_name_the_argument(option, error, pattern):
    with pytest.raises(error, match=pattern):
        dpfast.DataParallel(make(), device_ids=CPU4, **option)


def test_numpy_sizes_and_weights_are_numbers():
    """chunk_sizes and weights taken from numpy (an array, np.int64, np.float32) split the batch as
    the same Python numbers do."""
    np = pytest.importorskip("numpy")
    x = torch.randn(12, 4, dtype=torch.float64)
    reference = make()
    for option in ({"chunk_sizes": np.array([2, 4, 4, 2])}, {"chunk_sizes": [np.int64(3)] * 4},
                   {"weights": [np.float32(1), np.float32(2), np.float32(2), np.float32(1)]}):
        wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, gather=False, **option)
        outputs = wrapped(x)
        assert sum(outputs.chunk_sizes) == 12 and all(type(n) is int for n in outputs.chunk_sizes)
        torch.testing.assert_close(outputs.gather(), reference(x), rtol=1e-12, atol=1e-12)
    # numpy's bools and numbers, 0 and 1, and a one-element tensor stand for the flags and sizes they hold
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4, gather=np.False_, average_buffers=0,
                                  trust_version_counters=np.bool_(True), bucket_cap_mb=torch.tensor(0.5))
    assert (wrapped.gather_outputs, wrapped.average_buffers, wrapped.trust_version_counters) == (False, False, True)
    assert wrapped.bucket_cap_mb == 0.5


def test_mismatched_batch_sizes():
    class Two(nn.Module):
        def forward(self, a, b=None):
            return a

    wrapped = dpfast.DataParallel(Two(), device_ids=CPU4)
    with pytest.raises(ValueError, match=r"inputs: expected every input tensor to have the same size along dim 0 "
                                         r"\(the batch\), a whole multiple of it \(rows per sample\), or one row per replica, but inputs\[0\] has 8 and kwargs\['b'\] has 6"):
        wrapped(torch.zeros(8, 2), b=torch.zeros(6, 2))


@pytest.mark.parametrize("device_ids", [CPU4, ["cpu"]])
def test_an_empty_batch_gives_the_modules_empty_output_as_nn_dataparallel(device_ids):
    wrapped = dpfast.DataParallel(make(), device_ids=device_ids)
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = wrapped(x)
    assert out.shape == (0, 2)
    out.sum().backward()
    assert x.grad.shape == (0, 4)
    assert wrapped(torch.ones(8, 4, dtype=torch.float64)).shape == (8, 2)  # and the next batch as usual


def test_a_meta_tensor_input_is_named_before_anything_is_built():
    wrapped = dpfast.DataParallel(make(), device_ids=CPU4)
    with pytest.raises(ValueError, match=r"kwargs: expected tensors that hold data to scatter to the replicas, but "
                                         r"kwargs\['x'\] is a meta tensor \(shape \(8, 4\)\)"):
        wrapped(x=torch.empty(8, 4, dtype=torch.float64, device="meta"))
    assert wrapped._runtime is None  # no threads, buckets or replicas for a call that could not run
    x = torch.randn(8, 4, dtype=torch.float64)
    assert torch.equal(wrapped(x), wrapped.module(x))

def test_dim_out_of_range():
    wrapped = dpfast.DataParallel(make(), device_ids=CPU4)
    wrapped3 = dpfast.DataParallel(make(), device_ids=CPU4, dim=3)
    with pytest.raises(ValueError, match=r"dim: expected a dimension in \[-2, 2\) of every input tensor, but got dim=3 "
                                         r"and inputs\[0\] has shape \(8, 4\)"):
        wrapped3(torch.zeros(8, 4, dtype=torch.float64))


class Faulty(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.fail_on = None

    def forward(self, x):
        if self.fail_on is not None and bool((x[:, 0] == self.fail_on).any()):
            raise self.error
        return self.lin(x)


@pytest.mark.parametrize("error", [ValueError("boom"), KeyError("missing"), KeyboardInterrupt(),
                                   ZeroDivisionError("zero")])
def test_exception_in_a_replica_names_it_and_the_wrapper_trains_on(error):
    torch.manual_seed(0)
    reference = Faulty().double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU4)
    x = torch.randn(8, 4, dtype=torch.float64)
    wrapped(x)  # starts the persistent workers
    gc.collect()  # earlier tests' wrappers stop their workers when collected
    threads = threading.active_count()
    x[5, 0] = 99.0  # rows 4..5: replica 2
    wrapped.module.fail_on, wrapped.module.error = 99.0, error
    expected = rf"Caught {type(error).__name__} in replica 2 on device cpu.\nOriginal Traceback[\s\S]*\n\(replica 2 ran a batch chunk of 2 rows\)"
    with pytest.raises(type(error), match=expected):
        wrapped(x)
    wrapped.module.fail_on = None
    x[5, 0] = 0.5
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    gc.collect()
    assert threading.active_count() == threads  # no worker leaked or lost
    assert all(t.is_alive() for t in wrapped._ensure_runtime().pool.threads)


def test_exception_in_replica_zero_is_named_too():
    wrapped = dpfast.DataParallel(Faulty(), device_ids=CPU4)
    x = torch.randn(8, 4)
    x[0, 0] = 7.0
    wrapped.module.fail_on, wrapped.module.error = 7.0, RuntimeError("first chunk")
    with pytest.raises(RuntimeError, match=r"in replica 0 on device cpu"):
        wrapped(x)


def test_uninitialized_lazy_module_is_named_and_the_wrapper_works_once_initialized():
    model = nn.Sequential(nn.LazyLinear(3))
    wrapped = dpfast.DataParallel(model, device_ids=CPU4)
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match=r"module: expected initialized parameters and buffers, but found "
                                           r"uninitialized ones \(a lazy module such as nn.LazyLinear\)\. Modules with "
                                           r"uninitialized parameters can't be used with `DataParallel`"):
        wrapped(x)
    model(x)  # the module alone initializes its parameters
    torch.testing.assert_close(wrapped(x), model(x))
    assert wrapped.stats()["replica_builds"] == 1


def test_a_torchscript_part_is_named_in_a_clear_error_and_the_eager_module_works():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = nn.Sequential(torch.jit.script(copy.deepcopy(eager[0])), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match=r"module: expected Python modules, but found a TorchScript module "
                                           r"\(torch.jit.script or torch.jit.trace\) at '0'"):
        dpfast.DataParallel(scripted, device_ids=CPU4)(x)
    wrapped = dpfast.DataParallel(eager, device_ids=CPU4)
    torch.testing.assert_close(wrapped(x), eager(x))


def test_a_dpfast_wrapper_inside_another_is_refused_and_stays_usable():
    # The outer's replicas would share the inner wrapper's threads and replicas and break it.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 3))
    inner = dpfast.DataParallel(module, device_ids=CPU4)
    x = torch.randn(8, 5)
    outer = dpfast.DataParallel(nn.Sequential(inner), device_ids=CPU4)
    with pytest.raises(RuntimeError, match=r"module: expected a module without a dpfast.DataParallel inside, "
                                           r"but found one at '0'"):
        outer(x)
    torch.testing.assert_close(inner(x), module(x))


def test_device_ids_changed_after_construction_is_an_error_naming_it():
    module = nn.Sequential(nn.Linear(5, 3))
    wrapped = dpfast.DataParallel(module, device_ids=CPU4)
    x = torch.randn(8, 5)
    devices = wrapped.device_ids
    wrapped.device_ids = devices[:2]
    with pytest.raises(ValueError, match=r"device_ids: expected the devices the wrapper was made with"):
        wrapped(x)
    wrapped.device_ids = devices
    torch.testing.assert_close(wrapped(x), module(x))


def test_wrappers_that_are_not_replicated_may_nest():
    # Double wrapping on one device (resume code often does it) and a pass-through inner wrapper
    # work, as under nn.DataParallel; the same devices given again as a tuple or strings are no change.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(8, 5)
    double = dpfast.DataParallel(dpfast.DataParallel(module, device_ids=["cpu"]), device_ids=["cpu"])
    torch.testing.assert_close(double(x), module(x))
    wrapped = dpfast.DataParallel(module, device_ids=CPU4)
    wrapped.device_ids = tuple(wrapped.device_ids)
    torch.testing.assert_close(wrapped(x), module(x))
    wrapped.device_ids = ["cpu"] * 4
    torch.testing.assert_close(wrapped(x), module(x))


def test_a_replicas_error_reads_as_nn_dataparallels():
    """PyTorch's test_parallel_apply_passes_exception, through the wrapper: nn.DataParallel's own
    wording, then the replica's traceback; dpfast's addition (the chunk) comes last."""

    class Missing(nn.Module):
        def forward(self, *args):
            return {}["wonderful"]

    wrapped = dpfast.DataParallel(Missing(), device_ids=["cpu"] * 2)
    with pytest.raises(KeyError, match=r"Caught KeyError in replica \d on device cpu.\nOriginal Traceback \(most "
                                       r"recent call last\):\n  File"):
        wrapped(torch.zeros(4, 1))


class Unprintable(Exception):
    """An exception whose traceback cannot be formatted (its notes raise)."""

    @property
    def __notes__(self):
        raise TypeError("notes unavailable")


class FailsOnWorkers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        if threading.current_thread().name.startswith("dpfast-replica"):  # a worker's replica, not the caller's
            raise Unprintable("bad")
        return self.linear(x)


def test_an_exception_whose_traceback_cannot_be_formatted_is_raised_not_waited_for():
    """The replica's traceback is formatted where it is caught: where that fails, the caller still
    gets the exception, named as usual (it waited forever for a worker whose thread had died)."""
    wrapped = dpfast.DataParallel(FailsOnWorkers(), device_ids=["cpu"] * 2)
    caught = []

    def call():
        try:
            wrapped(torch.randn(4, 3))
        except Unprintable as error:
            caught.append(str(error))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the call hung"
    assert caught and caught[0].startswith("Caught Unprintable in replica 1 on device cpu.\nOriginal Unprintable "
                                           "(its traceback could not be formatted: TypeError)"), caught


def test_a_criterion_argument_without_the_batch_dim_is_named():
    """ParallelCriterion scatters its extra arguments along the wrapper's dim: a 1-D tensor with
    dim=1 gets the engine's error naming the dim and the shape, not an IndexError."""
    wrapped = dpfast.DataParallel(nn.Linear(3, 3), device_ids=["cpu"] * 2, dim=1, gather=False)
    out = wrapped(torch.randn(5, 4, 3))
    criterion = dpfast.ParallelCriterion(lambda o, t, scale: ((o - t) ** 2 * scale).mean())
    with pytest.raises(RuntimeError, match=r"dpfast.scatter: expected dim in \[-1, 1\) for a tensor of shape \[3\], "
                                           r"but got 1"):
        criterion(out, torch.randn(5, 4, 3), torch.ones(3))


def test_outputs_that_cannot_be_concatenated_name_the_output_and_replica():
    """pad_packed_sequence without total_length pads each replica's chunk to its own longest
    sequence: the gather's error says which output and which replica, and the wrapper works on."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x, lengths):
            longest = int(lengths.max())
            return {"logits": self.proj(x), "padded": self.proj(x)[:, :longest]}

    wrapped = dpfast.DataParallel(Padded(), device_ids=["cpu"] * 2)
    x = torch.randn(4, 6, 3)
    with pytest.raises(RuntimeError, match=r"outputs\['padded'\]: expected every replica's tensor to match replica "
                                           r"0's shape \[2, 6, 3\] in every dimension except dim 0, but replica 1 "
                                           r"returned shape \[2, 4, 3\]"):
        wrapped(x, torch.tensor([6, 5, 4, 3]))
    out = wrapped(x, torch.tensor([6, 5, 6, 3]))
    assert out["padded"].shape == (4, 6, 3)
    out["logits"].sum().backward()
    assert wrapped.module.proj.weight.grad is not None


@pytest.mark.parametrize("grad", [True, False])
def test_an_output_without_the_gather_dim_is_named_with_or_without_grad(grad):
    """dim=1 and a per-row output of one dimension: the same IndexError (torch's type, as
    nn.DataParallel's gather raises) naming the output, whether the gather is autograd's node
    or the engine's call; the wrapper works on."""
    class PerRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x, per_sequence=False):
            out = self.proj(x)
            return {"seq": out, "per_row": out.sum((1, 2)) if per_sequence else out.sum(2)}

    wrapped = dpfast.DataParallel(PerRow(), device_ids=["cpu"] * 2, dim=1)
    x = torch.randn(2, 4, 3)
    with torch.set_grad_enabled(grad):
        with pytest.raises(IndexError, match=r"outputs\['per_row'\]: expected tensors with a dimension 1 to gather "
                                             r"along \(dim in \[-1, 1\)\), but replica 0 returned shape \[2\]"):
            wrapped(x, per_sequence=True)
        out = wrapped(x)
    assert out["seq"].shape == (2, 4, 3) and torch.equal(out["per_row"], wrapped.module(x)["per_row"])


@pytest.mark.parametrize("parallel_backward", ["0", "1"])
def test_forward_mode_ad_is_not_implemented_as_under_nn_data_parallel(monkeypatch, parallel_backward):
    """nn.DataParallel's Python functions have no jvp: NotImplementedError. The engine's scatter and
    gather say so too, before a tangent could be dropped; the wrapper trains afterwards."""
    monkeypatch.setenv("DPFAST_PARALLEL_BACKWARD", parallel_backward)
    torch.manual_seed(0)
    reference = nn.Linear(4, 3).double()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=["cpu", "cpu"])
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"dpfast\.scatter: forward-mode AD"):
            wrapped(dual)
    wrapped(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
