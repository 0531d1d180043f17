"""Training configuration: presets, YAML and flags layered with typed errors naming the key and its source;
`l2t train --help` lists every field."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from l2t_ext.rl.config import TrainConfig, preset, resolve_config  # noqa: E402


def test_config_errors_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*valid keys: model, task"):
        TrainConfig.from_dict({"modle": "tiny"})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dpo")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="rollout_backend must be 'auto', 'hf' or 'vllm'"):
        TrainConfig(rollout_backend="sglang")
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        TrainConfig(vllm_gpu_memory_utilization=1.5)
    f = tmp_path / "c.yaml"
    f.write_text("method: grpo\nsteps: 7\nlr: 1\ntiers: [1, 2]\n")
    cfg = resolve_config(yaml_path=str(f))
    assert cfg.method == "grpo" and cfg.steps == 7 and cfg.lr == 1.0 and cfg.tiers == [1, 2]
    # later layers win: preset < YAML < flags
    cfg = resolve_config("tiny-arith", str(f), flags={"steps": 9})
    assert (cfg.steps, cfg.method, cfg.rank) == (9, "grpo", 8)
    with pytest.raises(ValueError, match=r"c.yaml: config key 'steps' must be int, got 'abc'"):
        f.write_text("steps: abc\n")
        resolve_config(yaml_path=str(f))
    with pytest.raises(ValueError, match=r"command line: config key 'beta' must be float"):
        resolve_config(flags={"beta": True})
    assert cfg.override(["beta=0.3", "ppo=true"]).beta == 0.3
    assert TrainConfig().lr == 1e-6 and TrainConfig().alpha == 0.8 and TrainConfig().beta == 0.6


# ------------------------------------------------------------------------------------------- runs

def test_train_help_lists_every_config_field_and_flags_override_preset(capsys):
    from l2t_ext.cli import _train_config, build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    missing = [k for k in TrainConfig.keys() if f"--{k}" not in help_text]
    assert not missing, missing
    args = build_parser().parse_args(["train", "--preset", "tiny-arith", "--max-new-tokens", "17", "--ppo",
                                      "--no_bf16", "--tiers", "1", "3"])
    cfg, ckpt = _train_config(args)
    assert (cfg.max_new_tokens, cfg.ppo, cfg.bf16, cfg.tiers, cfg.rank, ckpt) == (17, True, False, [1, 3], 8, None)
    # flags not given keep the preset's values, not the dataclass defaults
    assert _train_config(build_parser().parse_args(["train", "--preset", "tiny-arith"]))[0].rank == 8
