"""Static resource report of the tuned Triton kernels, without a GPU: compile every autotune tile for a GPU
target (sm_90 by default) exactly as a launch would specialise it, and read the compiler's own numbers.

A launch specialises unit strides to constants and marks pointers and 16-divisible sizes as such; the report
compiles with the same assumptions (contiguous rows, hidden sizes that are multiples of 16). Per tile it gives
the shared memory (Triton's metadata), registers and spill bytes (``ptxas -v`` on the generated PTX, the ptxas
Triton itself uses) and whether the dots became Hopper wgmma instructions. A tile that spills or does not fit
the shared memory is a tuning defect that only shows up as slowness on the GPU; python_tests/test_gpu_static.py
fails on it in CI.

Usage: ``TRITON_INTERPRET=0 python -m l2t_ext.bench.triton_static [--arch 90] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch

# usable shared memory per block on H100/H200 (227 KB)
SHARED_LIMIT = {90: 232448}
_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_report(fn, types: dict[str, str], constexprs: dict, div16: set[str], num_warps: int, num_stages: int,
                   arch: int = 90) -> dict:
    """Compile ``fn`` (a triton.jit kernel) for sm_<arch>; ``types`` maps each runtime argument to its Triton type
    ("*bf16", "i32", ...), ``div16`` names the arguments a launch would mark as divisible by 16."""
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    names = fn.arg_names
    missing = set(names) - set(types) - set(constexprs)
    if missing:
        raise ValueError(f"triton_static: no type or constant for argument(s) {sorted(missing)} of {fn.__name__}")
    sig = {k: ("constexpr" if k in constexprs else types[k]) for k in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names) if k in div16 and k not in constexprs}
    src = tc.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"triton_static: ptxas failed on {fn.__name__}: {res.stderr[-2000:]}")

    def num(pattern):
        m = re.search(pattern, res.stderr)
        return int(m.group(1)) if m else 0

    return {"shared_bytes": int(kernel.metadata.shared), "registers": num(r"Used (\d+) registers"),
            "spill_store_bytes": num(r"(\d+) bytes spill stores"), "spill_load_bytes": num(r"(\d+) bytes spill loads"),
            "wgmma": "wgmma" in kernel.asm["ptx"], "fits_shared": int(kernel.metadata.shared) <= SHARED_LIMIT[arch],
            **fenced_atomics(kernel.asm["ptx"])}


def fenced_atomics(ptx: str) -> dict:
    """The acq_rel atomics of a last-arriver protocol, and how many of them are fenced by CTA barriers on both
    sides in the PTX: a ``bar.sync`` after the block's last global store before the atomic (every thread's
    partials precede the release) and one before its first global load after it (no thread reads the others'
    partials before the acquire)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    at = [i for i, ln in enumerate(lines) if "atom.global.gpu.acq_rel" in ln]

    def barrier_between(ops, i, step):
        j = i + step
        while 0 <= j < len(lines) and not any(op in lines[j] for op in ops):
            if lines[j].startswith("bar.sync"):
                return True
            j += step
        return j < 0 or j >= len(lines)  # no such access on that side

    fenced = sum(barrier_between(("st.global",), i, -1) and barrier_between(("ld.global",), i, 1) for i in at)
    return {"acq_rel_atomics": len(at), "fenced_atomics": fenced}


def _signature(fn, dtype: str, **special: str) -> dict[str, str]:
    """Triton types of ``fn``'s arguments: pointers to ``dtype`` and int32 scalars unless named in ``special``
    (constexpr arguments are overridden by the constants passed to ``compile_report``)."""
    return {k: special.get(k, f"*{dtype}" if k.endswith("_PTR") else "i32") for k in fn.arg_names}


def segment_grad_outer_reports(arch: int = 90) -> list[dict]:
    """Every tile of the fused segment_grad_outer kernel, for each dtype and each r-tile width (16/32/64)."""
    from l2t_ext.ops import _triton

    fn = _triton._sgo_fused_kernel
    rows = []
    for dtype, tiles in _triton.SGO_TILES.items():
        t = _TYPES[dtype]
        types = _signature(fn, t, SEG_PTR="*i64", BND_PTR="*i64", P_PTR="*fp32")
        div16 = {k for k in types if k.endswith("_PTR")} | {"n", "m", "s_xt", "s_dt"}
        for bt, bk, warps, stages in tiles:
            for br in (16, 32, 64):
                const = {"BF16_DOT": dtype == torch.bfloat16, "BLOCK_A": br, "BLOCK_B": br, "BLOCK_T": bt,
                         "BLOCK_K": bk, "s_xc": 1, "s_dc": 1}
                rep = compile_report(fn, types, const, div16, warps, stages, arch)
                rows.append(dict(kernel="segment_grad_outer", dtype=t, BLOCK_T=bt, BLOCK_K=bk, BLOCK_R=br,
                                 num_warps=warps, num_stages=stages, **rep))
    return rows


def fisher_quadform_reports(arch: int = 90) -> list[dict]:
    """The fused fisher_quadform kernel at its tile, for each dtype, implicit and explicit."""
    from l2t_ext.ops import _triton

    fn = _triton._quadform_fused_kernel
    bm, bn, bk, warps, stages = _triton.QF_TILE
    rows = []
    for t in ("bf16", "fp32"):
        types = _signature(fn, t, WS_PTR="*fp32", NRM_PTR="*fp32", ROW_PTR="*fp32", Q_PTR="*fp32", CNT_PTR="*i32",
                           inv_n="fp32", damping="fp32")
        div16 = {k for k in types if k.endswith("_PTR")} | {"p", "kchunk", "s_dm", "s_gn"}
        for weighted in (False, True):
            const = {"WEIGHTED": weighted, "BF16_DOT": t == "bf16", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                     "s_dp": 1, "s_gp": 1}
            rep = compile_report(fn, types, const, div16, warps, stages, arch)
            rows.append(dict(kernel="fisher_quadform_" + ("explicit" if weighted else "implicit"), dtype=t,
                             BLOCK_T=bm, BLOCK_K=bk, BLOCK_R=bn, num_warps=warps, num_stages=stages, **rep))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, sm_{args.arch}")
    rows = segment_grad_outer_reports(args.arch) + fisher_quadform_reports(args.arch)
    # fisher_quadform rows: BLOCK_T / BLOCK_R hold its BLOCK_M / BLOCK_N
    cols = ["kernel", "dtype", "BLOCK_T", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages", "registers",
            "spill_store_bytes", "shared_bytes", "wgmma"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
