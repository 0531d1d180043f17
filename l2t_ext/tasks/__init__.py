"""Tasks and verifiers. ``verify(completion, reference) -> float in [0, 1]``; ``load_task`` gives a prompt source
with its own prompt format, held-out problems and answer extractor."""

from l2t_ext.tasks.task import ArithTask, FileTask, load_extractor, load_task
from l2t_ext.tasks.verifiers import load_verifier

__all__ = ["load_verifier", "load_task", "load_extractor", "ArithTask", "FileTask"]
