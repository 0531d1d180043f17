"""The dense process reward (paper Definition 4.1, Theorem 4.2; docs/architecture.md, "The reward"):

    r_prg[k] = (Jr(s_k + z_k) - Jr(s_k)) - beta * Pbar[k]
    reward to optimise: r_out + alpha * sum_k r_prg[k]          (alpha = 0.8, beta = 0.6)
"""

from __future__ import annotations

import dataclasses

import torch

from l2t_ext import ops
from l2t_ext.reward.fisher import FisherTracker, compression_penalty
from l2t_ext.reward.jr import AnswerLikelihoodJr, Rollouts


@dataclasses.dataclass
class RewardOutput:
    r_prg: torch.Tensor  # (B, K) dense process reward, 0 where ~valid
    valid: torch.Tensor  # (B, K) episode exists
    jr_before: torch.Tensor  # (B, K) Jr(s_k)
    jr_after: torch.Tensor  # (B, K) Jr(s_k + z_k)
    jr_gain: torch.Tensor  # (B, K) fitting gain jr_after - jr_before
    penalty: torch.Tensor  # (B, K) raw compression penalty g^T (F + lambda I) g
    penalty_normalized: torch.Tensor  # (B, K) Pbar: P over its scale (``normalize``)
    token_logprobs: torch.Tensor  # (B, L) log pi(x_{t+1} | x_<=t) at t from the tracker's forward (detached)

    def total(self, r_out: torch.Tensor, alpha: float) -> torch.Tensor:
        """r_out + alpha * sum_k r_prg[k] per rollout (Eq. 5)."""
        return r_out.to(self.r_prg.dtype) + alpha * self.r_prg.sum(1)


PENALTY_KINDS = ("fisher", "count", "tokens", "none")
PENALTY_NORMS = ("batch", "initial", "none")
PROBE_PATHS = ("auto", "packed", "cache")


def _own_probes(jr, tracker: FisherTracker) -> bool:
    """Answer-likelihood probes of the tracked model: they can reuse the tracker's forward (its KV cache, or a ride
    behind the rollout where the tracker keeps the decoder's hidden states: ``tracker.split``)."""
    return isinstance(jr, AnswerLikelihoodJr) and jr.model is tracker.model


def _rows(r: Rollouts, rows: slice) -> Rollouts:
    """The rollouts ``rows`` of ``r``."""
    pick = (lambda v: None if v is None else v[rows])
    return Rollouts(r.input_ids[rows], r.attention_mask[rows], r.response_mask[rows], r.episode_ids[rows],
                    answers=pick(r.answers), answer_ids=pick(r.answer_ids))


class DenseProcessReward:
    """Per-episode L2T rewards for a batch of rollouts.

    Args:
        jr: a Jr estimator (``AnswerLikelihoodJr``, ``ForcedAnswerJr``, ``CallableJr``) or any callable
            ``Rollouts -> (jr (B, K+1), valid (B, K+1))``.
        tracker: ``FisherTracker`` over the policy.
        alpha, beta: weights of the process reward and of the compression penalty (paper defaults).
        penalty_mode: "batch" (empirical Fisher of the batch's episodes) or "self" (Theorem 4.2 literally).
        damping: Fisher damping lambda.
        fisher_decay: if set (in [0, 1)), keep an explicit EMA Fisher across calls
            (``ops.fisher_accumulate``) and use it instead of the batch's implicit Fisher.
        backend: kernel backend of every op the reward calls (the tracker's rsvd / segment_grad_outer and the
            penalty's fisher_quadform / fisher_accumulate); None keeps the tracker's own.
        normalize: how the raw penalty P becomes Pbar. "batch" (the paper: P / mean of P over the batch's valid
            episodes, so an episode costs beta on average however small P becomes); "initial" (P / the batch
            mean of the first call, kept as ``scale`` afterwards: the penalty shrinks as the policy's gradients
            do); "none" (Pbar = P: beta carries the units). ``True``/``False`` mean "batch"/"none".
        penalty_kind: what the penalty measures. "fisher" (the paper's compression penalty g^T (F + lambda I) g);
            ablations that keep everything else: "count" (every episode costs the same: P = 1), "tokens"
            (P = the episode's token count), "none" (no penalty: information gain only). Normalised to mean 1
            over the batch's valid episodes like the Fisher penalty (``normalize``).
        micro_batch: rollouts per forward/backward of the tracker and per Jr probe batch (None: the whole batch
            at once). The forward materialises (rows, L, vocab) logits, so on large vocabularies this bounds the
            reward's peak memory; the penalty still sees every episode of the batch. Rows are independent, so the
            result equals the whole-batch one up to float reassociation in batched matmuls.
        gather: data parallelism. A function concatenating a (n, ...) tensor over the ranks (in rank order),
            called collectively on every rank; with it the batch Fisher, its EMA and the penalty's normalisation
            cover the global batch, so an episode's reward does not depend on how the batch was split.
        probes: how an ``AnswerLikelihoodJr`` on the tracked model runs its probes. "packed": behind the rollout in
            the tracker's forward (one decoder pass; the rollout's attention then takes a dense mask instead of the
            causal kernel); "cache": a second, short forward of the probe tokens from the tracker forward's KV
            cache; "auto" (default): packed on CUDA, where the reward's many small launches leave the GPU waiting
            on the host and one forward fewer saves a forward's launch overhead, cache elsewhere (on the CPU the
            dense mask costs more than the launches it saves). Same values either way. Where the probes cannot
            continue a cache (``AnswerLikelihoodJr.continues_cache``; e.g. sliding-window layers, whose cache keeps
            only the window's last tokens) "auto" packs, or the estimator runs its own forward, and "cache" is
            refused. Where one forward cannot give every probe what its separate forward would (a RoPE that
            switches with length, a batch straddling the switch: ``AnswerLikelihoodJr.position_groups``), the
            probes on the rollout's side of the switch ride and the others take one more forward.

    State: the EMA Fisher (``fisher_decay``) and the tracker's bases travel through ``state_dict()`` /
    ``load_state_dict()``.
    """

    def __init__(self, jr, tracker: FisherTracker, alpha: float = 0.8, beta: float = 0.6,
                 penalty_mode: str = "batch", damping: float = 1e-5, normalize: bool | str = "batch",
                 fisher_decay: float | None = None, backend: str | None = None, penalty_kind: str = "fisher",
                 gather=None, micro_batch: int | None = None, probes: str = "auto"):
        if probes not in PROBE_PATHS:
            raise ValueError(f"DenseProcessReward: probes must be one of {PROBE_PATHS}, got {probes!r}")
        self.packable = _own_probes(jr, tracker) and tracker.split is not None
        if probes == "packed" and not self.packable:
            raise ValueError("DenseProcessReward: probes='packed' needs an AnswerLikelihoodJr on the tracker's own "
                             "model and a tracker on the chunked log-prob path (FisherTracker(logprobs='auto' or "
                             "'chunked'))")
        self.cacheable = _own_probes(jr, tracker) and jr.continues_cache
        if probes == "cache" and not self.cacheable:
            raise ValueError("DenseProcessReward: probes='cache' needs an AnswerLikelihoodJr on the tracker's own "
                             "model that continues a KV cache (AnswerLikelihoodJr.continues_cache: a cue, logits = "
                             "output layer on the hidden state, no sliding-window layers, whose cache keeps only the "
                             "window's last tokens, no RoPE that switches with length)")
        self.probes = probes
        if penalty_kind not in PENALTY_KINDS:
            raise ValueError(f"DenseProcessReward: penalty_kind must be one of {PENALTY_KINDS}, got {penalty_kind!r}")
        self.penalty_kind, self.gather = penalty_kind, gather
        if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
            raise ValueError(f"DenseProcessReward: micro_batch must be None or an int >= 1, got {micro_batch!r}")
        self.micro_batch = micro_batch
        if isinstance(normalize, bool):
            normalize = "batch" if normalize else "none"
        if normalize not in PENALTY_NORMS:
            raise ValueError(f"DenseProcessReward: normalize must be one of {PENALTY_NORMS}, got {normalize!r}")
        if penalty_mode not in ("batch", "self"):
            raise ValueError(f"DenseProcessReward: penalty_mode must be 'batch' or 'self', got {penalty_mode!r}")
        if fisher_decay is not None and not 0.0 <= fisher_decay < 1.0:
            raise ValueError(f"DenseProcessReward: fisher_decay must be in [0, 1), got {fisher_decay!r}")
        self.jr, self.tracker = jr, tracker
        self.alpha, self.beta, self.penalty_mode, self.damping = alpha, beta, penalty_mode, damping
        self.normalize, self.fisher_decay = normalize, fisher_decay
        if backend is not None:
            tracker.backend = backend
        self.backend = tracker.backend
        self.fisher: torch.Tensor | None = None
        self.scale: float | None = None  # normalize="initial": the first call's mean penalty

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "fisher": self.fisher, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        f = state.get("fisher")
        self.fisher = None if f is None else f.to(self.tracker.modules[0].weight.device)
        self.scale = state.get("scale")

    def __call__(self, r: Rollouts) -> RewardOutput:
        K = r.num_episodes
        B = r.input_ids.shape[0]
        step = self.micro_batch or B
        if step >= B:  # the whole batch in one forward
            g, token_lp, jr_all, jr_valid = self._scored_rows(r, K)
        else:
            parts = [self._scored_rows(_rows(r, slice(i, i + step)), K) for i in range(0, B, step)]
            g, token_lp, jr_all, jr_valid = (torch.cat(x) for x in zip(*parts))
        valid = jr_valid[:, 1:] & jr_valid[:, :1]
        valid = valid & (torch.arange(K, device=valid.device)[None] < (r.episode_ids.max(1).values + 1)[:, None])
        fisher = None
        g_all = self._gathered(g[valid])  # every rank's valid episodes (collective when gather is set)
        if self.fisher_decay is not None and self.penalty_mode == "batch" and g_all.shape[0]:
            self.fisher = ops.fisher_accumulate(g_all, self.fisher, self.fisher_decay if self.fisher is not None
                                                else None, backend=self.backend)
            fisher = self.fisher
        P = self._penalty(g, valid, fisher, r.episode_ids, g_all)
        p_all = self._gathered(P[valid][:, None])
        Pbar = self._normalized(P, p_all)
        dt = P.dtype
        jr_before = torch.where(valid, jr_all[:, :-1].to(dt), torch.zeros((), dtype=dt, device=P.device))
        jr_after = torch.where(valid, jr_all[:, 1:].to(dt), torch.zeros((), dtype=dt, device=P.device))
        gain = jr_after - jr_before
        r_prg = torch.where(valid, gain - self.beta * Pbar, torch.zeros((), dtype=dt, device=P.device))
        return RewardOutput(r_prg=r_prg, valid=valid, jr_before=jr_before, jr_after=jr_after, jr_gain=gain,
                            penalty=P, penalty_normalized=Pbar, token_logprobs=token_lp)

    def _scored_rows(self, r: Rollouts, K: int):
        """(g (b, K, p), token log-probs (b, L), Jr (b, K+1), Jr valid (b, K+1)) of one micro-batch: one forward
        gives the per-episode gradients, the log-probs and, for ``AnswerLikelihoodJr`` on the tracked model, Jr:
        its probes ride packed behind the rollout or continue from the forward's KV cache (``probes``)."""
        t = self.tracker
        kw, k = dict(num_episodes=K, return_logprobs=True), r.num_episodes
        auto_packs = r.input_ids.is_cuda or not self.cacheable
        packs = self.packable and (self.probes == "packed" or (self.probes == "auto" and auto_packs))
        if packs:  # the last group (the rollout's positions) rides in the tracker's forward, any other runs apart
            pack = self.jr.pack(r, k)
            *apart, (pos, keep) = self.jr.position_groups(pack, rollout=True)
            g, token_lp, hidden = t.episode_grads(r.input_ids, r.attention_mask, r.episode_ids, **kw,
                                                  packed=(pack.ids, pos, pack.mask))
            jr_all, jr_valid = self.jr.score(hidden, pack)
            jr_all = self.jr.group_forwards(r, pack, apart, torch.where(keep, jr_all, 0.0))
        elif self.cacheable:
            g, token_lp, cache = t.episode_grads(r.input_ids, r.attention_mask, r.episode_ids, **kw, return_cache=True)
            jr_all, jr_valid = self.jr(r, cache=cache)
            del cache
        else:
            g, token_lp = t.episode_grads(r.input_ids, r.attention_mask, r.episode_ids, **kw)
            jr_all, jr_valid = self.jr(r)
        if jr_all.shape[1] != k + 1:
            raise ValueError(f"DenseProcessReward: Jr returned {jr_all.shape[1]} columns for K={k} episodes")
        if k < K:  # a micro-batch with fewer episodes than the batch: its missing boundaries are invalid
            jr_all = torch.nn.functional.pad(jr_all, (0, K - k))
            jr_valid = torch.nn.functional.pad(jr_valid, (0, K - k), value=False)
        return g, token_lp, jr_all, jr_valid

    def _normalized(self, P: torch.Tensor, p_all: torch.Tensor) -> torch.Tensor:
        """Pbar from the raw penalty (``normalize``); ``p_all``: the global batch's valid penalties."""
        if self.normalize == "none" or not p_all.shape[0]:
            return P
        if self.normalize == "batch":
            return P / (p_all.mean() + 1e-12)
        if self.scale is None:  # "initial": fixed by the first batch that has episodes
            self.scale = float(p_all.mean())
        return P / (self.scale + 1e-12)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gather is None else self.gather(x)

    def _penalty(self, g: torch.Tensor, valid: torch.Tensor, fisher, episode_ids: torch.Tensor,
                 g_all: torch.Tensor) -> torch.Tensor:
        """(B, K) raw penalty of ``penalty_kind`` (0 where ~valid); ``g_all``: the global batch's episodes."""
        if self.penalty_kind == "fisher":
            return compression_penalty(g, valid, self.penalty_mode, self.damping, normalize=False, fisher=fisher,
                                       backend=self.backend, fisher_grads=g_all)
        K = valid.shape[1]
        if self.penalty_kind == "tokens":  # tokens per episode: a one-hot count over episode ids
            hot = torch.nn.functional.one_hot(episode_ids.clamp(min=0), K) * (episode_ids >= 0)[..., None]
            P = hot.sum(1).to(g.dtype)
        else:
            P = torch.full(valid.shape, 0.0 if self.penalty_kind == "none" else 1.0, dtype=g.dtype, device=g.device)
        return torch.where(valid, P, torch.zeros((), dtype=g.dtype, device=g.device))
