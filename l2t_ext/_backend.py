"""Which compiled modules and kernel backends this installation can run, and how ``backend=`` is resolved.

Backends (docs/architecture.md, "Kernels and backends"): ``cuda`` (``_C_cuda``), ``triton``, ``cpu`` (``_C``,
C++/OpenMP) and ``torch`` (the reference, any device and dtype). ``backend="auto"`` picks the fastest one
available for the tensors' device and dtype (each op's module holds its measured ``auto_order``) and falls back
silently; an explicitly requested backend that cannot run raises ``RuntimeError`` with the real reason. The
chosen backend is logged once per (op, backend).
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
from collections.abc import Sequence

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


def source_tree_shadowing() -> str | None:
    """A one-line explanation when ``l2t_ext`` was imported from a source checkout (the repository root on
    ``sys.path``, e.g. Python started there) instead of the installed package: the checkout holds no compiled
    ``_C``, so every ``auto`` op would quietly run the torch reference. None otherwise."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(pkg)
    if _C is not None or not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return None
    return (f"l2t_ext was imported from the source checkout {pkg}, which has no compiled kernels (_C), so only the "
            "torch reference runs; run Python from another directory so the installed package is imported "
            "(after `pip install .`)")


_warned_source_tree = False


def warn_source_tree() -> None:
    """Say once, in one line on stderr, that ``source_tree_shadowing()`` applies."""
    global _warned_source_tree
    msg = source_tree_shadowing()
    if msg and not _warned_source_tree:
        _warned_source_tree = True
        print(f"l2t_ext: {msg}", file=sys.stderr)


def triton_interpret() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.bfloat16),
}


def disabled_backends() -> set[str]:
    """Backends switched off at run time by ``L2T_DISABLE_BACKENDS`` (comma-separated: cpu, cuda, triton): "auto"
    skips them and an explicit request raises. An escape hatch when a kernel misbehaves on some GPU or driver;
    the torch reference cannot be disabled. Read at every dispatch, so a process can change it."""
    raw = os.environ.get("L2T_DISABLE_BACKENDS", "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    bad = sorted(names - {"cpu", "cuda", "triton"})
    if bad:
        raise ValueError(f"L2T_DISABLE_BACKENDS={raw!r}: unknown backend(s) {bad}; use a comma-separated subset of "
                         "cpu, cuda, triton (the torch reference cannot be disabled)")
    return names


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``/``dtype`` (None when it can)."""
    if backend == "torch":
        return None
    if backend in disabled_backends():
        return f"disabled by L2T_DISABLE_BACKENDS={os.environ['L2T_DISABLE_BACKENDS']!r}"
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


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, auto_order: Sequence[str]) -> str:
    """The backend that runs ``op``: an explicit one (``RuntimeError`` with the reason if it cannot run), or for
    "auto" the first of the op's ``auto_order`` that can (never Triton's CPU interpreter; torch last resort)."""
    if backend == "auto":
        chosen = next((c for c in auto_order if not (c == "triton" and device.type != "cuda")
                       and unavailable_reason(c, device, dtype) is None), "torch")
        if chosen == "torch" and device.type == "cpu" and _C is None:
            warn_source_tree()
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
        "disabled_backends": sorted(disabled_backends()),
    }
    if _C is None:
        info["cpu_module_error"] = _C_ERR
    shadow = source_tree_shadowing()
    if shadow:
        info["warning"] = shadow
    if _C_cuda is None and getattr(_cfg, "CUDA_COMPILED", False):
        info["cuda_module_error"] = _C_CUDA_ERR
    return info
