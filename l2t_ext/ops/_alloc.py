"""Allocation of kernel outputs and workspaces (Python owns all memory; docs/architecture.md).

Tests switch on ``poison()`` so that every buffer handed to a kernel starts as NaN (or -1 for integer
buffers): an element a kernel forgot to write then shows up instead of hiding behind a zero.
"""

from __future__ import annotations

import contextlib

import torch

_POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


@contextlib.contextmanager
def poison(enabled: bool = True):
    """Within this block, fill every output/workspace with NaN before the kernel runs."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old
