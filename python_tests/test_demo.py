"""`l2t demo --quick`: report, JSON and plots with finite numbers; the warm start reaches its tier-1 floor."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")


def test_demo_quick(tmp_path):
    from l2t_ext.cli import main
    from l2t_ext.demo.run import METHODS, TIER1_FLOOR_QUICK

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(METHODS)
    for m in METHODS:
        r = res["methods"][m]
        for key in ("accuracy", "response_tokens"):
            assert math.isfinite(r[key]["mean"])
        assert set(r["per_tier"]) == {"1", "2", "3", "4"}
        assert all(math.isfinite(v) for v in r["accuracy_vs_budget"].values())
    assert {"config", "machine", "warm_start"} <= set(res)
    assert res["warm_start_tier1_greedy"] >= TIER1_FLOOR_QUICK
    report = (out / "report.md").read_text()
    assert "| l2t |" in report and "## Reading" in report
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    assert (out / "acc_tokens_by_depth.png").stat().st_size > 1000
