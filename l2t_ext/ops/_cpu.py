"""The ``cpu`` backend: thin launchers for the C++/OpenMP kernels in ``_C`` (csrc/cpu/kernels.cpp).

Invariants: inputs are float32 or float64 CPU tensors; operands that the kernels read row-contiguously
(V, U, delta, grads, fisher) are made contiguous here (a copy when they are not); X and D are read through
their strides. Outputs and workspaces come from ``_alloc.empty``.
"""

from __future__ import annotations

import math

import torch

from l2t_ext._backend import _C
from l2t_ext.ops import _plan
from l2t_ext.ops._alloc import empty

CHUNK = 256  # tokens per partial outer-product block


def _dt(t: torch.Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


def rsvd_sketch(W: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    B, m, n = W.shape
    Y = empty((B, m, k), W.dtype, W.device)
    _C.sketch(_dt(W), W.data_ptr(), B, m, n, W.stride(0), W.stride(1), W.stride(2), k, seed, Y.data_ptr())
    return Y


def row_project(X: torch.Tensor, idx: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
    V = V.to(X.dtype).contiguous()
    nrows = idx.numel() if idx is not None else X.shape[0]
    Y = empty((nrows, V.shape[1]), X.dtype, X.device)
    _C.row_project(_dt(X), X.data_ptr(), X.stride(0), X.stride(1), idx.data_ptr() if idx is not None else 0,
                   nrows, X.shape[1], V.data_ptr(), V.shape[1], Y.data_ptr())
    return Y


def chunk_outer(A: torch.Tensor, B: torch.Tensor, chunk_start: torch.Tensor) -> torch.Tensor:
    C = chunk_start.numel() - 1
    P = empty((C, A.shape[1], B.shape[1]), A.dtype, A.device)
    _C.chunk_outer(_dt(A), A.data_ptr(), B.data_ptr(), A.shape[1], B.shape[1], chunk_start.data_ptr(), C,
                   P.data_ptr())
    return P


def segment_sum(P: torch.Tensor, seg_chunk_start: torch.Tensor) -> torch.Tensor:
    S = seg_chunk_start.numel() - 1
    G = empty((S,) + tuple(P.shape[1:]), P.dtype, P.device)
    _C.segment_sum(_dt(P), P.data_ptr(), math.prod(P.shape[1:]), seg_chunk_start.data_ptr(), S, G.data_ptr())
    return G


def fisher_quadform_implicit(delta: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    d, g = delta.contiguous(), grads.to(delta.dtype).contiguous()
    M, p = d.shape
    N = g.shape[0]
    C = empty((M, N), d.dtype, d.device)
    q = empty((M,), d.dtype, d.device)
    _C.quadform_implicit(_dt(d), d.data_ptr(), g.data_ptr(), M, N, p, 1.0 / N, damping, C.data_ptr(), q.data_ptr())
    return q


def fisher_quadform_explicit(delta: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    d, F = delta.contiguous(), fisher.to(delta.dtype).contiguous()
    M, p = d.shape
    Y = empty((M, p), d.dtype, d.device)
    q = empty((M,), d.dtype, d.device)
    _C.quadform_explicit(_dt(d), d.data_ptr(), F.data_ptr(), M, p, damping, Y.data_ptr(), q.data_ptr())
    return q


def fisher_accumulate(G: torch.Tensor, F_in: torch.Tensor | None, decay: float | None) -> torch.Tensor:
    g = G.contiguous()
    N, p = g.shape
    F_in = F_in.to(g.dtype).contiguous() if F_in is not None else None
    F = empty((p, p), g.dtype, g.device)
    scale = (1.0 - decay) / N if F_in is not None else 1.0 / N
    _C.gram_ema(_dt(g), g.data_ptr(), N, p, F_in.data_ptr() if F_in is not None else 0,
                decay if F_in is not None else 0.0, scale, F.data_ptr())
    return F


CHUNKED = _plan.Chunked(CHUNK, row_project, chunk_outer, segment_sum)


def segment_grad_outer(X, D, seg, num_segments: int, U, V) -> torch.Tensor:
    return _plan.chunked_segment_grad_outer(CHUNKED, X, D, seg, num_segments, U, V)


def project(M, U, V) -> torch.Tensor:
    return _plan.chunked_project(CHUNKED, M, U, V)
