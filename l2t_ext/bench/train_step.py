"""End-to-end training steps at a real model's shapes, without its weights: where a step's time and memory go.

A randomly initialised policy with Qwen2-0.5B's shapes (151,936-token vocabulary, 24 layers, hidden 896; or a
tiny one for CPU checks) is saved as a local Hugging Face directory (model + tokenizer) and trained for a few
steps with ``l2t train`` (the real ``from_pretrained`` path, bf16 autocast on a GPU): GRPO, then L2T, on the same
prompts and seed. Reported per step, from each run's metrics.jsonl: the step's wall time and its phases
(generation, scoring, update), peak GPU memory, episodes per response; and the L2T reward's share of the step.

Random weights sample the whole vocabulary, so the tokenizer is the arithmetic task's character tokenizer padded
with placeholder tokens ``<uN>`` to the model's vocabulary; the episode marker is a regex on those placeholders
(``<u\\d*7>``: about one token in ten), which gives many episodes per response, as a model that writes steps
would. Accuracy is zero (random weights): the run measures cost, not learning.

Usage: ``python benchmarks/bench_train_step.py [--shape qwen2-0.5b|tiny] [--device cuda|cpu] [--steps 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
MARKER = r"re:<u\d*7>"
METHODS = ("grpo", "l2t")


def save_model(shape: str, path: str, seed: int = 0) -> str:
    """A random-init Qwen2 of ``shape`` and its padded character tokenizer, saved to ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from l2t_ext.lm.models import char_tokenizer
    from l2t_ext.tasks import arith

    dims = SHAPES[shape]
    tok = char_tokenizer(arith.CHARS, vocab_size=dims["vocab_size"])
    cfg = Qwen2Config(**dims, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(model_dir: str, method: str, out: str, device: str, steps: int, max_new_tokens: int) -> list[dict]:
    """``l2t train`` in a fresh process (as a user runs it); returns its metrics rows."""
    flags = dict(model=model_dir, task="arith", method=method, steps=steps, prompts_per_step=4, group_size=4,
                 max_new_tokens=max_new_tokens, markers=MARKER, device=device, sft_steps=0, eval_problems=0,
                 save_every=10**6, save_optimizer="false", lr=1e-6, micro_batch=16, out=out, seed=0)
    cmd = [sys.executable, "-m", "l2t_ext.cli", "train"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"l2t train --method {method} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(shape: str, device: str, steps: int, max_new_tokens: int, workdir: str) -> dict:
    from l2t_ext.bench import _harness as H

    model_dir = save_model(shape, os.path.join(workdir, "model"))
    runs = {m: train(model_dir, m, os.path.join(workdir, m), device, steps, max_new_tokens) for m in METHODS}
    last = {m: rows[-1] for m, rows in runs.items()}  # step 1 pays one-time costs (kernel compiles, autotuning)
    res = {"machine": H.machine_info(device), "shape": shape, "model": SHAPES[shape], "steps": steps,
           "max_new_tokens": max_new_tokens, "marker": MARKER, "runs": runs,
           "reward_share_of_step": last["l2t"]["time_score_s"] / last["l2t"]["time_s"],
           "reward_over_grpo_score": last["l2t"]["time_score_s"] / last["grpo"]["time_score_s"],
           "step_time_ratio_l2t_over_grpo": last["l2t"]["time_s"] / last["grpo"]["time_s"]}
    if "peak_mem_gb" in last["l2t"]:
        res["extra_peak_mem_frac"] = last["l2t"]["peak_mem_gb"] / last["grpo"]["peak_mem_gb"] - 1.0
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Training steps ({res['shape']} shapes, random weights) on {m.get('gpu') or m['cpu']}, torch "
             f"{m['torch']}; 4 prompts x 4 samples, up to {res['max_new_tokens']} new tokens, marker "
             f"`{res['marker']}`", "",
             "| method | step | s | rollout s | score s | update s | peak GB | tokens | episodes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, rows in res["runs"].items():
        for r in rows:
            peak = f"{r['peak_mem_gb']:.2f}" if "peak_mem_gb" in r else "-"
            lines.append(f"| {method} | {r['step']} | {r['time_s']:.2f} | {r['time_rollout_s']:.2f} | "
                         f"{r['time_score_s']:.2f} | {r['time_update_s']:.2f} | {peak} | "
                         f"{r['response_tokens_mean']:.0f} | {r['episodes_mean']:.1f} |")
    lines.append(f"\nLast step: the L2T reward takes {100 * res['reward_share_of_step']:.1f}% of L2T's step "
                 f"({res['reward_over_grpo_score']:.2f}x GRPO's old-log-prob forward it replaces); L2T's step is "
                 f"{res['step_time_ratio_l2t_over_grpo']:.2f}x GRPO's")
    if "extra_peak_mem_frac" in res:
        lines.append(f"\nPeak memory of L2T's step over GRPO's: {100 * res['extra_peak_mem_frac']:+.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is present")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--workdir", default=None, help="model and run directories (default: a temporary one)")
    p.add_argument("--json", default="bench_train_step.json")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.shape, device, args.steps, args.max_new_tokens, args.workdir or tmp)
    print(markdown(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0
