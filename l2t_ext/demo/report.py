"""``report.md`` of ``l2t demo`` from its ``results.json``: setup, the premise check, results with spread and
95% intervals, paired comparisons, the ablations' attribution, the reward anatomy and a plain reading."""

from __future__ import annotations

import json
import os


def _ms(s: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if not s or s["mean"] is None:
        return "-"
    out = f"{scale * s['mean']:.{digits}f}"
    if s.get("n", 1) > 1:
        out += f" ± {scale * s['spread']:.{digits}f}"
        if s.get("ci95") is not None:
            out += f" [{scale * (s['mean'] - s['ci95']):.{digits}f}, {scale * (s['mean'] + s['ci95']):.{digits}f}]"
    return out


def render(res: dict, plots: list[str]) -> str:
    cfg, S, M = res["config"], res["config"]["settings"], res["methods"]
    mc = res["machine"]
    sp = res["splits"]
    L = ["# l2t demo: does L2T cut over-thinking?", "",
         f"Setting `{res['setting']}`; machine: {mc['cpu']} ({mc['cores']} cores, AVX-512 "
         f"{'yes' if mc['avx512'] else 'no'}), torch {mc['torch']}; {cfg['jobs']} job(s) x {cfg['threads']} "
         f"thread(s); wall time {res['wall_s']:.0f} s.", "",
         "Numbers are mean ± spread (sample standard deviation over warm starts x RL seeds) [95% t-interval of the "
         "mean, over the warm starts' means when there are several: runs from one warm start are not independent] "
         "where there is more than one run.", "",
         "## Setup", "",
         f"- Task `overthink`: arithmetic chains mod 10, tier t = t + 1 steps. Warm-start traces: "
         f"{cfg['task']['warm_mix']} of styles; a step is wrong with probability {cfg['task']['step_error']} by "
         f"tier; after a wrong step a check (`chk`) always fixes it, after a right one a check follows with "
         f"probability {cfg['task']['check_prob']}; a distractor (`by`) follows a step with probability "
         f"{cfg['task']['distract_prob']} and corrupts the chain with probability {cfg['task']['corrupt_prob']}.",
         f"- Splits: {sp['rule']}. Reported: {sp['test_problems']} {sp['evaluated_split']} problems x "
         f"{sp['samples_per_problem']} samples, the same for every run. Warm starts {sp['warm_start_seeds']} x RL "
         f"seeds {sp['rl_seeds']}.",
         f"- Model: tiny Qwen2 (hidden {cfg['model']['hidden_size']}, {cfg['model']['num_layers']} layers), "
         "character tokenizer.",
         f"- Warm start until the validation accuracy per tier reaches {cfg['target']} (checked every "
         f"{S['chunk']} steps, at most {S['sft_max']}): " + "; ".join(
             f"warm start {w['ws']} stopped at {w['sft_steps']} steps ("
             f"{'target reached' if w['reached_target'] else 'target not reached'})" for w in res["warm_starts"]) + ".",
         f"- RL: {S['rl_steps']} steps x {S['prompts']} prompts x {S['group']} rollouts, at most "
         f"{S['max_new_tokens']} new tokens, per method and run. Tuned on validation: {cfg['tuned']}.",
         "- Methods: " + "; ".join(f"`{n}` = {m} {' '.join(x).format(**cfg['tuned']) if x else ''}".rstrip()
                                   for n, (m, x) in cfg["grid"].items()) + ".", ""]
    T = {"warm start": res["warm_start"]["tokens_by_depth"]}
    if "grpo" in M:
        T["grpo"] = M["grpo"]["tokens_by_depth"]
    L += _premise(res["premise"], T)
    L += _results_tables(res)
    L += ["", "## Reward anatomy of the warm start's rollouts (L2T, tuned beta)", ""]
    from l2t_ext.reward.anatomy import format_summary

    for a in res["anatomy"]:
        L += [f"Warm start {a['ws']}:", "", format_summary(a["summary"]), ""]
    L += ["Plots: " + ", ".join(f"![{p}]({p})" for p in plots), "", "## Reading", ""]
    L += reading(res)
    return "\n".join(L) + "\n"


def _results_tables(res: dict) -> list[str]:
    """The results table, the per-tier table and the paired comparisons."""
    M, sp = res["methods"], res["splits"]
    L = ["## Results (" + sp["evaluated_split"] + " split)", "",
          "| method | accuracy | response tokens | tokens per correct | episodes | checks | distractors |",
          "|---|---|---|---|---|---|---|"]
    for name, r in [("warm start", res["warm_start"])] + list(M.items()):
        k = r["episode_kinds"]
        L.append(f"| {name} | {_ms(r['accuracy'])} | {_ms(r['response_tokens'], 1)} | "
                 f"{_ms(r['tokens_per_correct'], 1)} | {_ms(r['episodes'], 2)} | {_ms(k.get('check'), 2)} | "
                 f"{_ms(k.get('distractor'), 2)} |")
    tiers = sorted(res["warm_start"]["per_tier"], key=int)
    L += ["", "Per tier (accuracy / response tokens):", "",
          "| method | " + " | ".join(f"tier {t}" for t in tiers) + " |", "|---|" + "---|" * len(tiers)]
    for name, r in [("warm start", res["warm_start"])] + list(M.items()):
        L.append(f"| {name} | " + " | ".join(f"{_ms(r['per_tier'][t]['accuracy'], 2)} / "
                                             f"{_ms(r['per_tier'][t]['response_tokens'], 1)}" for t in tiers) + " |")
    L += ["", "## Paired comparisons (same warm start, seed and problems)", "",
          "| comparison | token saving of l2t | accuracy difference (points) |", "|---|---|---|"]
    for k, v in res["paired"].items():
        if v:
            L.append(f"| {k} | {_ms(v['token_saving'], 1, 100)}% | {_ms(v['accuracy_diff_points'], 1)} |")
    return L


def _premise(P: dict, T: dict) -> list[str]:
    """The premise verdict per policy with its Acc(k) and T(k) curves (``T``: policy -> tokens_by_depth)."""
    L = ["## The premise: Acc(k) and T(k) per tier", "",
         "Acc(k): accuracy when each response is cut after its k-th episode and the answer is forced; T(k): the "
         "response tokens up to that point (responses with fewer episodes keep their own answer and length). The "
         "premise holds for a policy when Acc(k) peaks and then falls (by more than 2 points) on every tier, with "
         "easier tiers peaking no later than harder ones.", ""]
    for name, p in P.items():
        L.append(f"**{name}**: premise {'holds' if p['holds'] else 'does not hold'} (easy tiers peak earlier: "
                 f"{'yes' if p['easy_peak_earlier'] else 'no'}).")
        L += ["", "| tier | Acc(k), k = 1.. | T(k) | peak k | peak | last | falls |", "|---|---|---|---|---|---|---|"]
        for t, v in p["per_tier"].items():
            ks = sorted(v["acc_by_depth"], key=int)
            curve = " ".join(f"{v['acc_by_depth'][k]:.2f}" for k in ks)
            tk = " ".join(f"{T[name][t][k]:.0f}" for k in ks) if name in T else "-"
            L.append(f"| {t} | {curve} | {tk} | {v['peak_k']} | {v['peak_acc']:.3f} | {v['last_acc']:.3f} | "
                     f"{'yes' if v['falls'] else 'no'} |")
        L.append("")
    return L


def plot_anatomy(res: dict, out_dir: str) -> str | None:
    """A bar chart of the warm start's reward anatomy by episode kind (mean gain, Pbar, surprise, tokens; one bar
    group per warm start's mean); returns the PNG's path (None without anatomy)."""
    if not res.get("anatomy"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for a in res["anatomy"] for k in a["summary"]["groups"]})
    fields = (("gain", "information gain"), ("penalty_normalized", "Pbar"), ("surprise", "surprise (NLL)"),
              ("tokens", "tokens"))
    fig, axes = plt.subplots(1, len(fields), figsize=(3.2 * len(fields), 3.2))
    for ax, (f, title) in zip(axes, fields):
        vals = [[a["summary"]["groups"][k][f] for a in res["anatomy"] if k in a["summary"]["groups"]] for k in kinds]
        means = [sum(v) / len(v) for v in vals]
        ax.bar(kinds, means, color="tab:blue")
        for i, v in enumerate(vals):  # one dot per warm start
            ax.scatter([i] * len(v), v, color="black", s=8, zorder=3)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("L2T reward anatomy of the warm start's rollouts, by episode kind")
    fig.tight_layout()
    path = os.path.join(out_dir, "reward_anatomy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rerender(out_dir: str) -> str:
    """Write ``report.md`` (and the anatomy plot) again from ``out_dir/results.json``; returns the report path."""
    with open(os.path.join(out_dir, "results.json")) as f:
        res = json.load(f)
    plots = [p for p in ("accuracy_vs_budget.png", "acc_tokens_by_depth.png")
             if os.path.exists(os.path.join(out_dir, p))]
    anat = plot_anatomy(res, out_dir)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(render(res, plots + ([os.path.basename(anat)] if anat else [])))
    return path



def reading(res: dict) -> list[str]:
    """The sentences the README quotes: savings against GRPO and the gated length penalty, attribution."""
    M, P = res["methods"], res["paired"]
    out = []
    for base in ("grpo", "length_penalty_gated"):
        p = P.get(f"l2t_vs_{base}")
        if not p:
            continue
        s, d = p["token_saving"], p["accuracy_diff_points"]
        out.append(f"- L2T vs {base}: {100 * s['mean']:+.1f}% tokens saved (negative: more tokens), accuracy "
                   f"{d['mean']:+.1f} points" + (f" (95% intervals: saving [{100 * (s['mean'] - s['ci95']):.1f}, "
                                                 f"{100 * (s['mean'] + s['ci95']):.1f}]%, accuracy "
                                                 f"[{d['mean'] - d['ci95']:.1f}, {d['mean'] + d['ci95']:.1f}])"
                                                 if s.get("ci95") is not None else " (one run: no interval)") + ".")
    g = M.get("grpo")
    if g and "l2t" in M:
        goal = (P["l2t_vs_grpo"]["token_saving"]["mean"] >= 0.40
                and M["l2t"]["accuracy"]["mean"] >= g["accuracy"]["mean"])
        out.append(f"- Goal (>= 40% fewer tokens than GRPO at accuracy >= GRPO's): {'met' if goal else 'not met'}.")
    abl = [n for n in ("l2t_no_penalty", "l2t_count", "l2t_count_tuned", "l2t_tokens", "l2t_initial_scale") if n in M]
    if abl and "l2t" in M:
        parts = [f"{n} {M[n]['response_tokens']['mean']:.1f} tokens / {M[n]['accuracy']['mean']:.3f}" for n in abl]
        out.append(f"- Ablations (tokens / accuracy): l2t {M['l2t']['response_tokens']['mean']:.1f} / "
                   f"{M['l2t']['accuracy']['mean']:.3f}; " + "; ".join(parts) + ".")
        out.append("- " + attribution(M))
    for name, p in res["premise"].items():
        falls = [t for t, v in p["per_tier"].items() if v["falls"]]
        flat = [f"{t} (peak at k = {v['peak_k']})" for t, v in p["per_tier"].items() if not v["falls"]]
        out.append(f"- Premise on {name}: {'holds' if p['holds'] else 'does not hold'}; Acc(k) peaks and falls "
                   f"on tier(s) {', '.join(falls) or 'none'}" + (f", not on {', '.join(flat)}" if flat else "")
                   + f"; easier tiers peak no later: {'yes' if p['easy_peak_earlier'] else 'no'}.")
    return out


def attribution(M: dict) -> str:
    """Which term the token saving comes from, read off the ablations: a difference counts when it exceeds the
    larger spread of the two methods (and at least 1 token or 2 accuracy points); smaller ones are ties."""
    if "l2t_no_penalty" not in M or "l2t" not in M:
        return "Attribution needs the l2t and l2t_no_penalty runs."

    def m(n, k):
        return M[n][k]["mean"]

    def gap(a, b, k, floor):
        return max(floor, M[a][k]["spread"] or 0.0, M[b][k]["spread"] or 0.0)

    t0, t1 = m("l2t_no_penalty", "response_tokens"), m("l2t", "response_tokens")
    cut = t1 < t0 - gap("l2t", "l2t_no_penalty", "response_tokens", 1.0)
    msg = (f"Penalty: l2t uses {t1:.1f} tokens, {t0:.1f} with beta = 0 (l2t_no_penalty): "
           + ("the saving comes from the penalty, not from the information gain" if cut
              else "no clear saving from the penalty"))
    for n, what in (("l2t_count", "a plain per-episode cost"), ("l2t_count_tuned", "a per-episode cost at its own "
                    "tuned beta"), ("l2t_tokens", "a per-token cost")):
        if n not in M:
            continue
        tn, an = m(n, "response_tokens"), m(n, "accuracy")
        d_tok = tn - t1
        d_acc = 100 * (an - m("l2t", "accuracy"))
        same_tok = abs(d_tok) <= gap(n, "l2t", "response_tokens", 1.0)
        same_acc = abs(d_acc) <= 100 * gap(n, "l2t", "accuracy", 0.02)
        msg += f"; {what} ({n}) gives {tn:.1f} tokens at {d_acc:+.1f} points vs l2t"
        if same_tok and same_acc:
            msg += ": the Fisher weighting adds nothing over it"
        elif same_tok and d_acc < 0:
            msg += ": as short, but less accurate, so the Fisher weighting is what keeps accuracy while cutting"
        elif d_tok > 0 and same_acc:
            msg += ": longer at the same accuracy, so the Fisher weighting cuts more"
        elif d_tok < 0 and d_acc < 0:
            msg += ": shorter but less accurate at this beta (it also cuts episodes that earn their tokens)"
        else:
            msg += ": a different trade-off"
    return msg + "."

if __name__ == "__main__":  # python -m l2t_ext.demo.report DIR: re-render a finished demo's report
    import sys

    print(rerender(sys.argv[1]))
