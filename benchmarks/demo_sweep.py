"""The demo's investigation harness: one warm start (cached by its settings), then RL variants of the demo
experiment with their evaluation, so settings (trace mix, beta, alpha, RL steps, lr, ...) can be compared
without paying the warm start again. Writes one JSON per run and prints a table.

    python benchmarks/demo_sweep.py --tag base --methods grpo,l2t --rl-steps 40
    python benchmarks/demo_sweep.py --tag beta0.3 --methods l2t --set beta=0.3
    python benchmarks/demo_sweep.py --check-prob 1.0 --mix concise=0.25,verbose=0.6,terse=0.15 --max-new-tokens 112

Not a timed benchmark: wall times are printed for budgeting the demo only.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time

import torch

from l2t_ext.demo.run import HIDDEN, LAYERS, _problems, rl_config
from l2t_ext.eval import evaluate
from l2t_ext.lm import tiny_qwen2
from l2t_ext.lm.sft import warm_start
from l2t_ext.rl.trainer import Trainer
from l2t_ext.tasks import arith


def _mix(s: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in s.split(","))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="run")
    p.add_argument("--mix", default="concise=0.4,verbose=0.4,terse=0.2")
    p.add_argument("--check-prob", type=float, default=arith.VERBOSE_CHECK_PROB)
    p.add_argument("--check-form", default=arith.VERBOSE_CHECK_FORM, choices=arith.CHECK_FORMS)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--methods", default="grpo,length_penalty,l2t")
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--eval-per-tier", type=int, default=40)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], help="TrainConfig override key=value (repeatable)")
    p.add_argument("--cache", default="/tmp/l2t_sweep")
    args = p.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    torch.manual_seed(0)
    tok = arith.tokenizer()
    mix = _mix(args.mix)
    key = hashlib.sha1(json.dumps([mix, args.check_prob, args.sft_steps, HIDDEN, LAYERS]
                                + ([args.check_form] if args.check_form != "copy" else [])).encode()).hexdigest()[:10]
    path = os.path.join(args.cache, f"warm_{key}.pt")
    model = tiny_qwen2(tok, hidden_size=HIDDEN, num_layers=LAYERS, seed=0)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        t0 = time.time()
        pairs = lambda rng, n: arith.sft_pairs(rng, n, (1, 2, 3, 4), mix, args.check_prob, args.check_form)
        warm_start(model, tok, pairs, args.sft_steps, 3e-3, 64, seed=0, device="cpu")
        torch.save(model.state_dict(), path)
        print(f"warm start {args.sft_steps} steps: {time.time() - t0:.0f} s -> {path}", flush=True)
    warm = copy.deepcopy(model.state_dict())
    eval_set = _problems(args.eval_per_tier, seed=0)
    ev_kw = dict(n_samples=args.eval_samples, max_new_tokens=args.max_new_tokens, budgets=(), max_depth=0)
    rows = {}
    torch.manual_seed(1000)
    t0 = time.time()
    rows["warm"] = [evaluate(model, tok, eval_set, arith.verify, arith.extract_answer, **ev_kw)]
    print(f"warm eval {time.time() - t0:.0f} s", flush=True)
    S = {"rl_steps": args.rl_steps, "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens}
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            cfg = rl_config(S, method, seed, os.path.join(args.cache, "runs", args.tag, f"{method}_s{seed}"), args.set)
            t0 = time.time()
            trainer = Trainer(cfg, init_state=warm)
            curve = trainer.train()
            t_rl = time.time() - t0
            torch.manual_seed(1000 + seed)
            ev = evaluate(trainer.model, tok, eval_set, arith.verify, arith.extract_answer, **ev_kw)
            ev["rl_s"], ev["curve"] = t_rl, [{k: r[k] for k in ("accuracy", "response_tokens_mean")} for r in curve]
            rows.setdefault(method, []).append(ev)
            print(f"{method} s{seed}: rl {t_rl:.0f} s, eval {time.time() - t0 - t_rl:.0f} s", flush=True)
    print(f"\n[{args.tag}] mix={mix} check_prob={args.check_prob} check_form={args.check_form} "
          f"rl_steps={args.rl_steps} set={args.set}")
    print(f"{'method':16s} {'acc':>6s} {'tokens':>7s}  per tier acc/tokens")
    for m, evs in rows.items():
        acc = sum(e["overall"]["pass@1"] for e in evs) / len(evs)
        tk = sum(e["overall"]["response_tokens"] for e in evs) / len(evs)
        tiers = "  ".join(f"{t}:{sum(e['per_tier'][t]['pass@1'] for e in evs) / len(evs):.2f}/"
                          f"{sum(e['per_tier'][t]['response_tokens'] for e in evs) / len(evs):.1f}"
                          for t in sorted(evs[0]["per_tier"], key=int))
        print(f"{m:16s} {acc:6.3f} {tk:7.1f}  {tiers}")
    with open(os.path.join(args.cache, f"sweep_{args.tag}.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
