"""Damped Fisher quadratic form and the explicit empirical Fisher (docs/architecture.md, "Kernels and backends").

Implicit form: with the empirical Fisher F = (1/N) sum_j g_j g_j^T of N gradient rows,
    q_m = delta_m^T (F + lambda I) delta_m = (1/N) sum_j (g_j . delta_m)^2 + lambda ||delta_m||^2,
evaluated without forming the p x p matrix (M x N dot products). Explicit form: q_m with a given F, e.g. an
EMA Fisher built by ``fisher_accumulate``.
"""

from __future__ import annotations

import math

import torch

from l2t_ext.ops._common import check_same_device, check_tensor, implementation, l2t_op, pick

# fisher_quadform / fisher_accumulate per backend ("module.function" under l2t_ext/ops/; cuda uses the split-K
# driver in _splitk.py, triton the same driver with its own GEMM and finalize kernels); tests:
# python_tests/test_fisher_quadform.py, benchmark: l2t_ext/bench/fisher_quadform.py
FISHER_QUADFORM_IMPLICIT = {
    "torch": "reference.fisher_quadform_implicit",
    "cpu": "_cpu.fisher_quadform_implicit",
    "cuda": "_cuda.fisher_quadform_implicit",
    "triton": "_triton.fisher_quadform_implicit",
}
FISHER_QUADFORM_EXPLICIT = {
    "torch": "reference.fisher_quadform_explicit",
    "cpu": "_cpu.fisher_quadform_explicit",
    "cuda": "_cuda.fisher_quadform_explicit",
    "triton": "_triton.fisher_quadform_explicit",
}
FISHER_ACCUMULATE = {
    "torch": "reference.fisher_accumulate",
    "cpu": "_cpu.fisher_accumulate",
    "cuda": "_cuda.fisher_accumulate",
    "triton": "_triton.fisher_accumulate",
}


def quadform_auto_order(device: torch.device, dtype: torch.dtype, p: int) -> tuple[str, ...]:
    """Fastest first, measured by ``l2t bench`` at M=64, N=512 (benchmarks/README.md). CPU: torch (one MKL GEMM)
    beats the C++ kernel. H200 and H100, measured at p = 4096, 16384 and 65536, float32: the CUDA kernel wins at
    4096, Triton (split-K + finalize) at 16384; the cut is placed at p <= 8192, between the measured sizes; at
    p > 32768 torch (cuBLAS). bfloat16: Triton at every measured p (H100: 9x the CUDA kernel's tensor-core
    WMMA GEMM at 4096, 19x at 65536)."""
    if device.type == "cpu":
        return ("torch",)
    if dtype == torch.bfloat16:
        return ("triton", "torch", "cuda")
    if p <= 8192:
        return ("cuda", "triton", "torch")
    if dtype == torch.float32 and p > 32768:
        return ("torch", "triton", "cuda")
    return ("triton", "torch", "cuda")


def accumulate_auto_order(device: torch.device) -> tuple[str, ...]:
    """CPU: the C++ kernel, then torch; GPU: Triton, torch, then the CUDA kernel (as for the GEMMs above)."""
    return ("cpu", "torch") if device.type == "cpu" else ("triton", "torch", "cuda")


@l2t_op("fisher_quadform")
def _fisher_quadform_op(delta: torch.Tensor, grads: torch.Tensor | None, fisher: torch.Tensor | None,
                        damping: float, backend: str) -> torch.Tensor:
    if grads is not None:
        return implementation(FISHER_QUADFORM_IMPLICIT[backend])(delta, grads, damping)
    return implementation(FISHER_QUADFORM_EXPLICIT[backend])(delta, fisher, damping)


@_fisher_quadform_op.register_fake
def _(delta, grads, fisher, damping, backend):
    return delta.new_empty((delta.shape[0],), dtype=torch.float64 if delta.dtype == torch.float64 else torch.float32)


def fisher_quadform(delta: torch.Tensor, grads: torch.Tensor | None = None, fisher: torch.Tensor | None = None,
                    damping: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Damped Fisher quadratic form q_m = delta_m^T (F + damping I) delta_m.

    Args:
        delta: (M, p) parameter updates (float32/float64; bfloat16 on cuda/triton/torch).
        grads: (N, p) gradient rows defining the implicit empirical Fisher F = G^T G / N (never formed), or
        fisher: (p, p) explicit Fisher. Exactly one of ``grads``/``fisher``.
        damping: lambda >= 0.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".

    Returns:
        q (M,) float32 (float64 for float64 delta).
    """
    op = "fisher_quadform"
    check_tensor(op, "delta", delta, 2)
    if (grads is None) == (fisher is None):
        raise ValueError(f"l2t_ext.ops.{op}: pass exactly one of grads= (implicit) or fisher= (explicit)")
    p = delta.shape[1]
    if grads is not None:
        check_tensor(op, "grads", grads, 2)
        if grads.shape[1] != p:
            raise ValueError(f"l2t_ext.ops.{op}: grads must be (N, {p}) to match delta, got {tuple(grads.shape)}")
        if grads.shape[0] < 1:
            raise ValueError(f"l2t_ext.ops.{op}: grads must have at least one row (N >= 1)")
    else:
        check_tensor(op, "fisher", fisher, 2)
        if tuple(fisher.shape) != (p, p):
            raise ValueError(f"l2t_ext.ops.{op}: fisher must be ({p}, {p}) to match delta, got "
                             f"{tuple(fisher.shape)}")
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not math.isfinite(damping) \
            or damping < 0:
        raise ValueError(f"l2t_ext.ops.{op}: damping must be a finite float >= 0, got {damping!r}")
    device = check_same_device(op, delta=delta, grads=grads, fisher=fisher)
    other = grads if grads is not None else fisher
    if (delta.dtype == torch.float64) != (other.dtype == torch.float64):
        raise TypeError(f"l2t_ext.ops.{op}: delta is {delta.dtype} but {'grads' if grads is not None else 'fisher'} "
                        f"is {other.dtype}; use float64 for both or neither")
    name = pick(op, backend, device, delta.dtype, quadform_auto_order(device, delta.dtype, p))
    return _fisher_quadform_op(delta, grads, fisher, float(damping), name)


@l2t_op("fisher_accumulate")
def _fisher_accumulate_op(G: torch.Tensor, F: torch.Tensor | None, decay: float, backend: str) -> torch.Tensor:
    return implementation(FISHER_ACCUMULATE[backend])(G, F, decay if F is not None else None)


@_fisher_accumulate_op.register_fake
def _(G, F, decay, backend):
    p = G.shape[1]
    return G.new_empty((p, p), dtype=torch.float64 if G.dtype == torch.float64 else torch.float32)


def fisher_accumulate(G: torch.Tensor, F: torch.Tensor | None = None, decay: float | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Build or EMA-update an explicit empirical Fisher.

    Args:
        G: (N, p) gradient rows, N >= 1.
        F: optional (p, p) previous Fisher. Without F the result is G^T G / N.
        decay: required with F, in [0, 1]: result = decay * F + (1 - decay) * G^T G / N.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".

    Returns:
        (p, p) float32 (float64 for float64 G); a new tensor (F is not modified).
    """
    op = "fisher_accumulate"
    check_tensor(op, "G", G, 2)
    if G.shape[0] < 1:
        raise ValueError(f"l2t_ext.ops.{op}: G must have at least one row (N >= 1)")
    p = G.shape[1]
    if F is not None:
        check_tensor(op, "F", F, 2)
        if tuple(F.shape) != (p, p):
            raise ValueError(f"l2t_ext.ops.{op}: F must be ({p}, {p}) to match G, got {tuple(F.shape)}")
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"l2t_ext.ops.{op}: decay must be a float in [0, 1] when F is given, got {decay!r}")
    elif decay is not None:
        raise ValueError(f"l2t_ext.ops.{op}: decay={decay!r} given without F; pass F to EMA-update")
    device = check_same_device(op, G=G, F=F)
    name = pick(op, backend, device, G.dtype, accumulate_auto_order(device))
    return _fisher_accumulate_op(G, F, float(decay) if decay is not None else 0.0, name)
