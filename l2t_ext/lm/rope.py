"""Rotary position embeddings whose frequencies depend on the longest position in the forward.

Most RoPE variants (default, linear, YaRN, Llama 3) rotate a token by its own position, whatever else the forward
holds. Two Hugging Face variants pick their frequencies from the largest position id of the whole forward (every
row of the batch):

- "longrope" (Phi-3 / Phi-4 long-context models, e.g. Phi-4-mini-reasoning): the short factors while every
  position is below ``original_max_position_embeddings``, the long factors for every token once one position
  reaches it;
- "dynamic" NTK scaling: the original frequencies while the forward is shorter than ``max_position_embeddings``;
  beyond it, frequencies stretched for the longest sequence, which transformers keeps (cached on the module) until
  a forward shorter than that length resets them.

A forward that packs several sequences (the Jr probes behind their rollout) would rotate a short probe by the
frequencies of the longest sequence in the pack, which a separate forward of that probe never sees.
``rope_switch`` says where that happens, so the packers can keep the two sides apart.
"""

from __future__ import annotations

from l2t_ext.lm.logprobs import unwrapped


def rope_switch(model) -> tuple[int, bool] | None:
    """(n, exact_above) when the model's RoPE frequencies depend on the forward's longest position, else None.

    A forward whose position ids are all below ``n`` uses the original frequencies, whatever ran before it.
    ``exact_above``: every forward with a position id >= n uses the same other frequencies (longrope), so sequences
    on that side give what they would alone when they share a forward. False for dynamic scaling, whose frequencies
    keep changing with the length (and, in transformers, with the forwards before), and for models whose layer
    types switch at different lengths."""
    cfg = getattr(unwrapped(model), "config", None)
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    per_type = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    found = set()
    for p in per_type:
        kind = p.get("rope_type", p.get("type")) or "default"
        if kind == "longrope":  # long factors iff max(position_ids) + 1 > original_max_position_embeddings
            n = p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
            found.add((int(n or cfg.max_position_embeddings), True))
        elif "dynamic" in kind:  # reset to the original frequencies iff max(position_ids) + 1 < max_position_embeddings
            found.add((int(cfg.max_position_embeddings) - 1, False))
    if not found:
        return None
    n = min(s for s, _ in found)
    return n, len(found) == 1 and next(iter(found))[1]
