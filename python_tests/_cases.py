"""Backend x device x dtype combinations that can run on this machine (shared by the op tests)."""

from __future__ import annotations

import pytest
import torch

from l2t_ext import _backend

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
HAS_GPU = torch.cuda.is_available()
INTERP = _backend.triton_interpret()
DEVICES = ["cpu", "cuda"] if HAS_GPU else ["cpu"]  # for tests of device-agnostic code: the GPU check runs both


def _combos():
    """(backend, device, dtype) for every implementation this machine can run."""
    combos = [("torch", "cpu", F64), ("torch", "cpu", F32)]
    if _backend._C is not None:
        combos += [("cpu", "cpu", F64), ("cpu", "cpu", F32)]
    if _backend.triton is not None and (HAS_GPU or INTERP):
        dev = "cuda" if HAS_GPU else "cpu"
        combos += [("triton", dev, F32), ("triton", dev, BF16)]
    if HAS_GPU:
        combos += [("cuda", "cuda", F32), ("cuda", "cuda", BF16), ("torch", "cuda", F32)]
    return combos


def _id(backend, device, dtype):
    name = {F64: "f64", F32: "f32", BF16: "bf16"}[dtype]
    return f"{backend}-{name}" if backend == device else f"{backend}-{device}-{name}"


def cases(tol: dict[torch.dtype, object]):
    """pytest params (backend, device, dtype, tol) for every combination this machine can run. ``tol`` maps each
    dtype the test covers to its tolerance (float64/float32: the largest relative error against the float64
    reference, or a tuple of them for several checks; bfloat16: the largest ratio to torch's own all-bfloat16
    error); a dtype missing from ``tol`` is not tested."""
    return [pytest.param(b, d, t, tol[t], id=_id(b, d, t)) for b, d, t in _combos() if t in tol]


def exact_cases(*dtypes: torch.dtype):
    """pytest params (backend, device, dtype) for tests whose checks need no tolerance (bitwise equalities,
    comparisons against another randomized method)."""
    return [pytest.param(b, d, t, id=_id(b, d, t)) for b, d, t in _combos() if t in dtypes]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf (NaN never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    return (out64 - ref64).norm().item() / (den if den > 0 else 1.0)


def without_sync(fn):
    """fn() with CUDA's sync debug mode at "error" (any host synchronisation inside raises), after the GPU is idle."""
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
