"""Rollouts with Hugging Face ``generate``: G samples per prompt, laid out group-major, as one padded batch
(prompt left-padded, response right-padded) with the masks the reward and the loss need."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, Lp + Ln)
    attention_mask: torch.Tensor  # (B, Lp + Ln)
    response_mask: torch.Tensor  # (B, Lp + Ln) bool: generated tokens up to and including <eos>
    completions: list[str]  # decoded responses (no padding, no <eos>)
    prompt_len: int  # Lp

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, do_sample: bool = True) -> RolloutBatch:
    """``do_sample=False``: greedy decoding (temperature/top_p ignored)."""
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(dev)
    am = enc["attention_mask"].repeat_interleave(group_size, 0).to(dev)
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
    Lp = ids.shape[1]
    resp = out[:, Lp:]
    is_eos = resp == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first <eos>
    rmask = ~after_eos
    resp = torch.where(rmask, resp, torch.full_like(resp, tokenizer.pad_token_id))
    full = torch.cat([ids, resp], 1)
    attn = torch.cat([am, rmask.long()], 1)
    response_mask = torch.cat([torch.zeros_like(am, dtype=torch.bool), rmask], 1)
    texts = []
    for row, m in zip(resp, rmask & ~is_eos):
        texts.append(tokenizer.decode(row[m].tolist(), skip_special_tokens=False))
    return RolloutBatch(full, attn, response_mask, texts, Lp)
