import pytest
import torch

CUDA = torch.cuda.is_available()

# One test body per device: CPU always, CUDA where a GPU is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
