"""The L2T dense process reward on tiny random Hugging Face models (no downloads)."""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from l2t_ext import ops  # noqa: E402
from l2t_ext.reward import (  # noqa: E402
    AnswerLikelihoodJr,
    CallableJr,
    DenseProcessReward,
    FisherTracker,
    Rollouts,
    compression_penalty,
    segment_episodes,
)

M = 7  # marker token id used by the synthetic rollouts ("</think>")


def tiny_model(kind="qwen2", dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    common = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    common.update(config)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "phi3":  # fused qkv / gate-up projections, longrope (Phi-3, Phi-4-mini)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(pad_token_id=0, **common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return model.to(dtype).eval()


def rollouts(B=3, L=24, seed=0, left_pad=True):
    """Prompt (5 tokens) + response with markers; rows of different lengths, padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    resp = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        pad = 2 * b
        start = pad if left_pad else 0
        end = L if left_pad else L - pad
        am[b, :start] = 0
        am[b, end:] = 0
        resp[b, start + 5:end] = True
        for p in range(start + 7, end - 2, 4 + b):  # markers every few tokens, then a final answer
            ids[b, p] = M
    ids[am == 0] = 0
    return ids, am, resp


def _real_successor(am):
    """(B, L) bool: a real token whose successor is real too (the positions that predict a real token)."""
    return am.bool() & torch.cat([am[:, 1:].bool(), torch.zeros(am.shape[0], 1, dtype=torch.bool)], 1)


# ------------------------------------------------------------------------------------------- episodes
def test_segment_episodes_basic_and_final_answer():
    ids = torch.tensor([[1, 2, 3, 4, M, 5, 6, M, 8, 9]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ep = segment_episodes(ids, resp, [[M]])
    assert ep.tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1, -1, -1]]


def test_segment_episodes_edge_cases():
    resp = torch.ones(1, 6, dtype=torch.bool)
    # no marker: one episode
    assert segment_episodes(torch.tensor([[1, 2, 3, 4, 5, 6]]), resp, [[M]]).tolist() == [[0] * 6]
    # marker first and last response token; nothing after the last marker -> no final answer
    assert segment_episodes(torch.tensor([[M, 2, 3, 4, 5, M]]), resp, [[M]]).tolist() == [[0, 1, 1, 1, 1, 1]]
    # multi-token marker matched as a sequence; a lone first token is not a marker
    ids = torch.tensor([[1, 30, 2, 30, 31, 3, 30, 31, 4]])
    assert segment_episodes(ids, torch.ones(1, 9, dtype=torch.bool), [[30, 31]]).tolist() == \
        [[0, 0, 0, 0, 0, 1, 1, 1, -1]]
    # a marker in the prompt does not count; padding and all-padding rows are -1
    ids = torch.tensor([[M, 1, 2, M, 3], [0, 0, 0, 0, 0]])
    resp = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert segment_episodes(ids, resp, [[M]]).tolist() == [[-1, 0, 0, 0, -1], [-1] * 5]
    # max_episodes merges the tail into the last episode (the final answer stays -1)
    ids = torch.tensor([[M, M, M, M, 9]])
    assert segment_episodes(ids, torch.ones(1, 5, dtype=torch.bool), [[M]], max_episodes=2).tolist() == \
        [[0, 1, 1, 1, -1]]
    # several markers
    ids = torch.tensor([[1, M, 2, 33, 3]])
    assert segment_episodes(ids, torch.ones(1, 5, dtype=torch.bool), [[M], [33]]).tolist() == [[0, 0, 1, 1, -1]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(markers=[]), "markers must be a non-empty list"),
    (dict(markers=[[]]), r"markers\[0\] must be a non-empty list of ints"),
    (dict(markers=["paragraph"]), "text markers need tokenizer="),
    (dict(markers=["re:("]), "not a valid regex"),
    (dict(markers=["line", [5]]), "mix text and token ids"),
    (dict(max_episodes=0), "max_episodes"),
    (dict(response_mask=torch.ones(2, 3, dtype=torch.bool)), "response_mask"),
])
def test_segment_episodes_bad_input(kwargs, match):
    args = dict(input_ids=torch.ones(2, 4, dtype=torch.long), response_mask=torch.ones(2, 4, dtype=torch.bool),
                markers=[[M]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        segment_episodes(**args)


# ------------------------------------------------------------------------------------------- tracker
def brute_force_grads(model, tracker, ids, am, ep, K):
    """Per (row, episode) autograd of sum_{t in episode} log pi(x_t | x_<t) w.r.t. each tracked weight."""
    from l2t_ext.lm import position_ids_from_mask, token_logprobs

    B = ids.shape[0]
    weights = [m.weight for m in tracker.modules]
    out = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am))
    lp = token_logprobs(out.logits, ids)  # position t predicts token t+1
    seg = torch.full_like(ep, -1)
    seg[:, :-1] = ep[:, 1:]
    g = torch.zeros(B, K, tracker.p, dtype=torch.float64)
    full = [torch.zeros_like(w) for w in weights]
    rr = tracker.rank ** 2
    for b in range(B):
        for k in range(K):
            sel = torch.zeros_like(seg, dtype=torch.bool)
            sel[b] = seg[b] == k
            if not sel.any():
                continue
            grads = torch.autograd.grad(lp[sel].sum(), weights, retain_graph=True)
            for i, (n, gw) in enumerate(zip(tracker.layer_names, grads)):
                U, V = tracker.bases[n]
                g[b, k, i * rr:(i + 1) * rr] = (U.T @ gw @ V).flatten()
                full[i] += gw
    return g, full


@pytest.mark.parametrize("kind", ["qwen2", "llama", "phi3"])
def test_episode_grads_equal_bruteforce_default_layers(kind):
    """The default layers follow the last block's attention (Phi-3 fuses gate and up into gate_up_proj)."""
    model = tiny_model(kind)
    tracker = FisherTracker(model, rank=4, backend="cpu")
    names = ["o_proj", "gate_up_proj", "down_proj"] if kind == "phi3" else ["o_proj", "gate_proj", "up_proj",
                                                                           "down_proj"]
    assert [n.split(".")[-1] for n in tracker.layer_names] == names
    assert all(".layers.1." in n for n in tracker.layer_names)
    ids, am, resp = rollouts()
    ep = segment_episodes(ids, resp, [[M]])
    K = int(ep.max()) + 1
    g = tracker.episode_grads(ids, am, ep)
    assert g.shape == (3, K, len(names) * 16) and g.dtype == torch.float64
    ref, _ = brute_force_grads(model, tracker, ids, am, ep, K)
    assert (g - ref).abs().max() <= 1e-8 * max(1.0, ref.abs().max().item())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _check_sum_equals_full(tracker, g, full):
    rr = tracker.rank ** 2
    for i, n in enumerate(tracker.layer_names):
        U, V = tracker.bases[n]
        want = (U.T @ full[i] @ V).flatten()
        got = g[:, :, i * rr:(i + 1) * rr].sum((0, 1))
        assert (got - want).abs().max() <= 1e-8 * max(1.0, want.abs().max().item()), n


def test_sum_over_episodes_equals_projected_full_gradient():
    model = tiny_model("qwen2")
    ids, am, resp = rollouts(B=2, seed=1)
    ep = segment_episodes(ids, resp, [[M]])
    K = int(ep.max()) + 1
    # default layers: the one-backward token-local result is exact, so it sums to the full gradient
    tracker = FisherTracker(model, rank=3, backend="cpu")
    _, full = brute_force_grads(model, tracker, ids, am, ep, K)
    _check_sum_equals_full(tracker, tracker.episode_grads(ids, am, ep), full)
    # every Linear layer of the model, including those before attention mixing: exact mode (one backward
    # per episode) equals brute force per episode and sums to the full gradient
    tracker = FisherTracker(model, layers=r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$", rank=3,
                            backend="cpu")
    assert len(tracker.layer_names) == 14
    ref, full = brute_force_grads(model, tracker, ids, am, ep, K)
    ge = tracker.episode_grads(ids, am, ep, exact=True)
    assert (ge - ref).abs().max() <= 1e-8 * max(1.0, ref.abs().max().item())
    _check_sum_equals_full(tracker, ge, full)
    # token-local attribution agrees with exact on the layers after the last attention mixing
    gt = tracker.episode_grads(ids, am, ep)
    late = [i for i, n in enumerate(tracker.layer_names) if ".layers.1." in n and "self_attn.o_proj" in n or
            ".layers.1.mlp." in n]
    for i in late:
        assert (gt[:, :, i * 9:(i + 1) * 9] - ge[:, :, i * 9:(i + 1) * 9]).abs().max() <= 1e-8


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_chunked_and_full_logprob_paths_agree(kind):
    model = tiny_model(kind)
    ids, am, resp = rollouts()
    ep = segment_episodes(ids, resp, [[M]])
    chunked = FisherTracker(model, rank=4, backend="cpu", logprobs="chunked", logprob_chunk=5)
    full = FisherTracker(model, rank=4, backend="cpu", logprobs="full")
    assert chunked.split is not None and full.split is None
    assert FisherTracker(model, rank=4, backend="cpu").split is not None  # auto picks the chunked path here
    gc, lc = chunked.episode_grads(ids, am, ep, return_logprobs=True)
    gf, lf = full.episode_grads(ids, am, ep, return_logprobs=True)
    assert (gc - gf).abs().max() <= 1e-12 * max(1.0, gf.abs().max().item())
    assert (lc - lf).abs().max() <= 1e-12
    ref, _ = brute_force_grads(model, chunked, ids, am, ep, int(ep.max()) + 1)
    assert (gc - ref).abs().max() <= 1e-8 * max(1.0, ref.abs().max().item())


def test_chunked_logprobs_never_save_vocabulary_sized_tensors():
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=600, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, attn_implementation="sdpa")).double().eval()
    ids, am, resp = rollouts()
    ep = segment_episodes(ids, resp, [[M]])
    logits_numel = ids.numel() * 600
    for mode in ("chunked", "full"):
        tracker = FisherTracker(model, rank=4, backend="cpu", logprobs=mode, logprob_chunk=8)
        saved = []

        def pack(t, saved=saved):
            if not isinstance(t, torch.nn.Parameter):  # weights are held anyway
                saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tracker.episode_grads(ids, am, ep)
        # the full path saves (B, L - 1, vocab) float32 log-softmax outputs; the chunked one nothing that large
        assert (max(saved) >= logits_numel * 23 // 24) == (mode == "full"), (mode, max(saved), logits_numel)


def test_soft_capped_logits_use_the_full_path():
    """Gemma 2 caps its logits after the output layer: lm_head(hidden) is not its logits, so the tracker (and
    the Jr probes) must not split the forward there."""
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attn_implementation="eager",
        final_logit_softcapping=0.5)).double().eval()
    from l2t_ext.lm import split_head

    assert split_head(model) is None
    ids, am, resp = rollouts(left_pad=False)  # eager attention with left padding gives NaN rows in Gemma 2
    ep = segment_episodes(ids, resp, [[M]])
    tracker = FisherTracker(model, rank=4, backend="cpu")
    assert tracker.split is None
    ref, _ = brute_force_grads(model, tracker, ids, am, ep, int(ep.max()) + 1)
    assert (tracker.episode_grads(ids, am, ep) - ref).abs().max() <= 1e-8 * max(1.0, ref.abs().max().item())
    tracker.split = (model.get_decoder(), model.get_output_embeddings())  # what splitting there would compute
    assert (tracker.episode_grads(ids, am, ep) - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="logprobs='chunked' needs"):
        FisherTracker(model, rank=4, backend="cpu", logprobs="chunked")


def test_backward_does_not_reach_lower_layers():
    model = tiny_model("qwen2")
    tracker = FisherTracker(model, rank=4, backend="cpu")
    seen = {}

    def record(mod, args, out):
        seen["layer0_requires_grad"] = (out[0] if isinstance(out, tuple) else out).requires_grad

    h = model.model.layers[0].register_forward_hook(record)
    ids, am, resp = rollouts()
    tracker.episode_grads(ids, am, segment_episodes(ids, resp, [[M]]))
    h.remove()
    assert seen["layer0_requires_grad"] is False  # no graph was built below the first tracked layer


def test_tracker_bad_input():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="no nn.Linear layer matches"):
        FisherTracker(model, layers="nonexistent_proj")
    with pytest.raises(ValueError, match="rank=64 exceeds"):
        FisherTracker(model, rank=64)
    with pytest.raises(ValueError, match="is not an nn.Linear"):
        FisherTracker(model, layers=["model.norm"])
    with pytest.raises(ValueError, match="could not find transformer blocks"):
        FisherTracker(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="logprobs must be"):
        FisherTracker(model, rank=2, logprobs="fused")
    with pytest.raises(ValueError, match="logprob_chunk must be"):
        FisherTracker(model, rank=2, logprob_chunk=0)
    # the output layer tracked: its hook must run, so auto takes the full path and chunked is refused
    assert FisherTracker(model, layers=["lm_head"], rank=2, backend="cpu").split is None
    with pytest.raises(ValueError, match="logprobs='chunked' needs"):
        FisherTracker(model, layers=["lm_head"], rank=2, logprobs="chunked")
    tracker = FisherTracker(model, rank=2, backend="cpu")
    ids, am, resp = rollouts()
    with pytest.raises(ValueError, match="must match"):
        tracker.episode_grads(ids, am[:, :-1], segment_episodes(ids, resp, [[M]]))
    # K = 0 (no response tokens): well-defined empty output
    g = tracker.episode_grads(ids, am, torch.full_like(ids, -1))
    assert g.shape == (3, 0, tracker.p)


def test_refresh_schedule_and_proxy():
    model = tiny_model("qwen2")
    tracker = FisherTracker(model, rank=3, refresh_every=2, backend="cpu")
    before = {n: U.clone() for n, (U, _) in tracker.bases.items()}
    with torch.no_grad():
        for m in tracker.modules:
            m.weight.add_(torch.randn_like(m.weight))
    assert tracker.step() is False and tracker.step() is True
    assert any(not torch.equal(before[n], tracker.bases[n][0]) for n in before)
    assert tracker.proxy().shape == (tracker.p,)


# ------------------------------------------------------------------------------------------- penalty
def test_compression_penalty_matches_explicit_formula():
    g = torch.randn(3, 4, 10, dtype=torch.float64)
    valid = torch.rand(3, 4) > 0.3
    valid[0, 0] = True
    lam = 1e-2
    gv = g[valid]
    F = gv.T @ gv / gv.shape[0]
    want = torch.einsum("np,pq,nq->n", gv, F + lam * torch.eye(10, dtype=torch.float64), gv)
    P = compression_penalty(g, valid, "batch", damping=lam, normalize=False, backend="cpu")
    assert torch.allclose(P[valid], want, rtol=1e-12) and (P[~valid] == 0).all()
    Pn = compression_penalty(g, valid, "batch", damping=lam, normalize=True)
    assert torch.allclose(Pn[valid], want / want.mean(), rtol=1e-10)
    # self mode: F = g g^T per episode
    want_self = torch.stack([v @ (torch.outer(v, v) + lam * torch.eye(10, dtype=torch.float64)) @ v for v in gv])
    assert torch.allclose(compression_penalty(g, valid, "self", damping=lam, normalize=False)[valid], want_self)
    # explicit EMA Fisher path
    Pf = compression_penalty(g, valid, "batch", damping=lam, normalize=False, fisher=F)
    assert torch.allclose(Pf[valid], want, rtol=1e-10)
    # nothing valid -> zeros, never NaN
    assert (compression_penalty(g, torch.zeros(3, 4, dtype=torch.bool)) == 0).all()
    with pytest.raises(ValueError, match="valid must be"):
        compression_penalty(g, valid[:, :2])


# ------------------------------------------------------------------------------------------- Jr
@pytest.mark.parametrize("cue,left", [([11, 12, 13], True), ([11, 12, 13], False), ([], True)])
def test_packed_probes_equal_separate_forwards(cue, left):
    """Every probe of the packed forward (and of the KV-cache path) equals a separate forward of prefix + cue +
    answer; left or right padding; without a cue the context's last token predicts the first answer token."""
    model = tiny_model("qwen2", dtype=torch.float32)
    ids, am, resp = rollouts(B=3, seed=2, left_pad=left)
    ep = segment_episodes(ids, resp, [[M]])
    answers = [[20, 21], [22], [23, 24, 25]]
    jr_est = AnswerLikelihoodJr(model, cue_ids=cue, return_token_logprobs=True)
    r = Rollouts(ids, am, resp, ep, answer_ids=answers)
    jr, valid = jr_est(r)
    # the fast path (lm_head only at the answer positions) gives the same probabilities
    jr_fast, _ = AnswerLikelihoodJr(model, cue_ids=cue)(r)
    assert (jr_fast - jr).abs().max() <= 1e-6
    # and so do probes that reuse the rollout forward's KV cache (as DenseProcessReward runs them)
    tracker = FisherTracker(model, rank=4)
    _, cache = tracker.episode_grads(ids, am, ep, return_cache=True)
    jr_cache, _ = AnswerLikelihoodJr(model, cue_ids=cue)(r, cache=cache)
    assert (jr_cache - jr).abs().max() <= 1e-5
    want, v2 = _separate_forward_jr(model, ids, am, resp, ep, answers, cue)
    assert torch.equal(valid, v2) and (jr[~valid] == 0).all() and (jr - want).abs().max() <= 1e-5
    # the packed forward also returns the rollout's own token log-probs
    from l2t_ext.lm import position_ids_from_mask, token_logprobs

    with torch.no_grad():
        full = token_logprobs(model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits,
                              ids)
    real = _real_successor(am)
    assert (jr_est.last_token_logprobs[real] - full[real]).abs().max() <= 1e-5
    assert (jr_est.last_token_logprobs[~real] == 0).all()


@pytest.mark.parametrize("kind,cue,left,exact", [("qwen2", [11, 12], True, False), ("llama", [], False, False),
                                                  ("qwen2", [11], False, True)])
def test_tracker_packed_forward_equals_rollout_forward_plus_probes(kind, cue, left, exact):
    """The probes packed behind the rollout in the tracker's own forward (what DenseProcessReward runs): the
    gradients and token log-probs are the rollout forward's, and the hidden states score the probes as the
    estimator's own forward does (float64)."""
    model = tiny_model(kind)
    ids, am, resp = rollouts(B=3, seed=5, left_pad=left)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20, 21], [22], [23, 24, 25]])
    est, tracker = AnswerLikelihoodJr(model, cue_ids=cue), FisherTracker(model, rank=4)
    g, lp = tracker.episode_grads(ids, am, ep, exact=exact, return_logprobs=True)
    pack = est.pack(r)
    assert pack.ids.shape[1] > ids.shape[1]
    g2, lp2, hidden = tracker.episode_grads(ids, am, ep, exact=exact, return_logprobs=True,
                                            packed=(pack.ids, pack.position_ids, pack.mask))
    assert g.abs().max() > 0 and (g2 - g).abs().max() <= 1e-10 * g.abs().max()
    real = _real_successor(am)
    assert (lp2 - lp)[real].abs().max() <= 1e-10 and not hidden.requires_grad  # padding rows: never read
    jr, valid = est.score(hidden, pack)
    jr_ref, valid_ref = est(r)
    assert torch.equal(valid, valid_ref) and valid.any() and (jr - jr_ref).abs().max() <= 1e-12


def test_tracker_packed_bad_input():
    model = tiny_model()
    ids, am, resp = rollouts(B=2, seed=6)
    ep = segment_episodes(ids, resp, [[M]])
    pack = AnswerLikelihoodJr(model, cue_ids=[11]).pack(Rollouts(ids, am, resp, ep, answer_ids=[[20], [21]]))
    packed = (pack.ids, pack.position_ids, pack.mask)
    tracker = FisherTracker(model, rank=4)
    with pytest.raises(ValueError, match="return_cache"):
        tracker.episode_grads(ids, am, ep, packed=packed, return_cache=True)
    with pytest.raises(ValueError, match="packed must be ids"):
        tracker.episode_grads(ids, am, ep, packed=(pack.ids, pack.position_ids, pack.mask.long()))
    with pytest.raises(ValueError, match="packed must be ids"):
        tracker.episode_grads(ids, am, ep, packed=(pack.ids[:, :5], pack.position_ids[:, :5], pack.mask[:, :5, :5]))
    with pytest.raises(ValueError, match="start with input_ids"):
        tracker.episode_grads(ids, am, ep, packed=(pack.ids.flip(0), *packed[1:]))
    with pytest.raises(ValueError, match="chunked log-prob path"):
        FisherTracker(model, rank=4, logprobs="full").episode_grads(ids, am, ep, packed=packed)
    with pytest.raises(ValueError, match="hidden must be"):
        AnswerLikelihoodJr(model, cue_ids=[11]).score(torch.zeros(2, 3, 32, dtype=torch.float64), pack)


def test_reward_probe_paths_packed_and_cache():
    """probes="packed" runs one decoder forward (the probes ride behind the rollout), "cache" two (the rollout, then
    the probes from its KV cache), "auto" the cache path on the CPU; all give the same reward. A Jr on another
    model is never packed into (or cached from) the tracked one."""
    model = tiny_model()
    ids, am, resp = rollouts(B=3, seed=7)
    r = Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answer_ids=[[20, 21], [22], [23]])
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    outs = {}
    for probes in ("packed", "cache", "auto"):
        calls.clear()
        outs[probes] = DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4),
                                          probes=probes)(r)
        outs[probes].decoder_calls = len(calls)
    hook.remove()
    assert [outs[p].decoder_calls for p in ("packed", "cache", "auto")] == [1, 2, 2]
    real = _real_successor(am)
    out, ref = outs["packed"], outs["cache"]
    for name in ("r_prg", "jr_before", "jr_after", "penalty", "token_logprobs"):
        a, b = getattr(out, name), getattr(ref, name)
        a, b = (a[real], b[real]) if name == "token_logprobs" else (a, b)  # padding positions: never read
        assert out.valid.any() and (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max()), name
    other = tiny_model(seed=3)
    sep = DenseProcessReward(AnswerLikelihoodJr(other, cue_ids=[11]), FisherTracker(model, rank=4))(r)
    want, _ = AnswerLikelihoodJr(other, cue_ids=[11])(r)
    assert (sep.jr_before - torch.where(sep.valid, want[:, :-1], 0)).abs().max() <= 1e-12
    assert (sep.jr_before - out.jr_before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="probes must be one of"):
        DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4), probes="fast")
    for jr, tracker in [(AnswerLikelihoodJr(other, cue_ids=[11]), FisherTracker(model, rank=4)),
                        (AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4, logprobs="full"))]:
        with pytest.raises(ValueError, match="probes='packed' needs"):
            DenseProcessReward(jr, tracker, probes="packed")


def _reward_outputs(model, r, probes, layers=None):
    out = DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4, layers=layers),
                             probes=probes)(r)
    return {n: getattr(out, n) for n in ("r_prg", "jr_before", "jr_after", "penalty", "valid")}


def _assert_same_reward(out, ref, rtol, what):
    assert out["valid"].any() and torch.equal(out["valid"], ref["valid"]), what
    for n in ("r_prg", "jr_before", "jr_after", "penalty"):
        assert (out[n] - ref[n]).abs().max() <= rtol * max(1.0, ref[n].abs().max()), (what, n)


@pytest.mark.parametrize("left", [True, False])
def test_probe_masks_under_eager_attention_equal_sdpa(left):
    """Eager attention adds its mask to the scores: the probes' boolean mask would add 0 or 1 and mask nothing.
    Under eager the reward and the estimator's own forward equal SDPA's (float64 models; eager takes its softmax
    in float32, so to float32 round-off: the boolean mask was off by ~1e-3). The cache path runs the rollout with
    transformers' own eager mask, whose fully masked left-padding rows are NaN in float64 (its float64 minimum
    overflows in the float32 softmax) and poison the backward: right padding only."""
    model = tiny_model()
    ids, am, resp = rollouts(B=3, seed=9, left_pad=left)
    r = Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answer_ids=[[20, 21], [22], [23]])
    paths = ("packed",) if left else ("packed", "cache")
    ref = {p: _reward_outputs(model, r, p) for p in paths}
    jr_ref = AnswerLikelihoodJr(model, cue_ids=[11, 12])(r)[0]
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    for p in paths:
        _assert_same_reward(_reward_outputs(model, r, p), ref[p], 2e-6, p)
    assert (AnswerLikelihoodJr(model, cue_ids=[11, 12])(r)[0] - jr_ref).abs().max() <= 1e-6


def test_probe_masks_under_flex_attention_are_block_masks():
    """Under flex attention the probes hand the decoder a BlockMask (fully masked blocks are skipped): their Jr,
    and the reward with the probes packed into the tracker's forward, equal SDPA's. CPU: float32, no backward
    through flex attention (the default tracked layers need none: they follow the last block's attention), and
    inductor's CPU flex kernel fails to compile for the KV-cache path's query block (torch 2.13), so the cache
    path and a backward through flex attention are checked on CUDA (test_reward_under_flex_attention_on_cuda)."""
    from torch.nn.attention.flex_attention import BlockMask

    model = tiny_model(dtype=torch.float32)
    ids, am, resp = rollouts(B=3, seed=10)
    r = Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answer_ids=[[20, 21], [22], [23, 24]])
    est = AnswerLikelihoodJr(model, cue_ids=[11])
    ref, ref_reward = est(r)[0], _reward_outputs(model, r, "packed")
    model.set_attn_implementation("flex_attention")
    masks = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]),
                                                         with_kwargs=True)
    jr = est(r)[0]
    reward = _reward_outputs(model, r, "packed")
    hook.remove()
    assert len(masks) == 2 and all(isinstance(m, BlockMask) for m in masks)
    assert jr.gt(0).any() and (jr - ref).abs().max() <= 1e-5
    _assert_same_reward(reward, ref_reward, 1e-5, "packed")
    # sliding-window layers beside full ones: one BlockMask per layer type
    model = tiny_model(dtype=torch.float32, **SLIDING["qwen2"])
    est = AnswerLikelihoodJr(model, cue_ids=[11])
    ref = est(r)[0]
    model.set_attn_implementation("flex_attention")
    masks.clear()
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]),
                                                         with_kwargs=True)
    jr = est(r)[0]
    hook.remove()
    assert set(masks[0]) == {"full_attention", "sliding_attention"}
    assert all(isinstance(m, BlockMask) for m in masks[0].values()) and (jr - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's flex attention has no CPU backward)")
def test_reward_under_flex_attention_on_cuda():
    """On CUDA the whole reward runs under flex attention, both probe paths, tracking every block's projections
    (so the backward runs through flex attention): SDPA's reward (float32; heads of 16, flex's Triton kernels
    need at least 16 on older torch)."""
    model = tiny_model(dtype=torch.float32, head_dim=16).cuda()
    ids, am, resp = (t.cuda() for t in rollouts(B=3, seed=11))
    r = Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answer_ids=[[20, 21], [22], [23]])
    every = r"layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)$"
    ref = {p: _reward_outputs(model, r, p, every) for p in ("packed", "cache")}
    model.set_attn_implementation("flex_attention")
    for p in ("packed", "cache"):
        _assert_same_reward(_reward_outputs(model, r, p, every), ref[p], 1e-4, p)


def test_probe_masks_refuse_attention_without_custom_masks():
    """Flash-attention (and paged or hub kernels) take no custom 4-D mask: refused by name before any forward."""
    from l2t_ext.lm import custom_attention_mask

    model = tiny_model()
    ids, am, resp = rollouts(B=2, seed=12)
    ep = segment_episodes(ids, resp, [[M]])
    pack = AnswerLikelihoodJr(model, cue_ids=[11]).pack(Rollouts(ids, am, resp, ep, answer_ids=[[20], [21]]))
    tracker = FisherTracker(model, rank=4)
    mask = pack.mask[:, None]
    assert torch.equal(custom_attention_mask(model, pack.mask), mask)
    with pytest.raises(ValueError, match=r"mask must be a \(B, Q, KV\) bool"):
        custom_attention_mask(model, mask)
    model.config._attn_implementation = "flash_attention_2"
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="AnswerLikelihoodJr: the model's attention implementation 'flash_attention_2"):
        AnswerLikelihoodJr(model, cue_ids=[11])
    with pytest.raises(ValueError, match="episode_grads: packed=: the model's attention implementation"):
        tracker.episode_grads(ids, am, ep, packed=(pack.ids, pack.position_ids, pack.mask))
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP holds it
    with pytest.raises(ValueError, match="AnswerLikelihoodJr: the model's attention implementation"):
        AnswerLikelihoodJr(wrapper, cue_ids=[11])
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["full_attention", "linear_attention"]  # a layer kind no custom mask expresses
    with pytest.raises(ValueError, match=r"AnswerLikelihoodJr: the model has layers of type \['linear_attention'\]"):
        AnswerLikelihoodJr(model, cue_ids=[11])
    hook.remove()
    assert calls == []


@pytest.mark.parametrize("packed", [False, True])
def test_tracker_reads_nothing_back_while_its_forward_runs(packed, monkeypatch):
    """A host read waits for every kernel queued before it: the tracker reads back what it needs (which positions
    seed the backward) before it queues the decoder, and nothing from there until the backward is queued, so on a
    GPU the host keeps launching while the forward runs. (Reads in transformers' own code are not ours: its mask
    builder checks a 2-D mask at the top of the decoder, before any layer is queued.)"""
    model = tiny_model()
    ids, am, resp = rollouts(B=3, seed=8)
    ep = segment_episodes(ids, resp, [[M]])
    pack = AnswerLikelihoodJr(model, cue_ids=[11]).pack(Rollouts(ids, am, resp, ep, answer_ids=[[20], [21], [22]]))
    tracker = FisherTracker(model, rank=4)
    state, reads = {"on": False}, []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: state.update(on=True))
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: state.update(on=False) or grad(*a, **k))
    for name in ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _real=real, _name=name, **k: (
                                reads.append(_name) if state["on"] and "l2t_ext" in sys._getframe(1).f_code.co_filename
                                else None, _real(t, *a, **k))[1])
    g = tracker.episode_grads(ids, am, ep, packed=(pack.ids, pack.position_ids, pack.mask) if packed else None)
    hook.remove()
    g = g[0] if packed else g
    assert not state["on"] and g.abs().max() > 0 and reads == []


def test_packed_probes_read_nothing_back_per_row_or_boundary():
    """The probes are built on the device: a GPU would wait on every host read, so their number must not grow
    with rows x boundaries (the packing loop it replaced read back ~4 values per boundary and wrote one scalar per
    answer token)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("qwen2", dtype=torch.float32)
    ids, am, resp = rollouts(B=6, L=40, seed=3)
    r = Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answer_ids=[[20, 21, 22]] * 6)
    assert r.num_episodes >= 2
    jr = AnswerLikelihoodJr(model, cue_ids=[11, 12])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        jr(r)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_local_scalar_dense", 0) <= 3 and counts.get("aten::nonzero", 0) == 0


def test_callable_jr_and_dense_reward_end_to_end():
    model = tiny_model("qwen2", dtype=torch.float32)

    class Tok:  # decode-only stand-in tokenizer
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    seen = []

    def prm(prompts, prefixes, answers):
        seen.append(len(prefixes))
        return [min(1.0, 0.1 * len(p.split()) / 4) for p in prefixes]

    ids, am, resp = rollouts(B=3, seed=3)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answers=["1", "2", "3"])
    tracker = FisherTracker(model, rank=4)
    reward = DenseProcessReward(CallableJr(prm, Tok()), tracker, alpha=0.8, beta=0.6)
    out = reward(r)
    K = r.num_episodes
    assert out.r_prg.shape == (3, K) and torch.isfinite(out.r_prg).all()
    assert seen == [int(out.valid.sum()) + 3]
    v = out.valid
    assert torch.allclose(out.r_prg[v], (out.jr_after - out.jr_before)[v] - 0.6 * out.penalty_normalized[v])
    assert torch.allclose(out.penalty_normalized[v].mean(), torch.tensor(1.0), atol=1e-5)
    assert (out.r_prg[~v] == 0).all()
    total = out.total(torch.tensor([1.0, 0.0, 1.0]), alpha=0.8)
    assert torch.allclose(total, torch.tensor([1.0, 0.0, 1.0]) + 0.8 * out.r_prg.sum(1))
    # EMA Fisher variant runs and keeps a p x p Fisher
    ema = DenseProcessReward(CallableJr(prm, Tok()), tracker, fisher_decay=0.9)
    ema(r)
    out2 = ema(r)
    assert ema.fisher.shape == (tracker.p, tracker.p) and torch.isfinite(out2.r_prg).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense_reward_dtypes_with_answer_likelihood(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids, am, resp = rollouts(B=2, seed=4)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20, 21], [22]])
    reward = DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4))
    out = reward(r)
    assert torch.isfinite(out.r_prg).all() and torch.isfinite(out.penalty).all()
    assert ((out.jr_before >= 0) & (out.jr_before <= 1)).all()


def test_rollouts_validation():
    ids, am, resp = rollouts(B=2)
    with pytest.raises(ValueError, match="episode_ids must have"):
        Rollouts(ids, am, resp, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="answers has 1 entries for 2 rows"):
        Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]]), answers=["x"])
    with pytest.raises(ValueError, match="needs Rollouts.answer_ids"):
        AnswerLikelihoodJr(tiny_model(), cue_ids=[1])(Rollouts(ids, am, resp, segment_episodes(ids, resp, [[M]])))


def test_ops_project_matches_tracker_proxy():
    model = tiny_model("qwen2")
    tracker = FisherTracker(model, rank=3, backend="cpu")
    n = tracker.layer_names[0]
    U, V = tracker.bases[n]
    W = tracker.modules[0].weight.detach()
    assert torch.allclose(tracker.proxy()[:9], (U.T @ W @ V).flatten())
    assert torch.allclose(ops.project(W, U, V).flatten(), (U.T @ W @ V).flatten())


def test_forced_answer_jr_samples_and_grades():
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.reward import ForcedAnswerJr
    from l2t_ext.tasks import arith

    tok = arith.tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, num_layers=1).eval()
    texts = ["Q:1+2\n<think>1+2=3</think><think>check</think>A:3", "Q:4*2\n<think>4*2=8</think>A:8"]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, am = enc["input_ids"], enc["attention_mask"]
    resp = am.bool().clone()
    for b, t in enumerate(texts):
        n_prompt = len(tok.encode(t.split("\n")[0] + "\n", add_special_tokens=False))
        start = int(am[b].nonzero()[0])
        resp[b, :start + n_prompt] = False
    ep = segment_episodes(ids, resp, [tok.encode("</think>", add_special_tokens=False)])
    graded = []

    def verifier(completion, reference):
        graded.append((completion, reference))
        return arith.verify("</think>A:" + completion.strip().split("A:")[-1], reference)

    torch.manual_seed(0)
    jr, valid = ForcedAnswerJr(model, tok, verifier, m=3, max_new_tokens=4)(
        Rollouts(ids, am, resp, ep, answers=["3", "8"]))
    assert jr.shape == (2, 3) and valid.tolist() == [[True, True, True], [True, True, False]]
    assert ((jr >= 0) & (jr <= 1)).all() and (jr[~valid] == 0).all()
    assert len(graded) == 3 * int(valid.sum())  # m samples graded per valid boundary
    assert {r for _, r in graded} == {"3", "8"}


@pytest.mark.parametrize("kind", ["count", "tokens", "none"])
def test_penalty_ablations_replace_only_the_penalty(kind):
    """l2t_count / l2t_tokens / l2t_no_penalty: same gains, the penalty is 1, the episode's token count, or 0."""
    model = tiny_model("qwen2", dtype=torch.float32)
    ids, am, resp = rollouts(B=3, seed=3)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answers=["1", "2", "3"])
    jr = lambda r, cache=None: (torch.rand(3, r.num_episodes + 1), torch.ones(3, r.num_episodes + 1, dtype=torch.bool))  # noqa: E731
    torch.manual_seed(5)
    ref = DenseProcessReward(jr, FisherTracker(model, rank=4), beta=0.6)(r)
    torch.manual_seed(5)
    out = DenseProcessReward(jr, FisherTracker(model, rank=4), beta=0.6, penalty_kind=kind)(r)
    v = out.valid
    assert torch.equal(out.jr_gain, ref.jr_gain) and torch.equal(v, ref.valid)
    tokens = torch.stack([(ep == k).sum(1) for k in range(r.num_episodes)], 1).to(out.penalty.dtype)
    want = {"count": torch.ones_like(tokens), "tokens": tokens, "none": torch.zeros_like(tokens)}[kind]
    assert torch.equal(out.penalty[v], want[v]) and (out.penalty[~v] == 0).all()
    if kind != "none":
        assert torch.allclose(out.penalty_normalized[v].mean(), torch.tensor(1.0, dtype=out.penalty.dtype))
    assert torch.allclose(out.r_prg[v], out.jr_gain[v] - 0.6 * out.penalty_normalized[v])
    with pytest.raises(ValueError, match="penalty_kind must be one of"):
        DenseProcessReward(jr, FisherTracker(model, rank=4), penalty_kind="length")


def test_penalty_normalisations_batch_initial_none():
    """normalize="batch": Pbar = P / this batch's mean; "initial": / the first batch's mean, kept (and saved in
    state_dict); "none": Pbar = P."""
    model = tiny_model("qwen2", dtype=torch.float64)
    ids, am, resp = rollouts(B=3, seed=6)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answers=["1", "2", "3"])
    jr = lambda r, cache=None: (torch.rand(3, r.num_episodes + 1), torch.ones(3, r.num_episodes + 1, dtype=torch.bool))  # noqa: E731
    outs = {}
    for norm in ("batch", "initial", "none"):
        torch.manual_seed(1)
        rew = DenseProcessReward(jr, FisherTracker(model, rank=4, backend="cpu"), normalize=norm)
        first = rew(r)
        with torch.no_grad():  # a second batch with a different penalty scale: scale the tracked layer's weights
            rew.tracker.modules[0].weight.mul_(3.0)
        second = rew(r)
        with torch.no_grad():
            rew.tracker.modules[0].weight.div_(3.0)
        outs[norm] = (rew, first, second)
    _, f1, f2 = outs["batch"]
    v = f1.valid
    assert not torch.allclose(f1.penalty[v], f2.penalty[v])  # the scale really changed
    for out in (f1, f2):
        assert torch.allclose(out.penalty_normalized[v], out.penalty[v] / out.penalty[v].mean())
    rew, i1, i2 = outs["initial"]
    assert rew.scale == pytest.approx(float(i1.penalty[v].mean()), rel=1e-12)
    assert torch.allclose(i1.penalty_normalized[v], f1.penalty_normalized[v])
    assert torch.allclose(i2.penalty_normalized[v], i2.penalty[v] / rew.scale)
    assert rew.state_dict()["scale"] == rew.scale
    fresh = DenseProcessReward(jr, FisherTracker(model, rank=4), normalize="initial")
    fresh.load_state_dict(rew.state_dict())
    assert fresh.scale == rew.scale
    _, n1, n2 = outs["none"]
    assert torch.equal(n1.penalty_normalized, n1.penalty) and torch.equal(n2.penalty_normalized, n2.penalty)
    assert DenseProcessReward(jr, FisherTracker(model, rank=4), normalize=False).normalize == "none"
    with pytest.raises(ValueError, match="normalize must be one of"):
        DenseProcessReward(jr, FisherTracker(model, rank=4), normalize="ema")


def test_episode_anatomy_rows_match_the_reward_and_a_bruteforce_surprise():
    from l2t_ext.lm import position_ids_from_mask, token_logprobs
    from l2t_ext.reward import episode_anatomy, format_summary, summarize
    from l2t_ext.reward.anatomy import spearman

    model = tiny_model("qwen2", dtype=torch.float64)
    ids, am, resp = rollouts(B=3, seed=7)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20], [21, 22], [23]])
    out = DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4, backend="cpu"))(r)

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    rows = episode_anatomy(out, ep, ids, Tok(), kind=lambda t: "long" if len(t.split()) > 3 else "short",
                           outcome=torch.tensor([1.0, 0.0, 1.0]))
    assert len(rows) == int(out.valid.sum())
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    full = token_logprobs(logits, ids)  # full[b, t] = log p(ids[b, t + 1])
    for row in rows:
        b, k = row["rollout"], row["k"]
        pos = (ep[b] == k).nonzero().flatten()
        assert row["tokens"] == len(pos)
        want = -full[b, pos - 1].mean()
        assert row["surprise"] == pytest.approx(float(want), rel=1e-6)
        assert row["gain"] == pytest.approx(float(out.jr_gain[b, k]))
        assert row["penalty"] == pytest.approx(float(out.penalty[b, k]))
        assert row["penalty_normalized"] == pytest.approx(float(out.penalty_normalized[b, k]))
        assert row["text"] == " ".join(map(str, ids[b, pos].tolist())) and row["kind"] in ("long", "short")
        assert row["outcome"] == [1.0, 0.0, 1.0][b]
    s = summarize(rows)
    assert sum(g["n"] for g in s["groups"].values()) == len(rows)
    assert sum(g["share_of_penalty"] for g in s["groups"].values()) == pytest.approx(1.0)
    assert "| long |" in format_summary(s) or "| short |" in format_summary(s)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None
    with pytest.raises(ValueError, match="episode_ids"):
        episode_anatomy(out, ep[:2], ids)


@pytest.mark.parametrize("micro_batch,probes", [(1, "cache"), (2, "packed"), (4, "cache")])
def test_reward_micro_batches_equal_the_whole_batch(micro_batch, probes):
    """Scoring the rollouts ``micro_batch`` rows at a time (bounded logits memory) gives the whole-batch reward:
    the penalty still sees every episode, and micro-batches with fewer episodes than the batch pad Jr correctly.
    Row 3 has no marker (one episode) so some micro-batches have fewer episodes than the batch."""
    model = tiny_model("qwen2")
    ids, am, resp = rollouts(B=5, L=30, seed=9)
    ids[3][ids[3] == M] = 12
    ep = segment_episodes(ids, resp, [[M]])
    assert int(ep[3].max()) == 0 and int(ep.max()) >= 3
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20, 21], [22], [23, 24, 25], [26], [27]])

    def score(mb):
        return DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4, seed=1),
                                  micro_batch=mb, probes=probes)(r)

    whole, parts = score(None), score(micro_batch)
    assert torch.equal(whole.valid, parts.valid) and int(whole.valid.sum()) > 8
    for name in ("r_prg", "jr_before", "jr_after", "penalty", "penalty_normalized", "token_logprobs"):
        a, b = getattr(whole, name), getattr(parts, name)
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="micro_batch must be None or an int >= 1"):
        DenseProcessReward(AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4), micro_batch=0)


def test_forwards_that_nothing_continues_keep_no_kv_cache(monkeypatch):
    """Outside training with checkpointing a Hugging Face model keeps a KV cache unless told not to: two
    concatenations per layer and its memory, for nothing. Only the forward whose cache the probes continue keeps
    one (the tracker's return_cache=True and the probes' own continuation)."""
    from l2t_ext.lm import no_cache
    from l2t_ext.rl.policy import Policy

    made = []
    init = transformers.cache_utils.DynamicCache.__init__
    monkeypatch.setattr(transformers.cache_utils.DynamicCache, "__init__",
                        lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    model = tiny_model()
    ids, am, resp = rollouts(B=2, seed=13)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20], [21]])
    tracker, est = FisherTracker(model, rank=4), AnswerLikelihoodJr(model, cue_ids=[11])
    pack = est.pack(r)
    for run in (lambda: tracker.episode_grads(ids, am, ep), lambda: est(r),
                lambda: tracker.episode_grads(ids, am, ep, packed=(pack.ids, pack.position_ids, pack.mask)),
                lambda: AnswerLikelihoodJr(model, cue_ids=[11], return_token_logprobs=True)(r),
                lambda: FisherTracker(model, rank=4, logprobs="full").episode_grads(ids, am, ep),
                lambda: Policy(model)(ids, am), lambda: DenseProcessReward(est, tracker, probes="packed")(r)):
        run()
    assert made == []
    DenseProcessReward(est, tracker, probes="cache")(r)
    assert made == [1]  # the rollout's, which the probes continue
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP holds it
    assert no_cache(model) == no_cache(wrapper) == {"use_cache": False} and no_cache(torch.nn.Linear(2, 2)) == {}


# a sliding window of 6 positions on every layer (Mistral) or on the second of two (Qwen2's max_window_layers)
SLIDING = {"mistral": dict(sliding_window=6), "qwen2": dict(use_sliding_window=True, sliding_window=6,
                                                             max_window_layers=1)}


def _separate_forward_jr(model, ids, am, resp, ep, answers, cue):
    """Jr(s_k) by one forward of prefix_k + cue + answer per probe (the model's own masks), (B, K+1)."""
    from l2t_ext.reward import boundary_positions

    pos, valid = boundary_positions(ep, resp)
    want = torch.zeros(valid.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        start = int(am[b].nonzero()[0])
        for k in range(valid.shape[1]):
            if valid[b, k]:
                prefix = ids[b, start:int(pos[b, k]) + 1].tolist()
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([prefix + cue + answers[b]])).logits, -1)[0]
                n0 = len(prefix) + len(cue)
                want[b, k] = torch.exp(torch.stack([lp[n0 + j - 1, a] for j, a in enumerate(answers[b])]).mean())
    return want, valid


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_probe_masks_keep_the_sliding_window(kind, impl):
    """Sliding-window layers see only the last 6 positions: the probes' own mask keeps that window by position
    (one mask where every layer slides, one per layer type where both kinds exist), so packed Jr equals separate
    forwards of each probe's sequence (float64; they were off by ~1e-3 with the full causal mask), in the
    estimator's forward and behind the rollout in the tracker's, whose gradients stay the rollout forward's."""
    from l2t_ext.lm import sliding_window

    model = tiny_model(kind, **SLIDING[kind])
    model.set_attn_implementation(impl)
    assert sliding_window(model) == (6, kind == "qwen2")
    # left padding once (transformers' own float64 eager mask gives its padding rows NaN: test_probe_masks_under_eager)
    ids, am, resp = rollouts(B=3, L=30, seed=14, left_pad=kind == "qwen2" and impl == "sdpa")
    ep = segment_episodes(ids, resp, [[M]])
    answers, cue = [[20, 21], [22], [23, 24, 25]], [11, 12]
    r = Rollouts(ids, am, resp, ep, answer_ids=answers)
    want, valid = _separate_forward_jr(model, ids, am, resp, ep, answers, cue)
    assert int(valid.sum()) >= 6
    est, tracker = AnswerLikelihoodJr(model, cue_ids=cue), FisherTracker(model, rank=4)
    tol = 1e-10 if impl == "sdpa" else 1e-6  # eager takes its softmax in float32
    jr, v = est(r)
    assert torch.equal(v, valid) and (jr - want).abs().max() <= tol
    # through the model's own forward too (its full logits; the path of models whose head is not split off)
    assert (AnswerLikelihoodJr(model, cue_ids=cue, return_token_logprobs=True)(r)[0] - want).abs().max() <= tol
    g, lp = tracker.episode_grads(ids, am, ep, return_logprobs=True)
    pack = est.pack(r)
    g2, lp2, hidden = tracker.episode_grads(ids, am, ep, return_logprobs=True,
                                            packed=(pack.ids, pack.position_ids, pack.mask))
    assert g.abs().max() > 0 and (g2 - g).abs().max() <= tol * g.abs().max()
    real = _real_successor(am)
    assert (lp2 - lp)[real].abs().max() <= tol
    assert (est.score(hidden, pack)[0] - want).abs().max() <= tol


def test_sliding_window_models_never_continue_a_kv_cache():
    """A sliding layer's KV cache keeps only the window's last tokens: the probes never continue it. The reward's
    "auto" packs them on the CPU too (one decoder pass), "cache" is refused, and a cache handed to the estimator
    is not used."""
    model = tiny_model("mistral", **SLIDING["mistral"])
    ids, am, resp = rollouts(B=3, L=30, seed=15, left_pad=False)
    ep = segment_episodes(ids, resp, [[M]])
    r = Rollouts(ids, am, resp, ep, answer_ids=[[20, 21], [22], [23]])
    est, tracker = AnswerLikelihoodJr(model, cue_ids=[11]), FisherTracker(model, rank=4)
    assert not est.continues_cache and AnswerLikelihoodJr(tiny_model(), cue_ids=[11]).continues_cache
    want, _ = _separate_forward_jr(model, ids, am, resp, ep, [[20, 21], [22], [23]], [11])
    _, cache = tracker.episode_grads(ids, am, ep, return_cache=True)
    assert (est(r, cache=cache)[0] - want).abs().max() <= 1e-10
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    out = DenseProcessReward(est, tracker)(r)
    hook.remove()
    assert calls == [1] and (out.jr_before - torch.where(out.valid, want[:, :-1], 0)).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="probes='cache' needs an AnswerLikelihoodJr .* no sliding-window layers"):
        DenseProcessReward(est, tracker, probes="cache")


# ------------------------------------------------------------------------------------------- RoPE that switches
# longrope with the switch at position 16 (Phi-3/Phi-4's is 4096): short factors below it, long ones past it
LONGROPE = dict(original_max_position_embeddings=16, max_position_embeddings=64,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.3, 1.7, 2.0],
                                     long_factor=[3.0, 5.0, 9.0, 17.0]))


def test_rope_switch_reads_the_config():
    """Where the RoPE frequencies switch with the forward's longest position: longrope at its original context,
    dynamic NTK one short of max_position_embeddings (transformers resets it only below that length); from
    transformers 5's rope_parameters (also per layer type) and the older rope_scaling; None for position-only
    RoPE."""
    from types import SimpleNamespace

    from l2t_ext.lm import rope_switch

    assert rope_switch(tiny_model("phi3", **LONGROPE)) == (16, True)
    dynamic = dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0))
    assert rope_switch(tiny_model("llama", **dynamic)) == (15, False)
    linear = dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0))
    assert rope_switch(tiny_model()) is None and rope_switch(tiny_model("llama", **linear)) is None
    assert rope_switch(torch.nn.Linear(2, 2)) is None

    def model(**cfg):
        return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64, **cfg))

    assert rope_switch(model(rope_scaling={"type": "longrope"}, original_max_position_embeddings=8)) == (8, True)
    per_type = {"full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 8},
                "sliding_attention": {"rope_type": "default"}}
    assert rope_switch(model(rope_parameters=per_type)) == (8, True)
    per_type["sliding_attention"] = {"rope_type": "longrope", "original_max_position_embeddings": 12}
    assert rope_switch(model(rope_parameters=per_type)) == (8, False)  # two switches: not one regime past 8


def _probe_lengths(am, resp, ep, answers, cue):
    """(B, K+1) length of each probe's separate sequence, prefix_k + cue + answer (0 where invalid)."""
    from l2t_ext.reward import boundary_positions

    pos, valid = boundary_positions(ep, resp)
    ctx = am.cumsum(1).gather(1, pos.clamp(min=0))  # real tokens through the boundary
    lens = ctx + len(cue) + torch.tensor([len(a) for a in answers])[:, None]
    return torch.where(valid, lens, 0)


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("L, cue, window", [(30, [11, 12], None), (14, [11, 12, 13, 14], None),
                                            (16, [11, 12, 13, 14], None), (30, [11, 12], 6)],
                         ids=["rollout-past", "rollout-before", "rollout-ends-at-switch", "rollout-past-sliding"])
def test_probes_straddling_a_longrope_switch(L, cue, window, left_pad):
    """Longrope (Phi-3, Phi-4-mini-reasoning) rotates every token of a forward by its long factors once one position
    reaches the original context (16 here). A probe packed behind a longer rollout was rotated by them, while its
    separate forward uses the short ones: Jr was off by up to 2e-5 in float64. Now each forward is capped (tokens
    past the cap moved to position 0): the probes before the switch take the forward capped there, the later ones
    the pack's positions, and the rollout's outputs come from the forward matching its own length (the rollout
    ends past the switch, or before it while a probe reaches past it). Jr equals separate forwards through both
    heads; the rollout's log-probs and the reward's gradients stay the plain forward's; in the reward the
    rollout's group rides in the tracker's forward and the other takes one more; a batch below the switch takes
    one forward; a KV cache is never continued. Phi-3's sliding window (6 here) keeps its mask by position."""
    from l2t_ext.lm import position_ids_from_mask, token_logprobs

    model = tiny_model("phi3", sliding_window=window, **LONGROPE)
    ids, am, resp = rollouts(B=3, L=L, seed=14, left_pad=left_pad)
    ep = segment_episodes(ids, resp, [[M]])
    answers = [[20, 21], [22], [23, 24, 25]]
    r = Rollouts(ids, am, resp, ep, answer_ids=answers)
    want, valid = _separate_forward_jr(model, ids, am, resp, ep, answers, cue)
    lens = _probe_lengths(am, resp, ep, answers, cue)
    assert bool((valid & (lens <= 16)).any()) and bool((lens > 16).any())  # probes on both sides of the switch
    assert (int(am.sum(1).max()) > 16) == (L > 16)
    est = AnswerLikelihoodJr(model, cue_ids=cue)
    assert (est(r)[0] - want).abs().max() <= 1e-12
    full = AnswerLikelihoodJr(model, cue_ids=cue, return_token_logprobs=True)
    assert (full(r)[0] - want).abs().max() <= 1e-12
    both = _real_successor(am)
    with torch.no_grad():
        plain = token_logprobs(model(ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits, ids)
    assert (full.last_token_logprobs - plain)[both].abs().max() <= 1e-12
    assert not est.continues_cache
    with pytest.raises(ValueError, match="probes='cache' needs .* no RoPE that switches with length"):
        DenseProcessReward(est, FisherTracker(model, rank=4), probes="cache")
    ref = DenseProcessReward(lambda _: (want, valid), FisherTracker(model, rank=4))(r)  # the tracker's plain forward
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = DenseProcessReward(est, FisherTracker(model, rank=4), probes="packed")(r)
        assert len(calls) == 2  # the tracker's forward (with the rollout's group of probes), the other group
        assert torch.equal(out.valid, ref.valid) and (out.r_prg - ref.r_prg).abs().max() <= 1e-10
        assert (out.penalty - ref.penalty).abs().max() <= 1e-10 * ref.penalty.abs().max()
        assert (out.token_logprobs - ref.token_logprobs)[both].abs().max() <= 1e-12
        short = [x[:, :13 - len(cue)] for x in (ids, am, resp, ep)]  # the pack (answers <= 3 tokens) stays below 16
        want_short, _ = _separate_forward_jr(model, *short, answers, cue)
        calls.clear()
        out = DenseProcessReward(est, FisherTracker(model, rank=4))(Rollouts(*short, answer_ids=answers))
        assert calls == [1] and (out.jr_after - torch.where(out.valid, want_short[:, 1:], 0)).abs().max() <= 1e-12
    finally:
        hook.remove()


def test_probes_under_dynamic_rope_scaling():
    """Dynamic NTK scaling stretches the frequencies for the forward's longest sequence past max_position_embeddings
    (16 here). The probes that end before the switch are exact (their own forward); the later ones share the pack's
    longest frequencies, which transformers' own for one of them depend on the forwards before it: warned. In the
    reward the rollout's forward is capped at its own longest position, so its log-probs and gradients are those of
    a plain forward from the same state."""
    model = tiny_model("llama", max_position_embeddings=16,
                       rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0))
    ids, am, resp = rollouts(B=3, L=30, seed=14)
    ep = segment_episodes(ids, resp, [[M]])
    answers, cue = [[20, 21], [22], [23, 24, 25]], [11, 12]
    r = Rollouts(ids, am, resp, ep, answer_ids=answers)
    want, valid = _separate_forward_jr(model, ids, am, resp, ep, answers, cue)
    early = valid & (_probe_lengths(am, resp, ep, answers, cue) <= 15)
    assert int(early.sum()) >= 3 and bool((valid & ~early).any())
    est = AnswerLikelihoodJr(model, cue_ids=cue)
    with pytest.warns(UserWarning, match="RoPE frequencies change with the sequence length past position 15"):
        jr, v = est(r)
    assert torch.equal(v, valid) and (jr - want)[early].abs().max() <= 1e-12

    def reset():  # a forward shorter than the switch: transformers drops its stretched frequencies
        with torch.no_grad():
            model(ids[:, :4])

    reset()
    ref = DenseProcessReward(lambda _: (want, valid), FisherTracker(model, rank=4))(r)  # the tracker's plain forward
    reset()
    with pytest.warns(UserWarning, match="RoPE frequencies change"):
        out = DenseProcessReward(est, FisherTracker(model, rank=4))(r)
    both = _real_successor(am)
    assert (out.token_logprobs - ref.token_logprobs)[both].abs().max() <= 1e-12
    assert (out.penalty - ref.penalty).abs().max() <= 1e-10 * ref.penalty.abs().max()
    assert (out.jr_before - ref.jr_before)[early[:, :-1]].abs().max() <= 1e-12
