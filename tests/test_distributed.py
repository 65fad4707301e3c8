"""2 processes x 2 CPU replicas (and x 1, like DDP) on torch.distributed (gloo): every rank ends
with the parameters of one process training on the concatenated batches."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import _dist_worker as worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")
TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *extra):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, "--rank", str(r), "--out", str(tmp_path / f"rank{r}.pt"),
                               *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:  # never leave a rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outputs


@pytest.mark.parametrize("replicas,extra", [(2, ()), (1, ()), (2, ("--clear-after-no-sync",)), (0, ()),
                                             (0, ("--wrap-before-init",))],
                         ids=["2x2_replicas", "one_replica_per_process", "zero_grad_after_no_sync",
                              "no_device_ids_without_a_gpu", "no_device_ids_wrapped_before_init"])
def test_two_ranks_match_one_process_on_the_full_batch(tmp_path, replicas, extra):
    """With --clear-after-no-sync each step follows a no_sync() backward that zero_grad() drops
    (NOTE [Clearing an accumulation]): the result is the same. With no device_ids on a machine
    without a GPU (DDP's CPU case under torchrun), each process trains its module on one CPU lane
    with the others, also when torch.distributed started after the wrapper was made."""
    if replicas == 0 and torch.cuda.is_available():
        pytest.skip("no device_ids means this machine's GPUs here; the case is a machine without one")
    codes, outputs = launch(tmp_path, "--steps", "4", "--replicas", str(replicas), *extra)
    assert codes == [0, 0], outputs
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(100)  # rank 0's initial parameters
    reference = worker.make_model()
    worker.train(reference, worker.data(4), torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9))
    for key, value in reference.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key  # ranks identical
        torch.testing.assert_close(rank0[key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("kind", ["freeze", "freeze_late", "sparse"])
def test_freezing_every_step_and_sparse_gradients_across_processes(tmp_path, kind):
    """Layers frozen and unfrozen in turn (the reducer follows without rebuilding its hooks' state
    wrong), a layer frozen between a forward and its backward (no gradient, as autograd skips it),
    and a sparse embedding whose gradient stays sparse."""
    codes, outputs = launch(tmp_path, "--steps", "4", "--kind", kind)
    assert codes == [0, 0], outputs
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(100)
    reference = worker.make_model(kind)
    worker.train(reference, worker.data(4, kind), worker.make_optimizer(reference.parameters()), kind)
    for key, value in reference.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_a_rank_that_dies_makes_the_other_fail_not_hang(tmp_path):
    codes, outputs = launch(tmp_path, "--steps", "4", "--die-at-step", "2")
    assert codes[1] == 3
    assert codes[0] != 0, outputs[0]  # an error from torch.distributed, within the timeout
