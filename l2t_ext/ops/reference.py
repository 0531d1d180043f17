"""The ``torch`` backend: plain-torch reference implementations of every op (any device; float64 too).

Tests compare every other backend against these, evaluated in float64. bf16 inputs are upcast to float32 so
the reference accumulates like the kernels do (docs/architecture.md, "Numerics").
"""

from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for uint32 values held in int64, without int64 overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * b_lo, a * b_hi  # each < 2**48
    lo = p_lo + ((p_hi & 0xFFFF) << 16)
    hi = (p_hi >> 16) + (lo >> 32)
    return hi & _MASK, lo & _MASK


def omega(n: int, k: int, seed: int, device=None) -> torch.Tensor:
    """Omega (n, k) float32, the rsvd test matrix, exactly as csrc/philox.h: Philox4x32-10 at counter
    (row, col), then the standardised sum of four 22-bit uniforms (mean 0, variance 1)."""
    rows = torch.arange(n, dtype=torch.int64, device=device)[:, None].expand(n, k)
    cols = torch.arange(k, dtype=torch.int64, device=device)[None, :].expand(n, k)
    c0, c1, c2, c3 = rows & _MASK, cols & _MASK, rows >> 32, cols >> 32
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    s = (c0 >> 10) + (c1 >> 10) + (c2 >> 10) + (c3 >> 10)
    centered = (s + (2 - 2**23)).to(torch.float32) * (1.0 / 4194304.0)  # exact
    return centered * torch.tensor(3.0**0.5, dtype=torch.float32)  # one float32 rounding, as in C++


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rsvd_sketch(W: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Y (B, m, k) = W (B, m, n) @ Omega (n, k)."""
    acc = acc_dtype(W.dtype)
    return W.to(acc) @ omega(W.shape[-1], k, seed, W.device).to(acc)


def segment_grad_outer(X, D, seg, num_segments: int, U, V) -> torch.Tensor:
    """G (S, r, r): G[s] = sum_{t: seg[t]==s} (U^T D[t]) (V^T X[t])^T; tokens with seg < 0 ignored."""
    acc = acc_dtype(X.dtype)
    keep = seg >= 0
    a = D[keep].to(acc) @ U.to(acc)  # (T', r)
    b = X[keep].to(acc) @ V.to(acc)  # (T', r)
    G = torch.zeros(num_segments, U.shape[1], V.shape[1], dtype=acc, device=X.device)
    return G.index_add_(0, seg[keep], a[:, :, None] * b[:, None, :])


def project(M, U, V) -> torch.Tensor:
    """(B, r, r) = U^T M V, batched over the leading dim."""
    acc = acc_dtype(M.dtype)
    return U.to(acc).mT @ M.to(acc) @ V.to(acc)


def fisher_quadform_implicit(delta, grads, damping: float) -> torch.Tensor:
    """q (M,) = mean_j (g_j . delta_m)^2 + damping ||delta_m||^2."""
    acc = acc_dtype(delta.dtype)
    d, g = delta.to(acc), grads.to(acc)
    return (d @ g.T).square().sum(1) / g.shape[0] + damping * d.square().sum(1)


def fisher_quadform_explicit(delta, fisher, damping: float) -> torch.Tensor:
    """q (M,) = delta_m^T (F + damping I) delta_m."""
    acc = acc_dtype(delta.dtype)
    d = delta.to(acc)
    return ((d @ fisher.to(acc).T) * d).sum(1) + damping * d.square().sum(1)


def fisher_accumulate(G, F_in, decay: float | None) -> torch.Tensor:
    """F = G^T G / N, or decay * F_in + (1 - decay) * G^T G / N."""
    acc = acc_dtype(G.dtype)
    g = G.to(acc)
    F = g.T @ g / g.shape[0]
    if F_in is not None:
        F = decay * F_in.to(acc) + (1.0 - decay) * F
    return F
