"""L2T inside TRL's GRPOTrainer (CPU): the per-token advantages handed to TRL's loss equal TRL's outcome
advantage + alpha x our loop's ``process_token_advantages`` on the same rollouts (with the loop's position
alignment), and two training steps run, log the l2t/* metrics and change the weights."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from l2t_ext.integrations.trl import L2TConfig, L2TGRPOTrainer  # noqa: E402
from l2t_ext.lm import tiny_qwen2  # noqa: E402
from l2t_ext.reward import (  # noqa: E402
    AnswerLikelihoodJr,
    DenseProcessReward,
    FisherTracker,
    Rollouts,
    segment_episodes,  # noqa: E402
)
from l2t_ext.rl.advantages import process_token_advantages  # noqa: E402
from l2t_ext.tasks import arith  # noqa: E402


def _outcome(completions, answer, **kw):
    return [arith.verify(c, a) for c, a in zip(completions, answer)]


def _trainer(tmp_path, cls=L2TGRPOTrainer, steps=2):
    tok = arith.tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=0)
    rng = random.Random(0)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in arith.dataset(16, seed=0, tiers=(1,))]
    rng.shuffle(rows)
    args = L2TConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=steps,
                     max_completion_length=24, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, seed=0, l2t_markers=["</think>"], l2t_answer_cue="A:",
                     l2t_answer_prefix="", l2t_rank=4, temperature=1.0, beta=0.0)
    return cls(model=model, reward_funcs=_outcome, args=args, train_dataset=datasets.Dataset.from_list(rows),
               processing_class=tok)


def test_advantages_handed_to_trl_equal_the_loops(tmp_path, monkeypatch):
    seen = []
    base = trl.GRPOTrainer._generate_and_score_completions

    def record_base(self, inputs):
        out = base(self, inputs)
        seen.append({"outcome": out["advantages"].clone()})
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record_base)

    class Recording(L2TGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            seen[-1].update(out=out, inputs=inputs)
            return out

    t = _trainer(tmp_path, Recording, steps=1)
    t.train()
    rec = seen[0]
    out, inputs = rec["out"], rec["inputs"]
    P = out["prompt_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    resp = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1).bool()
    tok = t.processing_class
    ep = segment_episodes(ids, resp, ["</think>"], tokenizer=tok)
    assert (ep.max(1).values >= 0).all()
    # the reward as the loop builds it, on the weights of that step (a fresh tracker with the same seed; the
    # optimizer step has happened since, so restore the initial weights first)
    init = tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=0).eval()
    reward = DenseProcessReward(AnswerLikelihoodJr(init, tok.encode("A:", add_special_tokens=False), tok.pad_token_id),
                                FisherTracker(init, rank=4, seed=0))
    parts = reward(Rollouts(ids, am, resp, ep, answer_ids=[tok.encode(x["answer"], add_special_tokens=False)
                                                           for x in inputs]))
    ep_pred = torch.full_like(ep, -1)
    ep_pred[:, :-1] = ep[:, 1:]  # the loop's alignment: position t predicts token t + 1
    loop = process_token_advantages(parts.r_prg.float(), parts.valid, ep_pred, 4)
    want = rec["outcome"][:, None] * out["completion_mask"] + 0.8 * loop[:, P - 1:ids.shape[1] - 1]
    torch.testing.assert_close(out["advantages"], want, rtol=1e-5, atol=1e-6)
    assert out["advantages"].shape == out["completion_ids"].shape
    assert (loop != 0).any(), "no process advantage at all: the test cannot fail"


def test_two_steps_change_the_weights_and_log_l2t_metrics(tmp_path):
    t = _trainer(tmp_path)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train()
    after = t.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logged = {k for row in t.state.log_history for k in row}
    assert {"l2t/episodes_mean", "l2t/penalty_mean", "l2t/jr_gain_mean", "l2t/single_episode_share"} <= logged


TWO_PROCESS_SCRIPT = """
import os, sys, torch, datasets
from l2t_ext.integrations.trl import L2TConfig, L2TGRPOTrainer
from l2t_ext.lm import tiny_qwen2
from l2t_ext.reward import DenseProcessReward
from l2t_ext.rl.builders import exit_process
from l2t_ext.tasks import arith

seen = []
call = DenseProcessReward.__call__
def recording(self, r):
    out = call(self, r)
    seen.append(out.penalty_normalized[out.valid].detach())
    return out
DenseProcessReward.__call__ = recording

def outcome(completions, answer, **kw):
    return [arith.verify(c, a) for c, a in zip(completions, answer)]

out = sys.argv[1]
tok = arith.tokenizer()
model = tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=0)
rows = [{"prompt": p.prompt, "answer": p.answer} for p in arith.dataset(16, seed=0, tiers=(1,))]
args = L2TConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_steps=1,
                 max_completion_length=16, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                 use_cpu=True, bf16=False, seed=0, l2t_markers=["</think>"], l2t_answer_cue="A:",
                 l2t_answer_prefix="", l2t_rank=4, beta=0.0, l2t_probes="packed")
t = L2TGRPOTrainer(model=model, reward_funcs=outcome, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=tok)
t.train()
flat = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
rank = t.accelerator.process_index
torch.save(flat, os.path.join(out, f"params_r{rank}_of{t.accelerator.num_processes}.pt"))
torch.save({"pbar": seen, "gathers": t.l2t_reward.gather is not None}, os.path.join(out, f"pbar_r{rank}.pt"))
exit_process()
"""


def test_two_cpu_processes_keep_identical_replicas(tmp_path):
    """Two CPU processes started by ``accelerate launch`` with the shipped DDP config (gloo): one step, the
    episode rewards gathered across processes for group normalisation, one Fisher over both processes' episodes,
    replicas identical afterwards."""
    import os
    import subprocess
    import sys

    (tmp_path / "train.py").write_text(TWO_PROCESS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "examples" / "accelerate" / "ddp.yaml"), "--mixed_precision", "no",
                          str(tmp_path / "train.py"), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"params_r{r}_of2.pt") for r in (0, 1))
    init = torch.cat([p.detach().reshape(-1) for p in tiny_qwen2(arith.tokenizer(), hidden_size=32, num_layers=1,
                                                                   seed=0).parameters()])
    assert torch.equal(a, b) and not torch.equal(a, init)
    # one Fisher and one normalisation over both processes' episodes: Pbar averages 1 over the union only
    parts = [torch.load(tmp_path / f"pbar_r{r}.pt") for r in (0, 1)]
    assert all(p["gathers"] for p in parts)
    for step in range(len(parts[0]["pbar"])):
        mine = [p["pbar"][step] for p in parts]
        assert all(m.numel() for m in mine), "a process scored no episode (the check below needs both)"
        assert torch.cat(mine).mean().item() == pytest.approx(1.0, abs=1e-5)
        assert max(abs(m.mean().item() - 1.0) for m in mine) > 1e-3, "per-process normalisation (not gathered)"


def test_config_and_version_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="args must be an L2TConfig"):
        L2TGRPOTrainer(model=None, reward_funcs=_outcome,
                       args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))
    from l2t_ext.integrations import trl as integration

    monkeypatch.setattr(trl, "__version__", "1.99.0")
    with pytest.raises(ImportError, match="supports trl >= 1.16, < 1.17 .* found trl 1.99.0"):
        integration._check_trl()


def test_readme_recipe_runs_as_printed_under_accelerate_launch(tmp_path):
    """The README's TRL recipe is ``examples/trl_grpo_l2t.py`` verbatim; ``accelerate launch`` with the shipped DDP
    config starts two CPU processes that train the tiny model from a local directory (the ``from_pretrained``
    path) and save it. (On CPU accelerate runs the FSDP config as MULTI_CPU data parallel, so the FSDP file is
    checked to parse only; see the README.)"""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    script = (REPO / "examples" / "trl_grpo_l2t.py").read_text()
    readme = (REPO / "README.md").read_text()
    body = script.split('"""', 2)[2].lstrip("\n")  # the code after the docstring
    assert body in readme, "README's TRL recipe differs from examples/trl_grpo_l2t.py"
    fsdp = yaml.safe_load((REPO / "examples" / "accelerate" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2

    tok = arith.tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, num_layers=2, seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "examples" / "accelerate" / "ddp.yaml"), "--mixed_precision", "no",
                          str(REPO / "examples" / "trl_grpo_l2t.py"), str(tmp_path / "tiny"), "--max_steps", "2",
                          "--cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "process 0 of 2: done" in res.stdout and "process 1 of 2: done" in res.stdout, res.stdout[-2000:]
    assert "l2t/penalty_mean" in res.stdout + res.stderr
    trained = load_file(tmp_path / "l2t_trl_out" / "model.safetensors")
    init = load_file(tmp_path / "tiny" / "model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init), "the recipe did not change the weights"
