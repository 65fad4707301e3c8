"""csrc/grad_ready.{h,cpp}: the C++ counter behind the reducer's early bucket
launches, through dpfast._C.GradReadiness."""

import pytest
import torch

from dpfast import _C


class Recorder:
    def __init__(self):
        self.first_marks = 0
        self.completed = []

    def callbacks(self):
        def first():
            self.first_marks += 1

        return first, self.completed.append


def make(bucket_of, bucket_len, count_root=False):
    ready = _C.GradReadiness(bucket_of, bucket_len, count_root)
    recorder = Recorder()
    ready.set_callbacks(*recorder.callbacks())
    return ready, recorder


def test_a_bucket_completes_once_when_every_replica_marked_all_its_parameters():
    # parameters 0, 1 in bucket 0; parameter 2 in bucket 1; replicas 1..2 mark (replica 0 is the root)
    ready, seen = make([0, 0, 1], [2, 1])
    ready.note_replicas(3)
    ready.mark(2, 1)
    assert seen.first_marks == 1 and seen.completed == []
    ready.mark(2, 2)
    assert seen.completed == [1]
    ready.mark(0, 1)
    ready.mark(1, 1)
    ready.mark(0, 2)
    assert seen.completed == [1]
    ready.mark(1, 2)
    assert seen.completed == [1, 0] and seen.first_marks == 1
    assert ready.got_grad() == [True, True, True] and ready.any_grad() and ready.replicas_used() == 3
    ready.reset_window()  # a new backward: counts again, gradients still pending
    assert not ready.first_mark_seen() and ready.any_grad()
    ready.mark(2, 1)
    ready.mark(2, 2)
    assert seen.completed == [1, 0, 1] and seen.first_marks == 2
    ready.start_over()
    assert not ready.any_grad() and ready.replicas_used() == 1


def test_across_processes_the_root_counts_too():
    ready, seen = make([0], [1], count_root=True)
    ready.note_replicas(2)
    ready.mark(0, 1)
    assert seen.completed == []
    ready.mark(0, 0)
    assert seen.completed == [0]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_hooks_mark_after_accumulation_and_keep_grad_a_view():
    bucket = torch.zeros(5, dtype=torch.float64)
    views = [bucket[:3], bucket[3:].view(1, 2)]
    params = [torch.ones(3, dtype=torch.float64, requires_grad=True),
              torch.ones(1, 2, dtype=torch.float64, requires_grad=True)]
    ready, seen = make([0, 0], [2])
    for i, (p, v) in enumerate(zip(params, views)):
        p.grad = v
        ready.attach(p, i, 1, v)
    ready.note_replicas(2)
    (params[0] * 2).sum().backward()
    assert seen.completed == [] and ready.got_grad() == [True, False]
    (params[1] * 3).sum().backward(create_graph=True)  # autograd replaces the view: put back
    assert params[1].grad.data_ptr() == views[1].data_ptr()
    assert torch.equal(bucket, torch.tensor([2, 2, 2, 3, 3], dtype=torch.float64))
    assert seen.completed == [0]
    for p in params:
        _C.GradReadiness.detach(p)
    ready.reset_window()
    (params[0] * 2).sum().backward()
    assert seen.completed == [0] and not ready.first_mark_seen()  # no hook any more


def test_an_error_in_a_callback_reaches_backward_and_the_counter_goes_on():
    ready = _C.GradReadiness([0], [1], False)

    def fail(b):
        raise RuntimeError(f"launch of bucket {b} failed")

    ready.set_callbacks(lambda: None, fail)
    p = torch.ones(2, requires_grad=True)
    view = torch.zeros(2)
    p.grad = view
    ready.attach(p, 0, 1, view)
    ready.note_replicas(2)
    with pytest.raises(RuntimeError, match="launch of bucket 0 failed"):
        p.sum().backward()
    ready.reset_window()
    ready.set_callbacks(lambda: None, lambda b: None)
    p.sum().backward()
    assert torch.equal(view, torch.full((2,), 2.0))


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match=r"bucket_of\[1\]: expected a bucket index in \[0, 1\), but got 3"):
        _C.GradReadiness([0, 3], [1], False)
    ready = _C.GradReadiness([0], [1], False)
    with pytest.raises(RuntimeError, match=r"attach: index: expected a parameter index in \[0, 1\), but got 5"):
        ready.attach(torch.ones(1, requires_grad=True), 5, 1, torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"attach: param: expected a leaf tensor, but got one made by MulBackward0"):
        ready.attach(torch.ones(1, requires_grad=True) * 2, 0, 1, torch.zeros(1))


def test_a_parameter_marked_twice_counts_once():
    """A second accumulation of one replica's parameter (a weight used inside and outside a
    reentrant checkpoint) must not stand in for another replica's mark still to come; after the
    bucket completed, it is reported."""
    ready, seen = make([0, 0], [2])
    ready.note_replicas(3)
    for k in (1, 2):
        ready.mark(0, k)
        ready.mark(0, k)  # counted by occurrence, these four marks would have completed the bucket
    ready.mark(1, 1)
    assert seen.completed == []
    ready.mark(1, 2)
    assert seen.completed == [0] and not ready.marked_after_complete()
    ready.mark(1, 2)
    assert ready.marked_after_complete()
    ready.reset_window()
    assert not ready.marked_after_complete()
    ready.mark(0, 1)
    ready.mark(1, 1)
    ready.mark(0, 2)
    assert seen.completed == [0]  # a new window counts from nothing
