"""Pool several ``l2t demo`` runs (disjoint warm starts, same settings) into one analysis, and test whether a
further run reproduces the pooled result.

Each run directory's ``results.json`` keeps every RL run's test accuracy and response tokens (``methods[name]
["runs"]``) and which warm starts reached their validation target, so pooling needs no retraining: the statistics
are ``run.stat`` over the union (95% intervals over warm-start means) and the paired comparisons match runs by
(warm start, seed), as in a single demo.

The reproduction rule (declared before the third run was made): a run reproduces the pooled result when its mean
paired L2T-vs-baseline token saving and accuracy difference both fall inside the pooled 95% intervals.

    python -m l2t_ext.demo.pool docs/demo docs/demo_replication --check DIR3 --out docs/demo_pooled
"""

from __future__ import annotations

import argparse
import json
import os

from l2t_ext.demo.run import stat


def _load(d: str) -> dict:
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def _runs(results: list[dict], name: str) -> list[dict]:
    return [r for res in results for r in res["methods"][name]["runs"]] if name != "warm start" else \
        [r for res in results for r in res["warm_start"]["runs"]]


def paired(results: list[dict], a: str, b: str, keep=None) -> dict | None:
    """``a`` vs ``b`` matched by (warm start, seed): token saving and accuracy difference (points) as ``stat``."""
    idx = {(r["ws"], r["seed"]): r for r in _runs(results, b)}
    pairs = [(r, idx[(r["ws"], r["seed"])]) for r in _runs(results, a)
             if (r["ws"], r["seed"]) in idx and (keep is None or r["ws"] in keep)]
    if not pairs:
        return None
    ws = [x["ws"] for x, _ in pairs]
    return {"token_saving": stat([1 - x["response_tokens"] / y["response_tokens"] for x, y in pairs], ws),
            "accuracy_diff_points": stat([100 * (x["accuracy"] - y["accuracy"]) for x, y in pairs], ws)}


def pool(dirs: list[str]) -> dict:
    """The pooled analysis of the demo runs in ``dirs`` (methods present in every run)."""
    results = [_load(d) for d in dirs]
    names = [n for n in results[0]["methods"] if all(n in r["methods"] for r in results)]
    warms = [w for r in results for w in r["warm_starts"]]
    if len({w["ws"] for w in warms}) != len(warms):
        raise ValueError("pool: the runs share warm starts; pool only independent runs (disjoint warm starts)")
    reached = {w["ws"] for w in warms if w["reached_target"]}
    out = {"dirs": dirs, "warm_starts": [{"ws": w["ws"], "reached_target": w["reached_target"],
                                          "sft_steps": w["sft_steps"]} for w in warms],
           "machines": [r["machine"] for r in results], "methods": {}, "paired": {}, "paired_reached_target": {}}
    for n in ["warm start"] + names:
        rs = _runs(results, n)
        out["methods"][n] = {k: stat([r[k] for r in rs], [r["ws"] for r in rs]) for k in ("accuracy",
                                                                                         "response_tokens")}
    for b in names:
        if b != "l2t":
            out["paired"][b] = paired(results, "l2t", b)
            out["paired_reached_target"][b] = paired(results, "l2t", b, keep=reached)
    return out


def reproduces(pooled: dict, run: dict) -> dict:
    """The declared rule, per baseline: is the run's mean paired difference inside the pooled 95% interval?"""
    verdict = {}
    for b, p in pooled["paired"].items():
        q = paired([run], "l2t", b)
        if p is None or q is None:
            continue
        row = {}
        for k in ("token_saving", "accuracy_diff_points"):
            m, h, x = p[k]["mean"], p[k]["ci95"], q[k]["mean"]
            row[k] = {"pooled_mean": m, "pooled_ci95": h, "run_mean": x, "inside": h is not None and abs(x - m) <= h}
        row["reproduced"] = all(v["inside"] for v in row.values())
        verdict[b] = row
    return verdict


def _pm(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if s is None or s["mean"] is None:
        return "-"
    ci = f" [{(s['mean'] - s['ci95']) * scale:.{digits}f}, {(s['mean'] + s['ci95']) * scale:.{digits}f}]" \
        if s.get("ci95") is not None else ""
    return f"{s['mean'] * scale:.{digits}f}{ci}"


def render(p: dict, check: dict | None = None) -> str:
    ws = p["warm_starts"]
    lines = ["# `l2t demo`: pooled over independent runs", "",
             f"Runs: {', '.join(p['dirs'])}; warm starts {', '.join(str(w['ws']) for w in ws)} "
             f"({sum(w['reached_target'] for w in ws)} of {len(ws)} reached their validation target; the others are "
             "kept, and the paired table is repeated without them). Test split; intervals are 95% t-intervals over "
             "warm-start means.", "",
             "| method | accuracy | response tokens |", "|---|---|---|"]
    for n, m in p["methods"].items():
        lines.append(f"| {n} | {_pm(m['accuracy'], 1, 3)} | {_pm(m['response_tokens'])} |")
    lines += ["", "| L2T against | tokens saved (%) | accuracy (points) | same, target-reaching warm starts only |",
              "|---|---|---|---|"]
    for b, q in p["paired"].items():
        r = p["paired_reached_target"].get(b)
        lines.append(f"| {b} | {_pm(q['token_saving'], 100)} | {_pm(q['accuracy_diff_points'])} | "
                     f"{_pm(r['token_saving'], 100) if r else '-'} %, "
                     f"{_pm(r['accuracy_diff_points']) if r else '-'} pts |")
    if check:
        lines += ["", "## Reproduction check (rule declared before the run: the run's mean paired difference "
                  "inside the pooled 95% interval, for tokens and accuracy)", "",
                  "| L2T against | run's token saving (%) | inside | run's accuracy diff (points) | inside | "
                  "reproduced |", "|---|---|---|---|---|---|"]
        for b, row in check.items():
            t, a = row["token_saving"], row["accuracy_diff_points"]
            lines.append(f"| {b} | {100 * t['run_mean']:.1f} | {'yes' if t['inside'] else 'no'} | "
                         f"{a['run_mean']:+.1f} | {'yes' if a['inside'] else 'no'} | "
                         f"{'yes' if row['reproduced'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pool independent l2t demo runs; optionally check a further run")
    ap.add_argument("dirs", nargs="+", help="demo output directories (each with results.json)")
    ap.add_argument("--check", default=None, help="a further demo directory to test against the pooled intervals")
    ap.add_argument("--out", required=True, help="writes pooled.json and report.md here")
    a = ap.parse_args(argv)
    p = pool(a.dirs)
    check = reproduces(p, _load(a.check)) if a.check else None
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pooled.json"), "w") as f:
        json.dump({**p, "check": check, "check_dir": a.check}, f, indent=1)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(render(p, check))
    print(render(p, check))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
