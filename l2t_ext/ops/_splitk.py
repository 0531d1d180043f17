"""Split-K GEMM drivers shared by the ``cuda`` and ``triton`` backends (written once; each backend supplies
its GEMM and finalize launchers and its tile constants in a ``SplitK``). The ``triton`` backend's fisher_quadform
is a fused kernel of its own (the epilogue in the GEMM); this two-launch version stays its benchmark baseline.

fisher_quadform, implicit: C[z] = delta @ grads^T over the z-th chunk of p (nz chunks so that the grid fills
the GPU), then a finalize kernel sums the chunks in a fixed order and applies
q_m = (1/N) sum_n C[m, n]^2 + damping ||delta_m||^2. Explicit: C[z] = delta @ F^T per chunk,
q_m = sum_i (sum_z C[z, m, i]) delta[m, i] + damping ||delta_m||^2. fisher_accumulate: one GEMM with the EMA
folded in, F = scale G^T G + decay F_in. Deterministic: no float atomics, fixed summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

F32 = torch.float32


@dataclasses.dataclass(frozen=True)
class SplitK:
    gemm: Callable  # (X, sXr, sXc, sXz, idx, nrows, V, sVk, sVc, ncols, K, *, nz, split, kchunk, ...) -> (nz, r, c)
    finalize: Callable  # (C (nz, M, N), delta, weighted, inv_n, damping) -> q (M,)
    sm_count: Callable  # device -> streaming multiprocessors (1 for the Triton interpreter)
    tile_m: int  # rows of delta per GEMM tile
    tile_n: int  # columns of the other operand per GEMM tile
    kchunk_align: int  # a K chunk is a multiple of this
    bf16_dot: bool = False  # the GEMM takes ``bf16_dot=`` (bf16 tensor-core dot when both operands are bf16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split(k: SplitK, K: int, tiles: int, device) -> tuple[int, int]:
    """(nz, kchunk): split K so that about two waves of tiles fill the GPU (at most 64 chunks of >= 256)."""
    nz = max(1, min(64, (2 * k.sm_count(device)) // max(1, tiles), K // 256))
    kchunk = _cdiv(_cdiv(K, nz), k.kchunk_align) * k.kchunk_align
    return _cdiv(K, kchunk), kchunk


def _dot(k: SplitK, flag: bool) -> dict:
    return {"bf16_dot": flag} if k.bf16_dot else {}


def fisher_quadform_implicit(k: SplitK, delta: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    M, p = delta.shape
    N = grads.shape[0]
    g = grads if grads.dtype == delta.dtype else grads.to(delta.dtype)
    nz, kchunk = split(k, p, _cdiv(M, k.tile_m) * _cdiv(N, k.tile_n), delta.device)
    C = k.gemm(delta, delta.stride(0), delta.stride(1), 0, None, M, g, g.stride(1), g.stride(0), N, p, nz=nz,
               split=True, kchunk=kchunk, **_dot(k, delta.dtype == torch.bfloat16))
    return k.finalize(C, delta, False, 1.0 / N, damping)


def fisher_quadform_explicit(k: SplitK, delta: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    M, p = delta.shape
    F = fisher if fisher.dtype in (F32, torch.bfloat16) else fisher.to(F32)
    nz, kchunk = split(k, p, _cdiv(M, k.tile_m) * _cdiv(p, k.tile_n), delta.device)
    # C[z, m, i] = sum_{j in chunk z} delta[m, j] F[i, j]
    C = k.gemm(delta, delta.stride(0), delta.stride(1), 0, None, M, F, F.stride(1), F.stride(0), p, p, nz=nz,
               split=True, kchunk=kchunk, **_dot(k, delta.dtype == torch.bfloat16 and F.dtype == torch.bfloat16))
    return k.finalize(C, delta, True, 1.0, damping)


def fisher_accumulate(k: SplitK, G: torch.Tensor, F_in: torch.Tensor | None, decay: float | None) -> torch.Tensor:
    N, p = G.shape
    Fi = F_in.to(F32).contiguous() if F_in is not None else None
    scale = (1.0 - decay) / N if Fi is not None else 1.0 / N
    # F[i, j] = scale * sum_n G[n, i] G[n, j] + decay * F_in[i, j]
    return k.gemm(G, G.stride(1), G.stride(0), 0, None, p, G, G.stride(0), G.stride(1), p, N, alpha=scale,
                  beta=decay if Fi is not None else 0.0, Yin=Fi, **_dot(k, G.dtype == torch.bfloat16))[0]
