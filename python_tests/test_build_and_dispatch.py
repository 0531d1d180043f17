"""The build and the op registrations: build_info, CUDA compiled whenever nvcc was there, the `l2t info`
command, torch.library opcheck and torch.compile tracing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _cases import DEVICES

import l2t_ext
from l2t_ext import _backend, ops


def test_build_info_keys():
    info = l2t_ext.build_info()
    for key in ("cuda_compiled", "cuda_version", "cuda_archs", "openmp", "backends"):
        assert key in info
    assert "torch" in info["backends"] and "cpu" in info["backends"]
    assert isinstance(info["cuda_compiled"], bool)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA module is optional")
def test_cuda_module_built_when_nvcc_present():
    # A CUDA compile error would leave _C_cuda missing: with nvcc on PATH (as in CI) that must fail here.
    if os.environ.get("L2T_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("built with L2T_CUDA=OFF on purpose")
    info = l2t_ext.build_info()
    assert info["nvcc_found_at_build"], "nvcc is on PATH but CMake did not find it at build time"
    assert info["cuda_compiled"], f"_C_cuda missing: {_backend._C_CUDA_ERR}"
    assert info["cuda_version"] and info["cuda_archs"]
    assert all(int(a.split("-")[0]) >= 75 for a in info["cuda_archs"])


def test_cuda_module_links_no_torch():
    mod = _backend._C_cuda or _backend._C
    if sys.platform != "linux" or shutil.which("ldd") is None:
        pytest.skip("ldd check is Linux-only")
    for m in filter(None, (_backend._C, _backend._C_cuda)):
        out = subprocess.run(["ldd", m.__file__], capture_output=True, text=True).stdout
        assert "libtorch" not in out and "libc10" not in out
        if m is _backend._C_cuda:
            assert "libcudart" not in out, "cudart must be linked statically"
    del mod


def test_l2t_info_cli(tmp_path):
    # run outside the source tree so the installed package (with its compiled modules) is the one imported
    out = subprocess.run([sys.executable, "-m", "l2t_ext.cli", "info", "--json"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    info = json.loads(out)
    assert info["backends"] == l2t_ext.build_info()["backends"]


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    X, D = torch.randn(20, 6, generator=g), torch.randn(20, 5, generator=g)
    seg = torch.tensor([0, 1, 2, -1] * 5)
    U, V = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    return {
        "segment_grad_outer": (X, D, seg, 4, U, V, "cpu"),
        "rsvd": (torch.randn(12, 9, generator=g), 3, 4, 1, 5, "cpu"),
        "project": (torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 3, generator=g),
                    torch.randn(2, 6, 3, generator=g), "cpu"),
        "fisher_quadform": (torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), None, 1e-3, "cpu"),
        "fisher_accumulate": (torch.randn(5, 8, generator=g), torch.randn(8, 8, generator=g), 0.9, "cpu"),
    }


@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_opcheck(name):
    op = getattr(torch.ops.l2t_ext, name)
    torch.library.opcheck(op, _opcheck_args()[name])
    if name == "segment_grad_outer":  # the unchecked call (no host synchronisation on a GPU) too
        torch.library.opcheck(op, _opcheck_args()[name], {"check_ids": False})


def test_torch_compile_traces_segment_grad_outer():
    X, D, seg, S, U, V, _ = _opcheck_args()["segment_grad_outer"]

    def f(X, D):
        return ops.segment_grad_outer(X * 2.0, D, seg, S, U, V, backend="cpu").sum(0)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(X, D), f(X, D), rtol=1e-5, atol=1e-5)


def test_eager_calls_skip_the_custom_op_dispatcher_and_others_keep_it():
    """A plain eager call runs the op's body directly (the dispatcher's host time showed on GPU timings); inputs
    that need a gradient still meet the registered op and its missing autograd formula, not a silent gradient."""
    from torch.profiler import ProfilerActivity, profile

    X, D, seg, S, U, V, _ = _opcheck_args()["segment_grad_outer"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eager = ops.segment_grad_outer(X, D, seg, S, U, V, backend="cpu")
    assert not any("l2t_ext::" in e.key for e in prof.key_averages())
    Xg = X.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        G = ops.segment_grad_outer(Xg, D, seg, S, U, V, backend="cpu")
    assert any("l2t_ext::segment_grad_outer" in e.key for e in prof.key_averages())
    assert torch.equal(G.detach(), eager)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        G.sum().backward()
    with torch.no_grad():  # no gradient wanted: the direct path again
        assert torch.equal(ops.segment_grad_outer(Xg, D, seg, S, U, V, backend="cpu"), eager)


def _public_calls(args: dict, backend: str) -> dict:
    """Each public op called on ``_opcheck_args``-style inputs with ``backend``."""
    X, D, seg, S, U, V, _ = args["segment_grad_outer"]
    W, rank, over, n_iter, seed, _ = args["rsvd"]
    M, Up, Vp, _ = args["project"]
    delta, grads, _, damping, _ = args["fisher_quadform"]
    G, F, decay, _ = args["fisher_accumulate"]
    return {"segment_grad_outer": lambda: ops.segment_grad_outer(X, D, seg, S, U, V, backend=backend),
            "rsvd": lambda: ops.rsvd(W, rank, oversample=over, n_iter=n_iter, seed=seed, backend=backend),
            "project": lambda: ops.project(M, Up, Vp, backend=backend),
            "fisher_quadform": lambda: ops.fisher_quadform(delta, grads=grads, damping=damping, backend=backend),
            "fisher_accumulate": lambda: ops.fisher_accumulate(G, F, decay=decay, backend=backend)}


@pytest.mark.parametrize("device", DEVICES)
def test_ops_ignore_the_callers_autocast(device):
    # a trainer calls the reward inside a bf16 autocast region: the ops keep their own dtypes (float32 inputs,
    # float32 results, float32 matmuls), bit for bit what they return outside it
    args = {k: tuple(a.to(device) if torch.is_tensor(a) else a for a in v) for k, v in _opcheck_args().items()}
    info = l2t_ext.build_info()
    built = set(info["backends"]) - set(info["disabled_backends"])
    backends = [b for b in (("torch", "cpu") if device == "cpu" else ("torch", "cuda", "triton")) if b in built]
    assert "torch" in backends and (device == "cuda" or "cpu" in backends), built
    for backend in backends:
        for name, call in _public_calls(args, backend).items():
            plain = call()
            with torch.autocast(device, dtype=torch.bfloat16):
                cast = call()
            for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (plain, cast)), strict=True):
                assert b.dtype == a.dtype and torch.equal(a, b), (backend, name)


def test_disable_backends_at_run_time(monkeypatch):
    cpu = torch.device("cpu")
    _, _, segment_grad_outer = _op_modules()
    X, D, seg, S, U, V, _ = _opcheck_args()["segment_grad_outer"]
    monkeypatch.setenv("L2T_DISABLE_BACKENDS", " cpu ,triton")
    assert _backend.resolve("segment_grad_outer", "auto", cpu, torch.float32, segment_grad_outer.auto_order(cpu)) \
        == "torch"
    assert torch.equal(ops.segment_grad_outer(X, D, seg, S, U, V),
                       ops.segment_grad_outer(X, D, seg, S, U, V, backend="torch"))
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: disabled by L2T_DISABLE_BACKENDS"):
        ops.segment_grad_outer(X, D, seg, S, U, V, backend="cpu")
    assert l2t_ext.build_info()["disabled_backends"] == ["cpu", "triton"]
    for bad in ("cpu,gpu", "torch"):  # a typo, or the reference itself
        monkeypatch.setenv("L2T_DISABLE_BACKENDS", bad)
        with pytest.raises(ValueError, match="L2T_DISABLE_BACKENDS=.*unknown backend"):
            ops.segment_grad_outer(X, D, seg, S, U, V)
    monkeypatch.setenv("L2T_DISABLE_BACKENDS", "")
    assert _backend.resolve("segment_grad_outer", "auto", cpu, torch.float32, segment_grad_outer.auto_order(cpu)) \
        == "cpu"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be"):
        ops.fisher_accumulate(torch.randn(2, 3), backend="mps")


def _op_modules():
    """The op modules (l2t_ext.ops re-exports functions of the same names as two of them)."""
    import importlib

    return [importlib.import_module(f"l2t_ext.ops.{m}") for m in ("fisher", "rsvd", "segment_grad_outer")]


def test_auto_dispatch_table_on_cpu():
    cpu = torch.device("cpu")
    # measured: our C++ kernel wins segment_grad_outer and rsvd on CPU, MKL wins the quadform GEMM
    fisher, rsvd, segment_grad_outer = _op_modules()
    sgo = segment_grad_outer.auto_order(cpu)
    assert _backend.resolve("segment_grad_outer", "auto", cpu, torch.float32, sgo) == "cpu"
    assert _backend.resolve("rsvd", "auto", cpu, torch.float64, rsvd.rsvd_auto_order(cpu)) == "cpu"
    qf = fisher.quadform_auto_order(cpu, torch.float32, 4096)
    assert _backend.resolve("fisher_quadform", "auto", cpu, torch.float32, qf) == "torch"
    assert _backend.resolve("segment_grad_outer", "auto", cpu, torch.bfloat16, sgo) == "torch"


def test_auto_dispatch_table_on_cuda_shape_classes():
    # the orders are data (benchmarks/README.md); check their shape-class rules without needing a GPU
    fisher, _, segment_grad_outer = _op_modules()
    cuda = torch.device("cuda")
    order = fisher.quadform_auto_order
    assert order(cuda, torch.float32, 4096)[0] == "cuda"
    assert order(cuda, torch.float32, 16384)[0] == "triton"
    assert order(cuda, torch.float32, 65536)[0] == "torch"
    assert order(cuda, torch.bfloat16, 65536)[0] == "triton"
    assert order(cuda, torch.bfloat16, 4096)[0] == "triton"  # the tensor-core CUDA GEMM is unmeasured: not auto
    sgo = segment_grad_outer.auto_order(cuda)
    assert sgo.index("torch") < sgo.index("cuda")  # the CUDA C++ sgo kernel lost to torch


def test_every_backend_implements_every_op():
    # each op's table names one function per backend, and the function exists (CUDA/Triton modules are only
    # imported when they can be: _C_cuda needs no GPU to import, triton needs to be installed)
    from l2t_ext import _backend as B
    from l2t_ext.ops import _common

    fisher, rsvd, segment_grad_outer = _op_modules()
    tables = [segment_grad_outer.IMPLEMENTATIONS, fisher.FISHER_QUADFORM_IMPLICIT, fisher.FISHER_QUADFORM_EXPLICIT,
              fisher.FISHER_ACCUMULATE, rsvd.RSVD_SKETCH, rsvd.PROJECT]
    importable = {"torch", "cpu"} | ({"cuda"} if B._C_cuda is not None else set()) | \
        ({"triton"} if B.triton is not None else set())
    for table in tables:
        assert set(table) == set(B.BACKENDS)
        for backend, path in table.items():
            assert path.split(".")[-1].startswith(("segment_grad_outer", "fisher_", "rsvd_", "project")), path
            if backend in importable:
                assert callable(_common.implementation(path)), path
