"""The `l2t` command line end to end: train then eval with the report files; bad input gives one
`l2t: error:` line and exit code 2 before any work; --version and --debug."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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
    # inspect: the L2T reward anatomy of the (grpo) run's rollouts; the run directory is only read
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["inspect", str(out), "--prompts", "2", "--json", str(tmp_path / "anat.json")]) == 0
    anat = json.loads((tmp_path / "anat.json").read_text())
    assert anat["summary"]["n"] == len(anat["episodes"]) > 0
    assert {"gain", "penalty", "penalty_normalized", "surprise", "tokens", "text"} <= set(anat["episodes"][0])
    assert sorted(p.name for p in out.rglob("*")) == before


def _fails(capsys, argv, match):
    """``l2t argv`` exits 2 with one ``l2t: error:`` line matching ``match`` (before any training)."""
    from l2t_ext.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l2t: error: "), err
    assert re.search(match, err[0]), err[0]


def test_bad_inputs_are_one_line_errors_before_any_work(tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "run"), "--sft_steps", "0", "--steps", "1"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _fails(capsys, base + ["--task", str(empty)], "empty.jsonl: the dataset has no rows")
    no_answer = tmp_path / "rows.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    _fails(capsys, base + ["--task", str(no_answer)], r"rows.jsonl: row 1 has no 'question'/'answer'")
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "1+1?", "answer": "2"}\n')
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--task", str(good), "--sft_steps", "3"],
           "has no reference traces for a supervised warm start; set --sft_steps 0")
    _fails(capsys, base + ["--task", str(tmp_path / "missing.jsonl")], "dataset not found: .*missing.jsonl")
    yml = tmp_path / "c.yaml"
    yml.write_text("steps: abc\n")
    _fails(capsys, base + ["--config", str(yml)], "c.yaml: config key 'steps' must be int, got 'abc'")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _fails(capsys, base + ["--model", str(model)],
           r"not a Hugging Face model directory: no weights \(model.safetensors or .*\); no tokenizer \(")
    _fails(capsys, ["train", "--resume", str(tmp_path / "nowhere")], "--resume .*nowhere: no such file or directory")
    _fails(capsys, ["eval", "--model", str(tmp_path / "nowhere")], "model directory not found")
    assert not (tmp_path / "run").exists()  # nothing was written for any of them


def test_argument_errors_exit_2(capsys):
    from l2t_ext.cli import main

    for argv, match in ((["demo", "--seeds", "0"], "--seeds: expected an integer >= 1, got 0"),
                        (["train", "--steps", "abc"], "--steps: invalid int value: 'abc'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_exit_codes_version_and_debug(tmp_path):
    from l2t_ext import __version__

    run = lambda *a: subprocess.run([sys.executable, "-m", "l2t_ext.cli", *a], capture_output=True, text=True)  # noqa: E731
    assert run("--version").stdout.strip() == f"l2t_ext {__version__}"
    res = run("eval", "--model", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and res.stderr.strip() == (
        f"l2t: error: model directory not found: {tmp_path / 'nowhere'} (l2t never downloads; pass a local path "
        "or a preset such as 'tiny')")
    res = run("eval", "--model", str(tmp_path / "nowhere"), "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "MissingFileError" in res.stderr


def test_gguf_needs_its_extra_and_convert_checks_its_arguments(tmp_path, capsys, monkeypatch):
    import importlib.util

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    _fails(capsys, ["train", "--model", str(fake), "--out", str(tmp_path / "r"), "--sft_steps", "0"],
           r"reading a .gguf model needs gguf( and accelerate)?: pip install 'l2t_ext\[gguf\]'")
    _fails(capsys, ["convert", str(tmp_path / "none.gguf"), str(tmp_path / "o")], "GGUF file not found")
    _fails(capsys, ["convert", str(tmp_path / "x.bin"), str(tmp_path / "o")], "is not a .gguf file")
