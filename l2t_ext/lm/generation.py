"""Sampling from a causal LM into one padded batch: G samples per prompt, laid out group-major, prompt
left-padded and response right-padded, with the masks the reward and the loss need (``RolloutBatch``).
``generate`` uses Hugging Face ``model.generate``; ``pack`` lays out token ids produced elsewhere (a vLLM engine)
the same way; ``left_pad`` pads id lists for a batched forward or ``generate``."""

from __future__ import annotations

import dataclasses

import torch


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), attention_mask (B, L)) of id lists left-padded to the longest."""
    seqs = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id, padding_side="left")
    am = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0,
                                         padding_side="left")
    return ids.to(device), am.to(device)


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
    """HF ``generate``. ``do_sample=False``: greedy decoding (temperature/top_p ignored). Never synced across
    ranks (HF turns ``synced_gpus`` on for FSDP models): callers generate on gathered weights, each rank alone."""
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(dev)
    am = enc["attention_mask"].repeat_interleave(group_size, 0).to(dev)
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         synced_gpus=False, **kw)
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


def pack(tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]], device) -> RolloutBatch:
    """Rows of (prompt ids, response ids) -> the padded ``RolloutBatch`` layout of ``generate``. A response
    that stopped at <eos> carries it as its last id; ids after the first <eos> are dropped."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    cut = [r[:r.index(eos) + 1] if eos in r else list(r) for r in response_ids]
    Lp, Ln = max(map(len, prompt_ids)), max(1, max(map(len, cut)))
    B = len(prompt_ids)
    ids = torch.full((B, Lp + Ln), pad, dtype=torch.long)
    attn = torch.zeros(B, Lp + Ln, dtype=torch.long)
    rmask = torch.zeros(B, Lp + Ln, dtype=torch.bool)
    texts = []
    for i, (p, r) in enumerate(zip(prompt_ids, cut)):
        ids[i, Lp - len(p):Lp] = torch.tensor(p, dtype=torch.long)
        attn[i, Lp - len(p):Lp + len(r)] = 1
        if r:
            ids[i, Lp:Lp + len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[i, Lp:Lp + len(r)] = True
        texts.append(tokenizer.decode(r[:-1] if r and r[-1] == eos else r, skip_special_tokens=False))
    return RolloutBatch(ids.to(device), attn.to(device), rmask.to(device), texts, Lp)
