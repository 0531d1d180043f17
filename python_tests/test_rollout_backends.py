"""Rollout backends: ``pack`` reproduces the HF ``generate`` batch layout exactly; the vLLM backend's wiring
(token-id prompts, <eos> handling, weight sync after every update, backend selection and its errors) is
tested against a stand-in ``vllm`` module that runs HF generation on its own copy of the weights, loaded
from the snapshot directory with ``from_pretrained``. The real vLLM engine is not exercised here (no GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

from l2t_ext import lm  # noqa: E402
from l2t_ext.lm import tiny_qwen2  # noqa: E402
from l2t_ext.rl import rollout  # noqa: E402
from l2t_ext.tasks import arith  # noqa: E402

PROMPTS = ["Q:3+4*2\n", "Q:7-1*3+2-5\n", "Q:1+1\n"]


def _model(seed=0):
    tok = arith.tokenizer()
    return tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=seed).eval(), tok


def test_pack_reproduces_hf_generate_layout():
    model, tok = _model()
    torch.manual_seed(0)
    rb = lm.generate(model, tok, PROMPTS, 3, 20)
    eos = tok.eos_token_id
    pids, rids = [], []
    for i in range(rb.input_ids.shape[0]):
        row, am, rm = rb.input_ids[i], rb.attention_mask[i], rb.response_mask[i]
        pids.append(row[:rb.prompt_len][am[:rb.prompt_len].bool()].tolist())
        rids.append(row[rm].tolist())
    assert any(r[-1] == eos for r in rids)
    pk = lm.pack(tok, pids, rids, "cpu")
    assert pk.prompt_len == rb.prompt_len and pk.completions == rb.completions
    for name in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(pk, name), getattr(rb, name)), name
    # garbage after <eos> is cut
    pk2 = lm.pack(tok, pids[:1], [rids[0][:3] + [eos, 7, 8]], "cpu")
    assert pk2.response_mask.sum() == 4 and pk2.completions[0] == tok.decode(rids[0][:3])


class _FakeOutput:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


def _fake_vllm(record: dict):
    """A stand-in for the parts of vLLM the backend calls: LLM(model=dir, ...), generate(token prompts,
    SamplingParams) -> [RequestOutput(outputs=[CompletionOutput(token_ids, finish_reason)])], apply_model."""
    from transformers import AutoModelForCausalLM

    class SamplingParams:
        def __init__(self, n, temperature, top_p, max_tokens, stop_token_ids, detokenize):
            self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
            self.stop_token_ids = stop_token_ids

    class LLM:
        def __init__(self, model, tokenizer, dtype, seed, skip_tokenizer_init, gpu_memory_utilization,
                     tensor_parallel_size):
            record["init"] = dict(model=model, dtype=dtype, skip_tokenizer_init=skip_tokenizer_init)
            self.m = AutoModelForCausalLM.from_pretrained(model).eval()

            def load_weights(weights):  # vLLM models take (HF name, tensor) pairs
                sd = self.m.state_dict()
                for n, w in weights:
                    sd[n].copy_(w)
                record["loads"] = record.get("loads", 0) + 1
            self.m.load_weights = load_weights
            record["engine"] = self.m

        def apply_model(self, fn):
            return [fn(self.m)]

        def generate(self, prompts, sp, use_tqdm=True):
            eos = sp.stop_token_ids[0]
            outs = []
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]] * sp.n)
                with torch.no_grad():
                    g = self.m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                        temperature=sp.temperature, top_p=sp.top_p, top_k=0,
                                        max_new_tokens=sp.max_tokens, eos_token_id=eos, pad_token_id=eos)
                comps = []
                for j, row in enumerate(g[:, ids.shape[1]:].tolist()):
                    if eos in row:  # alternate: with and without the stop token in token_ids (both occur)
                        row = row[:row.index(eos) + (j % 2)]
                        comps.append(_FakeOutput(row, "stop"))
                    else:
                        comps.append(_FakeOutput(row, "length"))
                outs.append(types.SimpleNamespace(outputs=comps))
            return outs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, __version__="fake")


def test_vllm_backend_layout_and_weight_sync(tmp_path, monkeypatch):
    record = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(record))
    model, tok = _model()
    eng = rollout.VLLMRollouts(model, tok, str(tmp_path), seed=0)
    assert record["init"]["skip_tokenizer_init"] and record["init"]["model"].startswith(str(tmp_path))
    torch.manual_seed(0)
    rb = eng.generate(PROMPTS, 4, 30)
    assert rb.input_ids.shape[0] == 12 and len(rb.completions) == 12
    eos = tok.eos_token_id
    for i in range(12):  # a response ends at its first <eos> (kept) or at the budget
        r = rb.input_ids[i][rb.response_mask[i]].tolist()
        assert eos not in r[:-1] and (r[-1] == eos or len(r) == 30)
        assert rb.completions[i] == tok.decode([t for t in r if t != eos])
    assert torch.equal(rb.attention_mask[:, rb.prompt_len:].bool(), rb.response_mask[:, rb.prompt_len:])
    # weights: untouched until marked stale, then pushed once before the next generation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    eng.generate(PROMPTS[:1], 2, 5)
    assert eng.syncs == 0
    eng.mark_stale()
    eng.generate(PROMPTS[:1], 2, 5)
    assert eng.syncs == 1 and record["loads"] == 1
    eng_sd = record["engine"].state_dict()
    for n, p in model.state_dict().items():
        assert torch.equal(eng_sd[n], p), n


def test_backend_selection_and_errors(tmp_path, monkeypatch):
    model, tok = _model()
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    assert isinstance(rollout.make_rollouts("auto", model, tok, str(tmp_path), 0), rollout.HFRollouts)
    with pytest.raises(RuntimeError, match="rollout_backend=vllm: vllm is not importable"):
        rollout.make_rollouts("vllm", model, tok, str(tmp_path), 0)
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}))
    with pytest.raises(RuntimeError, match="training device is cpu"):
        rollout.make_rollouts("vllm", model, tok, str(tmp_path), 0)
    assert isinstance(rollout.make_rollouts("auto", model, tok, str(tmp_path), 0), rollout.HFRollouts)
    with pytest.raises(ValueError, match="rollout_backend must be"):
        rollout.make_rollouts("sglang", model, tok, str(tmp_path), 0)


def test_trainer_syncs_vllm_engine_after_every_update(tmp_path, monkeypatch):
    """The loop with the vLLM backend (forced on CPU): each step after the first starts with one sync, and the
    engine then holds exactly the trained weights."""
    from l2t_ext.rl.config import preset
    from l2t_ext.rl.trainer import Trainer

    record = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(record))
    monkeypatch.setattr(rollout, "vllm_unavailable_reason", lambda *a, **k: None)
    cfg = preset("tiny-arith").override(["method=l2t", "steps=3", "sft_steps=0", "hidden_size=32", "num_layers=1",
                                         "prompts_per_step=2", "group_size=4", "max_new_tokens=24", "rank=4",
                                         "rollout_backend=vllm", "eval_problems=0", f"out={tmp_path / 'run'}",
                                         "save_every=100"])
    t = Trainer(cfg)
    assert isinstance(t.rollouts, rollout.VLLMRollouts)
    rows = t.train()
    assert len(rows) == 3 and t.rollouts.syncs == 2  # before steps 2 and 3
    t.rollouts.sync()
    eng_sd = record["engine"].state_dict()
    assert all(torch.equal(eng_sd[n], p) for n, p in t.model.state_dict().items())
