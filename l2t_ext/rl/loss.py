"""PPO clipped policy loss with token-mean (default) or sequence-mean aggregation, and the k3 KL estimator."""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1)
    if mode == "seq-mean":
        return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    raise ValueError(f"loss aggregation must be 'token-mean' or 'seq-mean', got {mode!r}")


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
             eps_low: float = 0.2, eps_high: float = 0.28, agg: str = "token-mean",
             ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0):
    """Clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) (+ kl_coef * k3).

    All tensors (B, L); mask selects response tokens. Returns (loss, stats dict of floats)."""
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_tok = -torch.minimum(surr1, surr2)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        per_tok = per_tok + kl_coef * kl
    loss = aggregate(per_tok, mask, agg)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        clipped = (surr2 < surr1).to(logp.dtype)
        stats = {"clip_frac": float((clipped * m).sum() / m.sum().clamp(min=1)),
                 "kl": float((kl * m).sum() / m.sum().clamp(min=1))}
    return loss, stats
