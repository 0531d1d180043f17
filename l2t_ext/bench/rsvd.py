"""Benchmark suite: rsvd (single matrices and a batch of same-shape layers) against torch.svd_lowrank and a
full torch.linalg.svd, with accuracy; and project against plain matmuls."""

from __future__ import annotations

import torch

from l2t_ext import ops
from l2t_ext.bench._harness import Case, Impl

OP = "rsvd"


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(1, 1024, 1024, 16), (1, 4096, 1024, 16)]
    if device == "cuda" and quick:
        shapes = [(1, 4096, 1024, 16), (28, 1536, 1536, 32)]
    elif not quick or device == "cuda":
        shapes += [(1, 4096, 4096, 32), (28, 1536, 1536, 32)]
    return [Case(OP, f"B{B}_m{m}_n{n}_r{r}", dict(B=B, m=m, n=n, r=r)) for B, m, n, r in shapes]


def floor_bytes(params: dict, dtype: torch.dtype) -> int:
    return params["B"] * params["m"] * params["n"] * torch.finfo(dtype).bits // 8


def make_inputs(params: dict, device: str, dtype: torch.dtype) -> dict:
    """Matrices with a decaying spectrum 0.9^i + 1e-3 (where a low-rank basis is meaningful)."""
    g = torch.Generator().manual_seed(2)
    B, m, n, r = (params[k] for k in ("B", "m", "n", "r"))
    k = min(m, n)
    s = 0.9 ** torch.arange(k, dtype=torch.float32) + 1e-3
    Ws = []
    for _ in range(B):
        Uq = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
        Vq = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
        Ws.append((Uq * s) @ Vq.T)
    W = torch.stack(Ws).to(device=device, dtype=dtype)
    return dict(W=W if B > 1 else W[0], r=r, sv=s[:r].double(), opt=s[r:].double().square().sum().sqrt())


def reference(inp: dict) -> torch.Tensor:
    sv = inp["sv"]
    return sv.expand(inp["W"].shape[0], -1) if inp["W"].dim() == 3 else sv


def recon_ratio(inp: dict, out) -> float:
    """||W - U S V^T|| / ||W - W_r|| averaged over the batch (1.0 is the optimal rank-r error)."""
    U, S, V = (t.double().cpu() for t in out)
    W = inp["W"].double().cpu()
    err = (W - (U * S[..., None, :]) @ V.mT).flatten(-2).norm(dim=-1)
    return float((err / inp["opt"]).mean())


def _svd_lowrank(inp):
    W, r = inp["W"], inp["r"]
    torch.manual_seed(inp.get("seed", 0))
    Wf = W.float()
    mats = Wf if Wf.dim() == 3 else Wf[None]
    outs = [torch.svd_lowrank(Wi, q=r + 8, niter=2) for Wi in mats]  # the per-layer loop a user writes
    U = torch.stack([o[0][:, :r] for o in outs])
    S = torch.stack([o[1][:r] for o in outs])
    V = torch.stack([o[2][:, :r] for o in outs])
    return (U, S, V) if W.dim() == 3 else (U[0], S[0], V[0])


def _linalg_svd(inp):
    W, r = inp["W"].float(), inp["r"]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :].mT


def est_bytes(impl: str, params: dict, dtype: torch.dtype) -> int:
    return params["B"] * params["m"] * params["n"] * 4 * 3


def impls(device: str, l2t_backends: list[str]) -> list[Impl]:
    out = [Impl(f"l2t:{b}", "l2t", lambda inp, b=b: ops.rsvd(inp["W"], inp["r"], oversample=8, n_iter=2,
                                                             seed=inp.get("seed", 0), backend=b))
           for b in l2t_backends]
    return out + [Impl("svd_lowrank", "baseline", _svd_lowrank), Impl("linalg_svd", "baseline", _linalg_svd)]


# ------------------------------------------------------------------------------------------- project
PROJECT_OP = "project"


def project_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(1, 4096, 1024, 16)] + ([(28, 1536, 1536, 32)] if (not quick or device == "cuda") else [])
    return [Case(PROJECT_OP, f"B{B}_m{m}_n{n}_r{r}", dict(B=B, m=m, n=n, r=r))
            for B, m, n, r in shapes]


def project_inputs(params: dict, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(3)
    B, m, n, r = (params[k] for k in ("B", "m", "n", "r"))
    return dict(M=torch.randn(B, m, n, generator=g).to(device=device, dtype=dtype),
                U=torch.randn(B, m, r, generator=g).to(device), V=torch.randn(B, n, r, generator=g).to(device))


def project_reference(inp: dict) -> torch.Tensor:
    return inp["U"].double().mT @ inp["M"].double() @ inp["V"].double()


def _matmul(inp):
    M = inp["M"]
    return inp["U"].to(M.dtype).mT @ M @ inp["V"].to(M.dtype)


def project_impls(device: str, l2t_backends: list[str]) -> list[Impl]:
    out = [Impl(f"l2t:{b}", "l2t", lambda inp, b=b: ops.project(inp["M"], inp["U"], inp["V"], backend=b))
           for b in l2t_backends]
    return out + [Impl("torch_matmul", "baseline", _matmul)]
