"""The policy as the loss sees it: the causal LM and an optional value head as one module (what DDP wraps)."""

from __future__ import annotations

import torch

from l2t_ext.lm import no_cache, position_ids_from_mask, token_logprobs


class ValueHead(torch.nn.Module):
    """A zero-initialised linear value estimate on the last hidden state (PPO mode)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)

    def forward(self, h):
        return self.v(h.float()).squeeze(-1)


class Policy(torch.nn.Module):
    """``forward(ids, attention_mask, values)`` -> (token log-probs (B, L), values (B, L) or None); position t
    holds log pi(x_{t+1} | x_<=t)."""

    def __init__(self, model, value_head: ValueHead | None = None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, ids, attention_mask, values: bool = False):
        out = self.model(input_ids=ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), output_hidden_states=values,
                         **no_cache(self.model))
        lp = token_logprobs(out.logits, ids).float()
        return lp, (self.value_head(out.hidden_states[-1]) if values else None)
