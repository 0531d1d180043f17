"""GPU kernels checked on any machine, no GPU needed: the fused Triton kernels compile for a Hopper GPU (sm_90)
with every tile they launch with, without register spills and within the shared memory, and their bf16 dots
become wgmma instructions (Triton compiles for the target; its ptxas reports the resources); the CUDA C++
kernels compile for sm_90 without spills, and the bf16 GEMMs' machine code uses the tensor cores (HMMA), the row
kernel's with 16-byte loads."""

from __future__ import annotations

import json
import os
import re
import shutil
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


def test_quadform_counters_are_fenced_by_cta_barriers(rows):
    """The fused quadform's two completion counters (tile, row block) are acq_rel atomics with a CTA barrier
    between every thread's partial stores and the release, and between the acquire and any thread's reads of
    the other programs' partials: what the interpreter, running programs one at a time, cannot check. (Triton's
    lowering of a scalar atomic brings barriers of its own; this checks the compiled result, whoever placed them.)"""
    quad = [r for r in rows if r["kernel"].startswith("fisher_quadform")]
    assert quad and all(r["acq_rel_atomics"] == 2 == r["fenced_atomics"] for r in quad), quad
    assert all(r["acq_rel_atomics"] == 0 for r in rows if r["kernel"] == "segment_grad_outer")


def test_autotuner_tries_exactly_the_input_dtypes_tiles():
    """On a GPU the fused segment_grad_outer is tuned over every dtype's tiles, pruned at launch to the input's
    dtype (the interpreter has one tile, so CI's kernel tests never reach the pruning)."""
    import torch

    from l2t_ext.ops import _triton

    configs = _triton._sgo_configs(interpret=False)
    assert len(configs) == len({t for ts in _triton.SGO_TILES.values() for t in ts})
    for dtype, tiles in _triton.SGO_TILES.items():
        kept = _triton._sgo_prune(configs, {"X_PTR": torch.empty(2, 2, dtype=dtype)})
        assert sorted((c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in kept) == \
            sorted(tiles)
    assert "X_PTR" in _triton._sgo_fused.arg_names  # the name the pruning reads the input by


CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_do_not_spill_and_the_bf16_gemms_use_tensor_cores(tmp_path):
    cubin = str(tmp_path / "kernels.cubin")
    res = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-I{CSRC}", "-gencode", "arch=compute_90,code=sm_90",
                          "--resource-usage", "-cubin", "-o", cubin, os.path.join(CSRC, "cuda", "kernels.cu")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    spills = re.findall(r"Function properties for (\S+)\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads",
                        res.stdout + res.stderr)
    assert any("gemm_tc_kernel" in f for f, _, _ in spills), res.stderr[-2000:]
    assert all(st == "0" and ld == "0" for _, st, ld in spills), spills
    # the SASS of the tensor-core GEMM: cuobjdump ships with Triton's NVIDIA backend
    pytest.importorskip("triton")
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("no cuobjdump in this Triton install")
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, timeout=300).stdout
    funcs = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+Function : |\Z)", sass, flags=re.S))
    tc = [body for name, body in funcs.items() if "gemm_tc_kernel" in name]
    assert tc and all("HMMA" in body for body in tc)
    rows = [body for name, body in funcs.items() if "rows_tc_kernel" in name]  # tensor cores, 16-byte loads
    assert rows and all("HMMA" in body and "LDG.E.128" in body for body in rows)
    assert not any("HMMA" in body for name, body in funcs.items() if "gemm_kernel" in name)  # the fp32 twin
