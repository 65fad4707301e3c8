"""dpfast: a drop-in replacement for torch.nn.DataParallel.

    model = dpfast.DataParallel(model)   # was: torch.nn.DataParallel(model)
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401
from .checkpoint import load_state_dict, unwrap_state_dict, wrap_state_dict
from .criterion import ParallelCriterion, ReplicaOutputs
from .data_parallel import DataParallel, data_parallel  # the function, as torch.nn.parallel's

__all__ = ["DataParallel", "ParallelCriterion", "ReplicaOutputs", "data_parallel", "load_state_dict",
           "unwrap_state_dict", "wrap_state_dict"]
__version__ = "0.1.0"
