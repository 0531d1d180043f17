"""Custom attention masks for Hugging Face decoders: a boolean (B, Q, KV) mask (True: the query may attend to
the key) put in the form the model's attention implementation reads.

The Jr probes (their packed forward, their KV-cache forward, and the probes riding behind the rollout in the
Fisher tracker's forward) hand the decoder a mask of their own. Hugging Face passes a 4-D mask through to the
attention function unchanged, and each implementation reads it differently: SDPA takes a boolean mask; eager
attention adds its mask to the scores, so a boolean one would add 0 or 1 and mask nothing; flex attention takes a
``BlockMask`` and adds a tensor mask to its scores. Flash-attention, paged and hub kernels take no arbitrary mask
at all. So the mask is converted per implementation here, and the others are refused by name before any work.
"""

from __future__ import annotations

import torch

from l2t_ext.lm.logprobs import unwrapped

CUSTOM_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def attention_implementation(model) -> str | None:
    """The model's ``config._attn_implementation`` (through a ``.module`` wrapper such as DDP), or None for a
    model without a Hugging Face config."""
    return getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None)


def check_custom_mask(model, who: str) -> str | None:
    """Raise ValueError (naming ``who`` and the implementation) unless the model's attention reads custom 4-D
    masks; returns the implementation."""
    impl = attention_implementation(model)
    if impl is not None and impl not in CUSTOM_MASK_IMPLEMENTATIONS:
        raise ValueError(f"{who}: the model's attention implementation {impl!r} takes no custom 4-D attention mask; "
                         f"load the model with attn_implementation one of {CUSTOM_MASK_IMPLEMENTATIONS} (e.g. "
                         f"model.set_attn_implementation('sdpa'))")
    return impl


def custom_attention_mask(model, mask: torch.Tensor, who: str = "attention mask"):
    """The boolean ``mask`` (B, Q, KV) as the model's attention reads it: (B, 1, Q, KV) bool for SDPA (and models
    without a Hugging Face config), (B, 1, Q, KV) float32 with 0 where attended and the float32 minimum elsewhere
    for eager attention, a block-sparse ``BlockMask`` for flex attention (fully masked blocks are skipped, not
    computed and masked). Every query row must see at least one key (SDPA and eager would give it NaN)."""
    impl = check_custom_mask(model, who)
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"{who}: mask must be a (B, Q, KV) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)[:, None]
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        B, Q, KV = mask.shape
        return create_block_mask(lambda b, h, q, kv: mask[b, q, kv], B, None, Q, KV, device=mask.device)
    return mask[:, None]
