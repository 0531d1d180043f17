"""``l2t bench``: kernel benchmarks with side-by-side ratios against the baselines users would write.

Each suite (segment_grad_outer, fisher_quadform, rsvd, project) defines cases, inputs, a float64 reference
and implementations; this runner times every implementation, measures its peak memory, checks its error
against the reference in the same run, and writes ``{"machine": ..., "results": [...]}`` JSON (schema in
README "Benchmarks") plus markdown tables.
"""

from __future__ import annotations

import json
import math
import sys
import time
from types import SimpleNamespace

import torch

from l2t_ext import _backend
from l2t_ext.bench import _harness as H
from l2t_ext.bench import fisher_quadform as _fq
from l2t_ext.bench import rsvd as _rs
from l2t_ext.bench import segment_grad_outer as _sgo

SUITES = {
    "segment_grad_outer": SimpleNamespace(cases=_sgo.cases, inputs=_sgo.make_inputs, ref=_sgo.reference,
                                          impls=_sgo.impls, floor=_sgo.floor_bytes, est=_sgo.est_bytes),
    "fisher_quadform": SimpleNamespace(cases=_fq.cases, inputs=_fq.make_inputs, ref=_fq.reference,
                                       impls=_fq.impls, floor=_fq.floor_bytes, est=_fq.est_bytes),
    "rsvd": SimpleNamespace(cases=_rs.cases, inputs=_rs.make_inputs, ref=_rs.reference, impls=_rs.impls,
                            floor=_rs.floor_bytes, est=_rs.est_bytes),
    "project": SimpleNamespace(cases=_rs.project_cases, inputs=_rs.project_inputs, ref=_rs.project_reference,
                               impls=_rs.project_impls, floor=_rs.floor_bytes, est=_rs.est_bytes),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def l2t_backends(device: str, dtype: torch.dtype) -> list[str]:
    cands = ("cuda", "triton", "torch") if device == "cuda" else ("cpu", "torch")
    dev = torch.device(device)
    return [b for b in cands if _backend.unavailable_reason(b, dev, dtype) is None]


def _child_peak(op: str, params: dict, impl: str, dtype: str) -> float:
    """Entry point of the memory-measuring subprocess (CPU)."""
    torch.manual_seed(0)
    suite = SUITES[op]
    dt = DTYPES[dtype]
    inputs = suite.inputs(params, "cpu", dt)
    fn = next(i.fn for i in suite.impls("cpu", l2t_backends("cpu", dt)) if i.name == impl)
    return H.child_peak(inputs, fn)


def _mem_budget(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.6)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30


def _measure(row: dict, case, impl, inputs: dict, ref, floor: int) -> None:
    """Fills ``row`` with one implementation's error against the reference, its time, bandwidth and peak memory."""
    op, device, dtname = row["op"], row["device"], row["dtype"]
    if op == "rsvd":  # randomized methods: average the accuracy over 5 sketch seeds
        errs, recs = [], []
        for seed in range(1) if impl.name == "linalg_svd" else range(5):
            out = impl.fn({**inputs, "seed": seed})
            errs.append(H.rel_error(out[1], ref))
            recs.append(_rs.recon_ratio(inputs, out))
        row["error"], row["recon_ratio"] = sum(errs) / len(errs), sum(recs) / len(recs)
    else:
        out = impl.fn(inputs)
        H.sync(device)
        row["error"] = H.rel_error(out, ref)
    del out
    t = H.time_fn(lambda: impl.fn(inputs), device)
    row.update(ms=t["ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], gbps=floor / (t["ms"] * 1e-3) / 1e9)
    if device == "cuda":
        row["peak_mem_mb"] = H.cuda_peak_mb(lambda: impl.fn(inputs))
    else:
        row["peak_mem_mb"] = H.cpu_peak_mb(op, case.params, impl.name, dtname)


def run_suite(op: str, quick: bool, device: str, dtypes: list[str], log=print,
              profile: list | None = None) -> list[dict]:
    """Every implementation of ``op`` on every case and dtype: its error against the float64 reference, time and
    peak memory. ``profile``: a list that gets a profiler table (``_harness.profile_table``) per l2t
    implementation."""
    suite = SUITES[op]
    rows = []
    for case in suite.cases(quick, device):
        for dtname in dtypes:
            dt = DTYPES[dtname]
            inputs = suite.inputs(case.params, device, dt)
            ref = suite.ref(inputs)
            floor = suite.floor(case.params, dt)
            for impl in suite.impls(device, l2t_backends(device, dt)):
                row = dict(op=op, case=case.name, impl=impl.name, role=impl.role, device=device, dtype=dtname,
                           ms=None, p20_ms=None, p80_ms=None, peak_mem_mb=None, error=None, gbps=None)
                need = suite.est(impl.name, case.params, dt)
                if quick and impl.name == "linalg_svd" and math.prod(case.params[k] for k in "Bmn") > 4_000_000:
                    row["note"] = "skipped in --quick: a full SVD of this size takes seconds"
                    rows.append(row)
                    continue
                if need > _mem_budget(device):
                    row["note"] = f"skipped: needs about {need / 2**30:.1f} GiB"
                    rows.append(row)
                    log(f"  {op:18s} {case.name:28s} {dtname:8s} {impl.name:16s} {row['note']}")
                    continue
                try:
                    _measure(row, case, impl, inputs, ref, floor)
                    if profile is not None and impl.role == "l2t":
                        table = H.profile_table(lambda impl=impl, inputs=inputs: impl.fn(inputs), device)
                        profile.append(f"## {op} {case.name} {dtname} {impl.name}; {table}\n")
                except Exception as exc:  # report, keep going: one failing baseline must not hide the rest
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
                err = "-" if row["error"] is None else f"{row['error']:.1e}"
                log(f"  {op:18s} {case.name:28s} {dtname:8s} {impl.name:16s} {ms:>14s}  err {err}"
                    + (f"  {row['note']}" if row.get("note") else ""))
            del inputs, ref
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("l2t bench: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.dtype in (None, "both"):
        dtypes = ["float32", "bfloat16"] if device == "cuda" else ["float32"]
    else:
        dtypes = [d.strip() for d in args.dtype.split(",")]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            print(f"l2t bench: unknown dtype(s) {bad}; choose from {list(DTYPES)}", file=sys.stderr)
            return 2
    ops_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops_list if o not in SUITES]
    if unknown:
        print(f"l2t bench: unknown op(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    t0 = time.time()
    machine = H.machine_info(device)
    machine["bandwidth_gbps"] = H.measure_bandwidth(device)
    print(f"l2t bench on {machine.get('gpu') or machine['cpu']} ({machine['cpu_cores']} cores), torch "
          f"{machine['torch']}, copy bandwidth {machine['bandwidth_gbps']:.1f} GB/s")
    results = []
    tables = [] if args.profile_path else None
    report = {"machine": machine, "results": results, "quick": bool(args.quick), "ops_done": []}
    for op in ops_list:
        rows = run_suite(op, args.quick, device, dtypes, profile=tables)
        for r in rows:
            r["pct_of_bandwidth"] = (100 * r["gbps"] / machine["bandwidth_gbps"]) if r["gbps"] else None
        results += rows
        report["ops_done"].append(op)
        report["wall_s"] = time.time() - t0
        if args.json_path:  # after every op: a run cut off by a time limit keeps the ops it finished
            with open(args.json_path, "w") as f:
                json.dump(report, f, indent=1)
        if args.profile_path:
            with open(args.profile_path, "w") as f:
                f.write("\n".join(tables))
    md = H.markdown(report)
    print()
    print(md)
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(md + "\n")
    bad = [r for r in results if r["error"] is not None and not r["error"] < error_tolerance(r)]
    for r in bad:
        print(f"l2t bench: {r['op']} {r['case']} {r['impl']} {r['dtype']}: error {r['error']:.2e} above tolerance",
              file=sys.stderr)
    return 1 if bad else 0


def error_tolerance(row: dict) -> float:
    """Error bound an implementation must meet (rsvd: singular values of a decaying spectrum)."""
    if row["op"] == "rsvd":
        return 5e-2 if row["dtype"] == "bfloat16" else 1e-2
    return 5e-2 if row["dtype"] == "bfloat16" else 1e-3
