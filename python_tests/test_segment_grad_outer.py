"""segment_grad_outer: every runnable backend against a float64 brute-force per-segment gradient."""

from __future__ import annotations

import _cases
import pytest
import torch
from _cases import BF16, F32, F64, HAS_GPU, cases, exact_cases, rel_err, without_sync

from l2t_ext import ops


def brute_force(X, D, seg, S, U, V):
    """Full per-segment gradient sum_t D[t] X[t]^T (m, n), then U^T G V, in float64."""
    X, D, U, V = (t.double().cpu() for t in (X, D, U, V))
    seg = seg.cpu()
    G = torch.zeros(S, U.shape[1], V.shape[1], dtype=torch.float64)
    for s in range(S):
        sel = seg == s
        full = D[sel].T @ X[sel]  # (m, n): the layer's weight gradient restricted to segment s
        G[s] = U.T @ full @ V
    return G


def make(T, n, m, r, S, dtype, device, seed, mask_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, generator=g, dtype=torch.float64)
    D = torch.randn(T, m, generator=g, dtype=torch.float64)
    U = torch.randn(m, r, generator=g, dtype=torch.float64)
    V = torch.randn(n, r, generator=g, dtype=torch.float64)
    # only half of the segment ids are used -> empty segments; some tokens masked with -1
    used = max(1, S // 2)
    seg = torch.randint(0, used, (T,), generator=g) * (S // used)
    seg[torch.rand(T, generator=g) < mask_frac] = -1
    X, D = X.to(dtype), D.to(dtype)
    U, V = U.to(torch.float64 if dtype == torch.float64 else torch.float32), V.to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return [t.to(device) for t in (X, D, seg, U, V)]


def torch_bf16_error(X, D, seg, S, U, V, ref):
    """Relative error of the same computation done by torch entirely in bfloat16."""
    Xb, Db, Ub, Vb = (t.cpu().bfloat16() for t in (X, D, U, V))
    keep = seg.cpu() >= 0
    a, b = Db[keep] @ Ub, Xb[keep] @ Vb
    G = torch.zeros(S, U.shape[1], V.shape[1], dtype=torch.bfloat16)
    G.index_add_(0, seg.cpu()[keep], a[:, :, None] * b[:, None, :])
    return rel_err(G, ref)


SHAPES = [  # (T, n, m, r, S)
    (1, 1, 1, 1, 1),
    (3, 3, 3, 1, 2),
    (37, 13, 11, 3, 5),
    (130, 37, 37, 16, 64),
    (513, 20, 17, 5, 256),
]


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 1e-12, F32: 2e-5, BF16: 2.0}))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_n{}_m{}_r{}_S{}".format(*s))
def test_matches_float64_bruteforce(backend, device, dtype, tol, shape):
    T, n, m, r, S = shape
    X, D, seg, U, V = make(T, n, m, r, S, dtype, device, seed=hash(shape) % 1000)
    ref = brute_force(X, D, seg, S, U, V)
    with ops.poison():
        out = ops.segment_grad_outer(X, D, seg, S, U, V, backend=backend)
    assert out.shape == (S, r, r)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = rel_err(out, ref)
    if dtype == torch.bfloat16:
        assert err <= tol * torch_bf16_error(X, D, seg, S, U, V, ref) + 1e-6
    else:
        assert err <= tol, err
    # segments no token maps to are exact zeros, not merely small (and not NaN from the poisoned buffers)
    used = set(seg[seg >= 0].tolist())
    for s in range(S):
        if s not in used:
            assert torch.equal(out[s].cpu(), torch.zeros(r, r, dtype=out.dtype))


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 1e-12, F32: 2e-5}))
def test_masked_tokens_are_never_read_into_result(backend, device, dtype, tol):
    X, D, seg, U, V = make(64, 9, 7, 4, 6, dtype, device, seed=3, mask_frac=0.5)
    ref = brute_force(X, D, seg, 6, U, V)
    X, D = X.clone(), D.clone()
    X[seg < 0] = float("nan")
    D[seg < 0] = float("inf")
    out = ops.segment_grad_outer(X, D, seg, 6, U, V, backend=backend)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("backend,device,dtype,tol", cases({F64: 1e-12, F32: 2e-5}))
def test_deterministic_and_strided_inputs(backend, device, dtype, tol):
    X, D, seg, U, V = make(300, 24, 10, 6, 3, dtype, device, seed=5)
    a = ops.segment_grad_outer(X, D, seg, 3, U, V, backend=backend)
    b = ops.segment_grad_outer(X, D, seg, 3, U, V, backend=backend)
    if backend == "torch" and device == "cuda":
        # the torch reference uses index_add_, whose CUDA kernel accumulates with float atomics (documented)
        assert rel_err(a, b) <= tol
    else:
        assert torch.equal(a, b)  # our kernels: fixed reduction order, bitwise reproducible
    # non-contiguous X (a transposed buffer) and a strided D view give the same result
    Xt = X.T.contiguous().T
    D2 = torch.stack([D, -D], dim=2)[:, :, 0]  # column stride 2
    assert not Xt.is_contiguous() and not D2.is_contiguous()
    c = ops.segment_grad_outer(Xt, D2, seg, 3, U, V, backend=backend)
    assert rel_err(c, brute_force(X, D, seg, 3, U, V)) <= tol


@pytest.mark.parametrize("backend,device,dtype", exact_cases(F64, F32))
def test_all_tokens_masked_gives_zeros(backend, device, dtype):
    X, D, seg, U, V = make(10, 4, 5, 2, 3, dtype, device, seed=1)
    seg = torch.full_like(seg, -1)
    with ops.poison():
        out = ops.segment_grad_outer(X, D, seg, 3, U, V, backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(3, 2, 2, dtype=out.dtype))


@pytest.mark.parametrize("backend,device,dtype", exact_cases(F64, F32, BF16))
def test_unchecked_ids_drop_out_of_range_tokens_like_masked_ones(backend, device, dtype):
    X, D, seg, U, V = make(90, 11, 9, 3, 5, dtype, device, seed=8)
    out_of_range = (torch.rand(90, generator=torch.Generator().manual_seed(8)) < 0.3).to(device)
    wild = torch.where(out_of_range, torch.tensor([5, 6, 2**40], device=device).repeat(30), seg)
    dropped = torch.where(out_of_range, -1, seg)
    with pytest.raises(ValueError, match="seg contains id 1099511627776 >= num_segments=5"):
        ops.segment_grad_outer(X, D, wild, 5, U, V, backend=backend)
    with pytest.raises(TypeError, match="check_ids must be a bool, got 0"):
        ops.segment_grad_outer(X, D, seg, 5, U, V, backend=backend, check_ids=0)
    with ops.poison():
        pairs = [(ops.segment_grad_outer(X, D, a, 5, U, V, backend=backend, check_ids=False),
                  ops.segment_grad_outer(X, D, b, 5, U, V, backend=backend)) for a, b in ((wild, dropped), (seg, seg))]
    for unchecked, checked in pairs:  # the same kernels on the same ids: bitwise equal (NaN never is)
        if backend == "torch" and device == "cuda":  # index_add_'s float atomics on CUDA
            assert rel_err(unchecked, checked) <= 2e-5
        else:
            assert torch.equal(unchecked, checked)


def test_the_id_check_read_after_the_launches_masks_bad_ids_and_discards_the_result(monkeypatch):
    """The GPU's order (maximum queued, kernels on masked ids, then the check), taken on the CPU."""
    import importlib

    sgo = importlib.import_module("l2t_ext.ops.segment_grad_outer")
    X, D, seg, U, V = make(40, 6, 5, 2, 4, F32, "cpu", seed=12)
    seen = []
    real = sgo.implementation(sgo.IMPLEMENTATIONS["torch"])
    monkeypatch.setattr(sgo, "implementation", lambda path: lambda *a: seen.append(a[2].clone()) or real(*a))
    monkeypatch.setattr(sgo, "check_after_launch", lambda device: True)
    assert torch.equal(ops.segment_grad_outer(X, D, seg, 4, U, V, backend="torch"),
                       real(X, D, seg, 4, U, V)) and torch.equal(seen[-1], seg)
    bad = seg.clone()
    bad[::7] = 9
    with pytest.raises(ValueError, match="seg contains id 9 >= num_segments=4"):
        ops.segment_grad_outer(X, D, bad, 4, U, V, backend="torch")
    assert torch.equal(seen[-1], torch.where(bad == 9, -1, bad))  # the kernel ran, on the masked ids only


@pytest.mark.skipif(not HAS_GPU or _cases._backend.triton is None, reason="needs a GPU and Triton")
def test_triton_call_waits_for_the_id_check_only():
    """Unchecked: no host synchronisation at all. Checked: the host waits for the ids' maximum only, so it returns
    while the kernels are still running (the read used to wait for them), with the same result."""
    X, D, seg, U, V = make(4096, 256, 256, 16, 64, BF16, "cuda", seed=9)
    ops.segment_grad_outer(X, D, seg, 64, U, V, backend="triton", check_ids=False)  # autotunes (synchronises)
    unchecked = without_sync(lambda: ops.segment_grad_outer(X, D, seg, 64, U, V, backend="triton", check_ids=False))
    assert torch.equal(unchecked, ops.segment_grad_outer(X, D, seg, 64, U, V, backend="triton"))
    g = torch.Generator(device="cuda").manual_seed(10)  # ~0.5 GB of X and D: the kernels run for a while
    T, n = 32768, 4096
    Xb = torch.randn(T, n, device="cuda", dtype=BF16, generator=g)
    Db = torch.randn(T, n, device="cuda", dtype=BF16, generator=g)
    Ub, Vb = (torch.randn(n, 32, device="cuda", generator=g) for _ in range(2))
    segb = contiguous_episodes(T, 64, seed=10).cuda()
    want = ops.segment_grad_outer(Xb, Db, segb, 64, Ub, Vb, backend="triton", check_ids=False)  # autotunes
    torch.cuda.synchronize()
    got = ops.segment_grad_outer(Xb, Db, segb, 64, Ub, Vb, backend="triton")
    kernels_still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert kernels_still_running and torch.equal(got, want)


def contiguous_episodes(T, S, seed, gap_frac=0.2):
    """seg of S contiguous episodes in token order (some empty), prompt-like masked runs between them."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, T + 1, (S - 1,), generator=g)).values  # repeated cuts: empty episodes
    seg = torch.bucketize(torch.arange(T), cuts, right=True)
    seg[torch.rand(T, generator=g) < gap_frac] = -1
    return seg


TRITON_DEV = "cuda" if HAS_GPU else "cpu"
needs_triton = pytest.mark.skipif(not any(b == "triton" for b, _, _ in _cases._combos()),
                                  reason="triton backend not runnable here (no GPU, no interpreter)")


needs_cuda = pytest.mark.skipif(not any(b == "cuda" for b, _, _ in _cases._combos()),
                                reason="cuda backend not runnable here (no GPU or not built with CUDA)")
# the kernels that cut each segment's token span into parts: (module under l2t_ext.ops, function, device)
SPAN_PARTS = {"triton_fused": ("_triton", "segment_grad_outer_fused", TRITON_DEV),
              "cuda": ("_cuda", "segment_grad_outer", "cuda"), "cuda_generic": ("_cuda", "segment_grad_outer", "cuda")}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nsplit", [1, 2, 7])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("impl", [pytest.param("triton_fused", marks=needs_triton),  # ids lead with the backend
                                  *(pytest.param(i, marks=needs_cuda, id=i.replace("_", "-", 1))
                                    for i in ("cuda", "cuda_generic"))])
def test_span_parts_match_bruteforce(impl, dtype, nsplit, layout):
    """Triton's fused kernel and the CUDA backend cut each segment's token span into nsplit parts: every split, both
    layouts (contiguous episodes: the fast path; interleaved ids: the general one), r above one 64-wide tile (and
    above one 1024-output CUDA block), NaN in masked rows, empty segments, empty input."""
    import importlib

    module, name, dev = SPAN_PARTS[impl]
    mod = importlib.import_module(f"l2t_ext.ops.{module}")
    fn = getattr(mod, name)
    if impl == "cuda_generic":  # the span plan on the generic GEMM (the default: bf16 rows on rows_tc)
        fn = mod.generic_gemm()(fn)
    T, n, m, r, S = 203, 37, 29, 70, 9
    X, D, seg, U, V = make(T, n, m, r, S, dtype, dev, seed=11)
    if layout == "contiguous":
        seg = contiguous_episodes(T, S, seed=nsplit).to(dev)
    X, D = X.clone(), D.clone()
    X[seg < 0], D[seg < 0] = float("nan"), float("inf")
    ref = brute_force(X.masked_fill((seg < 0)[:, None], 0), D.masked_fill((seg < 0)[:, None], 0), seg, S, U, V)
    with ops.poison():
        out = fn(X, D, seg, S, U, V, nsplit=nsplit)
    assert out.shape == (S, r, r) and out.dtype == F32
    err = rel_err(out, ref)
    assert err <= (2e-5 if dtype == F32 else 2.0 * torch_bf16_error(X.nan_to_num(0, 0, 0), D.nan_to_num(0, 0, 0),
                                                                       seg, S, U, V, ref) + 1e-6), err
    for s in set(range(S)) - set(seg[seg >= 0].tolist()):
        assert torch.equal(out[s].cpu(), torch.zeros(r, r))
    # bitwise repeatable
    assert torch.equal(out, fn(X, D, seg, S, U, V, nsplit=nsplit))
    with ops.poison():
        empty = fn(X[:0], D[:0], seg[:0], 3, U, V, nsplit=nsplit)
    assert torch.equal(empty.cpu(), torch.zeros(3, r, r))


def test_span_plan_finds_each_segment_span_without_reading_back():
    """The GPU backends' plan: each segment's first and last token, empty segments first > last, masked tokens in no
    segment; built without a host read (on the meta device any read, .item() or nonzero, raises)."""
    from l2t_ext.ops import _plan

    seg = torch.tensor([-1, 2, 2, -1, 0, 2, 5, 5, -1])
    first, last = _plan.segment_spans(seg, 6)
    assert first.tolist() == [4, 9, 1, 9, 9, 6] and last.tolist() == [4, -1, 5, -1, -1, 7]
    first, last = _plan.segment_spans(seg.to("meta"), 6)
    assert first.shape == last.shape == (6,)
    assert [_plan.pieces(T, S, 132) for T, S in ((4096, 64), (16384, 64), (203, 9), (10, 3))] == [2, 8, 1, 1]


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 8), (64, 64, 32), (203, 150, 40), (130, 37, 16), (96, 8, 72)],
                         ids=lambda s: "rows{}_K{}_cols{}".format(*s))
def test_cuda_tensor_core_row_kernel_matches_float64(shape, monkeypatch):
    """rows_tc through the backend's GEMM: row and K tails (K not a multiple of 8 or of the 64-deep slice), more than
    one 32-wide column tile, a strided X whose rows stay 16-byte aligned, V in both layouts, K split into chunks;
    a layout it cannot take (misaligned rows) runs on the generic kernel with the same values."""
    from l2t_ext.ops import _cuda

    calls = []
    real = _cuda._C_cuda.rows_tc
    monkeypatch.setattr(_cuda._C_cuda, "rows_tc", lambda *a: calls.append(a) or real(*a))
    nrows, K, ncols = shape
    g = torch.Generator(device="cuda").manual_seed(nrows + K)
    stride = -(-K // 8) * 8 + 8 * (K % 2)  # a multiple of 8, sometimes with a gap after each row
    X = torch.randn(nrows, stride, device="cuda", generator=g).bfloat16()[:, :K]
    V = torch.randn(K, ncols, device="cuda", generator=g).bfloat16()
    Vt = V.T.contiguous()  # V(l, c) = Vt[c, l]: the quadform's layout
    want = X.double() @ V.double()
    for Vop, sVk, sVc in ((V, ncols, 1), (Vt, 1, K if K % 8 == 0 else None)):
        if sVc is None:  # Vt's rows are not 16-byte aligned: pad them
            Vt = torch.zeros(ncols, stride, device="cuda", dtype=torch.bfloat16)
            Vt[:, :K] = V.T
            Vop, sVc = Vt, stride
        for nz, kchunk in ((1, 0), (3, 8 * -(-K // 24))):
            calls.clear()
            with ops.poison():
                Y = _cuda._gemm(X, X.stride(0), 1, 0, None, nrows, Vop, sVk, sVc, ncols, K, nz=nz, split=nz > 1,
                                kchunk=kchunk)
            assert len(calls) == 1 and rel_err(Y.sum(0), want) <= 1e-5, (sVk, nz)
            with _cuda.generic_gemm():
                assert rel_err(_cuda._gemm(X, X.stride(0), 1, 0, None, nrows, Vop, sVk, sVc, ncols, K, nz=nz,
                                           split=nz > 1, kchunk=kchunk).sum(0), want) <= 1e-5
            assert len(calls) == 1
    calls.clear()
    odd = torch.randn(nrows, K + 1, device="cuda", generator=g).bfloat16()[:, 1:]  # misaligned rows
    assert rel_err(_cuda.row_project(odd, None, V), odd.double() @ V.double()) <= 1e-5 and not calls
    assert torch.equal(_cuda.row_project(X, None, V), _cuda.row_project(X, None, V)) and len(calls) == 2


@needs_cuda
def test_cuda_unchecked_call_does_not_synchronise():
    X, D, seg, U, V = make(4096, 256, 256, 16, 64, BF16, "cuda", seed=9)
    want = ops.segment_grad_outer(X, D, seg, 64, U, V, backend="cuda")
    assert torch.equal(without_sync(lambda: ops.segment_grad_outer(X, D, seg, 64, U, V, backend="cuda",
                                                                   check_ids=False)), want)


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ksplit", [2, 3, None])
def test_triton_two_pass_split_over_k_matches_bruteforce(dtype, ksplit):
    """The two-pass path's projections with K cut into chunks (programs of their own, summed in order): K not a
    multiple of the 64-wide chunk, n != m, masked rows holding NaN/Inf, bitwise repeatable; None picks the split
    from the GPU's size (one chunk under the interpreter)."""
    from l2t_ext.ops import _triton

    T, n, m, r, S = 97, 150, 131, 20, 5
    X, D, seg, U, V = make(T, n, m, r, S, dtype, TRITON_DEV, seed=ksplit or 1)
    X, D = X.clone(), D.clone()
    X[seg < 0], D[seg < 0] = float("nan"), float("inf")
    X0, D0 = X.masked_fill((seg < 0)[:, None], 0), D.masked_fill((seg < 0)[:, None], 0)
    ref = brute_force(X0, D0, seg, S, U, V)
    with ops.poison():
        out = _triton.segment_grad_outer_two_pass(X, D, seg, S, U, V, ksplit=ksplit)
    tol = 2e-5 if dtype == F32 else 2.0 * torch_bf16_error(X0, D0, seg, S, U, V, ref) + 1e-6
    assert rel_err(out, ref) <= tol
    assert torch.equal(out, _triton.segment_grad_outer_two_pass(X, D, seg, S, U, V, ksplit=ksplit))
    if ksplit:  # the chunks are really separate programs: 150 columns in 64-wide chunks
        A = _triton.row_project(X0, None, V, ksplit)
        assert rel_err(A, X0.double() @ V.double()) <= (2e-6 if dtype == F32 else 1e-2)


@needs_triton
def test_triton_fused_agrees_with_two_pass():
    from l2t_ext.ops import _triton

    X, D, seg, U, V = make(150, 24, 40, 16, 6, F32, TRITON_DEV, seed=4)
    seg = contiguous_episodes(150, 6, seed=4).to(TRITON_DEV)
    fused = _triton.segment_grad_outer_fused(X, D, seg, 6, U, V)
    assert rel_err(fused, _triton.segment_grad_outer_two_pass(X, D, seg, 6, U, V)) <= 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_triton_backend_path_by_dtype_and_size(dtype, monkeypatch):
    """The backend runs the fused single pass, except float32 inputs over FUSED_F32_MAX_BYTES (two passes, K split);
    both branches through the op match the float64 reference."""
    from l2t_ext.ops import _triton

    taken = []
    for name in ("segment_grad_outer_fused", "segment_grad_outer_two_pass"):
        real = getattr(_triton, name)
        monkeypatch.setattr(_triton, name, lambda *a, _f=real, _n=name, **k: taken.append(_n) or _f(*a, **k))
    X, D, _, U, V = make(97, 40, 24, 16, 5, dtype, TRITON_DEV, seed=11)
    seg = contiguous_episodes(97, 5, seed=11).to(TRITON_DEV)
    want = brute_force(X, D, seg, 5, U, V)
    tol = 2e-5 if dtype == F32 else 2.0 * torch_bf16_error(X, D, seg, 5, U, V, want)
    for limit, path in ((2**40, "segment_grad_outer_fused"),
                        (0, "segment_grad_outer_two_pass" if dtype == F32 else "segment_grad_outer_fused")):
        monkeypatch.setattr(_triton, "FUSED_F32_MAX_BYTES", limit)
        taken.clear()
        with ops.poison():
            out = ops.segment_grad_outer(X, D, seg, 5, U, V, backend="triton")
        assert taken == [path] and rel_err(out.cpu(), want) <= tol


@pytest.mark.skipif(_cases._backend._C is None, reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_cpu_row_projection_for_every_rank(dtype):
    """The C++ projection covers r with panels of two SIMD registers, one, half of one, then single columns: every
    r from 1 to 40 (each mix of panel widths), a strided X, rows not a multiple of the 4-row block."""
    from l2t_ext.ops import _cpu

    g = torch.Generator().manual_seed(7)
    X = torch.randn(37, 2 * 29, generator=g, dtype=torch.float64)[:, ::2]  # column stride 2
    for r in range(1, 41):
        V = torch.randn(29, r, generator=g, dtype=torch.float64)
        with ops.poison():
            Y = _cpu.row_project(X.to(dtype), None, V.to(dtype))
        assert Y.shape == (37, r) and rel_err(Y, X @ V) <= (1e-14 if dtype == F64 else 1e-6), r


def test_int32_seg_and_auto_backend_agree():
    X, D, seg, U, V = make(50, 8, 8, 3, 4, torch.float32, "cpu", seed=2)
    a = ops.segment_grad_outer(X, D, seg.int(), 4, U, V)
    b = ops.segment_grad_outer(X, D, seg, 4, U, V, backend="torch")
    assert rel_err(a, b) <= 2e-5


@pytest.mark.parametrize("bad,exc,match", [
    (dict(X=torch.randn(5)), ValueError, "X must be 2-D"),
    (dict(D=torch.randn(6, 4)), ValueError, "D has 6 rows"),
    (dict(seg=torch.zeros(4, dtype=torch.int64)), ValueError, "seg has length 4"),
    (dict(seg=torch.zeros(5)), TypeError, "seg must be int64 or int32"),
    (dict(seg=torch.tensor([0, 1, 2, 3, 9])), ValueError, "seg contains id 9 >= num_segments=4"),
    (dict(num_segments=0), ValueError, "num_segments must be an int >= 1"),
    (dict(U=torch.randn(3, 2)), ValueError, "U must be"),
    (dict(V=torch.randn(7, 2)), ValueError, "V must be"),
    (dict(D=torch.randn(5, 4, dtype=torch.float64)), TypeError, "X and D must share a dtype"),
    (dict(X=torch.ones(5, 3, dtype=torch.int64)), TypeError, "X must be a floating tensor"),
    (dict(backend="gpu"), ValueError, "backend must be"),
    # 10**9 x 2 x 2 float32 = 14.9 GiB: refused before the output is allocated (it used to be OOM-killed)
    (dict(num_segments=10**9), ValueError, r"num_segments=1000000000, 2, 2\) would take 14.9 GiB, over the 4 GiB"),
])
def test_bad_input_raises_naming_the_argument(bad, exc, match):
    args = dict(X=torch.randn(5, 3), D=torch.randn(5, 4), seg=torch.tensor([0, 1, -1, 3, 2]), num_segments=4,
                U=torch.randn(4, 2), V=torch.randn(3, 2), backend="cpu")
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.segment_grad_outer(**args)


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised when no GPU is present")
def test_explicit_cuda_without_gpu_raises_real_reason():
    X, D, seg, U, V = make(5, 3, 4, 2, 2, torch.float32, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*(CUDA tensors|built without CUDA)"):
        ops.segment_grad_outer(X, D, seg, 2, U, V, backend="cuda")


def test_cpu_backend_rejects_bf16_with_reason():
    X, D, seg, U, V = make(5, 3, 4, 2, 2, torch.bfloat16, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="backend 'cpu' supports float32, float64 inputs, got bfloat16"):
        ops.segment_grad_outer(X, D, seg, 2, U, V, backend="cpu")
    # auto falls back silently to the torch reference
    assert ops.segment_grad_outer(X, D, seg, 2, U, V).dtype == torch.float32
