"""Backend x device x dtype combinations that can run on this machine (shared by the op tests)."""

from __future__ import annotations

import pytest
import torch

from l2t_ext import _backend

HAS_GPU = torch.cuda.is_available()
INTERP = _backend.triton_interpret()


def cases(include_bf16: bool = True):
    out = [pytest.param("torch", "cpu", torch.float64, id="torch-cpu-f64"),
           pytest.param("torch", "cpu", torch.float32, id="torch-cpu-f32")]
    if _backend._C is not None:
        out += [pytest.param("cpu", "cpu", torch.float64, id="cpu-f64"),
                pytest.param("cpu", "cpu", torch.float32, id="cpu-f32")]
    if _backend.triton is not None and (HAS_GPU or INTERP):
        dev = "cuda" if HAS_GPU else "cpu"
        out.append(pytest.param("triton", dev, torch.float32, id=f"triton-{dev}-f32"))
        if include_bf16:
            out.append(pytest.param("triton", dev, torch.bfloat16, id=f"triton-{dev}-bf16"))
    if HAS_GPU:
        out.append(pytest.param("cuda", "cuda", torch.float32, id="cuda-f32"))
        if include_bf16:
            out.append(pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bf16"))
        out.append(pytest.param("torch", "cuda", torch.float32, id="torch-cuda-f32"))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf (NaN never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    return (out64 - ref64).norm().item() / (den if den > 0 else 1.0)


def fp_tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 2e-5}[dtype]
