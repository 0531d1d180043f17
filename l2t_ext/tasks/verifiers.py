"""Verifier plug-in point: ``verify(completion: str, reference: str) -> float in [0, 1]``.

Built-ins: ``arith`` (exact integer after ``A:``) and ``math`` (boxed / GSM8K / numeric equivalence). A user
verifier is given by import path, ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from l2t_ext.errors import InputError

BUILTIN = {"arith": "l2t_ext.tasks.arith:verify", "math": "l2t_ext.tasks.math:verify"}


def load_verifier(spec: str) -> Callable[[str, str], float]:
    path = BUILTIN.get(spec, spec)
    if ":" not in path:
        raise InputError(f"verifier must be one of {sorted(BUILTIN)} or 'module:function', got {spec!r}")
    mod, fn = path.split(":", 1)
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load verifier {spec!r}: {exc}") from exc
    if not callable(f):
        raise InputError(f"verifier {spec!r} is not callable")
    return f
