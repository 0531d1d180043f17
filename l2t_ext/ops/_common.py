"""Validation and backend plumbing shared by the public ops (raised before any kernel runs)."""

from __future__ import annotations

import functools
import importlib

import torch

from l2t_ext._backend import resolve
from l2t_ext.ops import reference

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(op: str, name: str, t, ndim: int | tuple[int, ...], floating: bool = True,
                 want: str | None = None) -> None:
    """Type, rank (``ndim``: allowed dims; ``want`` describes them in the error) and dtype of one argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"l2t_ext.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        want = want or " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"l2t_ext.ops.{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOATS:
        raise TypeError(f"l2t_ext.ops.{op}: {name} must be a floating tensor, got {t.dtype}")


def check_same_device(op: str, **tensors) -> torch.device:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for name, d in devs.items():
        if d != first:
            detail = ", ".join(f"{n} on {v}" for n, v in devs.items())
            raise ValueError(f"l2t_ext.ops.{op}: all tensors must be on one device; {name} differs ({detail})")
    return first


def check_backend_arg(op: str, backend) -> None:
    if not isinstance(backend, str) or backend not in ("auto", "cuda", "triton", "cpu", "torch"):
        raise ValueError(f"l2t_ext.ops.{op}: backend must be 'auto', 'cuda', 'triton', 'cpu' or 'torch'; "
                         f"got {backend!r}")


def pick(op: str, backend: str, device: torch.device, dtype: torch.dtype, auto_order: tuple[str, ...]) -> str:
    check_backend_arg(op, backend)
    return resolve(op, backend, device, dtype, auto_order)


def autocast_off(body):
    """Runs a custom op's body with autocast off for its tensors' device. Each op's dtypes are its own contract
    (the inputs' dtype, float32/float64 accumulation); a caller's bf16 autocast region (a trainer scoring rollouts)
    must not recast the matmuls of its torch paths. Autocast passes through custom ops, hence here."""
    @functools.wraps(body)
    def run(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device):  # entering the context costs ~10 us of host time per call
            return body(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return body(*args, **kwargs)
    return run


def l2t_op(name: str):
    """Registers the decorated body (autocast off inside) as the custom op ``l2t_ext::name`` and returns a caller
    of it. torch.compile, export, fake tensors, tensor subclasses and inputs that need a gradient (the op has no
    autograd formula: torch's error) go through the registered op; a plain eager call runs the body directly,
    because the custom-op dispatcher costs ~70 us of host time per call (2-core Xeon), more than the kernel of a
    small call on a GPU. ``caller.register_fake`` registers the op's shape function."""
    def wrap(body):
        body = autocast_off(body)
        op = torch.library.custom_op(f"l2t_ext::{name}", mutates_args=())(body)

        @functools.wraps(body)
        def caller(*args):
            return body(*args) if _plain_eager(args) else op(*args)

        caller.register_fake = op.register_fake
        return caller
    return wrap


def _plain_eager(args) -> bool:
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return not any(isinstance(a, torch.Tensor) and (type(a) not in (torch.Tensor, torch.nn.Parameter)
                                                    or (grad and a.requires_grad)) for a in args)


@functools.cache
def implementation(path: str):
    """The function at ``path`` ("module.function" under ``l2t_ext.ops``), imported on first use (a backend's
    module imports its compiled library or triton only when that backend runs)."""
    mod, fn = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"l2t_ext.ops.{mod}"), fn)


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.acc_dtype(dtype)
