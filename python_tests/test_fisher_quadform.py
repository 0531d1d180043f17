"""fisher_quadform (implicit and explicit) and fisher_accumulate against explicit float64 formulas."""

from __future__ import annotations

import _cases
import pytest
import torch
from _cases import BF16, F32, F64, HAS_GPU, cases, rel_err

from l2t_ext import ops


def explicit_ref(delta, grads, damping):
    d, g = delta.double().cpu(), grads.double().cpu()
    F = g.T @ g / g.shape[0] + damping * torch.eye(g.shape[1], dtype=torch.float64)
    return torch.einsum("mp,pq,mq->m", d, F, d)


def bf16_baseline_err(delta, grads, damping, ref):
    d, g = delta.cpu().bfloat16(), grads.cpu().bfloat16()
    q = (d @ g.T).square().mean(1) + damping * d.square().sum(1)
    return rel_err(q, ref)


SIZES = [(1, 1, 1), (3, 37, 5), (37, 513, 3), (8, 1000, 64)]  # (M, p, N)


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 5e-12, F32: 1e-4, BF16: 2.0}))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "M{}_p{}_N{}".format(*s))
def test_implicit_matches_explicit_float64(backend, device, dtype, tol, size):
    M, p, N = size
    delta = torch.randn(M, p, dtype=torch.float64).to(dtype)
    grads = torch.randn(N, p, dtype=torch.float64).to(dtype)
    damping = 0.3
    ref = explicit_ref(delta, grads, damping)
    with ops.poison():
        q = ops.fisher_quadform(delta.to(device), grads=grads.to(device), damping=damping, backend=backend)
    assert q.shape == (M,)
    if dtype == torch.bfloat16:
        assert rel_err(q, ref) <= tol * bf16_baseline_err(delta, grads, damping, ref) + 1e-6
    else:
        assert rel_err(q, ref) <= tol


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 2e-11, F32: 4e-4, BF16: 2.0}))
@pytest.mark.parametrize("size", [(1, 1, 1), (5, 37, 9), (16, 200, 40)], ids=lambda s: "M{}_p{}_N{}".format(*s))
def test_explicit_fisher_form(backend, device, dtype, tol, size):
    M, p, N = size
    delta = torch.randn(M, p, dtype=torch.float64).to(dtype).double()  # exactly representable in dtype
    grads = torch.randn(N, p, dtype=torch.float64)
    A = torch.randn(p, p, dtype=torch.float64)  # a non-symmetric F checks the index order too
    ref = torch.einsum("mp,pq,mq->m", delta, A, delta) + 0.1 * delta.square().sum(1)
    F = A.to(torch.float64 if dtype == torch.float64 else torch.float32)
    with ops.poison():
        q = ops.fisher_quadform(delta.to(dtype).to(device), fisher=F.to(device), damping=0.1, backend=backend)
    if dtype == torch.bfloat16:
        d = delta.bfloat16()
        base = rel_err(((d @ F.bfloat16().T) * d).sum(1) + 0.1 * d.square().sum(1), ref)
        assert rel_err(q, ref) <= tol * base + 1e-6
    else:
        assert rel_err(q, ref) <= tol
    del grads


@pytest.mark.skipif(not any(b == "triton" for b, _, _ in _cases._combos()), reason="triton backend not runnable here")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nz", [1, 2, 5])
def test_triton_fused_quadform_over_k_splits(dtype, nz):
    """The fused-epilogue kernel (an explicit candidate; the backend runs split-K): the last program of a tile sums
    the K-split partials in order, the last tile of a row block sums the row partials and the norms; both forms,
    shapes crossing tile edges, transposed inputs."""
    from l2t_ext.ops import _triton

    dev = "cuda" if HAS_GPU else "cpu"
    M, p, N = 37, 301, 40
    delta = torch.randn(M, p, dtype=torch.float64).to(dtype)
    grads = torch.randn(N, p, dtype=torch.float64).to(dtype)
    A = torch.randn(p, p, dtype=torch.float64).to(dtype)
    ref_i = explicit_ref(delta, grads, 0.3)
    d64 = delta.double()
    ref_e = torch.einsum("mp,pq,mq->m", d64, A.double(), d64) + 0.3 * d64.square().sum(1)
    d_t = delta.T.contiguous().T.to(dev)  # column-major view: strides are honoured
    with ops.poison():
        q_i = _triton.fisher_quadform_fused_implicit(d_t, grads.to(dev), 0.3, nz=nz)
        q_e = _triton.fisher_quadform_fused_explicit(delta.to(dev), A.to(dev), 0.3, nz=nz)
    tol = 1e-4  # the inputs are exact in their dtype and products accumulate in float32 (bf16 too)
    assert rel_err(q_i, ref_i) <= tol
    assert rel_err(q_e, ref_e) <= tol
    # bitwise repeatable: on a GPU the programs finish in a different order on every run, which the fixed
    # summation order must not see (and a missing memory fence would show as a stray value)
    for _ in range(20 if HAS_GPU else 1):
        assert torch.equal(q_i, _triton.fisher_quadform_fused_implicit(d_t, grads.to(dev), 0.3, nz=nz))
    assert rel_err(_triton.fisher_quadform_implicit(delta.to(dev), grads.to(dev), 0.3), ref_i) <= tol  # split-K


@pytest.mark.skipif(not any(b == "cuda" for b, _, _ in _cases._combos()), reason="cuda backend not runnable here")
@pytest.mark.parametrize("size", [(3, 8, 5), (37, 1000, 3), (64, 4104, 70)], ids=lambda s: "M{}_p{}_N{}".format(*s))
def test_cuda_bf16_quadforms_on_the_vectorised_kernel(size, monkeypatch):
    """bf16 quadforms with p a multiple of 8 run their split-K GEMM on rows_tc (V in its transposed layout): the same
    values as on the generic kernel, within bf16's error of the float64 forms, bitwise repeatable."""
    from l2t_ext.ops import _cuda

    calls = []
    real = _cuda._C_cuda.rows_tc
    monkeypatch.setattr(_cuda._C_cuda, "rows_tc", lambda *a: calls.append(a) or real(*a))
    M, p, N = size
    delta = torch.randn(M, p, dtype=torch.float64).bfloat16()
    grads = torch.randn(N, p, dtype=torch.float64).bfloat16()
    A = torch.randn(p, p, dtype=torch.float64).bfloat16() if p <= 1000 else None
    for kw, ref in ((dict(grads=grads.cuda()), explicit_ref(delta, grads, 0.3)),
                    *(((dict(fisher=A.cuda()), torch.einsum("mp,pq,mq->m", delta.double(), A.double(), delta.double())
                        + 0.3 * delta.double().square().sum(1)),) if A is not None else ())):
        calls.clear()
        with ops.poison():
            q = ops.fisher_quadform(delta.cuda(), damping=0.3, backend="cuda", **kw)
        assert len(calls) == 1 and calls[0][6]  # v_t: V is the transposed operand
        with _cuda.generic_gemm():
            q_generic = ops.fisher_quadform(delta.cuda(), damping=0.3, backend="cuda", **kw)
        assert len(calls) == 1 and rel_err(q, ref) <= 1e-4 and rel_err(q, q_generic) <= 1e-5
        assert torch.equal(q, ops.fisher_quadform(delta.cuda(), damping=0.3, backend="cuda", **kw))


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 5e-12, F32: 1e-4}))
@pytest.mark.parametrize("N,p", [(1, 1), (7, 37), (64, 130)])
def test_fisher_accumulate_build_and_ema(backend, device, dtype, tol, N, p):
    G = torch.randn(N, p, dtype=torch.float64)
    F0 = torch.randn(p, p, dtype=torch.float64)
    built = G.T @ G / N
    with ops.poison():
        F = ops.fisher_accumulate(G.to(dtype).to(device), backend=backend)
        F_ema = ops.fisher_accumulate(G.to(dtype).to(device), F0.to(dtype).to(device), decay=0.9, backend=backend)
    assert rel_err(F, built) <= tol
    assert rel_err(F_ema, 0.9 * F0 + 0.1 * built) <= tol
    # and the explicit quadform with the accumulated F equals the implicit one
    delta = torch.randn(3, p, dtype=torch.float64).to(dtype).to(device)
    q1 = ops.fisher_quadform(delta, fisher=F, damping=1e-5, backend=backend)
    q2 = ops.fisher_quadform(delta, grads=G.to(dtype).to(device), damping=1e-5, backend=backend)
    assert rel_err(q1, q2) <= 4 * tol


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(), ValueError, "exactly one of grads="),
    (dict(grads=torch.randn(4, 9)), ValueError, r"grads must be \(N, 8\)"),
    (dict(fisher=torch.randn(8, 7)), ValueError, r"fisher must be \(8, 8\)"),
    (dict(grads=torch.randn(0, 8)), ValueError, "at least one row"),
    (dict(grads=torch.randn(4, 8), damping=-1.0), ValueError, "damping must be"),
    (dict(grads=torch.randn(4, 8), damping=float("nan")), ValueError, "damping must be"),
    (dict(grads=torch.randn(4, 8, dtype=torch.float64)), TypeError, "float64 for both"),
    (dict(grads=torch.randn(4, 8), fisher=torch.randn(8, 8)), ValueError, "exactly one"),
])
def test_quadform_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.fisher_quadform(torch.randn(3, 8), backend="cpu", **kwargs)


def test_accumulate_bad_input():
    with pytest.raises(ValueError, match="decay must be a float in"):
        ops.fisher_accumulate(torch.randn(3, 4), torch.zeros(4, 4), decay=1.5)
    with pytest.raises(ValueError, match="decay=0.5 given without F"):
        ops.fisher_accumulate(torch.randn(3, 4), decay=0.5)
    with pytest.raises(ValueError, match=r"F must be \(4, 4\)"):
        ops.fisher_accumulate(torch.randn(3, 4), torch.zeros(3, 3), decay=0.5)
