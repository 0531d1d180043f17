"""Supervised warm start on reference traces (used by the tiny presets and the demo): next-token loss on the
response tokens of ``prompt + trace + <eos>`` with a mix of trace styles."""

from __future__ import annotations

import math
import random

import torch

from l2t_ext.tasks import arith

DEFAULT_MIX = {"concise": 0.4, "verbose": 0.4, "terse": 0.2}


def make_batch(tokenizer, rng: random.Random, n: int, tiers, mix: dict[str, float], device,
               check_prob: float = arith.VERBOSE_CHECK_PROB, check_form: str = arith.VERBOSE_CHECK_FORM):
    styles, weights = zip(*mix.items())
    texts, n_prompt = [], []
    for _ in range(n):
        p = arith.generate_problem(rng, rng.choice(list(tiers)))
        style = rng.choices(styles, weights)[0]
        texts.append((p.prompt, arith.trace(p, style, rng, check_prob, check_form) + tokenizer.eos_token))
    enc = [tokenizer.encode(a + b, add_special_tokens=False) for a, b in texts]
    n_prompt = [len(tokenizer.encode(a, add_special_tokens=False)) for a, _ in texts]
    L = max(map(len, enc))
    ids = torch.full((n, L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    am = torch.zeros(n, L, dtype=torch.long)
    for i, (e, k) in enumerate(zip(enc, n_prompt)):
        ids[i, :len(e)] = torch.tensor(e)
        am[i, :len(e)] = 1
        labels[i, k:len(e)] = torch.tensor(e[k:])
    return ids.to(device), am.to(device), labels.to(device)


def warm_start(model, tokenizer, steps: int, lr: float, batch: int, tiers, seed: int, device,
               mix: dict[str, float] | None = None, log=None,
               check_prob: float = arith.VERBOSE_CHECK_PROB,
               check_form: str = arith.VERBOSE_CHECK_FORM) -> list[float]:
    """Train ``steps`` AdamW steps (cosine schedule); returns the loss curve."""
    rng = random.Random(seed + 12345)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for s in range(steps):
        ids, am, labels = make_batch(tokenizer, rng, batch, tiers, mix or DEFAULT_MIX, device, check_prob,
                                       check_form)
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (s % 50 == 0 or s == steps - 1):
            log(f"warm start {s + 1}/{steps}: loss {loss:.3f}")
    model.eval()
    return losses
