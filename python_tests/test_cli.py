"""The `l2t` command line end to end: train then eval, with the report files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")




def test_cli_train_and_eval(tmp_path):
    from l2t_ext.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--preset", "tiny-arith", "--method", "grpo", "--steps", "1", "--out", str(out),
                 "--sft_steps", "5", "--eval_problems", "4", "--hidden_size", "32", "--num_layers", "1",
                 "--max_new_tokens", "24"]) == 0
    assert (out / "eval.json").exists() and (out / "accuracy_vs_budget.png").exists()
    assert main(["eval", "--model", str(out), "--eval_problems", "4", "--eval_samples", "2",
                 "--max-new-tokens", "24", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    r = next(iter(res.values()))
    for key in ("overall", "per_tier", "accuracy_vs_budget", "acc_by_depth", "tokens_by_depth"):
        assert key in r
    assert (tmp_path / "ev" / "acc_tokens_by_depth.png").exists()
