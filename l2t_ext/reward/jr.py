"""Jr(s): the policy's own estimate of the probability that context s leads to a correct answer
(paper Definition 4.1 and the Acc(k) probe of section 3 / appendix F.1).

Every estimator takes a ``Rollouts`` batch and returns ``(jr (B, K+1), valid (B, K+1))`` where column k is
Jr(s_k): s_0 is the prompt, s_k (k >= 1) the context through the last token of episode k-1.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence

import torch

from l2t_ext.lm import (
    check_custom_mask,
    custom_attention_mask,
    left_pad,
    no_cache,
    position_ids_from_mask,
    rope_switch,
    sliding_window,
    split_head,
    token_logprobs,
)
from l2t_ext.reward.episodes import boundary_positions, episode_counts

FORCED_ANSWER_CUE = "Please output the final answer directly based on the above steps"


@dataclasses.dataclass
class Rollouts:
    """A batch of rollouts. Tensors are (B, L); rows may be left- or right-padded (attention_mask 0)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    episode_ids: torch.Tensor
    answers: Sequence[str] | None = None  # reference answers (text), for verifier/callable estimators
    answer_ids: Sequence[Sequence[int]] | None = None  # reference answers (token ids), for AnswerLikelihoodJr

    def __post_init__(self):
        shp = self.input_ids.shape
        for name in ("attention_mask", "response_mask", "episode_ids"):
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.shape != shp:
                raise ValueError(f"Rollouts: {name} must have input_ids' shape {tuple(shp)}, got "
                                 f"{getattr(t, 'shape', type(t))}")
        for name in ("answers", "answer_ids"):
            v = getattr(self, name)
            if v is not None and len(v) != shp[0]:
                raise ValueError(f"Rollouts: {name} has {len(v)} entries for {shp[0]} rows")

    @property
    def num_episodes(self) -> int:
        return int(episode_counts(self.episode_ids).max()) if self.input_ids.shape[0] else 0


@dataclasses.dataclass
class ProbePack:
    """A rollout batch with its Jr probe blocks packed behind it (``AnswerLikelihoodJr.pack``), P = L + Q."""

    ids: torch.Tensor  # (B, P) the rollout's L tokens (its own padded layout), then the probe blocks
    position_ids: torch.Tensor  # (B, P)
    mask: torch.Tensor  # (B, P, P) bool: the rollout causally over its real tokens; block k its prefix and itself
    at: torch.Tensor  # (B, K+1, a_max) position whose output predicts answer token j of probe k
    tok: torch.Tensor  # (B, K+1, a_max) the answer tokens
    ok: torch.Tensor  # (B, K+1, a_max) a real answer token of a valid probe
    valid: torch.Tensor  # (B, K+1) the boundary exists


def _gather_at(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The rows ``at`` (B, ...) of ``x`` (B, P, n): (B, at.numel() / B, n)."""
    return x.gather(1, at.reshape(at.shape[0], -1, 1).expand(-1, -1, x.shape[-1]))


def _cache_kwarg(module) -> str:
    """Name of the KV-cache argument (transformers >= 5.2x renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _score(sel, at, tok, ok, valid) -> torch.Tensor:
    """Jr (B, K+1) = exp(mean log p(answer token)) from the logits ``sel`` (B, (K+1) * a_max, vocab) at the
    answer-predicting positions; 0 where ``valid`` is False."""
    lp = torch.log_softmax(sel.to(torch.float64 if sel.dtype == torch.float64 else torch.float32), -1)
    tok_lp = lp.reshape(*at.shape, -1).gather(-1, tok[..., None]).squeeze(-1)  # (B, K+1, a_max)
    jr = torch.exp((tok_lp * ok).sum(-1) / ok.sum(-1).clamp(min=1))
    return torch.where(valid, jr, torch.zeros_like(jr))


def _row_tokens(r: Rollouts, b: int):
    """Real (unpadded) tokens of row b and their episode ids / response flags, in order."""
    keep = r.attention_mask[b].bool()
    return r.input_ids[b][keep], r.episode_ids[b][keep], r.response_mask[b][keep].bool(), keep.nonzero().squeeze(1)


class AnswerLikelihoodJr:
    """Jr(s_k) = exp(mean log p(answer tokens | s_k + cue)) by teacher forcing (the default estimator).

    All K+1 probes of a rollout cost about one forward: the probe blocks ``cue + answer`` are packed behind
    the rollout; block k attends only to the rollout's first pos_k + 1 tokens and causally to itself, with
    position ids continuing from pos_k, so each probe sees exactly what a separate forward of
    ``prefix_k + cue + answer`` would see. Needs a model whose attention takes a custom mask: Hugging Face
    ``attn_implementation`` "sdpa", "eager" or "flex_attention" (there a block-sparse ``BlockMask``: blocks no
    probe sees are skipped; ``l2t_ext.lm.masks``); others are refused when the estimator is built. Sliding-window
    layers get the window in their mask, by position, as that separate forward would. Where the model's RoPE
    frequencies switch with the forward's longest position (``rope_switch``: longrope, dynamic NTK) and a pack
    straddles the switch, the probes on each side of it take a forward of their own (``position_groups``).

    Only the answer positions go through the output layer when ``split_head(model)`` finds logits =
    lm_head(last hidden state) with nothing after it (Qwen2/Llama/Mistral...): the (B, P, vocab) logits of the
    packed sequence are never formed. Other models (e.g. logit soft-capping) go through ``model(...).logits``.

    The packed sequence can come from another forward: ``pack(r)`` builds it and ``score(hidden, pack)`` reads Jr
    off its last hidden states, so ``FisherTracker.episode_grads(..., packed=...)`` runs the probes inside the
    reward's own forward of the rollout.

    Args:
        model: causal LM. cue_ids: token ids of the answer cue (e.g. "\\nFinal answer: "), may be empty.
        pad_id: token id used for padding the packed batch (never attended to).
        return_token_logprobs: also keep the rollout's own token log-probs from the packed forward in
            ``last_token_logprobs`` (forms full logits over the rollout part).
    """

    def __init__(self, model, cue_ids: Sequence[int], pad_id: int = 0, return_token_logprobs: bool = False):
        check_custom_mask(model, "AnswerLikelihoodJr")
        self.model = model
        self.cue_ids = [int(t) for t in cue_ids]
        self.pad_id = int(pad_id)
        self.return_token_logprobs = return_token_logprobs
        self.last_token_logprobs: torch.Tensor | None = None

    def _probes(self, r: Rollouts, K: int):
        """The probe blocks ``cue + answer`` for every boundary, built on the device without host loops:
        (ids, pos (B, Q), mask (B, Q, L + Q) over [rollout | blocks], at, tok, ok (B, K+1, a_max), valid, pos_all).
        Block k sees the rollout's real tokens up to pos_all[k] and itself causally; ``at`` indexes the block part
        (the predictor of answer token j is cue/answer token c + j - 1 of its block)."""
        if r.answer_ids is None:
            raise ValueError("AnswerLikelihoodJr needs Rollouts.answer_ids (reference answers as token ids)")
        B, L = r.input_ids.shape
        dev = r.input_ids.device
        c = len(self.cue_ids)
        lens = [len(a) for a in r.answer_ids]
        if min(lens) == 0:
            raise ValueError(f"AnswerLikelihoodJr: answer_ids[{lens.index(0)}] is empty")
        a_max = max(lens)
        blk, K1 = c + a_max, K + 1
        Q = K1 * blk
        pos_all, valid = boundary_positions(r.episode_ids, r.response_mask)  # (B, K+1) padded coordinates
        real_pos = position_ids_from_mask(r.attention_mask)
        ans = torch.tensor([list(a) + [self.pad_id] * (a_max - len(a)) for a in r.answer_ids], device=dev)
        block = torch.cat([torch.tensor(self.cue_ids, device=dev, dtype=torch.int64).expand(B, c), ans], 1)
        ids = torch.where(valid[:, :, None], block[:, None, :], self.pad_id).reshape(B, Q)
        start = real_pos.gather(1, pos_all.clamp(min=0)) + 1  # (B, K+1) position of each block's first token
        pos = (torch.where(valid, start, 0)[:, :, None] + torch.arange(blk, device=dev)).reshape(B, Q)
        cols = torch.arange(L, device=dev)
        see_ctx = (cols[None, None, :] <= pos_all[:, :, None]) & r.attention_mask.bool()[:, None, :] \
            & valid[:, :, None]  # (B, K+1, L)
        mask = torch.zeros((B, Q, L + Q), dtype=torch.bool, device=dev)
        mask[:, :, :L] = see_ctx[:, :, None, :].expand(B, K1, blk, L).reshape(B, Q, L)
        own = torch.block_diag(*([torch.ones(blk, blk, dtype=torch.bool, device=dev).tril()] * K1))  # (Q, Q)
        mask[:, :, L:] = own & valid.repeat_interleave(blk, 1)[:, :, None]
        mask[:, torch.arange(Q), L + torch.arange(Q)] = True  # every row sees itself (unused slots stay finite)
        j = torch.arange(a_max, device=dev)
        at = (torch.arange(K1, device=dev)[:, None] * blk + c - 1 + j).expand(B, K1, a_max)
        tok = ans[:, None, :].expand(B, K1, a_max)
        ok = (j[None, None, :] < torch.tensor(lens, device=dev)[:, None, None]) & valid[:, :, None]
        return ids, pos, mask, at, tok, ok, valid, pos_all

    def pack(self, r: Rollouts, K: int | None = None) -> ProbePack:
        """The rollout (its own padded layout) followed by the probe blocks, one sequence per row: a forward of
        ``ids`` under ``mask`` gives every probe (and the rollout itself, unchanged) in one pass. ``K``: episodes
        (default ``r.num_episodes``)."""
        K = r.num_episodes if K is None else K
        ids_q, pos_q, mask_q, at, tok, ok, valid, pos_all = self._probes(r, K)
        B, L = r.input_ids.shape
        dev = r.input_ids.device
        ar = torch.arange(L, device=dev)
        ctx = (ar[:, None] >= ar[None, :]) & r.attention_mask.bool()[:, None, :]  # causal over the real tokens
        ctx |= torch.eye(L, dtype=torch.bool, device=dev)  # padding rows see themselves (finite; never read)
        mask = torch.cat([torch.cat([ctx, ctx.new_zeros(B, L, ids_q.shape[1])], 2), mask_q], 1)
        ids = torch.cat([r.input_ids, ids_q], 1)
        pos = torch.cat([position_ids_from_mask(r.attention_mask), pos_q], 1)
        # without a cue, answer token 0 is predicted by the context's last token (in the rollout part)
        first = (len(self.cue_ids) + torch.arange(at.shape[2], device=dev) == 0)[None, None, :]
        at = torch.where(first, pos_all.clamp(min=0)[:, :, None], at + L)
        return ProbePack(ids, pos, mask, at, tok, ok, valid)

    @torch.no_grad()
    def score(self, hidden: torch.Tensor, pack: ProbePack) -> tuple[torch.Tensor, torch.Tensor]:
        """(jr (B, K+1), valid (B, K+1)) from the decoder's last hidden states (B, P, d) over ``pack.ids``, e.g.
        the ones ``FisherTracker.episode_grads(..., packed=...)`` returns: the output layer runs at the
        answer-predicting positions only. Needs ``split_head(model)``."""
        split = split_head(self.model)
        if split is None:
            raise ValueError("AnswerLikelihoodJr.score: the model's logits are not its output layer applied to the "
                             "decoder's hidden state (split_head is None); call the estimator instead")
        if hidden.dim() != 3 or hidden.shape[:2] != pack.ids.shape:
            raise ValueError(f"AnswerLikelihoodJr.score: hidden must be (B, P, d) with (B, P) = pack.ids' shape "
                             f"{tuple(pack.ids.shape)}, got {tuple(hidden.shape)}")
        return _score(split[1](_gather_at(hidden, pack.at)), pack.at, pack.tok, pack.ok, pack.valid), pack.valid

    def position_groups(self, pack: ProbePack, rollout: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The forwards over ``pack`` that give every probe what a separate forward of its sequence gives:
        [(position ids (B, P), probes read from that forward (B, K+1))], one entry per forward.

        One forward with the pack's own positions, unless the model's RoPE frequencies switch with the forward's
        longest position (``lm.rope_switch``) and the pack reaches the switch. Then each forward is capped: every
        token past its cap is moved to position 0, so the forward's longest position is the cap, and it is read
        only for sequences that end at or before the cap (the moved tokens are never attended to from them).
        The probes that end before the switch take the forward capped just before it (the original
        frequencies); the later ones the pack's own positions. Under dynamic NTK scaling the later probes then share
        the frequencies of the pack's longest position (transformers' own for one of them depend on the forwards
        before it): warned.

        ``rollout``: the rollout's own outputs are read too, from the last forward, whose frequencies are then
        those of the rollout's plain forward: capped before the switch when the rollout ends before it, else
        (dynamic scaling) at the rollout's own longest position."""
        pos, switch = pack.position_ids, rope_switch(self.model)
        if switch is None or int(pos.max()) < switch[0]:
            return [(pos, pack.valid)]
        n, exact_above = switch
        c, blk, K1 = len(self.cue_ids), len(self.cue_ids) + pack.tok.shape[2], pack.valid.shape[1]
        L = pos.shape[1] - K1 * blk
        last = pos[:, L::blk][:, :K1] + c + pack.ok.sum(-1) - 1  # (B, K+1) position of each probe's last real token
        early = pack.valid & (last < n)  # probes whose whole sequence is before the switch
        late = pack.valid & ~early
        if not exact_above and bool(late.any()):
            warnings.warn(f"AnswerLikelihoodJr: the model's RoPE frequencies change with the sequence length past "
                          f"position {n}; the probes past it share the frequencies of the longest one", stacklevel=2)
        caps = {n - 1: early, None: late}  # cap -> probes read there; None: the pack's own positions
        rollout_cap = None  # the cap whose forward runs even without probes (rollout=True), read last
        if rollout:
            R = int(pos[:, :L].max())  # the rollout's longest position
            if R < n:
                rollout_cap = n - 1
            elif not exact_above:  # dynamic scaling: the later probes within the rollout's length ride along with it
                rollout_cap, caps[R], caps[None] = R, late & (last <= R), late & (last > R)
            caps[rollout_cap] = caps.pop(rollout_cap)
        groups = [(cap, keep) for cap, keep in caps.items() if bool(keep.any()) or (rollout and cap == rollout_cap)]
        return [(pos if cap is None else torch.where(pos <= cap, pos, 0), keep) for cap, keep in groups] \
            or [(pos, late)]  # no probe at all: one forward, read for nothing

    @property
    def continues_cache(self) -> bool:
        """Whether ``__call__`` runs the probes from a given KV cache: with a cue, a model whose logits are its output
        layer on the decoder's hidden state (``split_head``), no sliding-window layers (their cache keeps only the
        window's last tokens) and no RoPE that switches with length (``rope_switch``: the cache's keys were rotated
        by the rollout's frequencies)."""
        return bool(self.cue_ids) and split_head(self.model) is not None and sliding_window(self.model) is None \
            and rope_switch(self.model) is None

    @torch.no_grad()
    def __call__(self, r: Rollouts, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Jr for every boundary. ``cache``: the rollout forward's KV cache (e.g. from
        ``FisherTracker.episode_grads(..., return_cache=True)``); the probes then only run their own tokens.
        The cache is extended in place and must not be reused afterwards. Unused unless ``continues_cache``: the
        probes then run packed."""
        K = r.num_episodes
        if cache is not None and self.continues_cache:
            dec, head = split_head(self.model)
            ids, pos, mask, at, tok, ok, valid, _ = self._probes(r, K)
            mask = custom_attention_mask(self.model, mask, "AnswerLikelihoodJr")
            h = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{_cache_kwarg(dec): cache}).last_hidden_state
            return _score(head(_gather_at(h, at)), at, tok, ok, valid), valid
        pack, rollout = self.pack(r, K), self.return_token_logprobs
        return self.group_forwards(r, pack, self.position_groups(pack, rollout), rollout=rollout), pack.valid

    def group_forwards(self, r: Rollouts, pack: ProbePack, groups, jr: torch.Tensor | None = None,
                       rollout: bool = False) -> torch.Tensor:
        """Jr (B, K+1): ``jr`` (zeros when None) with the probes of each ``(position ids, probes)`` group of
        ``position_groups`` read off one forward of ``pack`` at those positions. ``rollout``: the last group is the
        rollout's (``position_groups(pack, rollout=True)``); its forward also keeps the rollout's token log-probs
        (``return_token_logprobs``)."""
        mask = custom_attention_mask(self.model, pack.mask, "AnswerLikelihoodJr", (pack.position_ids,) * 2) \
            if groups else None
        for i, (pos, keep) in enumerate(groups):
            part = self._packed_forward(r, pack, mask, pos, rollout and i == len(groups) - 1)
            jr = torch.where(keep, part, torch.zeros_like(part) if jr is None else jr)
        return jr

    def _packed_forward(self, r: Rollouts, pack: ProbePack, mask, pos: torch.Tensor, rollout: bool) -> torch.Tensor:
        """Jr (B, K+1) of every probe from one forward of ``pack`` with position ids ``pos``; keeps the rollout's
        token log-probs when ``rollout`` and ``return_token_logprobs``."""
        split = split_head(self.model)
        rollout = rollout and self.return_token_logprobs
        if split is not None and not rollout:
            h = split[0](input_ids=pack.ids, attention_mask=mask, position_ids=pos, **no_cache(split[0]))
            return self.score(h.last_hidden_state, pack)[0]
        logits = self.model(input_ids=pack.ids, attention_mask=mask, position_ids=pos, **no_cache(self.model)).logits
        jr = _score(_gather_at(logits, pack.at), pack.at, pack.tok, pack.ok, pack.valid)
        if rollout:
            # the rollout part of the packed forward is the plain causal forward: keep its token log-probs where
            # both the token and its successor are real
            (B, L), am = r.input_ids.shape, r.attention_mask.bool()
            both = am & torch.cat([am[:, 1:], am.new_zeros(B, 1)], 1)
            self.last_token_logprobs = torch.where(both, token_logprobs(logits[:, :L], r.input_ids), 0.0).to(jr.dtype)
        return jr


class _TextJr:
    """Shared decoding of (prompt, prefix_k) texts for the text-level estimators."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _texts(self, r: Rollouts):
        if r.answers is None:
            raise ValueError(f"{type(self).__name__} needs Rollouts.answers (reference answers as text)")
        K = r.num_episodes
        pos, valid = boundary_positions(r.episode_ids, r.response_mask)
        items = []  # (b, k, prompt_text, prefix_text, prefix_ids)
        for b in range(r.input_ids.shape[0]):
            toks, _, resp, where = _row_tokens(r, b)
            n_prompt = int((~resp).long().cumprod(0).sum())  # tokens before the first response token
            for k in range(K + 1):
                if not valid[b, k]:
                    continue
                end = int((where == pos[b, k]).nonzero()[0, 0]) + 1
                items.append((b, k, self.tokenizer.decode(toks[:n_prompt].tolist(), skip_special_tokens=True),
                              self.tokenizer.decode(toks[n_prompt:end].tolist(), skip_special_tokens=True),
                              toks[:end].tolist()))
        return K, valid, items


class ForcedAnswerJr(_TextJr):
    """The paper's Acc(k) probe: stop at the boundary, append the answer cue, sample ``m`` short answers and
    grade them with ``verifier(completion, reference) -> float in [0, 1]``; Jr = mean grade."""

    def __init__(self, model, tokenizer, verifier: Callable[[str, str], float], m: int = 4,
                 cue: str = FORCED_ANSWER_CUE, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 64):
        super().__init__(tokenizer)
        if m < 1:
            raise ValueError(f"ForcedAnswerJr: m must be >= 1, got {m}")
        self.model, self.verifier, self.m = model, verifier, m
        self.cue_ids = tokenizer.encode("\n" + cue + "\n", add_special_tokens=False)
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = max_new_tokens, temperature, top_p, \
            batch_size

    @torch.no_grad()
    def __call__(self, r: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        K, valid, items = self._texts(r)
        dev = r.input_ids.device
        jr = torch.zeros(valid.shape, dtype=torch.float32, device=dev)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i0 in range(0, len(items), self.batch_size):
            chunk = items[i0:i0 + self.batch_size]
            ids, am = left_pad([it[4] + self.cue_ids for it in chunk], pad, dev)
            n = ids.shape[1]
            out = self.model.generate(input_ids=ids, attention_mask=am, do_sample=True,
                                      temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, num_return_sequences=self.m,
                                      pad_token_id=pad, synced_gpus=False)  # each rank alone
            texts = self.tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
            for j, (b, k, *_rest) in enumerate(chunk):
                grades = [float(self.verifier(t, r.answers[b])) for t in texts[j * self.m:(j + 1) * self.m]]
                jr[b, k] = sum(grades) / self.m
        return jr, valid


class CallableJr(_TextJr):
    """Any ``fn(prompts, prefixes, answers) -> probabilities`` (e.g. an external process reward model)."""

    def __init__(self, fn: Callable[[list[str], list[str], list[str]], Sequence[float]], tokenizer):
        super().__init__(tokenizer)
        self.fn = fn

    @torch.no_grad()
    def __call__(self, r: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        K, valid, items = self._texts(r)
        jr = torch.zeros(valid.shape, dtype=torch.float32, device=r.input_ids.device)
        if items:
            probs = list(self.fn([it[2] for it in items], [it[3] for it in items], [r.answers[it[0]] for it in items]))
            if len(probs) != len(items):
                raise ValueError(f"CallableJr: the callable returned {len(probs)} values for {len(items)} probes")
            for (b, k, *_rest), p in zip(items, probs):
                p = float(p)
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"CallableJr: probability {p} outside [0, 1]")
                jr[b, k] = p
        return jr, valid
