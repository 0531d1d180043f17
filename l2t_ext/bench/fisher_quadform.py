"""Benchmark suite: fisher_quadform (implicit) against an explicit Fisher and the best plain-torch form."""

from __future__ import annotations

import functools

import torch

from l2t_ext import ops
from l2t_ext.bench._harness import Case, Impl

OP = "fisher_quadform"


def cases(quick: bool, device: str) -> list[Case]:
    ps = [1024, 4096, 16384] if device == "cpu" else ([4096, 16384, 65536] if quick else [1024, 4096, 16384, 65536])
    return [Case(OP, f"p{p}_N512_M64", dict(p=p, N=512, M=64)) for p in ps]


def floor_bytes(params: dict, dtype: torch.dtype) -> int:
    return (params["N"] + params["M"]) * params["p"] * torch.finfo(dtype).bits // 8


def make_inputs(params: dict, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    p, N, M = params["p"], params["N"], params["M"]
    return dict(delta=torch.randn(M, p, generator=g).to(device=device, dtype=dtype),
                grads=torch.randn(N, p, generator=g).to(device=device, dtype=dtype), damping=1e-5)


def reference(inp: dict) -> torch.Tensor:
    return ops.reference.fisher_quadform_implicit(inp["delta"].double(), inp["grads"].double(), inp["damping"])


def _explicit_fisher(inp):
    """Build F = G^T G / N (p x p), then delta (F + lambda I) delta^T."""
    d, G, lam = inp["delta"], inp["grads"], inp["damping"]
    F = G.T @ G / G.shape[0]
    return ((d @ F) * d).sum(1) + lam * d.square().sum(1)


def _torch_best(inp):
    d, G, lam = inp["delta"], inp["grads"], inp["damping"]
    return (d @ G.T).square().mean(1) + lam * d.square().sum(1)


def est_bytes(impl: str, params: dict, dtype: torch.dtype) -> int:
    e = torch.finfo(dtype).bits // 8
    if impl == "explicit_fisher":
        return params["p"] ** 2 * e * 2
    return (params["N"] + params["M"]) * params["p"] * e


def impls(device: str, l2t_backends: list[str]) -> list[Impl]:
    def op(inp, backend):
        return ops.fisher_quadform(inp["delta"], grads=inp["grads"], damping=inp["damping"], backend=backend)

    out = [Impl(f"l2t:{b}", "l2t", functools.partial(op, backend=b)) for b in l2t_backends]
    if "cuda" in l2t_backends:  # the cuda backend with every GEMM on its generic kernel: rows_tc's share (bf16)
        from l2t_ext.ops import _cuda

        out.append(Impl("l2t:cuda_generic", "l2t", _cuda.generic_gemm()(functools.partial(op, backend="cuda"))))
    if "triton" in l2t_backends:  # Triton called directly (no op layer): the backend's split-K path, and the
        from l2t_ext.ops import _triton  # fused-epilogue kernel (not the backend's path: slower on an H100)

        out += [Impl(f"l2t:triton_{name}", "l2t", lambda inp, fn=fn: fn(inp["delta"], inp["grads"], inp["damping"]))
                for name, fn in (("splitk", _triton.fisher_quadform_implicit),
                                 ("fused", _triton.fisher_quadform_fused_implicit))]
    return out + [Impl("explicit_fisher", "baseline", _explicit_fisher), Impl("torch_best", "baseline", _torch_best)]
