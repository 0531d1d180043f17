"""Where the L2T process reward goes on the demo task: one ``Trainer.collect`` from a warm-started demo model (the
loop's own rollouts, dense reward and episode normalisation, no update), broken down by
episode kind (a single ``step``, a redundant ``check``, a ``merged`` multi-step episode; ``final`` = the
episode that produces the answer's value) and by rollout length. Used to investigate the demo's token
savings (reward scales, normalisation, beta); prints a table and writes JSON.

    python benchmarks/demo_reward_anatomy.py --warm /tmp/l2t_sweep/warm_<key>.pt [--beta 0.6] [--prompts 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch

from l2t_ext.demo.run import rl_config
from l2t_ext.rl import advantages as adv_lib
from l2t_ext.rl.trainer import Trainer
from l2t_ext.tasks import arith


def kind(text: str) -> str:
    body = text.replace(arith.THINK, "").replace(arith.END_THINK, "")
    if body.startswith("check"):
        return "check"
    n_ops = sum(body.split("=")[0][1:].count(c) for c in "+-*")
    return "step" if n_ops <= 1 else "merged"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm", required=True, help="a state_dict saved by benchmarks/demo_sweep.py")
    p.add_argument("--beta", type=float, default=0.6)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=112)
    p.add_argument("--norm", default="std", choices=("std", "mean_std"), help="episode-reward normalisation")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    S = {"rl_steps": 1, "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens}
    cfg = rl_config(S, "l2t", 0, "/tmp/l2t_anatomy", [f"beta={args.beta}", f"alpha={args.alpha}",
                                                       f"process_norm={args.norm}"])
    trainer = Trainer(cfg, init_state=torch.load(args.warm))
    tok = trainer.tok
    import random

    rng = random.Random(0)
    probs = [arith.generate_problem(rng, rng.choice((1, 2, 3, 4))) for _ in range(args.prompts)]
    batch = trainer.collect([{"prompt": q.prompt, "answer": q.answer, "tier": q.tier} for q in probs])
    G, out, r_out, ep = args.group, batch.reward, batch.outcome.cpu(), batch.episode_ids
    # the loop's group-normalised episode rewards and their suffix sums (what the tokens of episode k get)
    norm, suffix = adv_lib.normalized_episode_rewards(out.r_prg, out.valid, G, norm=args.norm)
    by_kind = collections.defaultdict(lambda: collections.defaultdict(list))
    style = []  # per rollout: terse (has a merged episode), verbose (has a check), concise
    for b in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[b]
        n_ep = int(out.valid[b].sum())
        kinds = [kind(tok.decode(ids[ep[b] == k].tolist(), skip_special_tokens=False)) for k in range(n_ep)]
        style.append("terse" if "merged" in kinds else "verbose" if "check" in kinds else "concise")
        for k, kd in enumerate(kinds):
            rows = [kd] + (["final"] if k == n_ep - 1 else []) + [f"{kd}|{'correct' if r_out[b] else 'wrong'}"]
            for key in rows:
                for name, t in (("gain", out.jr_gain), ("Pbar", out.penalty_normalized), ("r_prg", out.r_prg),
                                ("norm", norm), ("suffix", suffix)):
                    by_kind[key][name].append(float(t[b, k]))
    # per rollout: total L2T advantage of its first response token vs length, within groups, correct only
    grpo_adv = adv_lib.group_normalize(r_out, G)
    first_adv = grpo_adv + args.alpha * suffix[:, 0]
    lengths = batch.response_lengths
    corr = []
    for g in range(len(probs)):
        sl = slice(g * G, (g + 1) * G)
        ok = r_out[sl] > 0
        if ok.sum() >= 3 and lengths[sl][ok].std() > 0:
            x, y = lengths[sl][ok], first_adv[sl][ok]
            corr.append(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    print(f"norm={args.norm} beta={args.beta} alpha={args.alpha}: {len(batch.completions)} rollouts, "
          f"accuracy {float(r_out.mean()):.3f}, tokens {float(lengths.mean()):.1f}")
    print(f"{'episode kind':22s} {'n':>5s} {'gain':>7s} {'Pbar':>6s} {'r_prg':>7s} {'norm':>6s} {'suffix':>7s}")
    table = {}
    for key in sorted(by_kind):
        d = by_kind[key]
        table[key] = {name: statistics.fmean(v) for name, v in d.items()} | {"n": len(d["gain"])}
        t = table[key]
        print(f"{key:22s} {t['n']:5d} {t['gain']:7.3f} {t['Pbar']:6.2f} {t['r_prg']:7.3f} {t['norm']:6.2f} "
              f"{t['suffix']:7.2f}")
    # the relative advantage (vs the group's mean over correct rollouts) per style, correct rollouts only
    rel = collections.defaultdict(list)
    toks = collections.defaultdict(list)
    sums = collections.defaultdict(list)
    for g in range(len(probs)):
        idx = [i for i in range(g * G, (g + 1) * G) if r_out[i] > 0]
        if len(idx) < 2:
            continue
        mu = statistics.fmean(float(first_adv[i]) for i in idx)
        for i in idx:
            rel[style[i]].append(float(first_adv[i]) - mu)
            toks[style[i]].append(float(lengths[i]))
            sums[style[i]].append((float(out.jr_gain[i].sum()), float(out.penalty_normalized[i].sum()),
                                   float(out.jr_after[i][out.valid[i]][-1])))
    by_style = {k: {"n": len(v), "rel_adv": statistics.fmean(v), "tokens": statistics.fmean(toks[k]),
                    "sum_gain": statistics.fmean(x[0] for x in sums[k]),
                    "sum_Pbar": statistics.fmean(x[1] for x in sums[k]),
                    "jr_end": statistics.fmean(x[2] for x in sums[k])} for k, v in sorted(rel.items())}
    for k, v in by_style.items():
        print(f"correct {k:8s} rollouts: n {v['n']:4d}, tokens {v['tokens']:5.1f}, sum gain {v['sum_gain']:.3f} "
              f"(Jr at the end {v['jr_end']:.3f}), sum Pbar {v['sum_Pbar']:.2f}, first-token advantage vs group "
              f"{v['rel_adv']:+.3f}")
    mc = statistics.fmean(corr) if corr else float("nan")
    print(f"within-group corr(length, first-token advantage) over correct rollouts: {mc:+.3f} ({len(corr)} groups)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "by_kind": table, "by_style": by_style, "corr_length_adv": mc}, f, indent=1)


if __name__ == "__main__":
    main()
