"""Benchmark harness: timing, peak memory, machine facts and the JSON/markdown report (issue: kernel
benchmarks; benchmarks/README.md). Speed is only ever reported as a ratio against baselines measured in the
same run on the same machine.

Timing: on CUDA ``triton.testing.do_bench`` (events; median, p20, p80); on CPU ``time.perf_counter`` around
each call after warm-up, repeated until about a second of samples. Peak memory: on CUDA the growth of
``torch.cuda.max_memory_allocated`` over the inputs; on CPU the growth of the peak RSS of a fresh
subprocess that builds the inputs and then runs the implementation once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Impl:
    name: str
    role: str  # "l2t" (this package's backends) or "baseline"
    fn: Callable[[dict], object]  # inputs -> output (the output is compared with the reference)


@dataclasses.dataclass
class Case:
    op: str
    name: str
    params: dict  # the suite's floor(params, dtype) gives the fewest bytes any implementation must move


MIN_CUDA_REPS = 10  # timed calls per GPU measurement at least, budget allowing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, budget_s: float = 1.0, max_reps: int = 50) -> dict:
    """Median / p20 / p80 milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        # do_bench sizes its loop from ``rep`` milliseconds: at 200 ms a 130 ms call (the reward bench) ran once,
        # and its "median" was one sample. Ask for at least MIN_CUDA_REPS calls, within budget_s when that allows.
        fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        est_ms = (time.perf_counter() - t0) * 1e3
        rep = max(200.0, min(MIN_CUDA_REPS * est_ms, max(budget_s * 1e3, 3 * est_ms)))
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": p20, "p80_ms": p80, "reps": max(1, int(rep / max(est_ms, 1e-3)))}
    t0 = time.perf_counter()
    fn()  # warm-up (first-touch allocation, lazy init)
    first = time.perf_counter() - t0
    if first < 0.2:
        fn()
    reps = max(3, min(max_reps, int(budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7], "reps": reps}


def profile_table(fn: Callable[[], object], device: str, rows: int = 12) -> str:
    """One warmed-up call of fn under torch.profiler: its top ops by self device time (self CPU time on the CPU).
    The warm-up keeps compiles, autotuning and allocator growth out of the table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return f"sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def time_interleaved(fns: dict, device: str, reps: int) -> tuple[dict, dict]:
    """(name -> wall seconds of each call, name -> its last output) of ``reps`` rounds calling every fns[name]() in
    turn, synchronised on both sides: a shared machine's drift hits every candidate alike, so their ratio holds
    where separately timed medians may not."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, outs


def cuda_peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mb(op: str, params: dict, impl: str, dtype: str) -> float | None:
    """Peak RSS growth of one call, measured in a fresh subprocess (None if the child failed)."""
    code = ("import json,sys; from l2t_ext.bench import _child_peak; "
            "print(json.dumps(_child_peak(*json.loads(sys.argv[1]))))")
    # fixed glibc mmap threshold: large blocks are mmap'ed and returned on free, so the measured call's
    # working set shows up in RSS even though a warm-up call ran (and freed) first
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    # run outside the current directory: from a source checkout, ``-c`` would import the uncompiled tree
    res = subprocess.run([sys.executable, "-c", code, json.dumps([op, params, impl, dtype])], capture_output=True,
                         text=True, env=env, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        return None
    return float(res.stdout.strip().splitlines()[-1])


def child_peak(inputs: dict, impl_fn: Callable[[dict], object]) -> float:
    """In a fresh process: peak RSS during one call minus the RSS just before it (inputs already built, one
    warm-up call done so one-time lazy initialisation is not counted)."""
    impl_fn(inputs)
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs)")
    before = _rss_mb("VmRSS")
    out = impl_fn(inputs)
    peak = _rss_mb("VmHWM")
    del out
    return max(0.0, peak - before)


def measure_bandwidth(device: str, mb: int = 512) -> float:
    """GB/s of a large copy (bytes read + written), measured now on this machine."""
    n = mb * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    else:
        ms = time_fn(lambda: dst.copy_(src), device, budget_s=1.0)["ms"]
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def machine_info(device: str) -> dict:
    import l2t_ext

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "l2t_ext": l2t_ext.__version__,
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                    gpu_mem_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def rel_error(out, ref) -> float:
    if isinstance(out, (tuple, list)):
        out = out[0]
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(o).all():
        return float("inf")
    den = r.norm().item()
    return (o - r).norm().item() / (den if den else 1.0)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}, "
             f"l2t_ext {m['l2t_ext']}; measured copy bandwidth {m['bandwidth_gbps']:.1f} GB/s", ""]
    ops_seen = []
    for r in report["results"]:
        if r["op"] not in ops_seen:
            ops_seen.append(r["op"])
    for op in ops_seen:
        rows = [r for r in report["results"] if r["op"] == op]
        baselines = []
        for r in rows:
            if r["role"] == "baseline" and r["impl"] not in baselines:
                baselines.append(r["impl"])
        lines.append(f"### {op}")
        lines.append("")
        head = ["case", "dtype", "impl", "role", "ms (p20-p80)", "peak MB", "rel. error", "GB/s"]
        if op == "rsvd":
            head.append("recon/opt")
        head += [f"x vs {b}" for b in baselines]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            same = [x for x in rows if x["case"] == r["case"] and x["dtype"] == r["dtype"]]
            cells = [r["case"], r["dtype"], r["impl"], r["role"],
                     "skipped" if r["ms"] is None else f"{r['ms']:.3g} ({r['p20_ms']:.3g}-{r['p80_ms']:.3g})",
                     "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
                     "-" if r["error"] is None else f"{r['error']:.1e}",
                     "-" if r["gbps"] is None else f"{r['gbps']:.1f}"]
            if op == "rsvd":
                cells.append("-" if r.get("recon_ratio") is None else f"{r['recon_ratio']:.4f}")
            for b in baselines:
                base = next((x for x in same if x["impl"] == b and x["ms"]), None)
                cells.append(f"{base['ms'] / r['ms']:.2f}" if base and r["ms"] else "-")
            lines.append("| " + " | ".join(cells) + " |")
        notes = [r for r in rows if r.get("note")]
        for r in notes:
            lines.append(f"\n- {r['case']} {r['impl']}: {r['note']}")
        lines.append("")
    return "\n".join(lines)
