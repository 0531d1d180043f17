"""Test configuration: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before l2t_ext.ops._triton is
imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
