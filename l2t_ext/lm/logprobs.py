"""Token log-probabilities and position ids of a causal LM batch (left padding allowed)."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions that skip left padding (what HF ``generate`` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) log pi(x_{t+1} | x_<=t) at position t (last position: 0), in float32 (float64 for float64 logits)."""
    lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32),
                           -1)
    out = lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([out, out.new_zeros(out.shape[0], 1)], 1)
