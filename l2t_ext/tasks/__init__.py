"""Tasks and verifiers (DESIGN.md section 5). ``verify(completion, reference) -> float in [0, 1]``."""

from l2t_ext.tasks.verifiers import load_verifier

__all__ = ["load_verifier"]
