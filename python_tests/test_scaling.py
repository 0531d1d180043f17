"""``benchmarks/scaling_estimate.py`` (the numbers of docs/scaling.md): exact parameter counts of the real
architectures on the meta device, and the memory terms behave as the code does (FSDP divides the persistent
state by the GPU count and adds the gathered weights during rollouts)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")
PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_estimate.py"


def _module():
    spec = importlib.util.spec_from_file_location("scaling_estimate", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_parameter_counts_and_memory_terms():
    se = _module()
    small, big = se.shapes("1.5B"), se.shapes("7B")
    assert small["P"] == 1_543_714_304 and big["P"] == 7_615_616_512  # Qwen2.5-1.5B / -7B, as published
    assert small["n_tracked"] == big["n_tracked"] == 4
    run, hw = se.Run(), se.Hardware()
    one = se.estimate(big, run, hw, 1, "ddp")
    ddp, fsdp = se.estimate(big, run, hw, 8, "ddp"), se.estimate(big, run, hw, 8, "fsdp")
    assert fsdp["parts_gb"]["adam"] == pytest.approx(ddp["parts_gb"]["adam"] / 8)
    assert fsdp["parts_gb"]["gathered"] == pytest.approx(4 * big["P"] / 1e9) and ddp["parts_gb"]["gathered"] == 0
    assert not ddp["fits"] and fsdp["fits"]  # a 7B policy with AdamW needs sharding on 80 GB GPUs
    assert one["time_s"]["comm"] == 0.0 and fsdp["time_s"]["comm"] > ddp["time_s"]["comm"] > 0
    assert fsdp["fisher_allgather_mb"] == pytest.approx(4 * 64 * 8 * 10 * 1024 / 1e6)
