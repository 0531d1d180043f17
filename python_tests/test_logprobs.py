"""head_token_logprobs: token log-probs through the output layer a chunk of positions at a time, against the
full-logits float64 reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from l2t_ext.lm import GradRows, head_token_logprobs, token_logprobs


def _reference(h, head, ids, w):
    """Values and gradients (h, W, b) of sum(w * lp) through full float64 logits."""
    h64 = h.detach().double().requires_grad_(True)
    W64 = head.weight.detach().double().requires_grad_(True)
    b64 = head.bias.detach().double().requires_grad_(True)
    lp = token_logprobs(torch.nn.functional.linear(h64, W64, b64), ids)
    return (lp.detach(), *torch.autograd.grad((lp * w).sum(), [h64, W64, b64]))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("head_grads", [True, False], ids=["recomputed", "jacobian_in_forward"])
def test_matches_full_logits(dtype, tol, chunk, head_grads):
    g = torch.Generator().manual_seed(chunk)
    B, L, d, V = 3, 11, 16, 97  # odd sizes; 30 predicted positions
    h = torch.randn(B, L, d, generator=g).to(dtype).requires_grad_(True)
    head = torch.nn.Linear(d, V).to(dtype)
    ids = torch.randint(0, V, (B, L), generator=g)
    w = torch.randn(B, L, generator=g, dtype=torch.float64)
    w[0] = 0  # rows without an upstream gradient (the prompt) are skipped by the backward
    w[:, -1] = 0
    lp = head_token_logprobs(h, head, ids, chunk_tokens=chunk, head_grads=head_grads)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lp.shape == (B, L)
    wrt = [h, head.weight, head.bias] if head_grads else [h]  # per-token upstream gradients w, zero on some rows
    got = (lp.detach(), *torch.autograd.grad((lp.double() * w).sum(), wrt))
    want = _reference(h, head, ids, w)[:len(wrt) + 1]
    for name, a, b in zip(("lp", "d_hidden", "d_weight", "d_bias"), got, want):
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= tol * scale, name
    assert (lp[:, -1] == 0).all()
    assert (got[1][0] == 0).all()  # no gradient reaches positions whose log-prob has none


@pytest.mark.parametrize("backward_in_region", [True, False])
@pytest.mark.parametrize("head_grads", [True, False], ids=["recomputed", "jacobian_in_forward"])
@pytest.mark.parametrize("all_rows", [False, True], ids=["", "grad_rows"])  # grad_rows: the indexed path
def test_under_bf16_autocast_matches_the_models_own_logits(backward_in_region, head_grads, all_rows):
    # a float32 model scored inside a bf16 autocast region (the trainer on a GPU; CPU autocast here): the logits
    # are the head's bf16 GEMM, as model(...).logits would be, and the backward recomputes them in bf16 whether
    # it runs inside the region or after it
    g = torch.Generator().manual_seed(3)
    B, L, d, V = 2, 9, 16, 61
    h = torch.randn(B, L, d, generator=g).requires_grad_(True)
    head = torch.nn.Linear(d, V)
    ids = torch.randint(0, V, (B, L), generator=g)
    w = torch.randn(B, L, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = token_logprobs(head(h), ids)
        want_grads = torch.autograd.grad((want * w).sum(), [h, head.weight, head.bias])
        rows = torch.ones(B, L, dtype=torch.bool) if all_rows else None
        lp = head_token_logprobs(h, head, ids, chunk_tokens=4, head_grads=head_grads, grad_rows=rows)
        wrt = [h, head.weight, head.bias] if head_grads else [h]
        if backward_in_region:
            grads = torch.autograd.grad((lp * w).sum(), wrt)
    if not backward_in_region:
        grads = torch.autograd.grad((lp * w).sum(), wrt)
    assert lp.dtype == torch.float32 and (lp - want).abs().max() <= 1e-5
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert (a - b).abs().max() <= 2e-2 * max(1.0, b.abs().max().item()), name  # bf16 rounding of dz


def test_only_hidden_needs_grad_and_single_position():
    head = torch.nn.Linear(8, 13, bias=False).double().requires_grad_(False)
    h = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (2, 6))
    lp = head_token_logprobs(h, head, ids, chunk_tokens=4)
    (gh,) = torch.autograd.grad(lp.sum(), [h])
    (want,) = torch.autograd.grad(token_logprobs(head(h), ids).sum(), [h])
    assert (gh - want).abs().max() <= 1e-12
    one = head_token_logprobs(h[:, :1], head, ids[:, :1])
    assert one.shape == (2, 1) and (one == 0).all()


def test_head_grads_false_differentiates_the_hidden_state_only(monkeypatch):
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(8, 13)
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    (want,) = torch.autograd.grad(head_token_logprobs(h, head, ids, chunk_tokens=4).sum(), [h])
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.shape) or real(a, b))
    lp = head_token_logprobs(h, head, ids, chunk_tokens=4, head_grads=False)
    (got,) = torch.autograd.grad(lp.sum(), [h])
    assert torch.equal(got, want)
    # d hidden = dz @ W per chunk, formed in the forward; no dz^T @ h for the weight, no logits recomputed
    assert calls == [(4, 13), (4, 13), (2, 13)]
    lp = head_token_logprobs(h, head, ids, chunk_tokens=4, head_grads=False)
    with torch.no_grad():
        head_token_logprobs(h, head, ids, chunk_tokens=4, head_grads=False)
    assert calls == [(4, 13), (4, 13), (2, 13)] * 2  # no gradient wanted: nothing formed for it


@pytest.mark.parametrize("ahead", [False, True], ids=["mask", "GradRows"])
@pytest.mark.parametrize("head_grads", [True, False], ids=["recomputed", "jacobian_in_forward"])
def test_grad_rows_make_the_other_positions_constants(head_grads, ahead, monkeypatch):
    """Positions outside grad_rows keep their log-prob values but pass no gradient, whatever the upstream
    gradient there; with the head constant, no per-row gradient is formed for them (one GEMM for those rows).
    Given as ``GradRows`` (indices read back ahead), the output layer reads nothing back in its forward."""
    g = torch.Generator().manual_seed(7)
    B, L, d, V = 2, 7, 8, 13
    head = torch.nn.Linear(d, V).double()
    h = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, L), generator=g)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, 2:5], rows[1, 5] = True, True  # 4 of the 12 predicting positions
    w = torch.randn(B, L, generator=g, dtype=torch.float64)  # nonzero everywhere
    want_lp, *want = _reference(h, head, ids, w * rows)
    calls, reads = [], []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.shape) or real(a, b))
    arg = GradRows.of(rows) if ahead else rows
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **k: reads.append(1) or nonzero(t, *a, **k))
    lp = head_token_logprobs(h, head, ids, chunk_tokens=3, head_grads=head_grads, grad_rows=arg)
    assert len(reads) == (0 if ahead or head_grads else 2)
    wrt = [h, head.weight, head.bias] if head_grads else [h]
    got = torch.autograd.grad((lp * w).sum(), wrt)
    assert (lp - want_lp).abs().max() <= 1e-12
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())
    if not head_grads:
        assert calls == [(3, V), (1, V)]  # d hidden for the 4 gradient rows only, 3 at a time


def test_bad_input():
    head = torch.nn.Linear(8, 13)
    with pytest.raises(ValueError, match="hidden must be"):
        head_token_logprobs(torch.randn(2, 6, 8), head, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_token_logprobs(torch.randn(2, 6, 8), head, torch.zeros(2, 6, dtype=torch.long), chunk_tokens=0)
    for bad in (torch.ones(2, 5, dtype=torch.bool), GradRows.of(torch.ones(2, 5, dtype=torch.bool)),
                torch.ones(2, 6)):
        with pytest.raises(ValueError, match="grad_rows must be a bool tensor"):
            head_token_logprobs(torch.randn(2, 6, 8), head, torch.zeros(2, 6, dtype=torch.long), grad_rows=bad)


def test_split_head_only_where_logits_are_the_head_of_the_hidden_state():
    transformers = pytest.importorskip("transformers")
    from l2t_ext.lm import split_head, tiny_qwen2
    from l2t_ext.lm.models import char_tokenizer

    model = tiny_qwen2(char_tokenizer("0123456789+=- "))
    dec, head = split_head(model)
    assert dec is model.get_decoder() and head is model.lm_head
    model.lm_head._hf_hook = object()  # accelerate offloading hooks: the model's own forward must run
    assert split_head(model) is None
    assert split_head(torch.nn.Linear(2, 2)) is None
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, attn_implementation="eager", final_logit_softcapping=30.0))
    assert split_head(gemma) is None
