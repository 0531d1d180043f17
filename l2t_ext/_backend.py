"""Which compiled modules and kernel backends this installation can run, and how ``backend=`` is resolved.

Backends (DESIGN.md section 2): ``cuda`` (``_C_cuda``), ``triton``, ``cpu`` (``_C``, C++/OpenMP) and ``torch``
(the reference, any device and dtype). ``backend="auto"`` picks the fastest one available for the tensors'
device and dtype and falls back silently; an explicitly requested backend that cannot run raises
``RuntimeError`` with the real reason. The chosen backend is logged once per (op, backend).
"""

from __future__ import annotations

import importlib
import logging
import os
import platform

import torch

log = logging.getLogger("l2t_ext")

BACKENDS = ("cuda", "triton", "cpu", "torch")


def _import(name: str):
    try:
        return importlib.import_module(f"l2t_ext.{name}"), None
    except ImportError as exc:  # keep the real reason for error messages
        return None, f"{type(exc).__name__}: {exc}"


_C, _C_ERR = _import("_C")
_C_cuda, _C_CUDA_ERR = _import("_C_cuda")
_cfg, _CFG_ERR = _import("_build_config")

try:
    import triton  # noqa: F401

    _TRITON_ERR = None
except ImportError as exc:
    triton = None
    _TRITON_ERR = f"{type(exc).__name__}: {exc}"


def triton_interpret() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The order ``auto`` tries backends in, fastest first, per device type, op and shape class, as measured by
# ``l2t bench`` in one run per machine (README "Benchmarks": 2-core AMD EPYC; NVIDIA H200). ``torch`` is in
# every list, so a compiled backend that lost to torch on that class is listed after it and never picked.
# CPU: our C++ kernels win segment_grad_outer and rsvd; fisher_quadform is one GEMM where MKL wins.
# CUDA: Triton wins segment_grad_outer (the CUDA C++ kernel, an fp32 CUDA-core GEMM, loses to torch) and rsvd;
# fisher_quadform depends on p (see _quadform_cuda_order).
AUTO_ORDER = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "torch", "cuda"),
}
AUTO_ORDER_BY_OP = {
    ("fisher_quadform", "cpu"): ("torch",),
    ("rsvd", "cuda"): ("triton", "cuda", "torch"),
}


def _quadform_cuda_order(dtype: torch.dtype, size: int | None) -> tuple[str, ...]:
    """fisher_quadform on an H200 (M=64, N=512): the CUDA kernel wins for p <= 4096, Triton for larger p,
    except float32 at p >= 65536 where cuBLAS (torch) wins."""
    if size is not None and size <= 8192:
        return ("cuda", "triton", "torch")
    if dtype == torch.float32 and size is not None and size > 32768:
        return ("torch", "triton", "cuda")
    return ("triton", "torch", "cuda")


_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.bfloat16),
}


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``/``dtype`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if _C is None:
            return f"the l2t_ext C++ module _C failed to import ({_C_ERR}); reinstall with `pip install .`"
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device}"
    elif backend == "cuda":
        if _C_cuda is None:
            if _cfg is not None and not _cfg.CUDA_COMPILED:
                why = "nvcc was not found at build time" if not _cfg.NVCC_FOUND else f"L2T_CUDA={_cfg.L2T_CUDA}"
                return f"l2t_ext was built without CUDA: {why}; rebuild with nvcc on PATH (L2T_CUDA=ON)"
            return f"the CUDA module _C_cuda failed to import ({_C_CUDA_ERR})"
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device}"
    elif backend == "triton":
        if triton is None:
            return f"triton is not installed ({_TRITON_ERR}); `pip install triton`"
        if device.type == "cpu" and not triton_interpret():
            return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run its interpreter on CPU)"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not support device {device}"
    else:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if dtype not in _DTYPES[backend]:
        ok = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[backend])
        return f"backend {backend!r} supports {ok} inputs, got {str(dtype).replace('torch.', '')}"
    return None


_logged: set[tuple[str, str]] = set()


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, size: int | None = None) -> str:
    """Return the backend that runs ``op``; raise RuntimeError if an explicit one cannot. ``size`` is the
    op's shape-class hint for ``auto`` (fisher_quadform: p)."""
    if backend == "auto":
        chosen = "torch"
        if op == "fisher_quadform" and device.type == "cuda":
            order = _quadform_cuda_order(dtype, size)
        else:
            order = AUTO_ORDER_BY_OP.get((op, device.type), AUTO_ORDER.get(device.type, ("torch",)))
        for cand in order:
            if cand == "triton" and device.type != "cuda":
                continue  # never auto-select the interpreter
            if unavailable_reason(cand, device, dtype) is None:
                chosen = cand
                break
    else:
        why = unavailable_reason(backend, device, dtype)
        if why is not None:
            raise RuntimeError(f"l2t_ext.ops.{op}: backend {backend!r} is unavailable: {why}")
        chosen = backend
    if (op, chosen) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, chosen))
        log.info("l2t_ext.ops.%s: using backend %r (requested %r, %s %s)", op, chosen, backend, device, dtype)
    return chosen


def available_backends() -> list[str]:
    """Backends that can run on this machine (for some device/dtype)."""
    out = []
    if _C_cuda is not None and torch.cuda.is_available():
        out.append("cuda")
    if triton is not None and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    if _C is not None:
        out.append("cpu")
    out.append("torch")
    return out


def build_info() -> dict:
    """What this installation was built with and what can run here (also printed by ``l2t info``)."""
    info = {
        "version": importlib.import_module("l2t_ext").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cxx_compiler": getattr(_cfg, "CXX_COMPILER", None),
        "openmp": bool(_C.openmp()) if _C is not None else False,
        "cpu_threads": int(_C.max_threads()) if _C is not None else None,
        "cuda_compiled": _C_cuda is not None,
        "nvcc_found_at_build": bool(getattr(_cfg, "NVCC_FOUND", False)),
        "cuda_version": getattr(_cfg, "CUDA_VERSION", None),
        "cuda_archs": list(getattr(_cfg, "CUDA_ARCHS", [])),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_interpret": triton_interpret(),
        "backends": available_backends(),
    }
    if _C is None:
        info["cpu_module_error"] = _C_ERR
    if _C_cuda is None and getattr(_cfg, "CUDA_COMPILED", False):
        info["cuda_module_error"] = _C_CUDA_ERR
    return info
