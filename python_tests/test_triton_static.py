"""The fused Triton kernels compile for a Hopper GPU (sm_90) with every tile they launch with, without register
spills and within the shared memory, and their bf16 dots become wgmma instructions; checked on any machine
(no GPU needed: Triton compiles for the target and its ptxas reports the resources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from l2t_ext import _backend

pytestmark = pytest.mark.skipif(_backend.triton is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def rows():
    out = os.path.join(tempfile.mkdtemp(), "static.json")
    env = dict(os.environ, TRITON_INTERPRET="0")  # compile for the GPU target, not the interpreter
    # from outside the checkout, so that the installed package is imported
    res = subprocess.run([sys.executable, "-W", "ignore", "-m", "l2t_ext.bench.triton_static", "--json", out],
                         capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out) as f:
        return json.load(f)["rows"]


def test_every_segment_grad_outer_tile_is_reported(rows):
    from l2t_ext.ops import _triton

    want = {(str(d).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16"), *t, br)
            for d, ts in _triton.SGO_TILES.items() for t in ts for br in (16, 32, 64)}
    got = {(r["dtype"], r["BLOCK_T"], r["BLOCK_K"], r["num_warps"], r["num_stages"], r["BLOCK_R"]) for r in rows
           if r["kernel"] == "segment_grad_outer"}
    assert got == want
    quad = {(r["kernel"], r["dtype"]) for r in rows if r["kernel"].startswith("fisher_quadform")}
    assert quad == {(f"fisher_quadform_{k}", t) for k in ("implicit", "explicit") for t in ("bf16", "fp32")}


def test_no_tile_spills_or_overflows_shared_memory(rows):
    bad = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"] or not r["fits_shared"]]
    assert not bad, bad
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_bf16_dots_use_wgmma(rows):
    assert all(r["wgmma"] for r in rows if r["dtype"] == "bf16")
