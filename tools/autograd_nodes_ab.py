"""What the C++ autograd nodes (csrc/autograd_ops.h) save per step on CPU replicas, in one process.

dpfast as it is, against the same wrapper with the gather's node and the CPU routing node made by
the Python autograd.Functions they replaced (as they stood in c840352: Scatter, Gather,
ReplicaBackward, reproduced below and patched in for their rounds only), and the bare module on the
full batch; 2 CPU replicas, the wrapper's steps on one intra-op thread (torch.set_num_threads(1):
the parallel backward, whose routing node is one of the three), interleaved round by round in
alternating order, 20 timed steps a round, medians. The last column is the per-round difference
(Python nodes - C++ nodes): this VM's noise moves single rounds by more than the difference.

    PYTHONPATH=. python tools/autograd_nodes_ab.py mlp:tiny:32 30
"""
import os, sys, time, statistics, types
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from torch.nn import functional as F
import dpfast
from dpfast import _C, backward as B, scatter_gather as SG
from bench import workloads

class Scatter(torch.autograd.Function):  # as in c840352
    @staticmethod
    def forward(ctx, devices, chunk_sizes, dim, ids, tensor):
        ctx.source_device, ctx.devices, ctx.dim = tensor.device, devices, dim
        with torch.no_grad():
            pieces = tuple(_C.scatter(tensor, devices, chunk_sizes, dim, ids))
        ctx.piece_shapes = [p.shape for p in pieces]; ctx.dtype = tensor.dtype
        return pieces
    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros(s, dtype=ctx.dtype, device=d) if g is None else g for g, s, d in zip(grads, ctx.piece_shapes, ctx.devices)]
        return None, None, None, None, Gather.apply(ctx.source_device, ctx.dim, ctx.devices, [], *grads)

class Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, destination, dim, devices, ids, *tensors):
        ctx.devices, ctx.dim = devices, dim
        ctx.chunk_sizes = [t.size(dim) for t in tensors]
        return _C.gather(list(tensors), devices, destination, dim, ids)
    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            grads = Scatter.apply(ctx.devices, ctx.chunk_sizes, ctx.dim, [], grad)
        else:
            grads = _C.scatter(grad, ctx.devices, ctx.chunk_sizes, ctx.dim, [])
        return (None, None, None, None) + tuple(grads)

class ReplicaBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, callback, sentinel, tensors, anchor):
        ctx.set_materialize_grads(False)
        ctx.callback = callback
        ctx.save_for_backward(sentinel)
        return tuple(t.detach() for t in tensors)
    @staticmethod
    def backward(ctx, *grads):
        ctx.callback(list(grads))
        return None, None, None, None

old_C = types.SimpleNamespace(**{k: getattr(_C, k) for k in dir(_C) if not k.startswith('__')})
def old_gather(tensors, devices, destination, dim=0, stream_ids=(), destination_stream_id=-1):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return Gather.apply(destination, dim, devices, list(stream_ids), *tensors)
    return _C.gather(tensors, devices, destination, dim, list(stream_ids))
def old_route(tensors, anchor, keep_alive, on_backward):
    return ReplicaBackward.apply(on_backward, keep_alive, tensors, anchor)
old_C.gather = old_gather; old_C.route = old_route
new_C = _C
def use(old):
    SG._C = old_C if old else new_C
    B._C = old_C if old else new_C

name, size, batch = sys.argv[1].split(':'); rounds = int(sys.argv[2])
wl = getattr(workloads, name)(size); x, y = wl.make_batch(int(batch), 0)
def mk(dp):
    m = wl.build(0)
    if dp: m = dpfast.DataParallel(m, device_ids=['cpu', 'cpu'])
    return m, torch.optim.SGD(m.parameters(), lr=0.0)
systems = {'bare': mk(False), 'python nodes': mk(True), 'C++ nodes': mk(True)}
def run(key, steps):
    m, opt = systems[key]
    use(key == 'python nodes')
    if key != 'bare': torch.set_num_threads(1)
    ts = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter(); opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step(); ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(2); use(False)
    return statistics.median(ts) * 1e3
for k in systems: run(k, 5)
res = {k: [] for k in systems}
for r in range(rounds):
    order = list(systems) if r % 2 == 0 else list(reversed(list(systems)))
    for k in order: res[k].append(run(k, 20))

def grads(key):
    """One step's gradients through this system's nodes (the same weights: lr is 0)."""
    m, opt = systems[key]
    use(key == 'python nodes')
    torch.set_num_threads(1)
    try:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
    finally:
        torch.set_num_threads(2); use(False)
    return [p.grad.clone() for p in m.parameters()]


same = all(torch.equal(a, c) for a, c in zip(grads('python nodes'), grads('C++ nodes')))
b = statistics.median(res['bare'])
diff = [p - c for p, c in zip(res['python nodes'], res['C++ nodes'])]
print(f"{sys.argv[1]}: " + "  ".join(f"{k} {statistics.median(v):.3f} ms ({statistics.median(v)/b:.2f}x)" for k, v in res.items())
      + f"  | python - C++ per round: median {statistics.median(diff)*1e3:.0f} us, {sum(d > 0 for d in diff)}/{len(diff)} rounds > 0"
      + f"  | same gradients: {same}")
sys.exit(0 if same else 1)
