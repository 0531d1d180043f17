"""Per-episode gradients in a low-rank parameter proxy, and the Fisher compression penalty
(paper Theorem 4.2, appendix A; docs/architecture.md, "The reward").

For each tracked ``nn.Linear`` weight W (m, n): bases U (m, r), V (n, r) from ``ops.rsvd`` and the proxy
theta~ = U^T W V. One forward with hooks captures every tracked layer's input X; one backward of the summed
response log-likelihood gives the output gradients D; ``ops.segment_grad_outer`` turns (X, D, episode id) into
per-episode proxy gradients g~[k] = vec(U^T (d/dW sum_{t in k} log pi(x_t | x_<t)) V), concatenated over
layers.

Exactness: position t's hidden state produces token t+1, so the token at t+1 is charged to position t. For layers
after the last attention mixing (the default: o_proj, gate_proj, up_proj, down_proj of the last block; Phi-3's fused
gate_up_proj in place of the middle two) the output at a position only feeds that position's logits, so this equals
the exact per-episode gradient. For earlier layers it is token-local attribution: position t's contribution D[t]
X[t]^T (from one backward of the whole response log-likelihood) is charged to the episode of the token it predicts,
so effects that travel to later positions through attention are charged to the position they flow from, and the
share of positions that predict no episode token (the prompt) is left out. ``exact=True`` runs one backward per
episode and is exact for every layer (its episodes sum to the full gradient).

Cost: the forward below the first tracked layer runs without autograd and the backward starts from a leaf at
the first tracked layer's output, so no gradient flows through lower layers; gradients never touch
``param.grad``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from l2t_ext import ops
from l2t_ext.lm import (
    PLAIN_HEAD_MODEL_TYPES,
    GradRows,
    custom_attention_mask,
    head_token_logprobs,
    no_cache,
    output_cache,
    position_ids_from_mask,
    split_head,
    token_logprobs,
)

DEFAULT_SUFFIXES = ("o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")  # gate_up: fused (Phi-3)
_BLOCK_RE = re.compile(r"^(.*\.)?(layers|h|blocks)\.(\d+)\.")


def full_weight(w: torch.Tensor) -> torch.Tensor:
    """A weight's full value: gathered from its shards when it is an FSDP2 DTensor (collective: every rank calls
    it), else ``w`` itself. The SVD refresh gathers only the tracked weights this way, never the whole model."""
    from torch.distributed.tensor import DTensor

    return w.full_tensor() if isinstance(w, DTensor) else w


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def default_layers(model: nn.Module) -> list[str]:
    """Linear layers of the last transformer block after its attention mixing."""
    names = _linear_names(model)
    blocks = {}
    for n in names:
        mt = _BLOCK_RE.match(n)
        if mt:
            blocks.setdefault(int(mt.group(3)), []).append(n)
    if not blocks:
        raise ValueError("FisherTracker: could not find transformer blocks ('...layers.<i>.') among the model's "
                         f"Linear layers {names[:8]}...; pass layers= (a regex or a list of module names)")
    last = blocks[max(blocks)]
    chosen = [n for suf in DEFAULT_SUFFIXES for n in last if n.endswith("." + suf)]
    if not chosen:
        raise ValueError(f"FisherTracker: the last block has no {DEFAULT_SUFFIXES} Linear layers (found {last}); "
                         "pass layers=")
    return chosen


class FisherTracker:
    """Low-rank proxy bases for a set of Linear layers and per-episode proxy gradients.

    Args:
        model: any causal LM whose forward(input_ids, attention_mask, position_ids) returns ``.logits``
            (Hugging Face Qwen2/Llama/Mistral families) and whose projections are ``nn.Linear``.
        layers: None (default: last block's o_proj/gate_proj/up_proj/down_proj, or Phi-3's fused gate_up_proj), a
            regex matched against Linear module names (``re.search``), or a list of module names.
        rank: r per layer (1 <= r <= min(m, n) of every tracked layer).
        seed: rsvd sketch seed.
        refresh_every: recompute the bases every this many ``step()`` calls (optimizer steps).
        backend: kernel backend for rsvd / segment_grad_outer.
        logprobs: how the forward turns hidden states into token log-probs. "chunked": the decoder, then the
            output layer and log-softmax a chunk of ``logprob_chunk`` positions at a time
            (``head_token_logprobs``: no (B, L, vocab) logits, forward or backward); "full": ``model(...).logits``
            then log-softmax; "auto" (default): chunked when ``split_head(model)`` allows it and no tracked layer
            is the output layer, else full. Both give the same values and gradients.
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str] | None = None, rank: int = 16, seed: int = 0,
                 refresh_every: int = 10, oversample: int = 8, n_iter: int = 2, backend: str = "auto",
                 logprobs: str = "auto", logprob_chunk: int = 1024):
        self.model = model
        mods = dict(model.named_modules())
        if layers is None:
            names = default_layers(model)
        elif isinstance(layers, str):
            pat = re.compile(layers)
            names = [n for n in _linear_names(model) if pat.search(n)]
        else:
            names = list(layers)
            for n in names:
                if n not in mods or not isinstance(mods[n], nn.Linear):
                    raise ValueError(f"FisherTracker: {n!r} is not an nn.Linear module of the model")
        if not names:
            raise ValueError(f"FisherTracker: no nn.Linear layer matches layers={layers!r}; Linear layers are "
                             f"{_linear_names(model)[:12]}...")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"FisherTracker: rank must be an int >= 1, got {rank!r}")
        for n in names:
            m, k = mods[n].weight.shape
            if rank > min(m, k):
                raise ValueError(f"FisherTracker: rank={rank} exceeds min(m, n)={min(m, k)} of layer {n!r} "
                                 f"(weight {m}x{k})")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"FisherTracker: refresh_every must be an int >= 1, got {refresh_every!r}")
        if not isinstance(logprob_chunk, int) or logprob_chunk < 1:
            raise ValueError(f"FisherTracker: logprob_chunk must be an int >= 1, got {logprob_chunk!r}")
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self.layer_names = sorted(names, key=order.__getitem__)  # forward order
        self.modules = [mods[n] for n in self.layer_names]
        self.split = self._pick_logprobs(model, logprobs, self.modules)
        self.logprob_chunk = logprob_chunk
        self.rank, self.seed, self.oversample, self.n_iter = rank, seed, oversample, n_iter
        self.refresh_every, self.backend = refresh_every, backend
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps = 0
        self.refresh()

    @staticmethod
    def _pick_logprobs(model, logprobs: str, tracked: list) -> tuple | None:
        """(decoder, head) for the chunked log-prob path, or None for the full-logits path."""
        if logprobs not in ("auto", "chunked", "full"):
            raise ValueError(f"FisherTracker: logprobs must be 'auto', 'chunked' or 'full', got {logprobs!r}")
        split = split_head(model) if logprobs != "full" else None
        if split is not None and any(m is split[1] for m in tracked):
            split = None  # the output layer is tracked: its forward hook must run
        if split is None and logprobs == "chunked":
            raise ValueError("FisherTracker: logprobs='chunked' needs a model whose logits are get_output_embeddings()"
                             "(get_decoder() hidden state) with nothing after it (model types "
                             f"{sorted(PLAIN_HEAD_MODEL_TYPES)}) and an output layer that is not tracked; use "
                             "'auto' or 'full'")
        return split

    @property
    def p(self) -> int:
        return len(self.layer_names) * self.rank * self.rank

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute U, V for every tracked layer (same-shape layers share one batched rsvd call)."""
        groups: dict[tuple, list[str]] = {}
        for n, mod in zip(self.layer_names, self.modules):
            groups.setdefault((tuple(mod.weight.shape), mod.weight.dtype, mod.weight.device), []).append(n)
        mods = dict(zip(self.layer_names, self.modules))
        for names in groups.values():
            W = torch.stack([full_weight(mods[n].weight.detach()) for n in names])
            U, _, V = ops.rsvd(W, self.rank, oversample=self.oversample, n_iter=self.n_iter, seed=self.seed,
                               backend=self.backend)
            for i, n in enumerate(names):
                self.bases[n] = (U[i], V[i])

    def state_dict(self) -> dict:
        """The bases and the step counter (what an exact resume needs; the bases are not recomputed on load
        because the weights they were computed from may be older than the current ones)."""
        state = {"steps": self._steps}
        for n, (U, V) in self.bases.items():
            state[f"bases.{n}.U"], state[f"bases.{n}.V"] = U, V
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.layer_names if f"bases.{n}.U" not in state or f"bases.{n}.V" not in state]
        if missing:
            raise KeyError(f"FisherTracker.load_state_dict: no bases for tracked layers {missing}")
        self._steps = int(state["steps"])
        for n, mod in zip(self.layer_names, self.modules):
            dev = mod.weight.device
            self.bases[n] = (state[f"bases.{n}.U"].to(dev), state[f"bases.{n}.V"].to(dev))

    def step(self) -> bool:
        """Count one optimizer step; refresh the bases when due. Returns True if refreshed."""
        self._steps += 1
        if self._steps % self.refresh_every == 0:
            self.refresh()
            return True
        return False

    def proxy(self) -> torch.Tensor:
        """theta~ = concat over layers of vec(U^T W V), (p,)."""
        return torch.cat([ops.project(full_weight(m.weight.detach()), *self.bases[n], backend=self.backend).flatten()
                          for n, m in zip(self.layer_names, self.modules)])

    # ----------------------------------------------------------------------------------------- gradients
    def _capture_forward(self, input_ids, attention_mask, position_ids, use_cache=False, grad_rows=None,
                         packed=None):
        """Forward with autograd only from the first tracked layer on. Returns (token log-probs (B, L), X list,
        out list, KV cache or None, last hidden states or None). ``grad_rows``: the positions whose log-prob gets a
        gradient; ``packed``: see ``episode_grads`` (the X and out tensors then cover its P positions)."""
        xs: list[torch.Tensor] = [None] * len(self.modules)
        outs: list[torch.Tensor] = [None] * len(self.modules)
        first = self.modules[0]
        handles = []

        def pre_first(mod, args):
            torch.set_grad_enabled(True)  # everything below ran without building a graph

        def make_hook(i):
            def hook(mod, args, out):
                xs[i] = args[0].detach()
                if mod is first:
                    out = out.detach().requires_grad_(True)  # a leaf: the backward stops here
                outs[i] = out
                return out
            return hook

        # the packed mask in the form the model's attention reads (a BlockMask under flex attention; an attention
        # without custom masks is refused here, before the decoder is queued)
        packed_mask = None if packed is None else custom_attention_mask(self.model, packed[2], "episode_grads: packed=",
                                                                         (packed[1],) * 2)
        handles.append(first.register_forward_pre_hook(pre_first))
        for i, mod in enumerate(self.modules):
            handles.append(mod.register_forward_hook(make_hook(i)))
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids) if packed is None \
                else dict(input_ids=packed[0], attention_mask=packed_mask, position_ids=packed[1])
            # a KV cache only when asked for: nothing else continues this forward
            kw.update({"use_cache": True} if use_cache else no_cache(self.split[0] if self.split else self.model))
            hidden = None
            if self.split is not None:  # the (B, L, vocab) logits are never formed
                dec, head = self.split
                out = dec(**kw)
                hidden = out.last_hidden_state
                # only d lp / d hidden is needed (it flows back to the tracked layers), not the head's gradient
                lp = head_token_logprobs(hidden[:, :input_ids.shape[1]], head, input_ids, self.logprob_chunk,
                                         head_grads=False, grad_rows=grad_rows)
            else:
                out = self.model(**kw)
                lp = token_logprobs(out.logits if hasattr(out, "logits") else out[0], input_ids)
            cache = output_cache(out) if use_cache else None
        finally:
            torch.set_grad_enabled(prev)
            for h in handles:
                h.remove()
        if any(o is None for o in outs):
            missing = [n for n, o in zip(self.layer_names, outs) if o is None]
            raise RuntimeError(f"FisherTracker: tracked layers {missing} did not run in the forward pass")
        return lp, xs, outs, cache, None if packed is None else hidden.detach()

    def episode_grads(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, episode_ids: torch.Tensor,
                      num_episodes: int | None = None, exact: bool = False, return_logprobs: bool = False,
                      return_cache: bool = False, packed=None):
        """Per-episode proxy gradients g (B, K, p).

        Args:
            input_ids, attention_mask: (B, L) the rollouts (prompt + response, padded).
            episode_ids: (B, L) from ``segment_episodes`` (-1: not part of any episode).
            num_episodes: K (default: max episode id + 1 over the batch).
            exact: one backward per episode (slow; for tests and non-default layers).
            return_logprobs: also return the (B, L) token log-probs log pi(x_{t+1} | x_<=t) at position t
                (detached), reusable as the rollout's old log-probs.
            return_cache: also return the forward's KV cache (reused by ``AnswerLikelihoodJr`` probes).
            packed: ``(ids (B, P), position_ids (B, P), mask (B, P, P) bool)``, P >= L: forward this sequence
                instead, whose first L tokens are ``input_ids`` and see what the rollout's own forward would show
                them (``AnswerLikelihoodJr.pack``: the Jr probes ride behind the rollout in this one forward).
                The gradients and log-probs are the rollout's; its last hidden states (B, P, d) (detached) are
                returned last. Needs the chunked log-prob path (``split``); not with ``return_cache``.

        Returns:
            g (B, K, p) float32 (float64 for a float64 model), p = len(layer_names) * rank**2, blocks in
            ``layer_names`` order, each the row-major flattened r x r matrix U^T dW V; followed by the token
            log-probs, the KV cache and the packed sequence's hidden states when asked for.
        """
        if input_ids.shape != episode_ids.shape or input_ids.shape != attention_mask.shape:
            raise ValueError(f"episode_grads: input_ids {tuple(input_ids.shape)}, attention_mask "
                             f"{tuple(attention_mask.shape)} and episode_ids {tuple(episode_ids.shape)} must match")
        if packed is not None:
            self._check_packed(packed, input_ids, return_cache)
        B = input_ids.shape[0]
        K = max(int(episode_ids.max()) + 1 if num_episodes is None else int(num_episodes), 0)
        # the token at t+1 is produced at position t: its episode is charged to position t
        seg = torch.full_like(episode_ids, -1)
        seg[:, :-1] = episode_ids[:, 1:]
        seg = torch.where(seg >= K, torch.full_like(seg, -1), seg)
        # only episode positions seed the backward (the output layer forms no gradient for others); their indices are
        # read back before the forward is queued: on a GPU a read inside it would wait for the decoder's kernels
        keep = GradRows.of(seg >= 0)
        lp, xs, outs, cache, hidden = self._capture_forward(input_ids, attention_mask,
                                                            position_ids_from_mask(attention_mask), return_cache,
                                                            grad_rows=keep, packed=packed)
        g = torch.zeros(B, K, self.p, dtype=lp.dtype, device=input_ids.device)
        if K > 0 and keep.index.numel():
            (self._exact_grads if exact else self._batched_grads)(g, lp, seg, xs, outs)
        extra = ((lp.detach(),) if return_logprobs else ()) + ((cache,) if return_cache else ()) + \
            ((hidden,) if packed is not None else ())
        return (g, *extra) if extra else g

    def _check_packed(self, packed, input_ids: torch.Tensor, return_cache: bool) -> None:
        """``episode_grads``' ``packed`` argument, checked before any work (one host read: its rollout prefix)."""
        if self.split is None:
            raise ValueError("episode_grads: packed= needs the chunked log-prob path (a plain output layer that is "
                             "not tracked, logprobs != 'full')")
        if return_cache:
            raise ValueError("episode_grads: packed= and return_cache=True do not combine")
        if not isinstance(packed, (tuple, list)) or len(packed) != 3 or not all(map(torch.is_tensor, packed)):
            raise ValueError("episode_grads: packed must be (ids (B, P), position_ids (B, P), mask (B, P, P))")
        ids, pos, mask = packed
        (B, L), P = input_ids.shape, ids.shape[-1]
        if ids.shape != (B, P) or pos.shape != (B, P) or mask.shape != (B, P, P) or mask.dtype != torch.bool \
                or P < L:
            raise ValueError(f"episode_grads: packed must be ids (B, P), position_ids (B, P) and a bool mask "
                             f"(B, P, P) with B={B}, P >= L={L}; got {tuple(ids.shape)}, {tuple(pos.shape)}, "
                             f"{tuple(mask.shape)} {mask.dtype}")
        if not torch.equal(ids[:, :L], input_ids):
            raise ValueError("episode_grads: packed ids must start with input_ids (the rollout, then the extra tokens)")

    def _batched_grads(self, g, lp, seg, xs, outs) -> None:
        """One backward of the response log-likelihood, then segment_grad_outer per layer (fills g in place)."""
        B, K, _ = g.shape
        (L, T), rr = (seg.shape[1], xs[0].shape[1]), self.rank * self.rank
        # only the tracked outputs: param.grad untouched; where, not lp[seg >= 0]: no host synchronisation
        Ds = torch.autograd.grad(torch.where(seg >= 0, lp, 0).sum(), outs)
        # ids < B * K by construction (episode_grads dropped ids >= K): the op need not check them; positions past
        # the rollout (a packed forward's extra tokens, T > L) belong to no episode
        flat_seg = torch.where(seg >= 0, seg + K * torch.arange(B, device=seg.device)[:, None], -1)
        flat_seg = torch.nn.functional.pad(flat_seg, (0, T - L), value=-1).reshape(-1)
        for i, n in enumerate(self.layer_names):
            U, V = self.bases[n]
            G = ops.segment_grad_outer(_as_out(xs[i], Ds[i]).reshape(B * T, -1), Ds[i].reshape(B * T, -1), flat_seg,
                                       B * K, U, V, backend=self.backend, check_ids=False)  # (B*K, r, r)
            g[:, :, i * rr:(i + 1) * rr] = G.reshape(B, K, rr).to(g.dtype)

    def _exact_grads(self, g, lp, seg, xs, outs) -> None:
        """One backward per episode index k (all rows at once; each row has at most one episode k)."""
        B, K, _ = g.shape
        (L, T), rr = (seg.shape[1], xs[0].shape[1]), self.rank * self.rank
        for k in range(K):
            sel = seg == k
            if not bool(sel.any()):
                continue
            Ds = torch.autograd.grad(lp[sel].sum(), outs, retain_graph=True, allow_unused=True)
            rows = torch.where(sel.any(1), torch.arange(B, device=seg.device), -1)  # one segment per row
            rowseg = torch.nn.functional.pad(rows[:, None].expand(B, L), (0, T - L), value=-1).reshape(-1)
            for i, n in enumerate(self.layer_names):
                if Ds[i] is None:
                    continue
                U, V = self.bases[n]
                G = ops.segment_grad_outer(_as_out(xs[i], Ds[i]).reshape(B * T, -1), Ds[i].reshape(B * T, -1),
                                           rowseg, B, U, V, backend=self.backend, check_ids=False)
                g[:, k, i * rr:(i + 1) * rr] = G.reshape(B, rr).to(g.dtype) * sel.any(1, keepdim=True)


def _as_out(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A tracked layer's input in the dtype its GEMM ran in (its output's, ``d``'s): under bf16 autocast a float32
    model feeds float32 activations to a Linear that computes in bf16, and the projected weight gradient
    U^T D^T X V is the gradient of that bf16 product."""
    return x if x.dtype == d.dtype else x.to(d.dtype)


def compression_penalty(g: torch.Tensor, valid: torch.Tensor, mode: str = "batch", damping: float = 1e-5,
                        normalize: bool = True, fisher: torch.Tensor | None = None, eps: float = 1e-12,
                        backend: str = "auto", fisher_grads: torch.Tensor | None = None) -> torch.Tensor:
    """Compression penalty P[b, k] = dtheta~^T (F + damping I) dtheta~ with dtheta~ = g[b, k] (Theorem 4.2).

    Args:
        g: (B, K, p) per-episode proxy gradients.
        valid: (B, K) bool, which episodes exist.
        mode: "batch" - F = empirical Fisher of all valid episodes in the batch (implicit, never p x p),
            or the explicit ``fisher`` (p, p) when given (e.g. an EMA from ``ops.fisher_accumulate``);
            "self" - F = g g^T per episode (Theorem 4.2 read literally): P = ||g||^4 + damping ||g||^2.
        normalize: divide by the mean over valid episodes (+eps), so beta is unit-free.
        fisher_grads: (N, p) gradients whose empirical Fisher is F in "batch" mode (default: the valid rows of
            ``g``); data-parallel training passes every rank's episodes so that F is the global batch's.

    Returns:
        P (B, K), 0 at invalid entries; all zeros if no entry is valid.
    """
    if g.dim() != 3:
        raise ValueError(f"compression_penalty: g must be (B, K, p), got {tuple(g.shape)}")
    if valid.shape != g.shape[:2]:
        raise ValueError(f"compression_penalty: valid must be {tuple(g.shape[:2])}, got {tuple(valid.shape)}")
    if mode not in ("batch", "self"):
        raise ValueError(f"compression_penalty: mode must be 'batch' or 'self', got {mode!r}")
    if fisher is not None and mode != "batch":
        raise ValueError("compression_penalty: fisher= is only used with mode='batch'")
    valid = valid.to(torch.bool)
    P = torch.zeros(g.shape[:2], dtype=g.dtype, device=g.device)
    if not bool(valid.any()):
        return P
    gv = g[valid]  # (N, p)
    if mode == "self":
        n2 = gv.square().sum(-1)
        q = n2.square() + damping * n2
    elif fisher is not None:
        q = ops.fisher_quadform(gv, fisher=fisher, damping=damping, backend=backend)
    else:
        q = ops.fisher_quadform(gv, grads=gv if fisher_grads is None else fisher_grads, damping=damping,
                                backend=backend)
    q = q.to(g.dtype)
    if normalize:
        q = q / (q.mean() + eps)
    P[valid] = q
    return P
