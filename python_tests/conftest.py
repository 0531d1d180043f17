"""Test configuration: run Triton kernels through the interpreter when no GPU is present, and start every test
from the same RNG state.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before l2t_ext.ops._triton is
imported, hence here.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (torch and Python), whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    yield
