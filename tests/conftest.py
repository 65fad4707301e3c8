import gc
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()

# One test body per device: CPU always, CUDA where a GPU is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _collect_after_each_test(request):
    """DPFAST_TEST_GC=1: a full garbage collection after each test, its name printed first, so
    that a native crash in a finalizer names the test whose garbage it was (set it by hand when
    a GPU run crashes between tests)."""
    yield
    if os.environ.get("DPFAST_TEST_GC"):
        print(f"gc after {request.node.nodeid}", file=sys.__stderr__, flush=True)
        gc.collect()


def graph_nodes(tensor):
    """Names of every autograd node reachable from tensor."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def routed(output) -> bool:
    """Whether output's backward goes through dpfast's routing node (NOTE [Parallel backward])."""
    return "torch::autograd::CppNode<dpfast::Route>" in graph_nodes(output)
