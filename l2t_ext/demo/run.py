"""``l2t demo``: does L2T cut over-thinking, and which of its terms does it? (docs/architecture.md, "The demo").

The task (``l2t_ext.tasks.overthink``) makes over-thinking the warm-started policy's habit: noisy steps, checks
that fix mistakes on hard problems and waste tokens on easy ones, distractor episodes that can corrupt the
answer. The experiment, top to bottom:

1. warm starts: a tiny Qwen2 (character tokenizer) per warm-start seed, trained on the task's traces until the
   validation accuracy of every tier reaches ``TARGET`` (checked every ``chunk`` steps), not for a fixed number
   of steps, so that warm starts from different seeds or CPUs start RL from a comparable level; where each
   stopped is reported, and one that has not reached the target by ``sft_max`` steps is flagged (it stays
   in the statistics);
2. the premise, checked on the policies before any comparison: Acc(k) / T(k) per tier (accuracy and tokens
   when the response is cut after its k-th episode) of the warm start and of GRPO, and whether Acc(k) rises,
   peaks and falls, with easy tiers peaking earlier;
3. RL from each warm start with every method of the grid (same seeds, steps, rollouts); hyper-parameters (beta,
   the length coefficient) were chosen on the validation split by ``l2t demo --tune`` and are frozen in
   ``TUNED``; the test split is evaluated once per run;
4. statistics over warm starts x seeds: mean, spread (sample standard deviation) and a 95% t-interval per
   method, and paired differences (same warm start, seed and test problems) of L2T against each baseline;
5. the mechanism: the per-episode reward anatomy (information gain, raw and normalised penalty, surprise) by
   episode kind on the warm start's rollouts, and the episode kinds each trained policy writes.

Settings: ``quick`` (CI smoke, every method name, noisy), ``default`` (one warm start, the key methods),
``full`` (3 warm starts x 2 seeds, the whole grid), ``tune`` (validation sweep of beta and the length
coefficient). Runs of the grid are independent and run in ``jobs`` processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from l2t_ext.errors import InputError
from l2t_ext.tasks import arith
from l2t_ext.tasks import overthink as ot

HIDDEN, LAYERS = 96, 2  # ~0.2M parameters
# validation accuracy (sampled pass@1) per tier that ends the warm start; below what the traces themselves
# reach (mix-weighted: 0.89, 0.79, 0.70, 0.62), above what a half-trained model gets
TARGET = {"1": 0.75, "2": 0.6, "3": 0.5, "4": 0.4}
# chosen on the validation split by `l2t demo --tune` (docs/demo/tuning.json); see _choose for the rule
TUNED = {"beta": 2.4, "length_coef": 0.8, "l2t_count_beta": 0.6}
BETAS, LENGTH_COEFS = (0.15, 0.3, 0.6, 1.2, 2.4), (0.05, 0.1, 0.2, 0.4, 0.8)  # the tuning grid, the same budget

# name: (method, extra overrides). "l2t" is the paper's reward with the tuned beta; the rest are baselines and
# ablations that change one thing.
GRID = {
    "grpo": ("grpo", []),
    "length_penalty_gated": ("length_penalty_gated", ["length_coef={length_coef}"]),
    "length_penalty": ("length_penalty", ["length_coef={length_coef}"]),
    "l2t": ("l2t", ["beta={beta}"]),
    "l2t_no_penalty": ("l2t_no_penalty", []),
    "l2t_count": ("l2t_count", ["beta={beta}"]),
    "l2t_count_tuned": ("l2t_count", ["beta={l2t_count_beta}"]),  # the count ablation at its own tuned beta
    "l2t_tokens": ("l2t_tokens", ["beta={beta}"]),
    "l2t_initial_scale": ("l2t", ["beta={beta}", "penalty_norm=initial"]),
}
KEY_METHODS = ("grpo", "length_penalty_gated", "l2t", "l2t_no_penalty", "l2t_count", "l2t_count_tuned")
SETTINGS = {
    "quick": dict(warm_starts=1, seeds=1, methods=tuple(GRID), sft_max=100, chunk=100, target=None, rl_steps=2,
                  prompts=4, group=4, eval_per_tier=6, eval_samples=2, max_new_tokens=128, split="test",
                  anatomy_prompts=4),
    "default": dict(warm_starts=1, seeds=1, methods=KEY_METHODS, sft_max=2000, chunk=250, target=TARGET,
                    rl_steps=60, prompts=8, group=8, eval_per_tier=50, eval_samples=4, max_new_tokens=160,
                    split="test", anatomy_prompts=16),
    "full": dict(warm_starts=3, seeds=2, methods=tuple(GRID), sft_max=2000, chunk=250, target=TARGET, rl_steps=60,
                 prompts=8, group=8, eval_per_tier=50, eval_samples=4, max_new_tokens=160, split="test",
                 anatomy_prompts=16),
    "tune": dict(warm_starts=1, seeds=2, methods=(), sft_max=2000, chunk=250, target=TARGET, rl_steps=60, prompts=8,
                 group=8, eval_per_tier=40, eval_samples=4, max_new_tokens=160, split="val", anatomy_prompts=0),
}
TEST_SEED, VAL_SEED = 1, 2  # the held-out problem sets (the warm start's stopping check uses VAL_SEED + 1)
MAX_DEPTH = 12


def _log(msg: str) -> None:
    print(f"[l2t demo] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- jobs (one process)
def _evaluate(model, tok, problems, S, n_samples=None, light: bool = False) -> dict:
    """``evaluate`` with the demo's settings; ``light``: pass@1 and tokens only (no budgets, Acc(k) to depth 1)."""
    from l2t_ext.eval import evaluate

    return evaluate(model, tok, problems, arith.verify, arith.extract_answer, n_samples=n_samples or S["eval_samples"],
                    max_new_tokens=S["max_new_tokens"], budgets=() if light else (32, 48, 64, 96, 128),
                    max_depth=1 if light else MAX_DEPTH, episode_kind=ot.episode_kind)


def warm_start_job(ws: int, S: dict, out: str, threads: int) -> dict:
    """Train warm start ``ws`` until every tier's validation accuracy reaches the target (or ``sft_max`` steps);
    saves its weights and returns where it stopped with its evaluation on the reported split."""
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.lm.sft import warm_start

    torch.set_num_threads(threads)
    path = os.path.join(out, "warm", f"ws{ws}.pt")
    key = json.loads(json.dumps({k: S[k] for k in ("sft_max", "chunk", "target")}))
    tok = arith.tokenizer()
    model = tiny_qwen2(tok, hidden_size=HIDDEN, num_layers=LAYERS, seed=ws)
    try:  # the same warm start was trained before in this directory (e.g. by --tune): reuse it, evaluate again
        with open(path + ".json") as f:
            done = json.load(f)
        if all(done["key"][k] == v for k, v in key.items()):
            model.load_state_dict(torch.load(path))
            torch.manual_seed(100 + ws)
            return {**done["result"], "eval": _evaluate(model, tok, _split_problems(S), S), "reused": True}
    except (OSError, ValueError, KeyError):
        pass
    task = ot.OverthinkTask()
    check = ot.problems("val", 4 * 25, VAL_SEED + 1)
    history = []
    t0 = time.time()

    def stop(steps: int) -> bool:
        """Validation accuracy per tier (sampled, 25 problems x 2 per tier); True once every tier is at target."""
        torch.manual_seed(ws)
        acc = _evaluate(model, tok, check, S, n_samples=2, light=True)["per_tier"]
        history.append({"steps": steps, **{t: v["pass@1"] for t, v in acc.items()}})
        _log(f"warm start {ws}: {steps} steps, validation pass@1 by tier "
             + " ".join(f"{t}:{v['pass@1']:.2f}" for t, v in sorted(acc.items())))
        return bool(S["target"]) and all(acc[t]["pass@1"] >= a for t, a in S["target"].items())

    # one run (one AdamW, one cosine over sft_max steps), checked every `chunk` steps and at the end
    losses = warm_start(model, tok, task.sft_pairs, S["sft_max"], 3e-3, 64, seed=ws, device="cpu", stop=stop,
                        check_every=S["chunk"])
    steps = len(losses)
    if not history or history[-1]["steps"] != steps:
        stop(steps)
    reached = bool(S["target"]) and all(history[-1][t] >= a for t, a in S["target"].items())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    torch.manual_seed(100 + ws)
    ev = _evaluate(model, tok, _split_problems(S), S)
    result = {"ws": ws, "sft_steps": steps, "reached_target": reached, "history": history, "path": path,
              "eval": ev, "wall_s": time.time() - t0}
    with open(path + ".json", "w") as f:
        json.dump({"key": key, "result": result}, f)
    return result


def _split_problems(S: dict) -> list[dict]:
    seed = TEST_SEED if S["split"] == "test" else VAL_SEED
    return ot.problems(S["split"], 4 * S["eval_per_tier"], seed)


def rl_config(S: dict, name: str, seed: int, out: str, params: dict, threads: int):
    """The RL run ``name`` of the grid from a warm start: preset ``tiny-arith`` on the overthink task with the
    setting's sizes and the grid entry's overrides (``params`` fills beta / length_coef)."""
    from l2t_ext.rl.config import preset

    method, extra = GRID[name] if name in GRID else _tune_entry(name)
    return preset("tiny-arith").override([
        "task=overthink", f"method={method}", f"steps={S['rl_steps']}", f"prompts_per_step={S['prompts']}",
        f"group_size={S['group']}", f"max_new_tokens={S['max_new_tokens']}", f"seed={seed}", "sft_steps=0",
        "eval_problems=0", f"save_every={10**9}", f"hidden_size={HIDDEN}", f"num_layers={LAYERS}", f"out={out}",
        f"threads={threads}", *(e.format(**params) for e in extra)])


def _tune_entry(name: str):
    """Grid entries of the tuning sweep: ``l2t@beta=0.3``, ``length_penalty_gated@length_coef=0.1``."""
    method, kv = name.split("@")
    return method, [kv]


def rl_job(ws: int, name: str, seed: int, S: dict, out: str, params: dict, threads: int) -> dict:
    """One RL run from warm start ``ws``: train, evaluate on the setting's split, and for L2T-family runs the
    reward anatomy of the final policy's rollouts."""
    from l2t_ext.rl.trainer import Trainer

    torch.set_num_threads(threads)
    t0 = time.time()
    run_dir = os.path.join(out, "runs", f"ws{ws}_{name}_s{seed}")
    cfg = rl_config(S, name, seed, run_dir, params, threads)
    # a finished run of the same config from the same warm start is reused (an interrupted demo resumes)
    key = {"config": json.loads(cfg.to_json()), "split": S["split"], "eval": [S[k] for k in (
        "eval_per_tier", "eval_samples")], "warm": os.path.getmtime(os.path.join(out, "warm", f"ws{ws}.pt"))}
    key["config"].pop("threads")
    done_path = os.path.join(run_dir, "demo_result.json")
    try:
        with open(done_path) as f:
            done = json.load(f)
        if done["key"] == key:
            return {**done["result"], "reused": True}
    except (OSError, ValueError, KeyError):
        pass
    warm = torch.load(os.path.join(out, "warm", f"ws{ws}.pt"))
    trainer = Trainer(cfg, init_state=warm)
    rows = trainer.train()
    trainer.close()
    torch.manual_seed(10_000 * ws + seed)
    ev = _evaluate(trainer.model, trainer.tok, _split_problems(S), S)
    curve = [{k: r.get(k) for k in ("step", "accuracy", "response_tokens_mean", "episodes_mean", "penalty_mean",
                                    "jr_gain_mean")} for r in rows]
    result = {"ws": ws, "name": name, "seed": seed, "eval": ev, "curve": curve, "wall_s": time.time() - t0}
    with open(done_path, "w") as f:
        json.dump({"key": key, "result": result}, f)
    return result


def anatomy_job(ws: int, S: dict, out: str, params: dict, threads: int) -> dict:
    """The L2T reward anatomy (paper defaults but the tuned beta) of the warm start's own rollouts, by kind."""
    from l2t_ext.reward import episode_anatomy, summarize
    from l2t_ext.rl.trainer import Trainer

    torch.set_num_threads(threads)
    warm = torch.load(os.path.join(out, "warm", f"ws{ws}.pt"))
    cfg = rl_config({**S, "prompts": S["anatomy_prompts"]}, "l2t", 0, os.path.join(out, "runs", f"ws{ws}_anatomy"),
                    params, threads)
    trainer = Trainer(cfg, init_state=warm)
    batch = trainer.collect(trainer.next_problems())
    trainer.close()
    rows = episode_anatomy(batch.reward, batch.episode_ids, batch.input_ids, trainer.tok, kind=ot.episode_kind,
                           outcome=batch.outcome)
    return {"ws": ws, "summary": summarize(rows), "episodes": rows}


# ------------------------------------------------------------------------------------------- the experiment
def run_demo(out: str, quick: bool = False, full: bool = False, tune: bool = False, jobs: int | None = None,
             threads: int | None = None, seeds: int | None = None, warm_starts: int | None = None,
             first_warm_start: int = 0) -> dict:
    """Run the experiment of a setting (``quick``, ``full``, ``tune`` or the default) into ``out``: report.md,
    results.json (tuning.json for ``tune``), PNG plots. ``jobs`` processes share the CPU (``threads`` each).
    Warm starts use seeds ``first_warm_start, first_warm_start + 1, ...`` (another value: an independent
    replication of the same experiment)."""
    if sum(map(bool, (quick, full, tune))) > 1:
        raise InputError("choose at most one of quick, full, tune")
    for name, v in (("jobs", jobs), ("threads", threads), ("seeds", seeds), ("warm_starts", warm_starts)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(first_warm_start, int) or first_warm_start < 0:
        raise InputError(f"first_warm_start must be an integer >= 0, got {first_warm_start!r}")
    setting = "quick" if quick else "full" if full else "tune" if tune else "default"
    S = dict(SETTINGS[setting])
    S["seeds"], S["warm_starts"] = seeds or S["seeds"], warm_starts or S["warm_starts"]
    cores = os.cpu_count() or 1
    jobs = jobs or (1 if quick else max(1, min(2, cores)))
    threads = threads or max(1, cores // jobs)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    params = dict(TUNED)
    warms, runs, anatomies = _run_grid(S, setting, out, params, jobs, threads, first_warm_start,
                                       _tune_names() if tune else list(S["methods"]))
    if tune:
        res = _tuning_result(S, warms, runs)
        res["wall_s"] = time.time() - t_start
        with open(os.path.join(out, "tuning.json"), "w") as f:
            json.dump(res, f, indent=1)
        _log(f"chosen on validation: {res['chosen']} (wrote {out}/tuning.json)")
        return res
    res = _results(setting, S, warms, runs, anatomies, params, jobs, threads)
    from l2t_ext.eval import plot_report

    plots = plot_report({n: _first_run(runs, n)["eval"] for n in S["methods"]} | {"warm start": warms[0]["eval"]},
                        out)
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    from l2t_ext.demo.report import plot_anatomy, render

    anat = plot_anatomy(res, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render(res, [os.path.basename(p) for p in plots + ([anat] if anat else [])]))
    _log(f"wrote {out}/report.md, results.json and plots in {res['wall_s']:.0f}s")
    return res


def _run_grid(S: dict, setting: str, out: str, params: dict, jobs: int, threads: int, first_warm_start: int,
              names: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(warm starts, runs, anatomies): the warm starts, then every name x warm start x seed and the anatomy of
    each warm start, in ``jobs`` processes."""
    cores = os.cpu_count() or 1
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool state and can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        _log(f"{setting}: {S['warm_starts']} warm start(s) x {S['seeds']} seed(s), {jobs} job(s) x {threads} thread(s)")
        n = S["warm_starts"]  # fewer warm starts than jobs: each gets more threads
        ids = range(first_warm_start, first_warm_start + n)
        warms = list(pool.map(warm_start_job, ids, [S] * n, [out] * n, [max(threads, cores // min(jobs, n))] * n))
        for w in warms:
            reached = "reached" if w["reached_target"] else "NOT reached"
            _log(f"warm start {w['ws']}: {w['sft_steps']} steps, target {reached}, {S['split']} pass@1 "
                 f"{w['eval']['overall']['pass@1']:.3f}, tokens {w['eval']['overall']['response_tokens']:.1f}")
        specs = [(w["ws"], n, s) for w in warms for s in range(S["seeds"]) for n in names]
        futures = [pool.submit(rl_job, ws, n, s, S, out, params, threads) for ws, n, s in specs]
        anat = ([pool.submit(anatomy_job, w["ws"], S, out, params, threads) for w in warms]
                if S["anatomy_prompts"] else [])
        runs = []
        for f in futures:
            runs.append(f.result())
            r = runs[-1]
            _log(f"[{len(runs)}/{len(specs)}] ws{r['ws']} {r['name']} seed {r['seed']}: pass@1 "
                 f"{r['eval']['overall']['pass@1']:.3f}, tokens {r['eval']['overall']['response_tokens']:.1f} "
                 f"({r['wall_s']:.0f}s)")
        return warms, runs, [f.result() for f in anat]


def _first_run(runs: list[dict], name: str) -> dict:
    return next(r for r in runs if r["name"] == name)


def _tune_names() -> list[str]:
    """The sweep: GRPO (the accuracy bar), beta for l2t, the gated length penalty's coefficient, and beta for the
    l2t_count ablation (reported, so that the ablation can also be read at its own best beta)."""
    return (["grpo"] + [f"l2t@beta={b}" for b in BETAS]
            + [f"length_penalty_gated@length_coef={c}" for c in LENGTH_COEFS]
            + [f"l2t_count@beta={b}" for b in BETAS])


def _tuning_result(S: dict, warms: list[dict], runs: list[dict]) -> dict:
    """Validation results of the sweep and the chosen values (``_choose``)."""
    by = {}
    for n in _tune_names():
        rs = [r for r in runs if r["name"] == n]
        by[n] = {"accuracy": stat([r["eval"]["overall"]["pass@1"] for r in rs]),
                 "response_tokens": stat([r["eval"]["overall"]["response_tokens"] for r in rs])}
    grpo_acc = by["grpo"]["accuracy"]["mean"]
    chosen = {"beta": _choose(by, "l2t@beta=", BETAS, grpo_acc),
              "length_coef": _choose(by, "length_penalty_gated@length_coef=", LENGTH_COEFS, grpo_acc),
              "l2t_count_beta": _choose(by, "l2t_count@beta=", BETAS, grpo_acc)}
    return {"split": S["split"], "settings": S, "runs": by, "chosen": chosen, "rule": CHOICE_RULE, "machine": machine(),
            "warm_starts": [{k: w[k] for k in ("ws", "sft_steps", "reached_target", "history")} for w in warms]}


CHOICE_RULE = ("the value with the fewest validation response tokens among those whose validation accuracy is at "
               "least GRPO's minus 2 points; if none qualifies, the most accurate")


def _choose(by: dict, prefix: str, values, grpo_acc: float) -> float:
    ok = [v for v in values if by[f"{prefix}{v}"]["accuracy"]["mean"] >= grpo_acc - 0.02]
    if ok:
        return min(ok, key=lambda v: by[f"{prefix}{v}"]["response_tokens"]["mean"])
    return max(values, key=lambda v: by[f"{prefix}{v}"]["accuracy"]["mean"])


# ------------------------------------------------------------------------------------------- statistics
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def stat(xs: list[float | None], groups: list | None = None) -> dict:
    """``{"mean", "spread", "ci95", "n"}`` over runs: spread is the sample standard deviation over the runs. The
    95% t-interval half-width ``ci95`` is taken over the means of ``groups`` (the runs' warm starts: runs that
    share a warm start are not independent) when there are at least two groups, else over the runs (None
    with one run); ``ci_units`` says which."""
    keep = [(x, g) for x, g in zip(xs, groups or [None] * len(xs)) if x is not None]
    xs = [x for x, _ in keep]
    if not xs:
        return {"mean": None, "spread": None, "ci95": None, "n": 0}
    n = len(xs)
    sd = statistics.stdev(xs) if n > 1 else 0.0
    by: dict = {}
    for x, g in keep:
        by.setdefault(g, []).append(x)
    units, level = (list(by.values()), "warm starts") if groups and len(by) > 1 else ([[x] for x in xs], "runs")
    means = [statistics.fmean(u) for u in units]
    k = len(means)
    ci = _T975.get(k - 1, 1.96) * statistics.stdev(means) / math.sqrt(k) if k > 1 else None
    return {"mean": statistics.fmean(xs), "spread": sd, "ci95": ci, "n": n, "ci_units": f"{k} {level}"}


def _method_stats(rs: list[dict]) -> dict:
    ev = [r["eval"] for r in rs]
    ws = [r["ws"] for r in rs]

    def st(xs):  # every statistic of a method: intervals over its warm starts
        return stat(xs, ws)

    tiers = sorted(ev[0]["per_tier"], key=int)
    kinds = sorted({k for e in ev for k in e.get("episode_kinds", {}).get("overall", {})})
    return {
        "accuracy": st([e["overall"]["pass@1"] for e in ev]),
        "response_tokens": st([e["overall"]["response_tokens"] for e in ev]),
        "tokens_per_correct": st([e["overall"]["tokens_per_correct"] for e in ev]),
        "episodes": st([e["overall"]["episodes_mean"] for e in ev]),
        "per_tier": {t: {"accuracy": st([e["per_tier"][t]["pass@1"] for e in ev]),
                         "response_tokens": st([e["per_tier"][t]["response_tokens"] for e in ev]),
                         "tokens_per_correct": st([e["per_tier"][t]["tokens_per_correct"] for e in ev])}
                     for t in tiers},
        "episode_kinds": {k: st([e["episode_kinds"]["overall"].get(k, 0.0) for e in ev]) for k in kinds},
        "acc_by_depth": _mean_curves([e["acc_by_depth"] for e in ev]),
        "tokens_by_depth": _mean_curves([e["tokens_by_depth"] for e in ev]),
        "accuracy_vs_budget": {b: st([e["accuracy_vs_budget"][b] for e in ev])["mean"]
                               for b in ev[0]["accuracy_vs_budget"]},
        "runs": [{"ws": r["ws"], "seed": r["seed"], "accuracy": r["eval"]["overall"]["pass@1"],
                  "response_tokens": r["eval"]["overall"]["response_tokens"], "wall_s": r["wall_s"]} for r in rs],
    }


def _mean_curves(curves: list[dict]) -> dict:
    return {t: {k: statistics.fmean(c[t][k] for c in curves) for k in curves[0][t]} for t in curves[0]}


def _paired(runs: list[dict], a: str, b: str) -> dict | None:
    """``a`` vs ``b`` on the same warm start, seed and test problems: token saving ``1 - tokens_a / tokens_b`` and
    accuracy difference ``acc_a - acc_b`` (points), each as ``stat`` over the pairs."""
    idx = {(r["ws"], r["seed"]): r for r in runs if r["name"] == b}
    pairs = [(r, idx[(r["ws"], r["seed"])]) for r in runs if r["name"] == a and (r["ws"], r["seed"]) in idx]
    if not pairs:
        return None
    ws = [x["ws"] for x, _ in pairs]
    return {"token_saving": stat([1 - x["eval"]["overall"]["response_tokens"] / y["eval"]["overall"]["response_tokens"]
                                   for x, y in pairs], ws),
            "accuracy_diff_points": stat([100 * (x["eval"]["overall"]["pass@1"] - y["eval"]["overall"]["pass@1"])
                                           for x, y in pairs], ws)}


def premise(evals: dict[str, list[dict]], margin: float = 0.02) -> dict:
    """Per policy and tier, the depth k* where the mean Acc(k) peaks, whether Acc falls by more than ``margin``
    after it (at the largest depth), and whether easier tiers peak no later than harder ones."""
    out = {}
    for name, ev in evals.items():
        acc = _mean_curves([e["acc_by_depth"] for e in ev])
        tiers = sorted(acc, key=int)
        per = {}
        for t in tiers:
            ks = sorted(acc[t], key=int)
            peak = max(ks, key=lambda k: (acc[t][k], -int(k)))
            per[t] = {"peak_k": int(peak), "peak_acc": acc[t][peak], "last_acc": acc[t][ks[-1]],
                      "falls": acc[t][ks[-1]] < acc[t][peak] - margin, "acc_by_depth": acc[t]}
        order = [per[t]["peak_k"] for t in tiers]
        out[name] = {"per_tier": per, "easy_peak_earlier": all(x <= y for x, y in zip(order, order[1:])),
                     "holds": all(p["falls"] for p in per.values()) and all(x <= y for x, y in zip(order, order[1:]))}
    return out


def _results(setting, S, warms, runs, anatomies, params, jobs, threads) -> dict:
    names = list(S["methods"])
    res = {"setting": setting,
           "methods": {n: _method_stats([r for r in runs if r["name"] == n]) for n in names},
           "warm_start": _method_stats([{"ws": w["ws"], "seed": -1, "eval": w["eval"], "wall_s": w["wall_s"]}
                                        for w in warms]),
           "premise": premise({"warm start": [w["eval"] for w in warms]}
                              | ({"grpo": [r["eval"] for r in runs if r["name"] == "grpo"]} if "grpo" in names
                                 else {})),
           "paired": {f"l2t_vs_{b}": _paired(runs, "l2t", b) for b in names if b != "l2t"},
           "splits": {"rule": "blake2b(prompt) % 8: 0 test, 1 validation, else training (RL stream and warm start)",
                      "test_problems": 4 * S["eval_per_tier"], "samples_per_problem": S["eval_samples"],
                      "evaluated_split": S["split"], "warm_start_seeds": [w["ws"] for w in warms],
                      "rl_seeds": list(range(S["seeds"]))},
           "warm_starts": [{k: w[k] for k in ("ws", "sft_steps", "reached_target", "history", "wall_s")}
                           for w in warms],
           "anatomy": [{"ws": a["ws"], "summary": a["summary"]} for a in anatomies],
           "config": {"settings": S, "tuned": params, "grid": {n: GRID[n] for n in names}, "target": S["target"],
                      "task": {"step_error": {str(t): p for t, p in ot.STEP_ERROR.items()}, "check_prob": ot.CHECK_PROB,
                               "distract_prob": ot.DISTRACT_PROB, "corrupt_prob": ot.CORRUPT_PROB,
                               "warm_mix": ot.WARM_MIX},
                      "model": {"hidden_size": HIDDEN, "num_layers": LAYERS}, "jobs": jobs, "threads": threads},
           "machine": machine(),
           "training_curves": {n: [r["curve"] for r in runs if r["name"] == n] for n in names}}
    return res


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
            f.seek(0)
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"cpu": cpu, "avx512": "avx512f" in flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
