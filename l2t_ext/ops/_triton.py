"""The ``triton`` backend: Triton kernels mirroring the CUDA ones (one tiled GEMM that can gather rows and
generate the rsvd sketch matrix on the fly, deterministic chunk/segment reductions, the Fisher epilogue).

Runs on CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` (how CI
tests it). bf16 operands use bf16 tensor-core dots with float32 accumulation; float32 operands use
``input_precision="ieee"`` (no TF32), so float32 results carry float32 accuracy. Offsets are int64.
Launches go on torch's current stream (Triton's default).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import triton
import triton.language as tl

from l2t_ext._backend import triton_interpret
from l2t_ext.ops import _plan, _splitk
from l2t_ext.ops._alloc import empty

CHUNK = 128
# Triton's interpreter (TRITON_INTERPRET=1, used by CI) returns garbage for tl.dot on bfloat16 operands
# (checked with triton 3.9): there bf16 tiles are upcast to float32 before the dot instead. On a GPU the
# bf16 tensor-core path is used.
_BF16_DOT_OK = not triton_interpret()
F32 = torch.float32


@triton.jit
def _omega(seed_lo, seed_hi, rows, cols):
    """Omega[rows, cols] float32: Philox4x32-10 + standardised Irwin-Hall(4), bit-identical to csrc/philox.h."""
    c0 = (rows & 0xFFFFFFFF).to(tl.uint32)
    c1 = (cols & 0xFFFFFFFF).to(tl.uint32)
    c2 = (rows >> 32).to(tl.uint32)
    c3 = (cols >> 32).to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    s = (c0 >> 10).to(tl.int32) + (c1 >> 10).to(tl.int32) + (c2 >> 10).to(tl.int32) + (c3 >> 10).to(tl.int32)
    centered = (s + (2 - 8388608)).to(tl.float32) * (1.0 / 4194304.0)  # exact
    return centered * 1.7320508075688772


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gemm_kernel(X_PTR, IDX_PTR, V_PTR, YIN_PTR, Y_PTR, nrows, ncols, K, kchunk, s_xr, s_xc, s_xz, s_vk, s_vc,
                 seed_lo, seed_hi, alpha, beta, HAS_IDX: tl.constexpr, OMEGA: tl.constexpr, HAS_YIN: tl.constexpr,
                 SPLIT: tl.constexpr, BF16_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # Y[z] = alpha * X(rows) @ V + beta * Yin[z]; contract in csrc/cuda/kernels.h (gemm).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    z = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < nrows
    mask_n = offs_n < ncols
    if HAS_IDX:
        rows = tl.load(IDX_PTR + offs_m, mask=mask_m, other=0)
    else:
        rows = offs_m
    if SPLIT:
        k_begin = z * kchunk
        k_end = tl.minimum(K, k_begin + kchunk)
        x_base = X_PTR
    else:
        k_begin = z * 0
        k_end = K
        x_base = X_PTR + z * s_xz
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        x = tl.load(x_base + rows[:, None] * s_xr + offs_k[None, :] * s_xc,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        vmask = mask_k[:, None] & mask_n[None, :]
        if OMEGA:
            v = tl.where(vmask, _omega(seed_lo, seed_hi, offs_k[:, None], offs_n[None, :]), 0.0)
        else:
            v = tl.load(V_PTR + offs_k[:, None] * s_vk + offs_n[None, :] * s_vc, mask=vmask, other=0.0)
        if BF16_DOT:
            acc += tl.dot(x.to(tl.bfloat16), v.to(tl.bfloat16))
        else:
            acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    out = alpha * acc
    offs_y = z * nrows * ncols + offs_m[:, None] * ncols + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if HAS_YIN:
        out += beta * tl.load(YIN_PTR + offs_y, mask=ymask, other=0.0)
    tl.store(Y_PTR + offs_y, out, mask=ymask)


@triton.jit
def _chunk_outer_kernel(A_PTR, B_PTR, START_PTR, P_PTR, ra, rb, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_B: tl.constexpr):
    # P[c] = sum_{i in chunk c} A[i] outer B[i], tokens in order (deterministic).
    c = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    offs_b = tl.program_id(2).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    t0 = tl.load(START_PTR + c)
    t1 = tl.load(START_PTR + c + 1)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for t in range(t0, t1, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T).to(tl.int64)
        mt = offs_t < t1
        a = tl.load(A_PTR + offs_t[:, None] * ra + offs_a[None, :], mask=mt[:, None] & (offs_a[None, :] < ra),
                    other=0.0)
        b = tl.load(B_PTR + offs_t[:, None] * rb + offs_b[None, :], mask=mt[:, None] & (offs_b[None, :] < rb),
                    other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
    mask = (offs_a[:, None] < ra) & (offs_b[None, :] < rb)
    tl.store(P_PTR + c * ra * rb + offs_a[:, None] * rb + offs_b[None, :], acc, mask=mask)


@triton.jit
def _segment_outer_kernel(A_PTR, B_PTR, SEG_PTR, LO_PTR, HI_PTR, G_PTR, ra, rb, BLOCK_T: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # G[s] = sum_{t in [lo[s], hi[s]], seg[t] == s} A[t] outer B[t], tokens in order (deterministic). Rows of
    # other segments (and masked tokens, whose A/B rows may hold anything) are never loaded.
    s = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    offs_b = tl.program_id(2).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    lo = tl.load(LO_PTR + s)
    hi = tl.load(HI_PTR + s)  # empty segment: lo > hi, the loop does not run and zeros are stored
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for t in range(lo, hi + 1, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T).to(tl.int64)
        sel = tl.load(SEG_PTR + offs_t, mask=offs_t <= hi, other=-1) == s
        a = tl.load(A_PTR + offs_t[:, None] * ra + offs_a[None, :], mask=sel[:, None] & (offs_a[None, :] < ra),
                    other=0.0)
        b = tl.load(B_PTR + offs_t[:, None] * rb + offs_b[None, :], mask=sel[:, None] & (offs_b[None, :] < rb),
                    other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
    mask = (offs_a[:, None] < ra) & (offs_b[None, :] < rb)
    tl.store(G_PTR + s * ra * rb + offs_a[:, None] * rb + offs_b[None, :], acc, mask=mask)


@triton.jit
def _segment_bounds_kernel(SEG_PTR, BND_PTR, T, S, BLOCK: tl.constexpr):
    # BND[0, s] = T - (first token of s), BND[1, s] = (last token of s) + 1, both 0 for an empty segment (the
    # buffer starts zeroed). Integer atomic max: the result does not depend on the order programs run in.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    s = tl.load(SEG_PTR + offs, mask=offs < T, other=-1)
    keep = s >= 0
    s = tl.where(keep, s, 0)
    tl.atomic_max(BND_PTR + s, T - offs, mask=keep)
    tl.atomic_max(BND_PTR + S + s, offs + 1, mask=keep)


@triton.jit
def _project_rows(M_PTR, W_PTR, offs_t, sel, s_t, s_c, K, r, offs_r, BF16_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # (BLOCK_T, BLOCK_R) float32 = M[offs_t] @ W[:, offs_r]; rows with sel False are zero and never loaded
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = offs_k < K
        x = tl.load(M_PTR + offs_t[:, None] * s_t + offs_k[None, :] * s_c, mask=sel[:, None] & mk[None, :], other=0.0)
        w = tl.load(W_PTR + offs_k[:, None] * r + offs_r[None, :], mask=mk[:, None] & (offs_r[None, :] < r),
                    other=0.0)
        if BF16_DOT:
            acc += tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16))
        else:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _sgo_fused_kernel(X_PTR, D_PTR, U_PTR, V_PTR, SEG_PTR, BND_PTR, P_PTR, T, S, n, m, ra, rb, s_xt, s_xc, s_dt,
                      s_dc, nsplit, BF16_DOT: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # P[s, j] = sum over tokens t of piece j of segment s's span, seg[t] == s, of (U^T D[t]) outer (V^T X[t]),
    # tokens in order. The span [first, last] of s is cut into nsplit equal pieces; each token block's two
    # projections stay in registers (no (T, r) intermediate in memory). Contiguous episodes: each row of X and D
    # is read once. Interleaved segments: rows of other segments are masked off (not loaded), the loop still
    # walks the span.
    s = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    nb = tl.cdiv(rb, BLOCK_B)
    offs_a = (tl.program_id(2) // nb).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    offs_b = (tl.program_id(2) % nb).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    lo = T - tl.load(BND_PTR + s)
    end = tl.load(BND_PTR + S + s)
    piece = tl.cdiv(tl.maximum(end - lo, 0), nsplit)
    t0 = lo + j * piece
    t1 = tl.minimum(end, t0 + piece)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for t in range(t0, t1, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T).to(tl.int64)
        sel = tl.load(SEG_PTR + offs_t, mask=offs_t < t1, other=-1) == s
        a = _project_rows(D_PTR, U_PTR, offs_t, sel, s_dt, s_dc, m, ra, offs_a, BF16_DOT, BLOCK_T, BLOCK_A, BLOCK_K)
        b = _project_rows(X_PTR, V_PTR, offs_t, sel, s_xt, s_xc, n, rb, offs_b, BF16_DOT, BLOCK_T, BLOCK_B, BLOCK_K)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
    mask = (offs_a[:, None] < ra) & (offs_b[None, :] < rb)
    tl.store(P_PTR + (s * nsplit + j) * ra * rb + offs_a[:, None] * rb + offs_b[None, :], acc, mask=mask)


# Tile shapes (BLOCK_T, BLOCK_K, num_warps, num_stages) the fused kernel is tuned over on a GPU, per input dtype.
# Each one compiles for sm_90 without register spills for every r-tile (16/32/64) and fits the shared memory
# (checked by l2t_ext/bench/triton_static.py; python_tests/test_gpu_static.py). bf16: BLOCK_T >= 64 so that
# the projections run as wgmma; float32 (exact IEEE dots on CUDA cores) needs 8 warps to avoid spilling.
SGO_TILES = {torch.bfloat16: [(64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3), (128, 64, 8, 3),
                              (128, 128, 8, 2)],
             torch.float32: [(32, 32, 8, 3), (64, 32, 8, 3)]}


def _sgo_configs(interpret: bool | None = None):
    """Every dtype's tiles on a GPU (pruned to the input's dtype at launch; tuning cached on disk by Triton);
    the interpreter gets one small tile so that CI's small tests still cross block boundaries."""
    if triton_interpret() if interpret is None else interpret:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 16})]
    tiles = dict.fromkeys(t for ts in SGO_TILES.values() for t in ts)
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bt, bk, w, st in tiles]


def _sgo_prune(configs, named_args, **kwargs):
    tiles = SGO_TILES[torch.bfloat16 if named_args["X_PTR"].dtype == torch.bfloat16 else torch.float32]
    keep = [c for c in configs if (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in tiles]
    return keep or configs


# tuning results cached on disk where this Triton can (cache_results: Triton >= 3.2; the GPU check ran 3.6); keyed on
# the layer shapes and ranks only (and dtypes): the pieces per segment change with T and the episode count, which
# in training change every step, and keying on them re-tuned (compiled every tile) again and again
_DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_sgo_fused = triton.autotune(configs=_sgo_configs(), key=["n", "m", "ra", "rb"],
                             prune_configs_by={"early_config_prune": _sgo_prune}, **_DISK_CACHE)(_sgo_fused_kernel)


@triton.jit
def _segment_sum_kernel(P_PTR, START_PTR, G_PTR, rr, BLOCK: tl.constexpr):
    # G[s] = sum of its chunks in order; empty segments store exact zeros.
    s = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < rr
    c0 = tl.load(START_PTR + s)
    c1 = tl.load(START_PTR + s + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(c0, c1):
        acc += tl.load(P_PTR + c * rr + offs, mask=mask, other=0.0)
    tl.store(G_PTR + s * rr + offs, acc, mask=mask)


@triton.jit
def _quadform_fused_kernel(DELTA_PTR, G_PTR, WS_PTR, NRM_PTR, ROW_PTR, CNT_PTR, Q_PTR, M, N, p, kchunk, nz, s_dm,
                           s_dp, s_gn, s_gp, m_pad, inv_n, damping, WEIGHTED: tl.constexpr, BF16_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # fisher_quadform with its epilogue fused into the split-K GEMM C = delta @ G^T. Implicit (G = grads (N, p)):
    # q_m = inv_n sum_n C[m, n]^2 + damping ||delta_m||^2; explicit (WEIGHTED, G = F (p, p)):
    # q_m = sum_i C[m, i] delta[m, i] + damping ||delta_m||^2. Program (tile, z) multiplies K-chunk z; the last
    # of a tile's nz programs to finish (integer counter) sums the tile's partials in z order and reduces it to
    # per-row partials; the last of a row-block's tiles sums those in tile order and writes q. The fixed orders
    # make q bitwise reproducible whichever program finishes last; no float atomics, no second launch.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    z = tl.program_id(2).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tile = pid_m * tiles_n + pid_n
    n_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_end = tl.minimum(p, z * kchunk + kchunk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nrm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(z * kchunk, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        d = tl.load(DELTA_PTR + offs_m[:, None] * s_dm + offs_k[None, :] * s_dp,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(G_PTR + offs_n[:, None] * s_gn + offs_k[None, :] * s_gp,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if BF16_DOT:
            acc += tl.dot(d.to(tl.bfloat16), tl.trans(g.to(tl.bfloat16)))
        else:
            acc += tl.dot(d.to(tl.float32), tl.trans(g.to(tl.float32)), input_precision="ieee")
        df = d.to(tl.float32)
        nrm += tl.sum(df * df, axis=1)  # ||delta_m||^2 over this chunk (kept by the pid_n == 0 tiles)
    tile_offs = tl.arange(0, BLOCK_M).to(tl.int64)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[None, :]
    tl.store(WS_PTR + (z * n_tiles + tile) * BLOCK_M * BLOCK_N + tile_offs, acc)
    if pid_n == 0:
        tl.store(NRM_PTR + z * m_pad + offs_m, nrm)
    tl.debug_barrier()  # every thread's stores precede the release below
    if tl.atomic_add(CNT_PTR + tile, 1, sem="acq_rel", scope="gpu") == nz - 1:
        c = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for zz in range(0, nz):  # the tile's partials, in z order (L2 reads: other SMs wrote them)
            c += tl.load(WS_PTR + (zz * n_tiles + tile) * BLOCK_M * BLOCK_N + tile_offs, cache_modifier=".cg")
        if WEIGHTED:
            dw = tl.load(DELTA_PTR + offs_m[:, None] * s_dm + offs_n[None, :] * s_dp,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            part = tl.sum(c * dw, axis=1)
        else:
            part = inv_n * tl.sum(c * c, axis=1)  # columns past N are exact zeros (masked loads)
        tl.store(ROW_PTR + pid_n * m_pad + offs_m, part)
        tl.debug_barrier()
        if tl.atomic_add(CNT_PTR + n_tiles + pid_m, 1, sem="acq_rel", scope="gpu") == tiles_n - 1:
            s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for nn in range(0, tiles_n):
                s1 += tl.load(ROW_PTR + nn * m_pad + offs_m, cache_modifier=".cg")
            s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for zz in range(0, nz):
                s2 += tl.load(NRM_PTR + zz * m_pad + offs_m, cache_modifier=".cg")
            tl.store(Q_PTR + offs_m, s1 + damping * s2, mask=mask_m)


@triton.jit
def _finalize_kernel(C_PTR, D_PTR, Q_PTR, nz, M, N, p, s_dm, s_dp, inv_n, damping, WEIGHTED: tl.constexpr,
                     BLOCK: tl.constexpr):
    # q[m] = inv_n * sum_j f(sum_z C[z, m, j]) + damping * ||delta_m||^2   (fisher_quadform)
    m = tl.program_id(0).to(tl.int64)
    s1 = tl.zeros((BLOCK,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK):
        offs = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < N
        x = tl.zeros((BLOCK,), dtype=tl.float32)
        for zz in range(0, nz):
            x += tl.load(C_PTR + (zz * M + m) * N + offs, mask=mask, other=0.0)
        if WEIGHTED:
            s1 += tl.load(D_PTR + m * s_dm + offs * s_dp, mask=mask, other=0.0).to(tl.float32) * x
        else:
            s1 += x * x
    s2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, p, BLOCK):
        offs = l0 + tl.arange(0, BLOCK).to(tl.int64)
        d = tl.load(D_PTR + m * s_dm + offs * s_dp, mask=offs < p, other=0.0).to(tl.float32)
        s2 += d * d
    tl.store(Q_PTR + m, inv_n * tl.sum(s1, axis=0) + damping * tl.sum(s2, axis=0))


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _gemm_tiles(nrows: int, ncols: int) -> tuple[int, int]:
    return (128 if nrows >= 8192 else 64), _pow2(ncols, 16, 64)


def _gemm(X, sXr, sXc, sXz, idx, nrows, V, sVk, sVc, ncols, K, *, nz=1, split=False, kchunk=0, seed=0,
          alpha=1.0, beta=0.0, Yin=None, bf16_dot=False):
    Y = empty((nz, nrows, ncols), F32, X.device)
    if nrows == 0 or ncols == 0:
        return Y
    (BM, BN), BK = _gemm_tiles(nrows, ncols), 64
    grid = (triton.cdiv(nrows, BM), triton.cdiv(ncols, BN), nz)
    dummy = Y
    _gemm_kernel[grid](X, idx if idx is not None else dummy, V if V is not None else dummy,
                       Yin if Yin is not None else dummy, Y, nrows, ncols, K, kchunk or K, sXr, sXc, sXz, sVk, sVc,
                       seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, alpha, beta, HAS_IDX=idx is not None,
                       OMEGA=V is None, HAS_YIN=Yin is not None, SPLIT=split, BF16_DOT=bf16_dot and _BF16_DOT_OK,
                       BLOCK_M=BM,
                       BLOCK_N=BN, BLOCK_K=BK)
    return Y


def rsvd_sketch(W: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    B, m, n = W.shape
    return _gemm(W, W.stride(1), W.stride(2), W.stride(0), None, m, None, 0, 0, k, n, nz=B, seed=seed)


def row_project(X: torch.Tensor, idx: torch.Tensor | None, V: torch.Tensor, ksplit: int | None = 1) -> torch.Tensor:
    """X[idx] @ V (T', r) float32. ``ksplit`` > 1 cuts K into that many chunks, each its own program, summed in a
    fixed order (torch's sum over the chunk axis): more programs when the row tiles alone do not fill the GPU
    (r <= 64 is one column tile, so T16384 gives 128 programs). None: as many as ``_splitk.split`` picks for
    about two programs per SM."""
    bf16 = X.dtype == torch.bfloat16 and _BF16_DOT_OK
    V = V.to(torch.bfloat16 if bf16 else F32).contiguous()
    nrows, (K, ncols) = (idx.numel() if idx is not None else X.shape[0]), V.shape
    if ksplit is None:
        BM, BN = _gemm_tiles(nrows, ncols)
        ksplit = _splitk.split(SPLITK, K, triton.cdiv(nrows, BM) * triton.cdiv(ncols, BN), X.device)[0]
    kchunk = triton.cdiv(triton.cdiv(K, max(1, ksplit)), 64) * 64
    nz = max(1, triton.cdiv(K, kchunk))
    Y = _gemm(X, X.stride(0), X.stride(1), 0, idx, nrows, V, V.stride(0), 1, ncols, K, nz=nz, split=nz > 1,
              kchunk=kchunk, bf16_dot=bf16)
    return Y[0] if nz == 1 else Y.sum(0)


# float32 inputs (X and D) above this many bytes take the two-pass path (see segment_grad_outer below)
FUSED_F32_MAX_BYTES = 128 * 2**20


def segment_grad_outer(X, D, seg, num_segments: int, U, V) -> torch.Tensor:
    """The backend's path, chosen by the H100's measurements (benchmarks/results/h100_run2, direct calls): the
    fused single pass (bf16: 3.4x / 1.7x ``torch_best`` at T16384 n=m=4096 r32 / T4096 n=m=1024 r16; float32
    T4096: 1.8x), except float32 inputs over FUSED_F32_MAX_BYTES, where the fused kernel was 0.97x and the
    two-pass path with its projections split over K 2.1x (float32 T16384, 537 MB; the threshold sits between the
    two measured sizes, 34 MB and 537 MB)."""
    if X.dtype == F32 and (X.numel() + D.numel()) * 4 > FUSED_F32_MAX_BYTES:
        return segment_grad_outer_two_pass(X, D, seg, num_segments, U, V, ksplit=None)
    return segment_grad_outer_fused(X, D, seg, num_segments, U, V)


def segment_grad_outer_fused(X, D, seg, num_segments: int, U, V, nsplit: int | None = None) -> torch.Tensor:
    """Fused single pass, no host synchronisation: a bounds kernel finds each segment's token span, then one
    program per (segment, piece of its span, r-tile) projects its tokens on the fly and accumulates their outer
    products in token order; with more than one piece, the pieces are summed in a fixed order. Three launches for
    any T (four with pieces), deterministic (no float atomics). ``nsplit`` overrides the pieces (tests).
    On an H100 (bf16, called directly) 0.206 ms at T16384 n=m=4096 r32 (1303 GB/s, 44% of copy bandwidth) and
    0.10-0.15 ms at T4096 n=m=1024 r16, 1.4-2.5x the two-pass path below (benchmarks/results/h100_run2)."""
    T, S = seg.numel(), num_segments
    bf16 = X.dtype == torch.bfloat16 and _BF16_DOT_OK
    wdt = torch.bfloat16 if bf16 else F32
    U, V = U.to(wdt).contiguous(), V.to(wdt).contiguous()
    ra, rb = U.shape[1], V.shape[1]
    nsplit = nsplit or _plan.pieces(T, S, _sm_count(X.device))
    bounds = torch.zeros((2, S), dtype=torch.int64, device=X.device)
    if T:
        _segment_bounds_kernel[(triton.cdiv(T, 1024),)](seg, bounds, T, S, BLOCK=1024)
    P = empty((S, nsplit, ra, rb), F32, X.device)
    BA, BB = _pow2(ra, 16, 64), _pow2(rb, 16, 64)
    grid = (S, nsplit, triton.cdiv(ra, BA) * triton.cdiv(rb, BB))
    _sgo_fused[grid](X, D, U, V, seg, bounds, P, T, S, X.shape[1], D.shape[1], ra, rb, X.stride(0), X.stride(1),
                     D.stride(0), D.stride(1), nsplit, BF16_DOT=bf16, BLOCK_A=BA, BLOCK_B=BB)
    return P[:, 0] if nsplit == 1 else P.sum(1)  # torch's reduction: fixed order for a given shape


def segment_grad_outer_two_pass(X, D, seg, num_segments: int, U, V, ksplit: int | None = 1) -> torch.Tensor:
    """Two passes: project every token (two GEMMs writing (T, r) float32 intermediates, a small share of the bytes
    at r <= 64), then one program per segment reduces the rows of its token range [first, last] in token order.
    No sort, no host synchronisation, fixed tiles (nothing to tune at the first call), deterministic.
    ``ksplit`` goes to ``row_project`` (None: split K to fill the GPU; on an H100 1.1-1.15x the speed of ksplit=1
    in float32, 0.6-0.9x in bf16). The backend's path for large float32 inputs (``segment_grad_outer``)."""
    S = num_segments
    A = row_project(D, None, U, ksplit)  # (T, r) float32
    B = row_project(X, None, V, ksplit)  # (T, r') float32
    lo, hi = _plan.segment_spans(seg, S)
    ra, rb = A.shape[1], B.shape[1]
    G = empty((S, ra, rb), F32, X.device)
    BA, BB = _pow2(ra, 16, 64), _pow2(rb, 16, 64)
    _segment_outer_kernel[(S, triton.cdiv(ra, BA), triton.cdiv(rb, BB))](A, B, seg, lo, hi, G, ra, rb, BLOCK_T=64,
                                                                         BLOCK_A=BA, BLOCK_B=BB)
    return G


def chunk_outer(A: torch.Tensor, B: torch.Tensor, chunk_start: torch.Tensor) -> torch.Tensor:
    C, ra, rb = chunk_start.numel() - 1, A.shape[1], B.shape[1]
    P = empty((C, ra, rb), F32, A.device)
    if C and ra and rb:
        BA, BB = _pow2(ra, 16, 64), _pow2(rb, 16, 64)
        grid = (C, triton.cdiv(ra, BA), triton.cdiv(rb, BB))
        _chunk_outer_kernel[grid](A, B, chunk_start, P, ra, rb, BLOCK_T=32, BLOCK_A=BA, BLOCK_B=BB)
    return P


def segment_sum(P: torch.Tensor, seg_chunk_start: torch.Tensor) -> torch.Tensor:
    S, rr = seg_chunk_start.numel() - 1, math.prod(P.shape[1:])
    G = empty((S,) + tuple(P.shape[1:]), F32, P.device)
    if S and rr:
        BLOCK = _pow2(rr, 16, 1024)
        _segment_sum_kernel[(S, triton.cdiv(rr, BLOCK))](P, seg_chunk_start, G, rr, BLOCK=BLOCK)
    return G


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _finalize(C, delta, weighted: bool, inv_n: float, damping: float):
    nz, M, N = C.shape
    q = empty((M,), F32, delta.device)
    if M:
        _finalize_kernel[(M,)](C, delta, q, nz, M, N, delta.shape[1], delta.stride(0), delta.stride(1), inv_n,
                               damping, WEIGHTED=weighted, BLOCK=1024)
    return q


# 64 x 64 GEMM tiles (BLOCK_M x BLOCK_N of _gemm_kernel), K chunks in multiples of BLOCK_K = 64
SPLITK = _splitk.SplitK(gemm=_gemm, finalize=_finalize, sm_count=_sm_count, tile_m=64, tile_n=64, kchunk_align=64,
                        bf16_dot=True)


# BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages of the fused quadform: no register spills on sm_90 in all four
# variants (bf16/fp32 x implicit/explicit; l2t_ext/bench/triton_static.py), wgmma for bf16
QF_TILE = (64, 64, 64, 8, 3)


def _quadform_fused(delta: torch.Tensor, G: torch.Tensor, weighted: bool, inv_n: float, damping: float,
                    nz: int | None = None) -> torch.Tensor:
    """q (M,) from one launch (plus the zeroed counters); ``nz`` overrides the K split (tests)."""
    M, p = delta.shape
    N = G.shape[0]
    BM, BN, BK, warps, stages = (16, 16, 16, 1, 1) if triton_interpret() else QF_TILE  # CI: cross tile edges
    tiles_m, tiles_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    if nz is None:
        nz, kchunk = _splitk.split(SPLITK, p, tiles_m * tiles_n, delta.device)
    else:
        kchunk = max(1, triton.cdiv(triton.cdiv(p, nz), BK)) * BK
        nz = max(1, triton.cdiv(p, kchunk))
    q = empty((M,), F32, delta.device)
    if M == 0:
        return q
    m_pad = tiles_m * BM
    # one workspace (fewer allocator calls on this launch-bound path): tile partials, chunk norms, row partials
    sizes = (nz * tiles_m * tiles_n * BM * BN, nz * m_pad, tiles_n * m_pad)
    ws, nrm, rows = empty((sum(sizes),), F32, delta.device).split(sizes)
    counters = torch.zeros(tiles_m * tiles_n + tiles_m, dtype=torch.int32, device=delta.device)
    bf16 = delta.dtype == torch.bfloat16 and G.dtype == torch.bfloat16 and _BF16_DOT_OK
    _quadform_fused_kernel[(tiles_m, tiles_n, nz)](
        delta, G, ws, nrm, rows, counters, q, M, N, p, kchunk, nz, delta.stride(0), delta.stride(1), G.stride(0),
        G.stride(1), m_pad, inv_n, damping, WEIGHTED=weighted, BF16_DOT=bf16, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        num_warps=warps, num_stages=stages)
    return q


def fisher_quadform_fused_implicit(delta: torch.Tensor, grads: torch.Tensor, damping: float,
                                   nz: int | None = None) -> torch.Tensor:
    """The fused-epilogue quadform. Not the backend's path: on an H100 the split-K + finalize path below was faster
    at 5 of 6 measured sizes (benchmarks/results/h100), so this one stays an explicit candidate for ``l2t bench``."""
    g = grads if grads.dtype == delta.dtype else grads.to(delta.dtype)
    return _quadform_fused(delta, g, False, 1.0 / grads.shape[0], damping, nz)


def fisher_quadform_fused_explicit(delta: torch.Tensor, fisher: torch.Tensor, damping: float,
                                   nz: int | None = None) -> torch.Tensor:
    F = fisher if fisher.dtype in (F32, torch.bfloat16) else fisher.to(F32)
    return _quadform_fused(delta, F, True, 1.0, damping, nz)


def fisher_quadform_implicit(delta: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    """Split-K GEMM (bf16 dots on tensor cores for bf16 inputs), then a finalize kernel that squares and sums."""
    return _splitk.fisher_quadform_implicit(SPLITK, delta, grads, damping)


def fisher_quadform_explicit(delta: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    return _splitk.fisher_quadform_explicit(SPLITK, delta, fisher, damping)


def fisher_accumulate(G: torch.Tensor, F_in: torch.Tensor | None, decay: float | None) -> torch.Tensor:
    return _splitk.fisher_accumulate(SPLITK, G, F_in, decay)


CHUNKED = _plan.Chunked(CHUNK, row_project, chunk_outer, segment_sum, acc=F32)


def project(M, U, V) -> torch.Tensor:
    return _plan.chunked_project(CHUNKED, M, U, V)
