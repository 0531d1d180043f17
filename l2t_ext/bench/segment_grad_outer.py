"""Benchmark suite: segment_grad_outer against the per-segment gradients a user would otherwise compute."""

from __future__ import annotations

import functools

import torch

from l2t_ext import ops
from l2t_ext.bench._harness import Case, Impl

OP = "segment_grad_outer"


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(4096, 1024, 1024, 16, 64)]
    if device == "cuda":
        shapes += [(16384, 4096, 4096, 32, 64)] if quick else [(4096, 1536, 1536, 32, 64), (16384, 4096, 4096, 32, 64)]
    else:  # rank 8: the tiny-arith preset's and the TRL trainer's default (a rank below the 16-wide SIMD panel)
        shapes += [(4096, 1024, 1024, 8, 64)]
        if not quick:
            shapes += [(4096, 1536, 1536, 32, 64), (16384, 1536, 1536, 32, 64), (16384, 4096, 4096, 32, 64)]
    out = []
    for T, n, m, r, S in shapes:
        p = dict(T=T, n=n, m=m, r=r, S=S)
        out.append(Case(OP, f"T{T}_n{n}_m{m}_r{r}_S{S}", p))
    return out


def floor_bytes(params: dict, dtype: torch.dtype) -> int:
    return params["T"] * (params["n"] + params["m"]) * torch.finfo(dtype).bits // 8


def make_inputs(params: dict, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    T, n, m, r, S = (params[k] for k in ("T", "n", "m", "r", "S"))
    X = torch.randn(T, n, generator=g).to(device=device, dtype=dtype)
    D = torch.randn(T, m, generator=g).to(device=device, dtype=dtype)
    # S contiguous episodes of random lengths; ~10% of tokens masked (prompt/padding/final answer)
    cuts = torch.sort(torch.randperm(T - 1, generator=g)[: S - 1] + 1).values
    seg = torch.bucketize(torch.arange(T), cuts, right=True)
    seg[torch.rand(T, generator=g) < 0.1] = -1
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q.to(device)
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q.to(device)
    return dict(X=X, D=D, seg=seg.to(device), S=S, U=U, V=V)


def reference(inp: dict) -> torch.Tensor:
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
    return ops.reference.segment_grad_outer(d["X"], d["D"], d["seg"], d["S"], d["U"], d["V"])


def _torch_func(inp):
    """vmap over segments of grad of a Linear's summed, segment-masked output loss, then U^T G V."""
    X, D, seg, S, U, V = inp["X"], inp["D"], inp["seg"], inp["S"], inp["U"], inp["V"]
    W = torch.zeros(D.shape[1], X.shape[1], device=X.device, dtype=X.dtype)

    def loss(W, s):
        out = torch.nn.functional.linear(X, W)  # (T, m)
        return (out * D * (seg == s).to(X.dtype)[:, None]).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(W, torch.arange(S, device=X.device))
    return U.T.to(grads.dtype) @ grads @ V.to(grads.dtype)


def _torch_naive(inp):
    """Full per-segment gradients D_s^T X_s (S, m, n), then the projection."""
    X, D, seg, S, U, V = inp["X"], inp["D"], inp["seg"], inp["S"], inp["U"], inp["V"]
    full = torch.zeros(S, D.shape[1], X.shape[1], device=X.device, dtype=X.dtype)
    for s in range(S):
        sel = seg == s
        full[s] = D[sel].T @ X[sel]
    return U.T.to(full.dtype) @ full @ V.to(full.dtype)


def _torch_best(inp):
    """Project X and D first, then a segment-sum of r x r outer products."""
    X, D, seg, S, U, V = inp["X"], inp["D"], inp["seg"], inp["S"], inp["U"], inp["V"]
    keep = seg >= 0
    a = D[keep] @ U.to(D.dtype)
    b = X[keep] @ V.to(X.dtype)
    G = torch.zeros(S, U.shape[1], V.shape[1], device=X.device, dtype=X.dtype)
    return G.index_add_(0, seg[keep], a[:, :, None] * b[:, None, :])


def est_bytes(impl: str, params: dict, dtype: torch.dtype) -> int:
    T, n, m, r, S = (params[k] for k in ("T", "n", "m", "r", "S"))
    e = torch.finfo(dtype).bits // 8
    if impl == "torch_func":
        return S * T * m * e * 2 + S * m * n * e * 2  # batched masked outputs + per-segment gradients
    if impl == "torch_naive":
        return S * m * n * e * 2
    return T * (n + m) * e


def impls(device: str, l2t_backends: list[str]) -> list[Impl]:
    out = [Impl(f"l2t:{b}", "l2t",
                lambda inp, b=b: ops.segment_grad_outer(inp["X"], inp["D"], inp["seg"], inp["S"], inp["U"],
                                                        inp["V"], backend=b))
           for b in l2t_backends]
    from l2t_ext.ops import _plan

    def direct(fn, **kw):  # a backend's function called directly: no op layer, no id check
        return lambda inp: fn(inp["X"], inp["D"], inp["seg"].to(torch.int64), inp["S"], inp["U"], inp["V"], **kw)

    if "cuda" in l2t_backends:
        from l2t_ext.ops import _cuda

        # called directly: the backend's path (the span plan; bf16 projections on the vectorised tensor-core row
        # kernel), the same plan on the generic GEMM, and the chunked plan with the generic GEMM it replaced (a
        # sort of the tokens, gathered rows, three host synchronisations): what the plan and the kernel each bring
        chunked = functools.partial(_plan.chunked_segment_grad_outer, _cuda.CHUNKED)
        out += [Impl("l2t:cuda_direct", "l2t", direct(_cuda.segment_grad_outer)),
                Impl("l2t:cuda_generic", "l2t", _cuda.generic_gemm()(direct(_cuda.segment_grad_outer))),
                Impl("l2t:cuda_chunked", "l2t", _cuda.generic_gemm()(direct(chunked)))]
    if "triton" in l2t_backends:
        from l2t_ext.ops import _triton

        # as the reward calls it: no id check, no host synchronisation at all (the default call reads the largest
        # id back after its kernels are queued)
        out.append(Impl("l2t:triton_nocheck", "l2t", lambda inp: ops.segment_grad_outer(
            inp["X"], inp["D"], inp["seg"], inp["S"], inp["U"], inp["V"], backend="triton", check_ids=False)))
        # Triton candidates, called directly, so that they compare with each other: the two-pass path, the same
        # with its projections split over K to fill the GPU, and the fused single-pass kernel (the backend's path:
        # the fastest of the three on an H100)
        def fused_pieces(scale):  # the fused kernel with scale x its default pieces per segment
            def run(inp):
                seg = inp["seg"].to(torch.int64)
                nsplit = max(1, round(scale * _plan.pieces(seg.numel(), inp["S"], _triton._sm_count(seg.device))))
                return _triton.segment_grad_outer_fused(inp["X"], inp["D"], seg, inp["S"], inp["U"], inp["V"], nsplit)
            return run

        out += [Impl("l2t:triton_2pass", "l2t", direct(_triton.segment_grad_outer_two_pass)),
                Impl("l2t:triton_ksplit", "l2t", direct(_triton.segment_grad_outer_two_pass, ksplit=None)),
                Impl("l2t:triton_fused", "l2t", direct(_triton.segment_grad_outer_fused)),
                # pieces twice as long (U and V re-read half as often, half the programs) and half as long
                Impl("l2t:triton_fused_x0.5", "l2t", fused_pieces(0.5)),
                Impl("l2t:triton_fused_x2", "l2t", fused_pieces(2.0))]
    out += [Impl("torch_func", "baseline", _torch_func), Impl("torch_naive", "baseline", _torch_naive),
            Impl("torch_best", "baseline", _torch_best)]
    return out
