"""Randomized SVD with an in-kernel counter-based sketch, and the low-rank projection U^T M V
(docs/architecture.md, "Kernels and backends").

Halko-Martinsson-Tropp: Y = W Omega with Omega (n, k) ~ N(0, 1) generated inside the kernel from
(seed, row, col) by Philox (never stored; the same seed gives the same Omega on every backend), Q = orth(Y),
``n_iter`` power iterations Q <- orth(W orth(W^T Q)), then the small SVD of Q^T W. Orthonormalisation
(CholeskyQR2, Householder QR as fallback) and the small SVD use torch.linalg, as the design allows.
"""

from __future__ import annotations

import torch

from l2t_ext.ops._common import check_same_device, check_tensor, implementation, l2t_op, out_dtype, pick

# The sketch Y = W Omega of rsvd, and project, per backend ("module.function" under l2t_ext/ops/); tests:
# python_tests/test_rsvd.py, benchmark: l2t_ext/bench/rsvd.py
RSVD_SKETCH = {
    "torch": "reference.rsvd_sketch",  # Omega materialised from the same Philox stream
    "cpu": "_cpu.rsvd_sketch",
    "cuda": "_cuda.rsvd_sketch",
    "triton": "_triton.rsvd_sketch",
}
PROJECT = {
    "torch": "reference.project",
    "cpu": "_cpu.project",  # the chunked path (_plan.py)
    "cuda": "_cuda.project",
    "triton": "_triton.project",
}


def rsvd_auto_order(device: torch.device) -> tuple[str, ...]:
    """Fastest first (benchmarks/README.md): CPU: C++ Omega + BLAS, then torch; H200: Triton, then CUDA, torch."""
    return ("cpu", "torch") if device.type == "cpu" else ("triton", "cuda", "torch")


def project_auto_order(device: torch.device) -> tuple[str, ...]:
    """CPU: the C++ kernels, then torch; GPU: Triton, torch, then the CUDA kernels."""
    return ("cpu", "torch") if device.type == "cpu" else ("triton", "torch", "cuda")


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of tall-skinny Y (B, m, k). On CPU: LAPACK Householder QR (the fastest
    there at these sizes). On GPU: CholeskyQR2 with the k x k Gram matrix in float64 (two Gram-Cholesky-solve
    passes), falling back to Householder QR when a Cholesky fails (Y too ill-conditioned); batched
    Householder QR of tall-skinny matrices is slow on GPUs."""
    if Y.device.type == "cpu":
        return torch.linalg.qr(Y).Q
    Q = Y.double()
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y).Q
        Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT  # Q L^{-T}
    return Q.to(Y.dtype)


def _small_svd(Q: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ub (k, k), S (k,), V (n, k)) with Q^T W = Ub diag(S) V^T. On CPU LAPACK factors the tall B^T (n, k) about
    3x faster than the wide B (k, n) (it starts with a QR of the tall side), so the SVD is taken of B^T = W^T Q."""
    if W.device.type == "cpu":
        V, S, Ubt = torch.linalg.svd(_tmatmul(W, Q), full_matrices=False)
        return Ubt.mT, S, V
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)
    return Ub, S, Vh.mT


def _tmatmul(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W^T Q. On CPU as (Q^T W)^T: the same product, but MKL runs the skinny (k, m) x (m, n) layout about twice
    as fast as (n, m) x (m, k) with a transposed W (benchmarks/README.md, rsvd)."""
    return (Q.mT @ W).mT if W.device.type == "cpu" else W.mT @ Q


@l2t_op("rsvd")
def _rsvd_op(W: torch.Tensor, rank: int, oversample: int, n_iter: int, seed: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead, (m, n) = W.shape[:-2], W.shape[-2:]
    acc = out_dtype(W.dtype)
    W3 = W.reshape(-1, m, n)
    k = min(rank + oversample, m, n)
    Y = implementation(RSVD_SKETCH[backend])(W3, k, seed % 2**64).to(acc)  # (B, m, k) = W Omega
    Wf = W3.to(acc)
    if Wf.shape[0] == 1:  # plain 2-D matmuls: batched bmm with one matrix is slower on CPU BLAS
        Y, Wf = Y[0], Wf[0]
    Q = _orth(Y)
    for _ in range(n_iter):  # power iterations sharpen a slowly decaying spectrum
        Q = _orth(_tmatmul(Wf, Q))
        Q = _orth(Wf @ Q)
    Ub, S, V = _small_svd(Q, Wf)  # B = Q^T W = Ub diag(S) V^T
    U = Q @ Ub[..., :rank]
    V = V[..., :rank]
    return (U.reshape(*lead, m, rank).contiguous(), S[..., :rank].reshape(*lead, rank).contiguous(),
            V.reshape(*lead, n, rank).contiguous())


@_rsvd_op.register_fake
def _(W, rank, oversample, n_iter, seed, backend):
    lead, (m, n) = W.shape[:-2], W.shape[-2:]
    acc = out_dtype(W.dtype)
    return (W.new_empty((*lead, m, rank), dtype=acc), W.new_empty((*lead, rank), dtype=acc),
            W.new_empty((*lead, n, rank), dtype=acc))


def rsvd(W: torch.Tensor, rank: int, oversample: int = 8, n_iter: int = 2, seed: int = 0,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD, batched over leading dims.

    Args:
        W: (..., m, n) float32/float64 (bfloat16 on cuda/triton/torch); a batch of same-shape matrices.
        rank: r, 1 <= r <= min(m, n).
        oversample: extra sketch columns (k = min(r + oversample, m, n)).
        n_iter: power iterations.
        seed: 0 <= seed < 2**64; same seed, same Omega on every backend and same result on one backend.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (the sketch kernel; QR/SVD are torch.linalg).

    Returns:
        U (..., m, r) and V (..., n, r) with orthonormal columns, S (..., r) descending; float32
        (float64 for float64 W).
    """
    op = "rsvd"
    check_tensor(op, "W", W, tuple(range(2, 9)), want="a matrix (m, n) or a batch of them (..., m, n), at most 8-D")
    for name, val, lo in (("rank", rank, 1), ("oversample", oversample, 0), ("n_iter", n_iter, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise ValueError(f"l2t_ext.ops.{op}: {name} must be an int >= {lo}, got {val!r}")
    m, n = W.shape[-2:]
    if rank > min(m, n):
        raise ValueError(f"l2t_ext.ops.{op}: rank={rank} exceeds min(m, n)={min(m, n)} for W of shape "
                         f"{tuple(W.shape)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"l2t_ext.ops.{op}: seed must be an int in [0, 2**64), got {seed!r}")
    if W.numel() == 0:
        raise ValueError(f"l2t_ext.ops.{op}: W is empty (shape {tuple(W.shape)})")
    # QR/SVD of NaN/Inf fail deep in LAPACK without naming the input. min/max propagate NaN and reach +-Inf: an
    # exact test in one read of W (isfinite(W).all() materialises a mask and cost half the op on CPU)
    if not all(bool(torch.isfinite(x)) for x in torch.aminmax(W)):
        raise ValueError(f"l2t_ext.ops.{op}: W contains NaN or Inf (shape {tuple(W.shape)}); a low-rank basis of "
                         "non-finite values is undefined")
    name = pick(op, backend, W.device, W.dtype, rsvd_auto_order(W.device))
    # custom_op int args are int64: pass the seed as a signed value, the kernels read it as 64 raw bits
    return _rsvd_op(W, rank, oversample, n_iter, seed - 2**64 if seed >= 2**63 else seed, name)


@l2t_op("project")
def _project_op(M: torch.Tensor, U: torch.Tensor, V: torch.Tensor, backend: str) -> torch.Tensor:
    return implementation(PROJECT[backend])(M, U, V)


@_project_op.register_fake
def _(M, U, V, backend):
    return M.new_empty((M.shape[0], U.shape[-1], V.shape[-1]), dtype=out_dtype(M.dtype))


def project(M: torch.Tensor, U: torch.Tensor, V: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Low-rank projection U^T M V (the paper's proxy theta~ = U^T W V), batched.

    Args:
        M: (..., m, n); U: (..., m, r1) or (m, r1); V: (..., n, r2) or (n, r2) (2-D bases are shared by
            the batch). Float dtypes as for ``rsvd``.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".

    Returns:
        (..., r1, r2) float32 (float64 for float64 M).
    """
    op = "project"
    check_tensor(op, "M", M, tuple(range(2, 9)))
    check_tensor(op, "U", U, tuple(range(2, 9)))
    check_tensor(op, "V", V, tuple(range(2, 9)))
    device = check_same_device(op, M=M, U=U, V=V)
    lead, (m, n) = M.shape[:-2], M.shape[-2:]
    for name, B, rows in (("U", U, m), ("V", V, n)):
        if B.shape[-2] != rows:
            raise ValueError(f"l2t_ext.ops.{op}: {name} must have {rows} rows to match M {tuple(M.shape)}, got "
                             f"{tuple(B.shape)}")
        if B.dim() > 2 and B.shape[:-2] != lead:
            raise ValueError(f"l2t_ext.ops.{op}: {name} batch dims {tuple(B.shape[:-2])} differ from M's "
                             f"{tuple(lead)}")
    if M.numel() == 0:
        raise ValueError(f"l2t_ext.ops.{op}: M is empty (shape {tuple(M.shape)})")
    name = pick(op, backend, device, M.dtype, project_auto_order(device))
    M3 = M.reshape(-1, m, n)
    U3 = U.expand(*lead, *U.shape[-2:]).reshape(-1, *U.shape[-2:])
    V3 = V.expand(*lead, *V.shape[-2:]).reshape(-1, *V.shape[-2:])
    return _project_op(M3, U3, V3, name).reshape(*lead, U.shape[-1], V.shape[-1])
