"""PyTorch's own nn.DataParallel tests (test/distributed/test_data_parallel.py, pytorch/pytorch
@8845674), ported to dpfast.DataParallel on CPU replicas: what nn.DataParallel's users and its
own suite expect.

Translation: cuda:0 / cuda:1 / device_ids (0, 1) -> device_ids=["cpu"] * N (N = 2, some also 4);
torch.nn.parallel.data_parallel -> dpfast.data_parallel; torch.cuda.amp.autocast ->
torch.autocast("cpu", bfloat16); sizes shrunk. Tests of behaviour the README documents as
different are named test_doc_* and check the documented behaviour. Ported by a helper session
(2026-11-28) and adopted as they passed.
"""

import contextlib
import gc
import io
import re
import warnings
from collections import OrderedDict
from copy import deepcopy
from itertools import product

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck as _gradcheck
from torch.testing import assert_close

import dpfast


CPU2 = ["cpu"] * 2
CPU4 = ["cpu"] * 4
NDEVS = [2, 4]


@pytest.fixture(autouse=True)
def _default_double():
    # PyTorch's file does torch.set_default_dtype(torch.double) at import; keep it per test.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.double)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def gradcheck(fn, inputs):
    return _gradcheck(fn, inputs, check_batched_grad=False)


# --------------------------------------------------------------------------------------------
# TestDataParallel
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", NDEVS)
def test_data_parallel_buffers_requiring_grad(n):
    class TestModule(nn.Module):
        def __init__(self, t):
            super().__init__()
            self.register_buffer('t_rg', t)
            self.register_buffer('t_not_rg', t.clone().detach())

        def forward(self, x):
            return x * self.t_rg + self.t_not_rg

    m = TestModule(torch.randn(100, requires_grad=True))
    assert m.t_rg.requires_grad

    dpm = dpfast.DataParallel(m, ["cpu"] * n)
    inp = torch.randn(n, 100)

    def fn(t):
        return dpm(inp)

    assert gradcheck(fn, (m.t_rg,))


def test_data_parallel_rnn():
    class TestModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(30, 64, 1, batch_first=True, bidirectional=True)

        def forward(self, x):
            self.rnn.flatten_parameters()
            return self.rnn(x)

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=10)
        input = torch.ones(4, 4, 30)
        output = model(input)
        loss = F.mse_loss(output[0], torch.zeros_like(output[0]))
        loss.backward()
        opt.step()

    with torch.no_grad():
        model = TestModule()
        model_dp = dpfast.DataParallel(deepcopy(model), CPU2)
        # make sure DP does not crash when grad is disabled (#21108)
        model_dp(torch.rand(2, 4, 30))

    step(model)
    step(model_dp)

    for p1, p2 in zip(model.parameters(), model_dp.parameters()):
        assert p1.allclose(p2)


def test_data_parallel_lazy_linear_raises():
    # PyTorch: RuntimeError 'Modules with uninitialized parameters'. dpfast documents its own
    # message; the type (RuntimeError) is the same.
    with pytest.raises(RuntimeError, match="uninitialized"):
        model_dp = dpfast.DataParallel(torch.nn.LazyLinear(10), CPU2)
        model_dp(torch.rand(10, 10))


def test_data_parallel_lazy_linear_exact_message():
    with pytest.raises(RuntimeError, match='Modules with uninitialized parameters'):
        model_dp = dpfast.DataParallel(torch.nn.LazyLinear(10), CPU2)
        model_dp(torch.rand(10, 10))


def test_parallel_apply_passes_exception():
    # ported to the wrapper: both replicas (one device twice) raise KeyError
    class TestModule(nn.Module):
        def forward(self, *args):
            return {}['wonderful']

    l1 = TestModule()
    dpm = dpfast.DataParallel(l1, CPU2)
    with pytest.raises(KeyError, match=r'Caught KeyError in replica \d on device cpu[^\n]*\nOriginal Traceback'
                                       r'[\s\S]+wonderful'):
        dpm(torch.randn(4, 3))
    # the wrapper keeps working (dpfast's claim), and a later replica error too
    with pytest.raises(KeyError):
        dpm(torch.randn(4, 3))


def test_parallel_apply_passes_exception_exact_pytorch_regex():
    # PyTorch's literal regex with the device renamed: 'on device cpu.\nOriginal Traceback' (one
    # character between the device and the newline).
    class TestModule(nn.Module):
        def forward(self, *args):
            return {}['wonderful']

    dpm = dpfast.DataParallel(TestModule(), CPU2)
    with pytest.raises(KeyError) as info:
        dpm(torch.randn(4, 3))
    msg = str(info.value)
    assert re.search('Caught KeyError in replica \\d on device cpu.\nOriginal Traceback[\\s\\S]+wonderful', msg), msg


@pytest.mark.parametrize("n", NDEVS)
def test_data_parallel_multiple_input(n):
    devs = ["cpu"] * n

    class TestModule(nn.Module):
        def forward(self, var1, var2, float1, var3=None):
            if var3 is None:
                return float1 * (var1 * var2)
            else:
                return float1 * (var1 * var2 + var3)

    m = TestModule()
    var1 = torch.randn(5, 5, dtype=torch.float, requires_grad=True)
    var2 = torch.randn(5, 5, dtype=torch.float, requires_grad=True)
    var3 = torch.randn(5, 5, dtype=torch.float, requires_grad=False)
    float1 = torch.randn(1).item()

    expected = m(var1, var2, float1)
    expected.sum().backward()
    gvar1_exp = var1.grad.clone()
    gvar2_exp = var2.grad.clone()

    def local_test(out, expected):
        with torch.no_grad():
            var1.grad.fill_(0.0)
            var2.grad.fill_(0.0)
        out.sum().backward()
        assert_close(out, expected)
        assert_close(gvar1_exp, var1.grad)
        assert_close(gvar2_exp, var2.grad)

    local_test(dpfast.data_parallel(m, (var1, var2, float1), devs), expected)
    local_test(dpfast.data_parallel(m, (var1, var2, float1), ["cpu"]), expected)

    with torch.no_grad():
        var1.grad.fill_(0.0)
        var2.grad.fill_(0.0)
    expected = m(var1, var2, float1, var3=var3)
    expected.sum().backward()
    gvar1_exp = var1.grad.clone()
    gvar2_exp = var2.grad.clone()

    dpm = dpfast.DataParallel(TestModule(), devs)
    local_test(dpm(var1, var2, float1, var3=var3), expected)

    dpm = dpfast.DataParallel(TestModule(), device_ids=["cpu"])
    local_test(dpm(var1, var2, float1, var3=var3), expected)

    dpm = dpfast.DataParallel(TestModule())  # device_ids=None, no CUDA: the module runs itself
    local_test(dpm(var1, var2, float1, var3=var3), expected)

    kwarg_wrap = {'var3': var3}
    local_test(dpfast.data_parallel(m, (var1, var2, float1), devs, module_kwargs=kwarg_wrap), expected)
    local_test(dpfast.data_parallel(m, (var1, var2, float1), ["cpu"], module_kwargs=kwarg_wrap), expected)


def test_data_parallel_small_back():
    l = nn.Linear(10, 5).float()
    i = torch.randn(20, 10, dtype=torch.float)
    out = dpfast.data_parallel(l, i, CPU2)
    assert_close(out, l(i))


def test_data_parallel_model_device():
    """device[0] check at forward time. No second real device here: 'meta' stands in for the
    wrong device, cpu for device_ids[0]."""
    error_msg = "module must have its parameters and buffers on device {}"
    inp = torch.randn(2, 2)

    def test(inner_m, dp_to_empty, device_ids, should_fail):
        ctx = (pytest.raises(RuntimeError, match=re.escape(error_msg.format(torch.device("cpu"))))
               if should_fail else contextlib.nullcontext())
        dpm = dpfast.DataParallel(inner_m, device_ids)
        if dp_to_empty:
            dpm = dpm.to_empty(device="cpu")
        with ctx:
            dpm(inp)
        if not dp_to_empty:
            with ctx:
                dpfast.data_parallel(inner_m, inp, device_ids)

    l = nn.Linear(2, 2)
    test(deepcopy(l).to('meta'), False, CPU2, should_fail=True)
    test(l, False, CPU2, should_fail=False)
    test(deepcopy(l).to('meta'), True, CPU2, should_fail=False)  # moved after construction

    test(nn.Sequential(deepcopy(l).to('meta')), False, CPU2, should_fail=True)
    test(nn.Sequential(deepcopy(l), deepcopy(l).to('meta')), False, CPU2, should_fail=True)
    test(nn.Sequential(deepcopy(l).to('meta'), deepcopy(l)), False, CPU2, should_fail=True)
    test(nn.Sequential(deepcopy(l), deepcopy(l)), False, CPU2, should_fail=False)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_data_parallel_model_no_refcycles(batch):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x):
            return self.linear(x)

    # PyTorch does one gc.collect() here. Earlier tests leave garbage that needs more than one pass
    # (pytest's kept tracebacks), so collect to a fixpoint; the first call of a process is
    # test_reliability.py's test_the_first_call_in_a_process_leaves_no_reference_cycles.
    while gc.collect():
        pass
    model = dpfast.DataParallel(Model(), CPU2)
    data = torch.randn(batch, 1) if batch > 1 else torch.randn(1)
    model(data)
    assert gc.collect() == 0


def test_data_parallel_model_no_refcycles_after_backward():
    gc.collect()
    model = dpfast.DataParallel(nn.Linear(3, 1), CPU2)
    model(torch.randn(4, 3)).sum().backward()
    model(torch.randn(4, 3)).sum().backward()
    gc.collect()
    del model
    refcycles = gc.collect()
    assert refcycles == 0


def test_data_parallel_no_grad():
    class Layer(nn.Module):
        def forward(self, x):
            assert not torch.is_grad_enabled()
            return x

    l = Layer()
    i = torch.randn(20, 10, dtype=torch.float)
    with torch.no_grad():
        dpfast.data_parallel(l, i, CPU2)
    with pytest.raises(AssertionError):
        dpfast.data_parallel(l, i, CPU2)
    dpm = dpfast.DataParallel(l, CPU2)
    with torch.no_grad():
        dpm(i)
    with pytest.raises(AssertionError):
        dpm(i)


def _linear_and_input():
    return nn.Linear(10, 5).float(), torch.randn(20, 10, dtype=torch.float)


def _sparse_embedding_and_input():
    return nn.Embedding(10, 5, sparse=True), torch.randint(10, (20, 5), dtype=torch.long)


@pytest.mark.parametrize("n", NDEVS)
@pytest.mark.parametrize("make", [_linear_and_input, _sparse_embedding_and_input], ids=["dense", "sparse"])
def test_data_parallel(n, make):
    """test_data_parallel and test_data_parallel_sparse."""
    l, i = make()
    expected_out = l(i)
    expected_out.sum().backward()
    expected_grads = [p.grad.clone() for p in l.parameters()]
    for _ in range(2):  # (0, 1) and (1, 0) are the same CPU device twice
        l.zero_grad()
        out = dpfast.data_parallel(l, i, ["cpu"] * n)
        out.sum().backward()
        assert out.device == torch.device("cpu")
        assert_close(out, expected_out)
        for expected, param in zip(expected_grads, l.parameters()):
            assert param.grad.is_sparse == expected.is_sparse
            if expected.is_sparse:
                assert_close(param.grad.coalesce(), expected.coalesce())
            else:
                assert_close(param.grad, expected)
    # None device_ids
    dpfast.data_parallel(l, i)


@pytest.mark.parametrize("n", NDEVS)
def test_data_parallel_sparse_wrapper_steps(n):
    # the persistent wrapper over several steps (zero_grad to None between), same check
    l = nn.Embedding(10, 5, sparse=True)
    ref = deepcopy(l)
    dpm = dpfast.DataParallel(l, ["cpu"] * n)
    for _ in range(3):
        i = torch.randint(10, (8, 3), dtype=torch.long)
        ref.zero_grad()
        dpm.zero_grad()
        ref(i).pow(2).sum().backward()
        dpm(i).pow(2).sum().backward()
        assert l.weight.grad.is_sparse
        assert_close(l.weight.grad.coalesce(), ref.weight.grad.coalesce())
        with torch.no_grad():
            ref.weight.sub_(0.1 * ref.weight.grad.to_dense())
            l.weight.sub_(0.1 * l.weight.grad.to_dense())


def test_data_parallel_nested_output():
    def fn(input):
        return [
            input, (input.sin(), input.cos(), [input.add(1)]), input,
            OrderedDict(a=input, b=[input.sin()])
        ]

    class Net(nn.Module):
        def forward(self, input):
            return fn(input)

    for n in NDEVS:
        i = torch.randn(n, 2).float()
        output = dpfast.data_parallel(Net(), i, ["cpu"] * n)
        torch.testing.assert_close(output, fn(i))
        assert isinstance(output[0], torch.Tensor)
        assert isinstance(output[1], tuple)
        assert isinstance(output[1][0], torch.Tensor)
        assert isinstance(output[1][1], torch.Tensor)
        assert isinstance(output[1][2], list)
        assert isinstance(output[1][2][0], torch.Tensor)
        assert isinstance(output[2], torch.Tensor)
        assert isinstance(output[3], dict)
        assert len(output[3]) == 2
        assert 'a' in output[3]
        assert 'b' in output[3]
        assert isinstance(output[3]['a'], torch.Tensor)
        assert isinstance(output[3]['b'], list)
        assert isinstance(output[3]['b'][0], torch.Tensor)
        assert type(output[3]) is OrderedDict  # nn.DataParallel's gather keeps type(out)


def test_data_parallel_nested_input():
    def fn(input):
        return input[1][0]

    class Net(nn.Module):
        def forward(self, *input):
            return fn(input)

    i = torch.randn(20, 3, dtype=torch.float)
    input = (i.cos(), (i.sin(), i), i.sin())
    for n in NDEVS:
        output = dpfast.data_parallel(Net(), input, ["cpu"] * n)
        assert_close(output, fn(input))


def test_data_parallel_module_zero_inputs():
    class TestModule(nn.Module):
        def forward(self):
            t = torch.eye(2, 3)
            return t + (1 - t)

    def test_helper(output, expected):
        assert output.device == torch.device("cpu")
        assert_close(output, expected)

    expected = torch.ones(2, 3)
    model = TestModule()
    test_helper(dpfast.DataParallel(model, ["cpu"])(), expected)
    test_helper(dpfast.DataParallel(model, CPU2)(), expected)
    test_helper(dpfast.DataParallel(model, CPU4)(), expected)
    test_helper(dpfast.data_parallel(model, None, ["cpu"]), expected)
    test_helper(dpfast.data_parallel(model, (), CPU2), expected)


def test_data_parallel_device_args():
    cpu = torch.device('cpu')
    # output_device
    l = nn.Linear(10, 5).to(cpu, torch.float)
    i = torch.randn(20, 10, dtype=torch.float, device=cpu, requires_grad=True)
    out = dpfast.data_parallel(l, i, device_ids=CPU2, output_device=cpu)
    assert_close(out, l(i))
    # device_ids as torch.device
    l = nn.Linear(10, 5).to(cpu, torch.float)
    i = torch.randn(20, 10, dtype=torch.float, device=cpu, requires_grad=True)
    out = dpfast.data_parallel(l, i, device_ids=(cpu, cpu), output_device=cpu)
    assert_close(out, l(i))
    # and the wrapper, with gradients to the input
    dpm = dpfast.DataParallel(l, device_ids=(cpu, cpu), output_device=cpu)
    out = dpm(i)
    assert_close(out, l(i))
    out.sum().backward()
    ig = i.grad.clone()
    i.grad = None
    l(i).sum().backward()
    assert_close(ig, i.grad)


@pytest.mark.parametrize("n", NDEVS)
def test_data_parallel_function_deletion(n):
    # gh-16532
    def gradient_penalty(net, x):
        output = net(x)
        loss = torch.autograd.grad(
            outputs=output, inputs=x,
            grad_outputs=x.new_ones(output.size()),
            create_graph=True, retain_graph=True)[0].mean()
        return loss

    net = nn.Linear(4, 1)
    dpn = dpfast.DataParallel(net, ["cpu"] * n)
    x = torch.ones(n, 4, requires_grad=True)

    dpn.zero_grad()
    loss = gradient_penalty(dpn, x)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert len(grads) == 2
    assert_close(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), grads[0])
    # PyTorch asserts zeros for the bias (nn.DataParallel's broadcast gives every parameter a
    # gradient). dpfast documents "a parameter no replica used keeps .grad None, as on one device".
    single = deepcopy(net)
    single.zero_grad()
    gradient_penalty(single, x.detach().requires_grad_()).backward()
    if grads[1] is None:
        assert single.bias.grad is None  # matches one device
    else:
        assert_close(torch.tensor([0.0]), grads[1])


def test_data_parallel_complex_semantics():
    # The module's own result: dpfast must equal the module run on the batch (complex in, complex out)
    class Cplx(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cplx = torch.nn.Parameter(torch.randn(1, 10, dtype=torch.cfloat))

        def forward(self, x):
            return x * self.cplx

    m = Cplx()
    ref = deepcopy(m)
    for n in NDEVS:
        cplx = dpfast.DataParallel(m, ["cpu"] * n)
        input = torch.rand(8, 10, dtype=torch.cfloat)
        result = cplx(input)
        expected = ref(input)
        assert result.dtype == torch.cfloat
        assert_close(result, expected)
        m.zero_grad()
        ref.zero_grad()
        result.abs().sum().backward()
        expected.abs().sum().backward()
        assert_close(m.cplx.grad, ref.cplx.grad)


def test_autocast():
    class Model(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 8)

        @torch.autocast("cpu", dtype=torch.bfloat16)
        def forward(self, input):
            return super().forward(input)

    model = dpfast.DataParallel(Model().to(dtype=torch.float32), CPU2)
    input = torch.randn((8, 8), dtype=torch.float32)
    assert model(input).dtype is torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_carried_into_replicas(dtype):
    # the parallel_apply_autocast intent through the wrapper: the caller's autocast reaches replicas
    seen = []

    class Model(nn.Linear):
        def forward(self, input):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(input)

    m = Model(8, 8).float()
    model = dpfast.DataParallel(m, CPU4)
    input = torch.randn(8, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out = model(input)
        expected = m(input)
    assert out.dtype is dtype
    assert all(s == (True, dtype) for s in seen), seen
    assert_close(out, expected)


def test_save_replica_module():
    # gh-37182 intent through the wrapper: a wrapper that has replicas (and a live graph) saves/loads
    module = torch.nn.Linear(8, 8)
    dpm = dpfast.DataParallel(module, CPU2)
    out = dpm(torch.randn(4, 8))  # replicas built, graph alive (detach=False analog)
    data = io.BytesIO()
    torch.save(dpm, data)
    out.sum().backward()
    with torch.no_grad():
        dpm(torch.randn(4, 8))  # detach=True analog
    data2 = io.BytesIO()
    torch.save(dpm, data2)
    data2.seek(0)
    loaded = torch.load(data2, weights_only=False)
    x = torch.randn(4, 8)
    assert_close(loaded(x), module(x))
    data.seek(0)
    loaded1 = torch.load(data, weights_only=False)
    assert_close(loaded1(x), module(x))


LAYER_FORMATS = ([torch.contiguous_format] * 4,
                 [torch.channels_last] * 2 + [torch.contiguous_format] * 2,
                 [torch.channels_last] * 4)
# half -> bfloat16: CPU conv in half is slow/patchy; the layout question is the same
LAYER_DTYPES = ([torch.float] * 4,
                [torch.float] * 2 + [torch.bfloat16] * 2,
                [torch.bfloat16] * 4)


@pytest.mark.parametrize("fi,di", list(product(range(3), range(3))))
def test_strided_grad_layout(fi, di):
    formats, dtype_list = LAYER_FORMATS[fi], LAYER_DTYPES[di]

    class ConvNet(nn.Module):
        def __init__(self, layouts, dtype_list):
            super().__init__()
            self.dtypes = dtype_list
            self.conv0 = torch.nn.Conv2d(8, 16, (2, 2)).to(memory_format=layouts[0], dtype=dtype_list[0])
            self.conv1 = torch.nn.Conv2d(16, 32, (2, 2)).to(memory_format=layouts[1], dtype=dtype_list[1])
            self.conv2 = torch.nn.Conv2d(32, 16, (2, 2)).to(memory_format=layouts[2], dtype=dtype_list[2])
            self.conv3 = torch.nn.Conv2d(16, 8, (2, 2)).to(memory_format=layouts[3], dtype=dtype_list[3])

        def forward(self, x):
            x = x.to(self.dtypes[0])
            x = self.conv0(x).to(self.dtypes[1])
            x = self.conv1(x).to(self.dtypes[2])
            x = self.conv2(x).to(self.dtypes[3])
            x = self.conv3(x)
            return x

    ndevs = 2
    input = torch.randn(ndevs * 8, 8, 8, 8, dtype=torch.float)
    target = torch.randn(ndevs * 8, 8, 4, 4, dtype=torch.float)
    m = ConvNet(formats, dtype_list)
    m_dp = dpfast.DataParallel(deepcopy(m), device_ids=["cpu"] * ndevs)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt_dp = torch.optim.SGD(m_dp.parameters(), lr=0.1)
    has_low = any(p.dtype is torch.bfloat16 for p in m.parameters())
    tol = 3e-2 if has_low else 1e-5
    for it in range(2):
        F.mse_loss(m(input).float(), target).backward()
        F.mse_loss(m_dp(input).float(), target).backward()
        for i, ((layer_name, m_child), m_dp_child) in enumerate(zip(m.named_children(), m_dp.module.children())):
            msg = f"{layer_name}.weight it={it} formats={fi} dtypes={di}"
            assert m_child.weight.grad.is_contiguous(memory_format=formats[i]), msg
            assert m_dp_child.weight.grad.is_contiguous(memory_format=formats[i]), msg
            for (pname, p), p_dp in zip(m_child.named_parameters(), m_dp_child.parameters()):
                assert_close(p.grad, p_dp.grad, rtol=tol, atol=tol, msg=f"{layer_name}.{pname} it={it}")
        opt.step()
        opt_dp.step()
        opt.zero_grad()
        opt_dp.zero_grad()


def test_parameter_list_dict_replica():
    state = {}

    class MyMod(torch.nn.Module):
        def __init__(self, data, check_fn):
            super().__init__()
            self.data = data
            self.check_fn = check_fn

        def forward(self, inp):
            self.check_fn(self)
            return inp * self.data[state["k0"]].sum() + self.data[state["k1"]].sum()

    p1 = torch.nn.Parameter(torch.rand(10))
    p2 = torch.nn.Parameter(torch.rand(10))
    calls = []

    def check_fn(self_):
        assert_close(p1, self_.data[state["k0"]])
        assert_close(p2, self_.data[state["k1"]])
        assert self_.data[state["k0"]].requires_grad
        assert self_.data[state["k1"]].requires_grad
        calls.append(type(self_.data).__name__)
        # PyTorch also asserts data[k].grad_fn is not None (replica parameters are broadcast
        # outputs). Documented difference: see test_doc_parameter_list_dict_replica_grad_fn.

    for data, keys in ((torch.nn.ParameterList([p1, p2]), (0, 1)),
                       (torch.nn.ParameterDict({"0": p1, "1": p2}), ("0", "1"))):
        state["k0"], state["k1"] = keys
        calls.clear()
        for q in (p1, p2):
            q.grad = None
        module = MyMod(data, check_fn)
        model = dpfast.DataParallel(module, CPU2)
        input = torch.randn((8, 8))
        model(input).sum().backward()
        assert len(calls) == 2, calls
        g = [q.grad.clone() for q in (p1, p2)]
        for q in (p1, p2):
            q.grad = None
        module(input).sum().backward()
        assert_close(g[0], p1.grad)
        assert_close(g[1], p2.grad)


# --------------------------------------------------------------------------------------------
# Documented differences: check what the README says dpfast does, and that PyTorch's assertion fails
# --------------------------------------------------------------------------------------------

def test_doc_parameter_list_dict_replica_grad_fn():
    grad_fns = []

    class MyMod(torch.nn.Module):
        def __init__(self, data):
            super().__init__()
            self.data = data

        def forward(self, inp):
            grad_fns.append(self.data[0].grad_fn)
            return inp

    model = dpfast.DataParallel(MyMod(torch.nn.ParameterList([nn.Parameter(torch.rand(3))])), CPU2)
    model(torch.randn(8, 8))
    # PyTorch: every replica's entry has a grad_fn. dpfast: replicas are separate leaves.
    assert grad_fns == [None, None]


def test_doc_zero_grad_in_forward():
    # PyTorch: a warning "Calling .zero_grad() from a module created with nn.DataParallel() has no
    # effect." in every replica. dpfast documents: replica 0 is the module itself, its zero_grad
    # clears the module's .grad; no replica is marked _is_replica.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 6)

        def forward(self, x):
            self.zero_grad()
            return self.l(x)

    module = Net()
    dpm = dpfast.DataParallel(module, CPU2)
    module.l.weight.grad = torch.ones_like(module.l.weight)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dpm(torch.rand(4, 6))
    assert not any("has no effect" in str(x.message) for x in w)
    assert module.l.weight.grad is None


def test_data_parallel_replica_zero_grad_then_step():
    # the zero_grad test's surroundings: a normal loop with zero_grad outside forward stays exact
    module = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    ref = deepcopy(module)
    dpm = dpfast.DataParallel(module, CPU2)
    opt, opt_ref = torch.optim.SGD(dpm.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for set_to_none in (True, False, True):
        x = torch.randn(6, 6)
        opt.zero_grad(set_to_none=set_to_none)
        opt_ref.zero_grad(set_to_none=set_to_none)
        dpm(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        for p, q in zip(module.parameters(), ref.parameters()):
            assert_close(p.grad, q.grad)
        opt.step()
        opt_ref.step()


# --------------------------------------------------------------------------------------------
# TestDataParallelDeviceType
# --------------------------------------------------------------------------------------------

_prec = {torch.float: 1e-5, torch.double: 1e-5, torch.half: 1e-2}
_DEVS = [CPU2, CPU4, None]


@pytest.mark.parametrize("dtype", [torch.float, torch.double, torch.half])
@pytest.mark.parametrize("devs", _DEVS, ids=["cpu2", "cpu4", "none"])
def test_data_parallel_module(dtype, devs):
    l = nn.Linear(10, 5).to("cpu", dtype)
    i = torch.randn(20, 10, dtype=dtype)
    expected_out = l(i)
    net = dpfast.DataParallel(l, devs)
    out = net(i)
    assert out.device == torch.device("cpu")
    assert_close(out, expected_out, atol=_prec[dtype], rtol=0)


def _kw_net(l, get):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = l

        def forward(self, input):
            return self.l(get(input))
    return Net()


@pytest.mark.parametrize("dtype", [torch.float, torch.double, torch.half])
@pytest.mark.parametrize("devs", _DEVS, ids=["cpu2", "cpu4", "none"])
@pytest.mark.parametrize("kind", ["plain", "empty_list", "empty_dict", "empty_tuple"])
def test_data_parallel_module_kwargs_only(dtype, devs, kind):
    l = nn.Linear(10, 5).to("cpu", dtype)
    i = torch.randn(20, 10, dtype=dtype)
    expected_out = l(i)
    if kind == "plain":
        n = dpfast.DataParallel(_kw_net(l, lambda x: x), devs)
        out = n(input=i)
    else:
        unused = {"empty_list": [], "empty_dict": {}, "empty_tuple": ()}[kind]
        n = dpfast.DataParallel(_kw_net(l, lambda x: x['data']), devs)
        out = n(input={'data': i, 'unused': unused})
    assert out.device == torch.device("cpu")
    assert_close(out, expected_out, atol=_prec[dtype], rtol=0)


def test_doc_torchscript_several_devices():
    # test/jit/test_data_parallel.py replicates scripted modules; dpfast documents: "on several,
    # not supported: an error names the scripted part"; on one device the module itself runs.
    m = torch.jit.script(nn.Linear(4, 2))
    x = torch.randn(4, 4)
    assert_close(dpfast.DataParallel(m, ["cpu"])(x), m(x))
    with pytest.raises(Exception, match=r"(?i)script"):
        dpfast.DataParallel(m, CPU2)(x)
