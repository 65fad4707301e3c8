"""The engine (dpfast._C) against reference implementations, one body per device."""

import pytest
import torch

from dpfast import _C

from conftest import DEVICES

CPU = torch.device("cpu")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64]
SIZES = [0, 1, 7, 1000, 3 * 2**20 + 5]  # several MB, odd


def integer_valued(numel, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    low = 0 if dtype == torch.uint8 else -8  # negatives would wrap round in an unsigned type
    return torch.randint(low, 9, (numel,), generator=g).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("shape", ["chain", "binomial", "auto"])
def test_reduce_add_matches_sum_exactly(device, n, shape):
    for dtype in DTYPES:
        for numel in SIZES if n in (1, 2, 5, 8) else [7, 1000]:
            buffers = [integer_valued(numel, dtype, device, seed=k) for k in range(n)]
            expected = torch.stack([b.double().cpu() for b in buffers]).sum(0) if numel else torch.zeros(0)
            for root in sorted({0, n - 1}):
                work = [b.clone() for b in buffers]
                _C.reduce_add_(work, root, [], shape, 4096)  # small chunks: many pipeline steps
                assert torch.equal(work[root].double().cpu(), expected), (dtype, numel, root)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_reduce_add_exact_on_views_at_every_alignment(device, dtype):
    """The CUDA add kernel loads 16-byte packets where dst and src allow it and one element at a
    time elsewhere: views that start mid-packet, chunk sizes that are not a multiple of 16 bytes
    (a user's chunk_bytes cuts the buffer there), and tails shorter than a packet must all add."""
    per_packet = 16 // torch.empty((), dtype=dtype).element_size()
    for offsets in [(0, 0), (1, 1), (0, 3), (per_packet - 1, 0)]:
        for numel, chunk_bytes in [(per_packet - 1, 4096), (1000, 4096), (1003, 1000), (5000, 0)]:
            storages = [integer_valued(numel + 16, dtype, device, seed=k) for k in range(3)]
            views = [storages[k][offsets[k % 2]:offsets[k % 2] + numel] for k in range(3)]
            expected = torch.stack([v.double().cpu() for v in views]).sum(0)
            def around_root():
                return torch.cat([storages[0][:offsets[0]], storages[0][offsets[0] + numel:]])
            untouched = around_root().clone()
            _C.reduce_add_(views, 0, [], "chain", chunk_bytes)
            assert torch.equal(views[0].double().cpu(), expected), (offsets, numel, chunk_bytes)
            # Nothing outside the root's view moves (a packet that ran past its end would).
            assert torch.equal(around_root(), untouched), (offsets, numel, chunk_bytes)


@pytest.mark.parametrize("device", DEVICES)
def test_reduce_add_exact_beyond_one_grid_of_the_add_kernel(device):
    """One chunk larger than the CUDA add kernel's largest grid (4096 blocks of 512 threads, each
    a 16-byte packet): its grid-stride loop must cover the rest."""
    numel = 4096 * 512 * 4 * 2 + 5  # two grids of float32 packets, and a tail
    buffers = [integer_valued(numel, torch.float32, device, seed=k) for k in range(2)]
    expected = buffers[0].double().cpu() + buffers[1].double().cpu()
    _C.reduce_add_(buffers, 0, [], "chain", numel * 4)  # one chunk: one launch
    assert torch.equal(buffers[0].double().cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_reduce_add_float_close_to_reference(device):
    buffers = [torch.randn(100_003, dtype=torch.float32, device=device) for _ in range(5)]
    expected = torch.stack([b.double() for b in buffers]).sum(0)
    work = [b.clone() for b in buffers]
    _C.reduce_add_(work, 0)
    torch.testing.assert_close(work[0].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("shape", ["chain", "binomial"])
def test_broadcast_copies_exactly(device, n, shape):
    for dtype in DTYPES:
        for numel in SIZES if n in (1, 3, 8) else [1, 1000]:
            source = torch.randn(numel).to(dtype=dtype, device=device)
            for root in sorted({0, n // 2}):
                buffers = [torch.full((numel,), -1, dtype=dtype, device=device) for _ in range(n)]
                buffers[root].copy_(source)
                _C.broadcast_(buffers, root, [], shape, 4096)
                for b in buffers:
                    assert torch.equal(b, source)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_scatter_and_gather_round_trip_exactly(device, n, dim):
    tensor = torch.randn(13, 6, 5, device=device)
    size = tensor.size(dim)
    base, extra = divmod(size, n)
    chunk_sizes = [base + (1 if i < extra else 0) for i in range(n)]
    devices = [torch.device(device, 0) if device == "cuda" else torch.device("cpu")] * n
    pieces = _C.scatter(tensor, devices, chunk_sizes, dim)
    expected = torch.split(tensor, chunk_sizes, dim)
    assert len(pieces) == n
    for piece, ref in zip(pieces, expected):
        assert torch.equal(piece, ref)
    assert torch.equal(_C.gather(pieces, devices, devices[0], dim), tensor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, -1])
def test_scatter_and_gather_are_differentiable_twice(device, dim):
    """Recorded by autograd (csrc/autograd_ops.h): the backward of each is the other, and a
    backward with create_graph=True is itself differentiable (a gradient penalty through the
    wrapper's gather)."""
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    devices = [dev] * 3
    x = torch.randn(6, 6, dtype=torch.float64, device=dev, requires_grad=True)

    def f(x):
        pieces = _C.scatter(x, devices, [1, 3, 2], dim)
        return _C.gather([p ** 3 * (k + 1) for k, p in enumerate(pieces)], devices, dev, dim)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    with torch.no_grad():  # nothing recorded without grad mode, nor for tensors that do not require grad
        assert f(x).grad_fn is None
    assert _C.gather([x.detach()] * 2, devices[:2], dev, 0).grad_fn is None


def test_scatter_from_cpu_to_repeated_device_copies_exactly():
    tensor = torch.arange(40, dtype=torch.int64).view(10, 4)
    pieces = _C.scatter(tensor, [torch.device("cpu")] * 3, [4, 0, 6], 0)
    assert [p.shape[0] for p in pieces] == [4, 0, 6]
    assert torch.equal(torch.cat(pieces), tensor)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_pieces_on_the_source_device_have_their_own_version_counters(device):
    # The first is a view (as torch.cuda.comm.scatter gives); the others alias the source's memory
    # with counters of their own, so one replica's in-place write leaves another's saved chunk valid.
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    tensor = torch.arange(24.0, device=dev).view(6, 4)
    pieces = _C.scatter(tensor, [dev] * 3, [2, 2, 2], 0)
    version = [p._version for p in pieces]
    pieces[1].mul_(10)
    assert pieces[1]._version == version[1] + 1
    assert pieces[0]._version == version[0] and pieces[2]._version == version[2] and tensor._version == 0
    assert torch.equal(tensor[2:4], torch.arange(8.0, 16.0, device=dev).view(2, 4) * 10)  # the same memory
    pieces[0].add_(1)
    assert tensor._version == 1 and pieces[1]._version == version[1] + 1  # the view shares the source's
    leaf = torch.randn(6, 4, device=dev, requires_grad=True)
    assert all(p._base is leaf for p in _C.scatter(leaf, [dev] * 3, [2, 2, 2], 0))  # autograd keeps its checks


@pytest.mark.parametrize("device", DEVICES)
def test_coalesce_round_trip(device):
    base = torch.randn(20, device=device)
    contiguous = [torch.randn(3, 4, device=device), torch.randn(5, device=device), torch.randn(0, device=device),
                  base[7:13].view(2, 3)]  # a view at an offset: the CPU's byte copies start there
    lists = [contiguous, contiguous + [torch.randn(2, 2, 2, device=device).transpose(0, 2)]]  # one non-contiguous
    for tensors in lists:
        total = sum(t.numel() for t in tensors)
        flat = torch.full((total + 3,), -1.0, device=device)
        _C.coalesce_into(tensors, flat)
        assert torch.equal(flat[:total], torch.cat([t.reshape(-1) for t in tensors]))
        assert torch.equal(flat[total:], torch.full((3,), -1.0, device=device))  # nothing written past them
        back = [torch.empty_like(t) for t in tensors]
        _C.uncoalesce_from(flat, back)
        for a, b in zip(back, tensors):
            assert torch.equal(a, b)
    # A lazily conjugated or negated tensor's bytes are not its values: coalesced as its values.
    z = torch.randn(4, dtype=torch.complex64, device=device)
    lazy = [z.conj(), torch.randn(3, dtype=torch.complex64, device=device)]
    flat = torch.empty(7, dtype=torch.complex64, device=device)
    _C.coalesce_into(lazy, flat)
    assert torch.equal(flat, torch.cat([t.resolve_conj().reshape(-1) for t in lazy]))
    zeros = [torch._efficientzerotensor(3, device=device), torch.ones(2, device=device)]  # no memory behind it
    flat = torch.full((5,), 7.0, device=device)
    _C.coalesce_into(zeros, flat)
    assert torch.equal(flat, torch.tensor([0.0, 0, 0, 1, 1], device=device))
    flat = torch.arange(6.0, device=device)
    with pytest.raises(RuntimeError):  # a source that overlaps what it would overwrite: refused, as cat_out does
        _C.coalesce_into([flat[1:4]], flat)
    negated = [torch._neg_view(torch.randn(4, device=device)), torch.randn(2, device=device)]
    assert negated[0].is_neg() and negated[0].is_contiguous() and lazy[0].is_conj() and lazy[0].is_contiguous()
    flat = torch.empty(6, device=device)
    _C.coalesce_into(negated, flat)
    assert torch.equal(flat, torch.cat([t.resolve_neg().reshape(-1) for t in negated]))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_after_a_reduction_leaves_the_root_sum_and_zero_scratch(device):
    """zero_ on the lanes reduce_add_ used as scratch, right after it and on their own streams
    (several lanes on one device, as the reducer's replicas): the root keeps the exact sum."""
    n = 4
    streams = [torch.cuda.Stream() for _ in range(n)] if device == "cuda" else []
    ids = [s.stream_id for s in streams]
    for numel in [0, 7, 3 * 2**20 + 5]:
        buffers = [integer_valued(numel, torch.float32, device, seed=k) for k in range(n)]
        expected = torch.stack([b.double().cpu() for b in buffers]).sum(0) if numel else torch.zeros(0)
        if streams:
            torch.cuda.current_stream().synchronize()
        _C.reduce_add_(buffers, 0, ids, "chain", 1 << 16)
        _C.zero_(buffers[1:], ids[1:])
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(buffers[0].double().cpu(), expected)
        for b in buffers[1:]:
            assert torch.count_nonzero(b) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_exact_alias_shares_the_flat_buffer_until_a_resize_moves_it_out(device):
    """NOTE [Exact storages]: a tensor on flat's memory, whose storage holds exactly its bytes: a
    resize_ that grows it moves it to memory of its own, never over the flat buffer's other
    tensors; point_into(exact=True) puts it back, in the shape given."""
    flat = torch.arange(10.0, device=device)
    alias = _C.exact_alias(flat, 2, (2, 2))
    assert alias.data_ptr() == flat[2:].data_ptr() and alias.untyped_storage().nbytes() == 4 * flat.element_size()
    torch.testing.assert_close(alias, flat[2:6].view(2, 2), rtol=0, atol=0)
    alias.add_(100)
    torch.testing.assert_close(flat, torch.tensor([0, 1, 102, 103, 104, 105, 6, 7, 8, 9.0], device=device))
    assert alias._version == 1 and flat._version == 0  # a version counter of its own
    alias.resize_(7).fill_(-1)  # grows: moved out, the neighbours untouched
    assert alias.data_ptr() != flat[2:].data_ptr()
    torch.testing.assert_close(flat, torch.tensor([0, 1, 102, 103, 104, 105, 6, 7, 8, 9.0], device=device))
    _C.point_into(alias, flat, 6, (2,), exact=True)
    assert alias.shape == (2,) and alias.data_ptr() == flat[6:].data_ptr()
    alias.resize_(5)  # past the flat buffer's end: moved out too
    assert alias.data_ptr() != flat[6:].data_ptr()
    kept = _C.exact_alias(torch.ones(4, device=device), 1, (3,))  # keeps its flat buffer alive
    torch.testing.assert_close(kept, torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match="exact_alias: offset: expected a place for 4 elements in a flat buffer of "
                                           "10, but got offset 7"):
        _C.exact_alias(flat, 7, (4,))


def test_engine_errors_name_op_argument_expected_and_actual():
    a, b = torch.zeros(4), torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"dpfast.reduce_add_: expected all buffers to have shape \[4\].*buffers\[1\] has shape \[5\]"):
        _C.reduce_add_([a, b], 0)
    with pytest.raises(RuntimeError, match=r"dpfast.reduce_add_: expected root in \[0, 2\), but got 2"):
        _C.reduce_add_([a, a.clone()], 2)
    with pytest.raises(RuntimeError, match=r"dpfast.broadcast_: expected all buffers to have dtype Float.*buffers\[1\] has dtype Double"):
        _C.broadcast_([a, a.double()], 0)
    with pytest.raises(RuntimeError, match=r"expected contiguous buffers, but buffers\[1\] is not contiguous"):
        _C.broadcast_([torch.zeros(2, 3), torch.zeros(3, 2).t()], 0)
    with pytest.raises(RuntimeError, match=r"expected distinct buffers, but buffers\[0\] and buffers\[1\] share memory"):
        _C.reduce_add_([a, a], 0)
    storage = torch.zeros(9)
    with pytest.raises(RuntimeError, match=r"expected distinct buffers, but buffers\[0\] and buffers\[1\] share memory"):
        _C.reduce_add_([storage[0:5], storage[1:6]], 0)  # partly overlapping views
    _C.reduce_add_([storage[0:4], storage[4:8]], 0)  # adjacent views of one storage are fine
    with pytest.raises(RuntimeError, match=r"dpfast.scatter: expected chunk sizes that sum to the size of dim 0 \(4\), but they sum to 5"):
        _C.scatter(a, [CPU, CPU], [2, 3], 0)
    with pytest.raises(RuntimeError, match=r"dpfast.scatter: expected dim in \[-1, 1\) .* but got 1"):
        _C.scatter(a, [CPU], [4], 1)
    with pytest.raises(RuntimeError, match=r"dpfast.gather: expected all tensors to match"):
        _C.gather([torch.zeros(2, 3), torch.zeros(2, 4)], [CPU, CPU], CPU, 0)
    with pytest.raises(RuntimeError, match=r"tree shape: expected 'auto', 'chain' or 'binomial', but got 'ring'"):
        _C.reduce_add_([a, a.clone()], 0, [], "ring")
    with pytest.raises(RuntimeError, match=r"expected a real floating-point or integer dtype, but got Bool"):
        _C.reduce_add_([a.bool(), a.bool().clone()], 0)
    _C.wait_lane(CPU, -1, CPU, -1)  # nothing to order on the CPU
    with pytest.raises(RuntimeError, match=r"dpfast.wait_lane: expected all lanes on CPU or all on CUDA devices, but got a mix"):
        _C.wait_lane(CPU, -1, torch.device("cuda", 0), -1)
    with pytest.raises(RuntimeError, match=r"dpfast.zero_: expected one stream id per device \(2 devices\), but got 1"):
        _C.zero_([a, b], [7])


def test_planner_bindings():
    rounds = _C.make_tree(8, 0, "binomial")
    assert rounds == [[(1, 0), (3, 2), (5, 4), (7, 6)], [(2, 0), (6, 4)], [(4, 0)]]
    assert _C.make_tree(3, 1, "chain") == [[(0, 2)], [(2, 1)]]
    shape, chunk, predicted = _C.plan_for(100 * 10**6, 8)
    assert shape == "chain" and 0 < chunk < 100 * 10**6 and predicted > 4000
    assert _C.plan_for(4096, 8)[0] == "binomial"
    with pytest.raises(ValueError, match="make_tree: expected root in"):
        _C.make_tree(2, 5, "chain")


def test_the_extension_shares_the_process_libstdcxx():
    """NOTE [One libstdc++] in setup.py: a static copy of libstdc++ inside _C garbles or crashes
    every error message that prints a number."""
    import shutil
    import subprocess
    import sys

    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("needs binutils' readelf on Linux")
    dynamic = subprocess.run([readelf, "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic  # loaded from the process, not carried inside
    with pytest.raises(RuntimeError, match=r"expected root in \[0, 2\), but got 12345"):
        _C.reduce_add_([torch.zeros(2), torch.zeros(2)], 12345)


def test_spinning_hand_offs_wait_set_and_time_out():
    """NOTE [Spinning hand-offs]: the workers' event and semaphore, spinning or not."""
    import threading
    import time

    for spin_us in (0, 2000):
        event = _C.SpinEvent()
        assert not event.is_set() and not event.wait(spin_us, 0.01)  # times out, unset
        threading.Timer(0.02, event.set).start()
        assert event.wait(spin_us, 5.0) and event.is_set()
        assert event.wait(spin_us, 0.0)  # stays set

        semaphore = _C.SpinSemaphore()
        assert not semaphore.acquire(spin_us, 0.01)
        semaphore.release()
        semaphore.release()
        assert semaphore.acquire(spin_us, 0.01) and semaphore.acquire(spin_us, 0.01)  # one per release
        assert not semaphore.acquire(spin_us, 0.01)

        # A worker's "done, next": the event is set before the thread blocks on the semaphore.
        done, taken = _C.SpinEvent(), []
        worker = threading.Thread(target=lambda: taken.append(semaphore.set_then_acquire(done, spin_us)))
        worker.start()
        assert done.wait(spin_us, 5.0)
        time.sleep(0.01)
        assert worker.is_alive() and not taken  # still waiting for the next job
        semaphore.release()
        worker.join(5.0)
        assert not worker.is_alive() and taken == [None]
