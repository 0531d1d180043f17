"""The training loop on CPU: short runs for every method, exact resume, atomic checkpoints, NaN stops, and
clear errors for a tokenizer without the episode marker."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from l2t_ext.rl import checkpoint  # noqa: E402
from l2t_ext.rl.config import preset  # noqa: E402

METRIC_KEYS = ("step", "accuracy", "reward_mean", "response_tokens_mean", "episodes_mean", "loss", "kl",
               "clip_frac", "penalty_mean", "jr_gain_mean", "time_s", "time_rollout_s", "time_score_s", "time_update_s")


def small_cfg(tmp_path, name, **kw):
    # L2T_TEST_DEVICE=cuda: the GPU check runs the every-method test on the GPU (bf16 autocast)
    base = dict(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=40, sft_steps=30, sft_batch=32,
                eval_problems=0, save_every=2, hidden_size=64, num_layers=2, rank=4, refresh_every=2,
                out=str(tmp_path / name), tiers=(1, 2), device=os.environ.get("L2T_TEST_DEVICE", "cpu"))
    base.update(kw)
    return preset("tiny-arith").override([f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                          for k, v in base.items()])


@pytest.mark.parametrize("method,ppo", [("grpo", False), ("length_penalty", False), ("length_penalty_gated", False),
                                        ("l2t", False), ("l2t", True), ("l2t_no_penalty", False),
                                        ("l2t_count", False), ("l2t_tokens", False)])
def test_three_step_run_every_method(tmp_path, method, ppo):
    from l2t_ext.rl.trainer import Trainer

    cfg = small_cfg(tmp_path, f"{method}{ppo}", method=method, ppo=ppo, kl_coef=0.01 if ppo else 0.0)
    rows = Trainer(cfg).train()
    assert len(rows) == 3
    lines = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        for k in METRIC_KEYS:
            assert k in r and math.isfinite(r[k]), (k, r)
        phases = [r["time_rollout_s"], r["time_score_s"], r["time_update_s"]]
        assert min(phases) > 0 and sum(phases) <= r["time_s"], r  # disjoint parts of the step's wall time
    if method.startswith("l2t") and method != "l2t_no_penalty":
        assert any(r["penalty_mean"] > 0 for r in lines)
    assert os.path.isdir(checkpoint.resolve(cfg.out))


@pytest.mark.parametrize("ppo", [False, True])
def test_l2t_inside_a_bf16_autocast_region(tmp_path, monkeypatch, ppo):
    # on a GPU the trainer scores and updates a float32 model inside a bf16 autocast region, so float32
    # activations meet bf16 GEMM outputs in the reward's kernels; CPU autocast runs those code paths here
    from l2t_ext.rl import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.Trainer, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    cfg = small_cfg(tmp_path, f"autocast{ppo}", method="l2t", ppo=ppo, steps=2, kl_coef=0.01 if ppo else 0.0)
    rows = trainer_mod.Trainer(cfg).train()
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in METRIC_KEYS)
    assert any(r["penalty_mean"] > 0 for r in rows)



def test_l2t_on_a_longrope_model_from_a_local_directory(tmp_path, monkeypatch):
    """A local Phi-3 model (``from_pretrained``) whose longrope switches at position 32, inside the rollouts'
    length: in the training loop the probes on each side of the switch take forwards of their own (counted), the
    tracker follows Phi-3's fused gate_up_proj, and every metric is finite."""
    import transformers

    from l2t_ext.reward import AnswerLikelihoodJr
    from l2t_ext.rl.trainer import Trainer
    from l2t_ext.tasks import arith

    tok = arith.tokenizer()
    cfg = transformers.Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  original_max_position_embeddings=32, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8,
                                                       long_factor=[4.0] * 8),
                                  bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    groups, plain = [], AnswerLikelihoodJr.position_groups

    def counted(self, *args, **kwargs):
        groups.append(plain(self, *args, **kwargs))
        return groups[-1]

    monkeypatch.setattr(AnswerLikelihoodJr, "position_groups", counted)
    trainer = Trainer(small_cfg(tmp_path, "phi3_l2t", method="l2t", model=str(tmp_path / "phi3"), steps=2))
    assert [n.split(".")[-1] for n in trainer.reward.tracker.layer_names] == ["o_proj", "gate_up_proj", "down_proj"]
    rows = trainer.train()
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in METRIC_KEYS)
    assert any(len(g) == 2 for g in groups)  # a batch straddled the switch: one more forward for its other side


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["length_penalty", "l2t"])
def test_resume_equals_uninterrupted(tmp_path, method):
    from l2t_ext.rl.trainer import Trainer

    full = Trainer(small_cfg(tmp_path, "full", method=method, steps=4, save_every=2, refresh_every=3))
    full_rows = full.train()
    part = Trainer(small_cfg(tmp_path, "part", method=method, steps=4, save_every=2, refresh_every=3))
    part.train(stop_at=2)  # stop after 2 steps, as a crash after the step-2 checkpoint would
    part.close()
    mid = _weights(part.model)
    resumed = Trainer(small_cfg(tmp_path, "part", method=method, steps=4, save_every=2, refresh_every=3),
                      resume=str(tmp_path / "part"))
    assert resumed.step_idx == 2
    rows = resumed.train()
    a, b = _weights(full.model), _weights(resumed.model)
    assert any(not torch.equal(mid[k], b[k]) for k in b)  # steps 3-4 really changed the weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["accuracy"] for r in full_rows[2:]] == [r["accuracy"] for r in rows]
    assert [r["loss"] for r in full_rows[2:]] == [r["loss"] for r in rows]


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from l2t_ext.rl.trainer import Trainer

    t = Trainer(small_cfg(tmp_path, "crash", method="grpo", steps=2, save_every=1))
    t.train()
    good = checkpoint.resolve(t.cfg.out)
    t.step_idx = 5

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    assert checkpoint.resolve(t.cfg.out) == good
    state = checkpoint.load_state(good)
    assert state["step"] == 2


def test_nan_loss_stops_with_message(tmp_path, monkeypatch):
    import l2t_ext.rl.trainer as trainer_mod
    from l2t_ext.rl.trainer import Trainer

    t = Trainer(small_cfg(tmp_path, "nan", method="grpo", steps=3, save_every=1, sft_steps=0))
    t.train(stop_at=1)
    good = checkpoint.resolve(t.cfg.out)

    def nan_loss(logp, *a, **k):
        return logp.sum() * float("nan"), {"clip_frac": 0.0, "kl": 0.0}

    monkeypatch.setattr(trainer_mod, "ppo_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        t.train()
    assert checkpoint.resolve(t.cfg.out) == good  # the last good checkpoint stays the latest



def test_tokenizer_without_marker_says_how_to_fix():
    from l2t_ext.lm import char_tokenizer, marker_ids

    with pytest.raises(ValueError, match="tokenizer.add_tokens"):
        marker_ids(char_tokenizer(chars="0123456789"), ["<reflect>"])


def test_chat_template_and_instruction_shape_the_prompt():
    from l2t_ext.lm import render_prompt
    from l2t_ext.tasks import arith

    tok = arith.tokenizer()
    assert render_prompt(tok, "3+4=", "") == "3+4="  # no template, no instruction: the task's own prompt
    assert render_prompt(tok, "3+4=", "Think.") == "Think.\n\n3+4="
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_prompt(tok, "3+4=\n", "Think.") == "<system>Think.<user>3+4=<assistant>"
    assert render_prompt(tok, "3+4=", "Think.", chat_template="none") == "Think.\n\n3+4="


def test_file_task_defaults_follow_the_task_and_markers(tmp_path):
    from l2t_ext.rl.builders import resolve_task_defaults
    from l2t_ext.tasks import load_task

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cfg = resolve_task_defaults(preset("tiny-arith").override([f"task={f}", "verifier=auto", "answer_cue=auto",
                                                               "markers=[\"paragraph\"]"]), load_task(str(f)))
    assert cfg.verifier == "math" and cfg.answer_cue == "The answer is"
    assert "blank line" in cfg.instruction and "The answer is" in cfg.instruction
    arith_cfg = resolve_task_defaults(preset("tiny-arith").override(["verifier=auto", "answer_cue=auto"]),
                                      load_task("arith"))
    assert (arith_cfg.verifier, arith_cfg.answer_cue, arith_cfg.instruction) == ("arith", "A:", "")


def test_single_episode_rollouts_warn_once(tmp_path):
    from l2t_ext.rl.trainer import Trainer

    # no warm start: the random model rarely writes </think>, so most rollouts are one episode
    t = Trainer(small_cfg(tmp_path, "health", method="l2t", steps=2, sft_steps=0, max_new_tokens=12))
    with pytest.warns(UserWarning, match=r"step 1: \d+% of the rollouts have a single episode .*--markers paragraph"):
        rows = t.train()
    assert all(r["single_episode_share"] > 0.5 for r in rows)
    for r in rows:  # the share is the fraction of rollouts without a marker
        assert 1.0 <= r["episodes_mean"] <= 1.0 + (1 - r["single_episode_share"]) * (t.cfg.max_episodes - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.cfg.steps = 3
        t.train()  # once per run
