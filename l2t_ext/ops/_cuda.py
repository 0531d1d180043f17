"""The ``cuda`` backend: launchers for the CUDA kernels in ``_C_cuda`` (csrc/cuda/kernels.cu).
``segment_grad_outer`` runs on the span plan, ``project`` on the chunked plan (``_plan``).

Invariants: inputs are float32 or bfloat16 CUDA tensors on one device; accumulation, outputs and workspaces
are float32; every launch goes on ``torch.cuda.current_stream()`` of the inputs' device, so the kernels
order correctly with surrounding torch work without any synchronisation. X/D/W/delta/grads/fisher are read
through their strides; small operands (U, V) are converted to contiguous float32 (bfloat16 when X is bfloat16).
bf16 x bf16 GEMMs run on tensor cores (WMMA) on sm_80+: on the vectorised ``rows_tc`` kernel where the operands'
layout allows (``_rows_tc_layout``), else on the generic one; everything else on the fp32 CUDA-core kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from l2t_ext._backend import _C_cuda
from l2t_ext.ops import _plan, _splitk
from l2t_ext.ops._alloc import empty

CHUNK = 128
F32 = torch.float32


def _dt(t: torch.Tensor) -> str:
    return "bfloat16" if t.dtype == torch.bfloat16 else "float32"


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _gemm(X, sXr, sXc, sXz, idx, nrows, V, sVk, sVc, ncols, K, *, nz=1, split=False, kchunk=0, seed=0,
          alpha=1.0, beta=0.0, Yin=None):
    """Y[z] (nrows, ncols) = alpha * X(rows) @ V + beta * Yin  (see csrc/cuda/kernels.h): on ``rows_tc`` where the
    layout allows (``_rows_tc_layout``), else on the generic kernels."""
    Y = empty((nz, nrows, ncols), F32, X.device)
    tc = _rows_tc_layout(X, sXr, sXc, sXz, idx, V, sVk, sVc, ncols, split, kchunk, alpha, beta, Yin)
    with torch.cuda.device(X.device):
        if tc is not None:
            _C_cuda.rows_tc(X.data_ptr(), sXr, sXz, nrows, V.data_ptr(), *tc, ncols, K, kchunk or K, nz, split,
                            Y.data_ptr(), _stream(X))
        else:
            _C_cuda.gemm(_dt(X), X.data_ptr(), sXr, sXc, sXz, idx.data_ptr() if idx is not None else 0, nrows,
                         _dt(V) if V is not None else "float32", V.data_ptr() if V is not None else 0, sVk, sVc,
                         seed, ncols, K, kchunk or K, nz, split, alpha, beta,
                         Yin.data_ptr() if Yin is not None else 0, Y.data_ptr(), _stream(X))
    return Y


_GENERIC_ONLY = False  # set by generic_gemm()


@contextlib.contextmanager
def generic_gemm():
    """Within this block (or around a function it decorates: ``generic_gemm()(fn)``) every GEMM runs on the generic
    kernels (one element per load, through any strides), never on ``rows_tc``: the A/B of ``l2t bench``
    (``l2t:cuda_generic``) and of the tests."""
    global _GENERIC_ONLY
    old, _GENERIC_ONLY = _GENERIC_ONLY, True
    try:
        yield
    finally:
        _GENERIC_ONLY = old


@functools.cache
def _major(device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _rows_tc_layout(X, sXr, sXc, sXz, idx, V, sVk, sVc, ncols, split, kchunk, alpha, beta, Yin):
    """(sVr, v_t) for ``rows_tc`` when it can run this GEMM, else None: bf16 X and V on sm_80+, X unit-stride along
    K and its rows 16-byte aligned, V unit-stride along one dimension with 16-byte aligned rows (V (K, ncols):
    ncols a multiple of 8), K chunks multiples of 8; no row index, alpha, beta or sketch (the generic kernels'
    extras). The segment_grad_outer projections, ``project`` and the quadforms' split-K GEMMs in bf16 qualify."""
    if _GENERIC_ONLY or idx is not None or V is None or Yin is not None or alpha != 1.0 or beta != 0.0 \
            or X.dtype != torch.bfloat16 or V.dtype != torch.bfloat16 or sXc != 1:
        return None
    sVr, v_t = (sVk, False) if sVc == 1 and ncols % 8 == 0 else (sVc, True)
    if v_t and sVk != 1:
        return None
    aligned = sXr % 8 == 0 and sXz % 8 == 0 and sVr % 8 == 0 and (not split or kchunk % 8 == 0) \
        and X.data_ptr() % 16 == 0 and V.data_ptr() % 16 == 0
    return (sVr, v_t) if aligned and _major(X.device) >= 8 else None


def rsvd_sketch(W: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    B, m, n = W.shape
    return _gemm(W, W.stride(1), W.stride(2), W.stride(0), None, m, None, 0, 0, k, n, nz=B, seed=seed)


def row_project(X: torch.Tensor, idx: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
    # bf16 X: V in bf16 too, so that the GEMM runs on tensor cores (sm_80+; fp32 accumulation)
    V = V.to(torch.bfloat16 if X.dtype == torch.bfloat16 else F32).contiguous()
    nrows = idx.numel() if idx is not None else X.shape[0]
    return _gemm(X, X.stride(0), X.stride(1), 0, idx, nrows, V, V.stride(0), 1, V.shape[1], X.shape[1])[0]


def chunk_outer(A: torch.Tensor, B: torch.Tensor, chunk_start: torch.Tensor) -> torch.Tensor:
    C = chunk_start.numel() - 1
    P = empty((C, A.shape[1], B.shape[1]), F32, A.device)
    with torch.cuda.device(A.device):
        _C_cuda.chunk_outer(A.data_ptr(), B.data_ptr(), A.shape[1], B.shape[1], chunk_start.data_ptr(), C,
                            P.data_ptr(), _stream(A))
    return P


def segment_sum(P: torch.Tensor, seg_chunk_start: torch.Tensor) -> torch.Tensor:
    S = seg_chunk_start.numel() - 1
    G = empty((S,) + tuple(P.shape[1:]), F32, P.device)
    with torch.cuda.device(P.device):
        _C_cuda.segment_sum(P.data_ptr(), math.prod(P.shape[1:]), seg_chunk_start.data_ptr(), S, G.data_ptr(),
                            _stream(P))
    return G


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _finalize(C, delta, weighted: bool, inv_n: float, damping: float):
    nz, M, N = C.shape
    q = empty((M,), F32, delta.device)
    with torch.cuda.device(delta.device):
        _C_cuda.quadform_finalize(C.data_ptr(), nz, M, N, _dt(delta), delta.data_ptr(), delta.stride(0),
                                  delta.stride(1), delta.shape[1], weighted, inv_n, damping, q.data_ptr(),
                                  _stream(delta))
    return q


# 64 x 32 GEMM tiles (csrc/cuda/kernels.cu), K chunks in multiples of 32
SPLITK = _splitk.SplitK(gemm=_gemm, finalize=_finalize, sm_count=_sm_count, tile_m=64, tile_n=32, kchunk_align=32)


def fisher_quadform_implicit(delta: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    return _splitk.fisher_quadform_implicit(SPLITK, delta, grads, damping)


def fisher_quadform_explicit(delta: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    return _splitk.fisher_quadform_explicit(SPLITK, delta, fisher, damping)


def fisher_accumulate(G: torch.Tensor, F_in: torch.Tensor | None, decay: float | None) -> torch.Tensor:
    return _splitk.fisher_accumulate(SPLITK, G, F_in, decay)


CHUNKED = _plan.Chunked(CHUNK, row_project, chunk_outer, segment_sum, acc=F32)


def segment_grad_outer(X, D, seg, num_segments: int, U, V, nsplit: int | None = None) -> torch.Tensor:
    """Two passes on the span plan (``_plan``): project every token (two GEMMs, (T, r) float32 intermediates),
    then one block per (segment, part of its token span, 1024 outputs) adds its part's outer products in token
    order, and the parts are summed in a fixed order. No sort and nothing read back to the host (the chunked
    plan it replaced sorted the tokens and synchronised three times per call: ``nonzero``, ``bincount``'s size, the
    chunk count). bf16 projections of rows with unit column stride run on ``rows_tc``.
    ``nsplit`` overrides the parts per span (tests)."""
    T, S = seg.numel(), num_segments
    A = row_project(D, None, U)  # (T, r) float32
    B = row_project(X, None, V)  # (T, r') float32
    first, last = _plan.segment_spans(seg, S)
    nsplit = nsplit or _plan.pieces(T, S, _sm_count(X.device))
    seg = seg.contiguous()
    P = empty((S, nsplit, A.shape[1], B.shape[1]), F32, X.device)
    with torch.cuda.device(X.device):
        _C_cuda.span_outer(A.data_ptr(), B.data_ptr(), A.shape[1], B.shape[1], seg.data_ptr(), first.data_ptr(),
                           last.data_ptr(), S, nsplit, P.data_ptr(), _stream(X))
    return P[:, 0] if nsplit == 1 else P.sum(1)  # torch's reduction: fixed order for a given shape


def project(M, U, V) -> torch.Tensor:
    return _plan.chunked_project(CHUNKED, M, U, V)
