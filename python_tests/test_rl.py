"""The RL loop: advantages against hand-computed values, the PPO loss gradient against finite differences,
config handling, short CPU training runs for every method, exact resume, atomic checkpoints, evaluation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from l2t_ext.rl import advantages as A  # noqa: E402
from l2t_ext.rl import checkpoint  # noqa: E402
from l2t_ext.rl.config import TrainConfig, preset, resolve_config  # noqa: E402
from l2t_ext.rl.loss import k3_kl, ppo_loss  # noqa: E402

METRIC_KEYS = ("step", "accuracy", "reward_mean", "response_tokens_mean", "episodes_mean", "loss", "kl",
               "clip_frac", "penalty_mean", "jr_gain_mean", "time_s")


# ------------------------------------------------------------------------------------------- advantages
def test_group_normalize_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    a = A.group_normalize(r, 3, eps=0.0)
    # group 1: mean 1/3, std sqrt(2)/3; group 2: mean 2/3, same std
    s = math.sqrt(2) / 3
    want = torch.tensor([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s])
    assert torch.allclose(a, want, atol=1e-6)
    assert torch.equal(A.group_normalize(torch.ones(4), 2), torch.zeros(4))  # a tied group gives no signal


def test_length_penalized_hand_computed():
    r = torch.tensor([1.0, 1.0])
    lengths = torch.tensor([10.0, 30.0])  # group mean 20, std 10 -> z = -1, +1
    assert torch.allclose(A.length_penalized(r, lengths, 2, coef=0.5), torch.tensor([1.5, 0.5]), atol=1e-6)


def test_process_token_advantages_hand_computed():
    # one group of 2 rollouts; rollout 0 has 2 valid episodes, rollout 1 has 1
    r_prg = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # valid values 1, 3, 2: mean 2, population std sqrt(2/3)
    s = math.sqrt(2 / 3)
    ep = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 0, -1, -1]])
    for norm, n in (("mean_std", {(0, 0): -1 / s, (0, 1): 1 / s, (1, 0): 0.0}),
                    ("std", {(0, 0): 1 / s, (0, 1): 3 / s, (1, 0): 2 / s})):
        adv = A.process_token_advantages(r_prg, valid, ep, group_size=2, eps=0.0, norm=norm)
        want = torch.tensor([[0, n[0, 0] + n[0, 1], n[0, 0] + n[0, 1], n[0, 1], 0],
                             [0, n[1, 0], n[1, 0], 0, 0]])
        assert torch.allclose(adv, want.float(), atol=1e-6), norm
    with pytest.raises(ValueError, match="norm must be"):
        A.process_token_advantages(r_prg, valid, ep, group_size=2, norm="z")


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.4
    d1 = 0.0 + g * 0.4 - 0.2
    d0 = 0.0 + g * 0.2 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = A.gae(rewards, values, mask, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]), atol=1e-6)


# ------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_ppo_loss_gradient_matches_finite_differences(agg):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3

    def f(x):
        return ppo_loss(x, old, adv, mask, 0.2, 0.28, agg, ref, kl_coef=0.05)[0]

    f(logp).backward()
    num = torch.zeros_like(logp)
    h = 1e-6
    for i in range(3):
        for j in range(5):
            e = torch.zeros_like(logp)
            e[i, j] = h
            num[i, j] = (f(logp.detach() + e) - f(logp.detach() - e)) / (2 * h)
    assert torch.allclose(logp.grad, num, atol=1e-6)


def test_k3_kl_properties():
    x = torch.randn(100)
    assert (k3_kl(x, x) == 0).all()
    assert (k3_kl(x, x + torch.randn(100)) >= 0).all()


def test_ppo_loss_clip_stats():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    loss, st = ppo_loss(logp, old, adv, torch.ones(1, 4, dtype=torch.bool), 0.2, 0.28)
    # clipped: ratio 1.5 with A>0 (above 1.28) and ratio 0.5 with A<0 (below 0.8)
    assert st["clip_frac"] == 0.5
    assert math.isclose(float(loss), -(1.0 + 1.28 - 0.8 + 1.1) / 4, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------- config
def test_config_errors_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*valid keys: model, task"):
        TrainConfig.from_dict({"modle": "tiny"})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dpo")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="rollout_backend must be 'auto', 'hf' or 'vllm'"):
        TrainConfig(rollout_backend="sglang")
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        TrainConfig(vllm_gpu_memory_utilization=1.5)
    f = tmp_path / "c.yaml"
    f.write_text("method: grpo\nsteps: 7\nlr: 1\ntiers: [1, 2]\n")
    cfg = resolve_config(yaml_path=str(f))
    assert cfg.method == "grpo" and cfg.steps == 7 and cfg.lr == 1.0 and cfg.tiers == [1, 2]
    # later layers win: preset < YAML < flags
    cfg = resolve_config("tiny-arith", str(f), flags={"steps": 9})
    assert (cfg.steps, cfg.method, cfg.rank) == (9, "grpo", 8)
    with pytest.raises(ValueError, match=r"c.yaml: config key 'steps' must be int, got 'abc'"):
        f.write_text("steps: abc\n")
        resolve_config(yaml_path=str(f))
    with pytest.raises(ValueError, match=r"command line: config key 'beta' must be float"):
        resolve_config(flags={"beta": True})
    assert cfg.override(["beta=0.3", "ppo=true"]).beta == 0.3
    assert TrainConfig().lr == 1e-6 and TrainConfig().alpha == 0.8 and TrainConfig().beta == 0.6


# ------------------------------------------------------------------------------------------- runs
def small_cfg(tmp_path, name, **kw):
    base = dict(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=40, sft_steps=30, sft_batch=32,
                eval_problems=0, save_every=2, hidden_size=64, num_layers=2, rank=4, refresh_every=2,
                out=str(tmp_path / name), tiers=(1, 2))
    base.update(kw)
    return preset("tiny-arith").override([f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                          for k, v in base.items()])


@pytest.mark.parametrize("method,ppo", [("grpo", False), ("length_penalty", False), ("l2t", False),
                                        ("l2t", True)])
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
    if method == "l2t":
        assert any(r["penalty_mean"] > 0 for r in lines)
    assert os.path.isdir(checkpoint.resolve(cfg.out))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["length_penalty", "l2t"])
def test_resume_equals_uninterrupted(tmp_path, method):
    from l2t_ext.rl.trainer import Trainer

    full = Trainer(small_cfg(tmp_path, "full", method=method, steps=4, save_every=2, refresh_every=3))
    full_rows = full.train()
    part = Trainer(small_cfg(tmp_path, "part", method=method, steps=4, save_every=2, refresh_every=3))
    part.train(stop_at=2)  # stop after 2 steps, as a crash after the step-2 checkpoint would
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


def test_train_help_lists_every_config_field_and_flags_override_preset(capsys):
    from l2t_ext.cli import _train_config, build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    missing = [k for k in TrainConfig.keys() if f"--{k}" not in help_text]
    assert not missing, missing
    args = build_parser().parse_args(["train", "--preset", "tiny-arith", "--max-new-tokens", "17", "--ppo",
                                      "--no_bf16", "--tiers", "1", "3"])
    cfg, ckpt = _train_config(args)
    assert (cfg.max_new_tokens, cfg.ppo, cfg.bf16, cfg.tiers, cfg.rank, ckpt) == (17, True, False, [1, 3], 8, None)
    # flags not given keep the preset's values, not the dataclass defaults
    assert _train_config(build_parser().parse_args(["train", "--preset", "tiny-arith"]))[0].rank == 8


def test_tokenizer_without_marker_says_how_to_fix():
    from l2t_ext.lm import char_tokenizer, marker_ids

    with pytest.raises(ValueError, match="tokenizer.add_tokens"):
        marker_ids(char_tokenizer(chars="0123456789"), ["<reflect>"])


def test_cli_train_and_eval(tmp_path):
    from l2t_ext.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--preset", "tiny-arith", "--method", "grpo", "--steps", "1", "--out", str(out),
                 "--sft_steps", "5", "--eval_problems", "4", "--hidden_size", "32", "--num_layers", "1",
                 "--max_new_tokens", "24"]) == 0
    assert (out / "eval.json").exists() and (out / "accuracy_vs_budget.png").exists()
    assert main(["eval", "--model", str(out), "--eval_problems", "4", "--eval_samples", "2",
                 "--max-new-tokens", "24", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    r = next(iter(res.values()))
    for key in ("overall", "per_tier", "accuracy_vs_budget", "acc_by_depth", "tokens_by_depth"):
        assert key in r
    assert (tmp_path / "ev" / "acc_tokens_by_depth.png").exists()
