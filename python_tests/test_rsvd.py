"""rsvd and project: orthonormality, ordering, accuracy against torch.svd_lowrank, seeds, batching, and
the in-kernel sketch matrix being the same on every backend."""

from __future__ import annotations

import _cases
import pytest
import torch
from _cases import BF16, F32, F64, cases, exact_cases, rel_err, without_sync

from l2t_ext import ops
from l2t_ext.ops import reference


def decaying(m, n, seed, dtype=torch.float64, decay=0.8):
    """A matrix with singular values decay**i (and a noise floor), fresh random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    Uq = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    Vq = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64) + 1e-3
    return ((Uq * s) @ Vq.T).to(dtype)


@pytest.mark.parametrize("backend,device,dtype", exact_cases(F64, F32))
def test_sketch_matrix_is_identical_across_backends(backend, device, dtype):
    # W = I_n makes the sketch Y = Omega itself: every backend must generate the same float32 Omega
    n, k, seed = 37, 11, 2**40 + 12345
    from l2t_ext.ops._common import implementation
    from l2t_ext.ops.rsvd import RSVD_SKETCH

    eye = torch.eye(n, dtype=dtype, device=device)[None]
    Y = implementation(RSVD_SKETCH[backend])(eye, k, seed)[0]
    Om = reference.omega(n, k, seed)
    assert torch.equal(Y.float().cpu(), Om)


# (orthonormality of U and V, singular values against float64 svdvals)
@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: (1e-10, 1e-6), F32: (1e-5, 1e-4)}))
@pytest.mark.parametrize("shape,rank", [((40, 30), 5), ((3, 64, 37), 8), ((1, 1), 1), ((513, 37), 16)])
def test_rsvd_properties(backend, device, dtype, tol, shape, rank):
    W = torch.stack([decaying(*shape[-2:], seed=i) for i in range(shape[0] if len(shape) == 3 else 1)])
    W = (W if len(shape) == 3 else W[0]).to(dtype).to(device)
    U, S, V = ops.rsvd(W, rank, seed=7, backend=backend)
    assert U.shape == (*shape[:-1], rank) and V.shape == (*shape[:-2], shape[-1], rank)
    assert S.shape == (*shape[:-2], rank)
    eye = torch.eye(rank, dtype=torch.float64)
    assert (U.double().cpu().mT @ U.double().cpu() - eye).abs().max() < tol[0]
    assert (V.double().cpu().mT @ V.double().cpu() - eye).abs().max() < tol[0]
    assert (S[..., :-1] >= S[..., 1:]).all()
    sv = torch.linalg.svdvals(W.double().cpu())[..., :rank]
    assert rel_err(S, sv) < tol[1]
    # same seed -> bitwise identical on the same backend
    U2, S2, V2 = ops.rsvd(W, rank, seed=7, backend=backend)
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(V, V2)


@pytest.mark.parametrize("backend,device,dtype", exact_cases(F64, F32))
def test_rsvd_at_least_as_accurate_as_svd_lowrank(backend, device, dtype):
    """Same oversampling and power iterations as torch.svd_lowrank, compared over 100 fresh matrices and seeds.

    Both are randomized: a single draw can favour either. Over 300 draws (measured, float64) the mean
    singular-value error was within 7% of svd_lowrank's and the reconstruction ratio within 0.1%, which is
    inside the standard error of the means. The bounds below allow that sampling noise of 100 draws (about
    10% for the heavy-tailed singular-value error, well under 1% for the reconstruction) and no more."""
    rank, over, iters = 10, 4, 1
    ours_sv, base_sv, ours_rec, base_rec = [], [], [], []
    for trial in range(100):
        W = decaying(120, 90, seed=100 + trial, decay=0.9).to(dtype).to(device)
        Wd = W.double().cpu()
        sv = torch.linalg.svdvals(Wd)
        opt = sv[rank:].square().sum().sqrt()
        U, S, V = ops.rsvd(W, rank, oversample=over, n_iter=iters, seed=trial, backend=backend)
        torch.manual_seed(trial)
        Ub, Sb, Vb = torch.svd_lowrank(W, q=rank + over, niter=iters)
        Ub, Sb, Vb = Ub[:, :rank], Sb[:rank], Vb[:, :rank]
        for (u, s, v), sv_list, rec_list in (((U, S, V), ours_sv, ours_rec), ((Ub, Sb, Vb), base_sv, base_rec)):
            u, s, v = u.double().cpu(), s.double().cpu(), v.double().cpu()
            sv_list.append(rel_err(s, sv[:rank]))
            rec_list.append(((Wd - (u * s) @ v.T).norm() / opt).item())  # 1.0 = optimal rank-r error
    mean = lambda xs: sum(xs) / len(xs)
    print(f"rsvd vs svd_lowrank: sv error {mean(ours_sv):.3e} vs {mean(base_sv):.3e}, "
          f"reconstruction {mean(ours_rec):.4f} vs {mean(base_rec):.4f}")
    assert mean(ours_sv) <= mean(base_sv) * 1.10, (mean(ours_sv), mean(base_sv))
    assert mean(ours_rec) <= mean(base_rec) * 1.005, (mean(ours_rec), mean(base_rec))


# (singular values, rank-r reconstruction) of a batched call against a loop of single calls
@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: (1e-11, 1e-10), F32: (2e-4, 2e-3)}))
def test_rsvd_batch_equals_loop_and_seeds_differ(backend, device, dtype, tol):
    W = torch.stack([decaying(50, 40, seed=i) for i in range(4)]).to(dtype).to(device)
    U, S, V = ops.rsvd(W, 6, seed=3, backend=backend)
    for i in range(4):
        Ui, Si, Vi = ops.rsvd(W[i], 6, seed=3, backend=backend)
        assert rel_err(Si, S[i]) < tol[0]
        assert rel_err((Ui * Si) @ Vi.mT, (U[i] * S[i]) @ V[i].mT) < tol[1]
    Wn = torch.randn(60, 60, dtype=dtype, device=device)  # flat spectrum: the sketch seed matters
    assert not torch.equal(ops.rsvd(Wn, 4, seed=1, n_iter=0, backend=backend)[0],
                           ops.rsvd(Wn, 4, seed=2, n_iter=0, backend=backend)[0])


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 1e-12, F32: 2e-5, BF16: 2.0}))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (37, 13, 3, 5, None), (2, 513, 37, 16, 8)])
def test_project_matches_float64(backend, device, dtype, tol, shape):
    if shape[-1] is None:  # unbatched M with 2-D bases
        m, n, r1, r2 = shape[:4]
        M = torch.randn(m, n, dtype=torch.float64)
        U, V = torch.randn(m, r1, dtype=torch.float64), torch.randn(n, r2, dtype=torch.float64)
    else:
        b, m, n, r1, r2 = shape
        M = torch.randn(b, m, n, dtype=torch.float64)
        U, V = torch.randn(b, m, r1, dtype=torch.float64), torch.randn(n, r2, dtype=torch.float64)
    Mi = M.to(dtype)
    ref = U.mT @ Mi.double() @ V
    base = torch.float64 if dtype == torch.float64 else torch.float32
    with ops.poison():
        out = ops.project(Mi.to(device), U.to(base).to(device), V.to(base).to(device), backend=backend)
    assert out.shape == ref.shape
    if dtype == torch.bfloat16:
        bf = (U.bfloat16().mT @ Mi @ V.bfloat16())
        assert rel_err(out, ref) <= tol * rel_err(bf, ref) + 1e-6
    else:
        assert rel_err(out, ref) <= tol


def test_project_rows_plan_is_the_segment_plan_of_one_segment_without_reading_back():
    from l2t_ext.ops import _plan

    for n, chunk in ((0, 4), (1, 4), (8, 4), (9, 4), (513, 128)):
        got = _plan.rows_plan(n, chunk, "cpu")
        want = _plan.segment_plan(torch.zeros(n, dtype=torch.int64), 1, chunk)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (n, chunk)
    assert [t.shape for t in _plan.rows_plan(513, 128, "meta")] == [(513,), (6,), (2,)]  # a host read raises on meta


@pytest.mark.skipif(not any(b in ("cuda", "triton") and d == "cuda" for b, d, _ in _cases._combos()),
                    reason="needs a GPU backend")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_project_on_a_gpu_does_not_synchronise(backend):
    if not any(b == backend and d == "cuda" for b, d, _ in _cases._combos()):
        pytest.skip(f"{backend} not runnable on the GPU here")
    M = torch.randn(3, 300, 200, device="cuda")
    U, V = torch.randn(3, 300, 8, device="cuda"), torch.randn(200, 16, device="cuda")
    want = ops.project(M, U, V, backend=backend)
    got = without_sync(lambda: ops.project(M, U, V, backend=backend))
    assert torch.equal(got, want) and rel_err(got, U.double().mT @ M.double() @ V.double()) <= 2e-5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=0), ValueError, "rank must be an int >= 1"),
    (dict(rank=31), ValueError, r"rank=31 exceeds min\(m, n\)=30"),
    (dict(W=torch.randn(30)), ValueError, r"W must be a matrix \(m, n\) or a batch of them \(\.\.\., m, n\), at most "
                                          r"8-D, got shape \(30,\)"),
    (dict(W=torch.full((30, 30), float("nan"))), ValueError, "W contains NaN or Inf"),
    (dict(W=torch.eye(30).index_put_((torch.tensor([3]), torch.tensor([4])), torch.tensor(float("inf")))),
     ValueError, "W contains NaN or Inf"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(n_iter=-1), ValueError, "n_iter must be"),
    (dict(W=torch.zeros(0, 30, 30)), ValueError, "W is empty"),
])
def test_rsvd_bad_input(kwargs, exc, match):
    args = dict(W=torch.randn(40, 30), rank=4, backend="cpu")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.rsvd(**args)


def test_project_bad_input():
    with pytest.raises(ValueError, match="U must have 5 rows"):
        ops.project(torch.randn(5, 6), torch.randn(4, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="V batch dims"):
        ops.project(torch.randn(2, 5, 6), torch.randn(5, 2), torch.randn(3, 6, 2))


@pytest.mark.parametrize("backend,device,dtype", exact_cases(F64, F32))
def test_rsvd_seed_edge_values(backend, device, dtype):
    W = decaying(30, 20, seed=0).to(dtype).to(device)
    for seed in (0, 1, 2**32 - 1, 2**32 + 1, 2**63, 2**64 - 1):
        U, S, V = ops.rsvd(W, 3, seed=seed, backend=backend)
        assert torch.isfinite(U).all() and (S[:-1] >= S[1:]).all()
