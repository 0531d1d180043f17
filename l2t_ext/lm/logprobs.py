"""Token log-probabilities and position ids of a causal LM batch (left padding allowed)."""

from __future__ import annotations

import dataclasses
import inspect

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions that skip left padding (what HF ``generate`` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) log pi(x_{t+1} | x_<=t) at position t (last position: 0), in float32 (float64 for float64 logits)."""
    lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32),
                           -1)
    out = lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([out, out.new_zeros(out.shape[0], 1)], 1)


# Model types whose logits are exactly ``get_output_embeddings()(get_decoder()(...).last_hidden_state)``: no
# logit soft-capping (Gemma 2/3), scale (Cohere, Granite) or other post-processing in the LM head.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "smollm3", "phi3", "olmo2"})


def split_head(model) -> tuple | None:
    """(decoder, lm_head Linear) when the model's logits are lm_head(decoder last hidden state) with nothing
    after it (model types in ``PLAIN_HEAD_MODEL_TYPES``), else None. Callers that split the forward at the head
    must fall back to ``model(...).logits`` on None rather than guess."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    dec = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if dec is None or not isinstance(head, torch.nn.Linear) or hasattr(head, "_hf_hook"):
        return None  # accelerate's device-map hooks (offloading) must see the head's call: keep the model's forward
    return dec, head


def unwrapped(module):
    """The module a wrapper such as DDP holds in ``.module`` (and passes keyword arguments on to), else itself."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def no_cache(module) -> dict:
    """``{"use_cache": False}`` when the module's forward takes ``use_cache``, else ``{}``: outside training with
    checkpointing, Hugging Face models keep a KV cache by default, two concatenations per layer (and its memory)
    for a forward that nothing continues."""
    return {"use_cache": False} if "use_cache" in inspect.signature(unwrapped(module).forward).parameters else {}


def output_cache(out):
    """The KV cache a Hugging Face forward with ``use_cache=True`` returned (``cache`` in transformers >= 5.2x,
    ``past_key_values`` before), or None."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@dataclasses.dataclass(frozen=True)
class GradRows:
    """The positions whose log-prob may carry a gradient (``head_token_logprobs``' ``grad_rows``), with their flat
    indices over the (B, L - 1) scored positions already read back: ``GradRows.of(mask)`` before a forward is
    queued does the host read while the device is idle, instead of inside the output layer, where on a GPU it
    would wait for the whole decoder forward."""

    mask: torch.Tensor  # (B, L) bool
    index: torch.Tensor  # (n,) int64 flat indices of the True positions among the first L - 1 of each row
    rest: torch.Tensor  # (B * (L - 1) - n,) int64 the others

    @classmethod
    def of(cls, mask: torch.Tensor) -> GradRows:
        """One host read (the number of True positions)."""
        return cls(mask, *_split_rows(mask[:, :-1].reshape(-1)))


def _split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the True entries of the bool vector ``rows``, of the False ones): one host read."""
    return rows.nonzero().squeeze(1), (~rows).nonzero().squeeze(1)


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] row by row, ``chunk`` rows at a time; the (rows, vocab) logits exist one chunk
    at a time. Two ways to the gradient:

    - only ``h`` needs one (the head is constant): each row's log-prob depends on its own hidden state alone, so
      its Jacobian d lp_t / d h_t = (onehot(target_t) - softmax(z_t)) W is a d-vector, computed in the forward
      from the chunk's logits already at hand and saved (rows x d, like h); the backward scales it by the
      upstream gradient. Two GEMMs per chunk in all, as through full logits, and no logits recomputed.
    - the head's parameters need one too: saves (h, W, b, targets, lse) and the backward recomputes each chunk's
      logits (the weight's gradient needs the upstream gradient, unknown in the forward).

    ``rows`` (bool, or None for all): the rows whose log-prob may carry a gradient; the others' log-probs are
    constants, and in the first way their Jacobians are never formed (a long prompt costs one GEMM, not two).
    ``split``: (indices of the True rows, of the others) read back ahead (``GradRows``), or None: read here."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, rows, split):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        n = h.shape[0]
        lp = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
        ctx.jacobian = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        jac = torch.zeros_like(h) if ctx.jacobian else None  # rows outside ``rows``: no gradient
        ctx.zdt = torch.result_type(h, weight)  # the logits' dtype: the head's, or autocast's (below) when active
        # (row indices or None for all rows, form the Jacobian?)
        groups = [(None, ctx.jacobian)] if rows is None or not ctx.jacobian else \
            list(zip(split or _split_rows(rows), (True, False)))
        for idx, want_jac in groups:
            for s in range(0, n if idx is None else idx.numel(), chunk):
                sel = slice(s, s + chunk) if idx is None else idx[s:s + chunk]
                z = torch.nn.functional.linear(h[sel], weight, bias)  # as the model's own head computes them
                ctx.zdt = z.dtype
                z = z.to(acc)
                lse[sel] = torch.logsumexp(z, -1)
                lp[sel] = z.gather(1, targets[sel, None]).squeeze(1) - lse[sel]
                if want_jac:
                    jac[sel] = _dlogprob_dhidden(z, lse[sel], targets[sel], weight, ctx.zdt, h.device.type).to(
                        jac.dtype)  # index_put does not cast (bf16 logits of a float32 model under autocast)
        if ctx.jacobian:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(h, weight, bias, targets, lse, rows)
        ctx.chunk = chunk
        return lp

    @staticmethod
    def backward(ctx, grad):
        if ctx.jacobian:
            (jac,) = ctx.saved_tensors
            return jac * grad[:, None].to(jac.dtype), None, None, None, None, None, None
        h, weight, bias, targets, lse, rows = ctx.saved_tensors
        if rows is not None:
            grad = torch.where(rows, grad, 0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=lse.dtype, device=h.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=lse.dtype, device=h.device) if need_b else None
        rows = grad.nonzero().squeeze(1)  # rows without an upstream gradient (prompt, padding) are skipped
        zdt = ctx.zdt
        # explicit dtypes, whatever autocast state the backward runs under: the logits are recomputed in the
        # forward's dtype (so that they match lse) and their gradient flows back in it, as autograd would do
        with torch.autocast(h.device.type, enabled=False):
            wz, bz = weight.to(zdt), None if bias is None else bias.to(zdt)
            for s in range(0, rows.numel(), ctx.chunk):
                idx = rows[s:s + ctx.chunk]
                hc, g = h[idx], grad[idx].to(lse.dtype)
                z = torch.nn.functional.linear(hc.to(zdt), wz, bz).to(lse.dtype)
                dz = _dlogprob_dlogits(z, lse[idx], targets[idx], g).to(zdt)
                if need_h:
                    gh[idx] = (dz @ wz).to(gh.dtype)
                if need_w:
                    gw += dz.mT.to(gw.dtype) @ hc.to(gw.dtype)
                if need_b:
                    gb += dz.sum(0).to(gb.dtype)
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None, None, None, None,
                None)


def _dlogprob_dlogits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor | None):
    """(rows, vocab) g * (onehot(target) - softmax(z)), the gradient of g * lp w.r.t. the logits; overwrites z."""
    dz = z.sub_(lse[:, None]).exp_().neg_()
    if g is not None:
        dz.mul_(g[:, None])
    return dz.scatter_add_(1, targets[:, None], g[:, None] if g is not None else dz.new_ones(dz.shape[0], 1))


def _dlogprob_dhidden(z, lse, targets, weight, zdt, device_type: str) -> torch.Tensor:
    """(rows, d) d lp / d h = (onehot(target) - softmax(z)) W, in the logits' dtype as autograd would compute it;
    overwrites z."""
    with torch.autocast(device_type, enabled=False):
        return _dlogprob_dlogits(z, lse, targets, None).to(zdt) @ weight.to(zdt)


def head_token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, input_ids: torch.Tensor,
                        chunk_tokens: int = 1024, head_grads: bool = True,
                        grad_rows: torch.Tensor | GradRows | None = None) -> torch.Tensor:
    """``token_logprobs(head(hidden), input_ids)`` without forming the (B, L, vocab) logits: the output layer and
    its log-softmax run ``chunk_tokens`` positions at a time, so the memory of that step is O(chunk_tokens x
    vocab) instead of two (B, L, vocab) float32 tensors. With ``head_grads=False`` the gradient w.r.t. ``hidden``
    is formed in the forward from each chunk's logits (one more GEMM per chunk, no logits in the backward);
    otherwise the backward recomputes each chunk's logits.

    Args:
        hidden: (B, L, d) the decoder's last hidden state (after its final norm).
        head: the output Linear (vocab, d), e.g. ``model.get_output_embeddings()``.
        input_ids: (B, L) int64.
        chunk_tokens: positions per chunk (>= 1).
        head_grads: False treats the head's parameters as constants. A custom autograd function's backward
            cannot tell which inputs a ``torch.autograd.grad`` call asks for, so a caller that only needs the
            gradient w.r.t. ``hidden`` saves the logits' recomputation, a (vocab x d) GEMM per chunk and a
            (vocab, d) float32 buffer; it pays one (rows, d) tensor for the saved per-row gradients.
        grad_rows: optional (B, L) bool, the positions whose log-prob may receive a gradient (e.g. the response
            tokens); the others are returned as constants (no gradient flows from them), and with
            ``head_grads=False`` their per-row gradients are not formed. Costs one host read of its indices,
            unless it comes as ``GradRows.of(mask)``, built ahead (e.g. before the decoder's forward is queued).

    Returns:
        (B, L) log pi(x_{t+1} | x_<=t) at position t, last position 0; float32 (float64 for float64 hidden);
        differentiable in ``hidden`` (and the head's parameters unless ``head_grads`` is False).
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"head_token_logprobs: hidden must be (B, L, d) and input_ids (B, L); got "
                         f"{tuple(hidden.shape)} and {tuple(input_ids.shape)}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"head_token_logprobs: chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    mask = grad_rows.mask if isinstance(grad_rows, GradRows) else grad_rows
    if grad_rows is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                  or mask.shape != input_ids.shape):
        raise ValueError(f"head_token_logprobs: grad_rows must be a bool tensor (or GradRows) shaped like input_ids "
                         f"{tuple(input_ids.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    B, L, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    weight, bias = (head.weight, head.bias) if head_grads else \
        (head.weight.detach(), None if head.bias is None else head.bias.detach())
    rows = None if mask is None else mask[:, :-1].reshape(-1)
    split = (grad_rows.index, grad_rows.rest) if isinstance(grad_rows, GradRows) else None
    lp = _HeadLogprobs.apply(h, weight, bias, input_ids[:, 1:].reshape(-1), chunk_tokens, rows, split)
    lp = lp.reshape(B, L - 1)
    return torch.cat([lp, lp.new_zeros(B, 1)], 1)
