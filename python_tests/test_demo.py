"""`l2t demo`: the quick setting end to end (every method name, the results schema, report and plots), and the
experiment's statistics, premise check and tuning rule on hand-made inputs."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

pytest.importorskip("transformers")

from l2t_ext.demo import run as demo  # noqa: E402


def test_demo_quick(tmp_path):
    from l2t_ext.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(demo.GRID)
    for r in res["methods"].values():
        for key in ("accuracy", "response_tokens", "episodes"):
            assert {"mean", "spread", "ci95", "n"} <= set(r[key]) and math.isfinite(r[key]["mean"])
        assert set(r["per_tier"]) == {"1", "2", "3", "4"}
        assert {"mean", "spread", "ci95", "n"} <= set(r["per_tier"]["1"]["accuracy"])
        assert r["episode_kinds"] and all(math.isfinite(v["mean"]) for v in r["episode_kinds"].values())
        assert r["runs"][0]["ws"] == 0 and r["runs"][0]["seed"] == 0
    assert {"premise", "splits", "paired", "anatomy", "warm_starts", "machine", "config"} <= set(res)
    assert set(res["premise"]) == {"warm start", "grpo"}
    assert set(res["premise"]["grpo"]["per_tier"]) == {"1", "2", "3", "4"}
    assert res["splits"]["evaluated_split"] == "test" and res["splits"]["rl_seeds"] == [0]
    assert res["warm_starts"][0]["sft_steps"] == 100
    assert res["anatomy"][0]["summary"]["n"] > 0
    report = (out / "report.md").read_text()
    for text in ("## The premise", "| l2t |", "| l2t_count |", "## Paired comparisons", "## Reward anatomy",
                 "## Reading"):
        assert text in report
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    assert (out / "acc_tokens_by_depth.png").stat().st_size > 1000
    assert (out / "reward_anatomy.png").stat().st_size > 1000 and "reward_anatomy.png" in report
    assert "| tier | Acc(k), k = 1.. | T(k) |" in report
    # the report re-renders from results.json alone
    from l2t_ext.demo.report import rerender

    (out / "report.md").unlink()
    assert (out / "report.md").samefile(rerender(str(out))) and (out / "report.md").read_text() == report
    # the warm start is reused by a later run in the same directory (its evaluation is redone)
    again = demo.warm_start_job(0, demo.SETTINGS["quick"], str(out), 1)
    assert again.get("reused") and again["sft_steps"] == 100


def test_stat_mean_spread_and_t_interval():
    s = demo.stat([1.0, 2.0, 3.0, None])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["spread"] == pytest.approx(1.0)
    assert s["ci95"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert demo.stat([5.0])["ci95"] is None and demo.stat([5.0])["spread"] == 0.0
    assert demo.stat([None])["mean"] is None
    # runs nested in warm starts: the interval is over the warm starts' means (2 groups -> t with 1 dof)
    g = demo.stat([1.0, 3.0, 5.0, 7.0], groups=[0, 0, 1, 1])
    assert g["mean"] == 4.0 and g["ci_units"] == "2 warm starts"
    assert g["ci95"] == pytest.approx(12.706 * statistics.stdev([2.0, 6.0]) / math.sqrt(2))
    assert demo.stat([1.0, 3.0], groups=[0, 0])["ci_units"] == "2 runs"  # one warm start: over runs


def _run(name, ws, seed, acc, tokens):
    return {"name": name, "ws": ws, "seed": seed, "eval": {"overall": {"pass@1": acc, "response_tokens": tokens}}}


def test_paired_comparison_matches_runs_by_warm_start_and_seed():
    runs = [_run("l2t", 0, 0, 0.8, 30.0), _run("grpo", 0, 0, 0.7, 60.0),
            _run("l2t", 1, 0, 0.9, 40.0), _run("grpo", 1, 0, 0.9, 50.0), _run("grpo", 2, 0, 0.1, 10.0)]
    p = demo._paired(runs, "l2t", "grpo")
    assert p["token_saving"]["n"] == 2 and p["token_saving"]["ci_units"] == "2 warm starts"  # ws 2: no l2t run
    assert p["token_saving"]["mean"] == pytest.approx((0.5 + 0.2) / 2)
    assert p["accuracy_diff_points"]["mean"] == pytest.approx((10.0 + 0.0) / 2)
    assert demo._paired(runs, "l2t", "length_penalty") is None


def _curves(*tiers):
    return {"acc_by_depth": {str(t + 1): {str(k + 1): a for k, a in enumerate(c)} for t, c in enumerate(tiers)}}


def test_premise_peak_fall_and_order():
    holds = _curves([0.2, 0.9, 0.8, 0.8], [0.1, 0.5, 0.9, 0.7])
    p = demo.premise({"grpo": [holds]})["grpo"]
    assert p["holds"] and p["easy_peak_earlier"]
    assert p["per_tier"]["1"]["peak_k"] == 2 and p["per_tier"]["2"]["peak_k"] == 3 and p["per_tier"]["2"]["falls"]
    flat = _curves([0.2, 0.9, 0.9, 0.9], [0.1, 0.5, 0.9, 0.7])  # tier 1 never falls
    assert not demo.premise({"x": [flat]})["x"]["holds"]
    late = _curves([0.1, 0.2, 0.9, 0.5], [0.9, 0.5, 0.4, 0.3])  # the hard tier peaks first
    q = demo.premise({"x": [late]})["x"]
    assert not q["easy_peak_earlier"] and not q["holds"]


def test_tuning_rule_fewest_tokens_within_two_points_of_grpo():
    by = {f"l2t@beta={b}": {"accuracy": {"mean": a}, "response_tokens": {"mean": t}}
          for b, a, t in ((0.15, 0.80, 50), (0.3, 0.79, 40), (0.6, 0.70, 20), (1.2, 0.5, 10), (2.4, 0.4, 9))}
    assert demo._choose(by, "l2t@beta=", demo.BETAS, grpo_acc=0.80) == 0.3
    assert demo._choose(by, "l2t@beta=", demo.BETAS, grpo_acc=0.95) == 0.15  # none qualifies: most accurate


def test_demo_bad_input():
    from l2t_ext.errors import InputError

    with pytest.raises(InputError, match="at most one of quick, full, tune"):
        demo.run_demo("/nonexistent/never", quick=True, full=True)
    with pytest.raises(InputError, match="jobs must be an integer >= 1"):
        demo.run_demo("/nonexistent/never", jobs=0)


def _fake_demo(d, warm_starts, saving, acc_gap=0.0):
    """A results.json with the fields ``l2t_ext.demo.pool`` reads: grpo at 50 tokens, l2t ``saving`` shorter."""
    runs = {"grpo": [], "l2t": [], "warm start": []}
    for i, ws in enumerate(warm_starts):
        for seed in (0, 1):
            base = 50.0 + ws + seed
            runs["grpo"].append({"ws": ws, "seed": seed, "accuracy": 0.8, "response_tokens": base})
            runs["l2t"].append({"ws": ws, "seed": seed, "accuracy": 0.8 + acc_gap + 0.01 * i,
                                "response_tokens": base * (1 - saving - 0.01 * (i + seed))})
        runs["warm start"].append({"ws": ws, "seed": -1, "accuracy": 0.5, "response_tokens": 55.0})
    res = {"methods": {n: {"runs": runs[n]} for n in ("grpo", "l2t")}, "warm_start": {"runs": runs["warm start"]},
           "warm_starts": [{"ws": ws, "reached_target": ws != warm_starts[-1], "sft_steps": 500}
                           for ws in warm_starts], "machine": {"cpu": "test"}}
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)
    return str(d)


def test_pool_statistics_and_the_reproduction_rule(tmp_path):
    from l2t_ext.demo import pool

    a = _fake_demo(tmp_path / "a", [0, 1, 2], 0.30)
    b = _fake_demo(tmp_path / "b", [3, 4, 5], 0.30)
    p = pool.pool([a, b])
    q = p["paired"]["grpo"]["token_saving"]
    assert q["n"] == 12 and q["ci_units"] == "6 warm starts"
    savings = [1 - r["response_tokens"] / g["response_tokens"]
               for d in (a, b) for res in [pool._load(d)]
               for r, g in zip(res["methods"]["l2t"]["runs"], res["methods"]["grpo"]["runs"])]
    assert q["mean"] == pytest.approx(sum(savings) / len(savings))
    assert p["paired_reached_target"]["grpo"]["token_saving"]["n"] == 8  # warm starts 2 and 5 missed the target
    same = pool.reproduces(p, pool._load(_fake_demo(tmp_path / "c", [6, 7, 8], 0.30)))
    other = pool.reproduces(p, pool._load(_fake_demo(tmp_path / "d", [9, 10, 11], 0.05)))
    assert same["grpo"]["reproduced"] and not other["grpo"]["reproduced"]
    assert not other["grpo"]["token_saving"]["inside"] and other["grpo"]["accuracy_diff_points"]["inside"]
    assert "Reproduction check" in pool.render(p, same)
    with pytest.raises(ValueError, match="share warm starts"):
        pool.pool([a, a])
    assert pool.main([a, b, "--check", str(tmp_path / "c"), "--out", str(tmp_path / "pooled")]) == 0
    assert json.load(open(tmp_path / "pooled" / "pooled.json"))["check"]["grpo"]["reproduced"]
