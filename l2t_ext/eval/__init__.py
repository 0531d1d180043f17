"""Evaluation: pass@1, maj@k, response tokens, tokens per correct answer, accuracy vs token budget and
Acc(k)/T(k) per episode depth (``l2t eval``)."""

from l2t_ext.eval.evaluate import evaluate, plot_report

__all__ = ["evaluate", "plot_report"]
