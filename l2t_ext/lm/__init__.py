"""Language-model utilities shared by the reward, the loop and evaluation: token log-probabilities, position ids,
padding, custom attention masks, RoPE variants that switch with length, sampling (``generate``), loading local
Hugging Face models, and tiny models built from a config.

This package sits below ``reward``, ``eval`` and ``rl`` (docs/architecture.md, "Layers"): it imports none of them.
"""

from l2t_ext.lm.generation import RolloutBatch, generate, left_pad, pack
from l2t_ext.lm.logprobs import (
    PLAIN_HEAD_MODEL_TYPES,
    GradRows,
    head_token_logprobs,
    no_cache,
    output_cache,
    position_ids_from_mask,
    split_head,
    token_logprobs,
)
from l2t_ext.lm.masks import attention_implementation, check_custom_mask, custom_attention_mask, sliding_window
from l2t_ext.lm.models import char_tokenizer, check_model_dir, load_local, marker_ids, tiny_qwen2
from l2t_ext.lm.prompts import render_prompt
from l2t_ext.lm.rope import rope_switch

__all__ = ["RolloutBatch", "generate", "left_pad", "pack", "position_ids_from_mask", "token_logprobs",
           "PLAIN_HEAD_MODEL_TYPES", "GradRows", "head_token_logprobs", "no_cache", "output_cache", "split_head",
           "attention_implementation", "check_custom_mask", "custom_attention_mask", "sliding_window",
           "char_tokenizer", "check_model_dir", "load_local", "marker_ids", "render_prompt", "rope_switch",
           "tiny_qwen2"]
