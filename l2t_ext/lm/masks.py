"""Custom attention masks for Hugging Face decoders: a boolean (B, Q, KV) mask (True: the query may attend to
the key) put in the form the model's attention implementation reads.

The Jr probes (their packed forward, their KV-cache forward, and the probes riding behind the rollout in the
Fisher tracker's forward) hand the decoder a mask of their own. Hugging Face passes a 4-D mask through to the
attention function unchanged, and each implementation reads it differently: SDPA takes a boolean mask; eager
attention adds its mask to the scores, so a boolean one would add 0 or 1 and mask nothing; flex attention takes a
``BlockMask`` and adds a tensor mask to its scores. Flash-attention, paged and hub kernels take no arbitrary mask
at all. So the mask is converted per implementation here, and the others are refused by name before any work.

A model whose layers attend within a sliding window (Mistral-style ``sliding_window``, or ``layer_types`` with
"sliding_attention" layers: Qwen2/3 with ``use_sliding_window``, Gemma 2/3) builds that window into its own masks;
a custom mask must do the same, by position: a key is in the window of a query when their positions differ by
less than ``sliding_window`` (what a separate forward of the probe's sequence would see). Models with layers of
both kinds take one mask per layer type, as a dict.
"""

from __future__ import annotations

import torch

from l2t_ext.lm.logprobs import unwrapped

CUSTOM_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_implementation(model) -> str | None:
    """The model's ``config._attn_implementation`` (through a ``.module`` wrapper such as DDP), or None for a
    model without a Hugging Face config."""
    return getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None)


def sliding_window(model) -> tuple[int, bool] | None:
    """(window, per_layer_type) when some of the model's layers attend within a sliding window, else None.
    ``per_layer_type``: the model has ``layer_types`` and takes a dict of masks keyed by them; otherwise every
    layer slides and takes one mask."""
    cfg = getattr(unwrapped(model), "config", None)
    window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window), types is not None


def check_custom_mask(model, who: str) -> str | None:
    """Raise ValueError (naming ``who`` and the reason) unless the model's attention reads custom 4-D masks and
    its layers are of kinds a custom mask can express; returns the attention implementation."""
    impl = attention_implementation(model)
    if impl is not None and impl not in CUSTOM_MASK_IMPLEMENTATIONS:
        raise ValueError(f"{who}: the model's attention implementation {impl!r} takes no custom 4-D attention mask; "
                         f"load the model with attn_implementation one of {CUSTOM_MASK_IMPLEMENTATIONS} (e.g. "
                         f"model.set_attn_implementation('sdpa'))")
    types = getattr(getattr(unwrapped(model), "config", None), "layer_types", None) or ()
    other = sorted(set(types) - set(LAYER_TYPES))
    if other:
        raise ValueError(f"{who}: the model has layers of type {other}; a custom attention mask covers only "
                         f"{LAYER_TYPES}")
    return impl


def custom_attention_mask(model, mask: torch.Tensor, who: str = "attention mask", positions=None):
    """The boolean ``mask`` (B, Q, KV) as the model's attention reads it: (B, 1, Q, KV) bool for SDPA (and models
    without a Hugging Face config), (B, 1, Q, KV) float32 with 0 where attended and the float32 minimum elsewhere
    for eager attention, a block-sparse ``BlockMask`` for flex attention (fully masked blocks are skipped, not
    computed and masked). Every query row must see at least one key (SDPA and eager would give it NaN).

    ``positions``: (query positions (B, Q), key positions (B, KV)), needed when the model has sliding-window layers
    (``sliding_window``): their mask also drops keys a window or more behind the query; a model with both kinds of
    layers gets ``{"full_attention": ..., "sliding_attention": ...}``."""
    impl = check_custom_mask(model, who)
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"{who}: mask must be a (B, Q, KV) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    window = sliding_window(model)
    if window is None:
        return _for_implementation(impl, mask)
    if positions is None or positions[0].shape != mask.shape[:2] or positions[1].shape != mask.shape[::2]:
        raise ValueError(f"{who}: the model attends within a sliding window of {window[0]}: positions must be "
                         f"(query (B, Q), key (B, KV)) for the mask {tuple(mask.shape)}")
    q_pos, kv_pos = positions
    near = mask & (q_pos[:, :, None] - kv_pos[:, None, :] < window[0])  # the window keeps each query's own key
    if not window[1]:
        return _for_implementation(impl, near)
    return {"full_attention": _for_implementation(impl, mask), "sliding_attention": _for_implementation(impl, near)}


def _for_implementation(impl: str | None, mask: torch.Tensor):
    """``mask`` (B, Q, KV) bool in the form ``impl`` reads (``custom_attention_mask``)."""
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)[:, None]
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        B, Q, KV = mask.shape
        return create_block_mask(lambda b, h, q, kv: mask[b, q, kv], B, None, Q, KV, device=mask.device)
    return mask[:, None]
