"""The GPU performance goals, read off one GPU check's outputs: ``l2t bench --device cuda`` (bench_gpu.json),
``benchmarks/bench_reward.py`` (bench_reward_gpu.json; bench_reward_gpu_flex.json under flex attention),
``benchmarks/bench_train_step.py`` (bench_train_step.json) and the tiny-arith run's metrics
(tiny_arith/metrics.jsonl), all written by ``benchmarks/device_check.sh`` into one folder in one run. Each goal is a
ratio within that run, so the table it prints is what the README's goals table needs: measured value, threshold,
met or missed. A file or row that is missing, failed or above the benchmark's error tolerance makes its goal
"not measured" (never met).

Usage: ``python -m l2t_ext.bench.goals DIR [--markdown goals.md]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from l2t_ext.bench import error_tolerance

SGO_BIG, SGO_SMALL = "T16384_n4096_m4096_r32_S64", "T4096_n1024_m1024_r16_S64"
QF_CASES = ("p16384_N512_M64", "p65536_N512_M64")
# reported beside the sgo goals' ratios (the goal is judged on l2t:triton, the op's default, checked call)
SGO_CANDIDATES = (("l2t:triton_nocheck", "without the id check (the reward's call)"),
                  ("l2t:triton_2pass", "two-pass, direct call"), ("l2t:triton_ksplit", "two-pass split over K"),
                  ("l2t:triton_fused", "fused single pass"), ("l2t:triton_fused_x0.5", "fused, half the pieces"),
                  ("l2t:triton_fused_x2", "fused, twice the pieces"))


def _load(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _timed(rows: list[dict], op: str, case: str, dtype: str) -> dict:
    """impl -> row, for the rows of (op, case, dtype) that ran and are within the error tolerance."""
    return {r["impl"]: r for r in rows if r["op"] == op and r["case"] == case and r["dtype"] == dtype
            and r.get("ms") and r.get("error") is not None and r["error"] < error_tolerance(r)}


def _row(goal: str, measured: str | None, met: bool | None) -> dict:
    """met None with a measurement: a goal without a threshold (the numbers are the goal)."""
    status = "not measured" if measured is None else "measured" if met is None else "met" if met else "missed"
    return {"goal": goal, "measured": measured or "-", "status": status}


def kernel_goals(rows: list[dict]) -> list[dict]:
    out = []
    for case, dtype, want_x, want_pct in ((SGO_BIG, "bfloat16", 3.0, 60.0), (SGO_SMALL, "bfloat16", 1.0, None)):
        t = _timed(rows, "segment_grad_outer", case, dtype)
        goal = f"sgo {case} {dtype}: l2t:triton >= {want_x:g}x torch_best" + \
            (f", >= {want_pct:g}% of the bytes floor" if want_pct else "")
        if "l2t:triton" not in t or "torch_best" not in t:
            out.append(_row(goal, None, None))
            continue
        tri = t["l2t:triton"]
        x = t["torch_best"]["ms"] / tri["ms"]
        pct = tri.get("pct_of_bandwidth") or 0.0
        extra = "".join(f"; {label} {t['torch_best']['ms'] / t[impl]['ms']:.2f}x"
                        for impl, label in SGO_CANDIDATES if impl in t)
        out.append(_row(goal, f"{x:.2f}x, {pct:.0f}% of the floor ({tri['ms']:.3f} ms){extra}",
                        x >= want_x and (want_pct is None or pct >= want_pct)))
    for case in (SGO_SMALL, SGO_BIG):
        for dtype in ("bfloat16", "float32"):
            t = _timed(rows, "segment_grad_outer", case, dtype)
            goal = f"sgo {case} {dtype}: l2t:cuda >= 0.8x l2t:triton's speed"
            ok = "l2t:cuda" in t and "l2t:triton" in t
            x = t["l2t:triton"]["ms"] / t["l2t:cuda"]["ms"] if ok else None
            out.append(_row(goal, f"{x:.2f}x" if ok else None, ok and x >= 0.8))
    for case in QF_CASES:
        for dtype in ("bfloat16", "float32"):
            t = _timed(rows, "fisher_quadform", case, dtype)
            goal = f"fisher_quadform {case} {dtype}: best l2t >= 1.5x torch_best, >= 60% of the bytes floor"
            ours = [r for name, r in t.items() if name.startswith("l2t:")]
            if not ours or "torch_best" not in t:
                out.append(_row(goal, None, None))
                continue
            best = min(ours, key=lambda r: r["ms"])
            x, pct = t["torch_best"]["ms"] / best["ms"], best.get("pct_of_bandwidth") or 0.0
            out.append(_row(goal, f"{best['impl']} {x:.2f}x, {pct:.0f}% of the floor", x >= 1.5 and pct >= 60))
    return out


def reward_goals(res: dict | None, attn: str | None = None) -> list[dict]:
    """The reward goal off one bench_reward.py run; ``attn``: the run's attention implementation when it is not
    the default (named in the goal's row)."""
    goal = "reward / PPO step net of the old-log-prob forward <= 0.25x, penalty <= 0.10x, extra peak memory <= 10%" \
        + (f" ({attn})" if attn else "")
    if not res or "ratios" not in res:
        return [_row(goal, None, None)]
    rt, mem = res["ratios"], res.get("extra_peak_mem_frac")
    net, pen = rt["reward_net_of_old_logprob_forward"], rt["penalty_net_of_old_logprob_forward"]
    measured = f"{net:.2f}x, penalty {pen:.2f}x (gross {rt['reward']:.2f}x / {rt['penalty']:.2f}x)" + \
        (f", memory +{100 * mem:.1f}%" if mem is not None else ", memory not measured") + \
        (f"; packed probes {rt['packed_speedup_over_cache']:.2f}x the KV-cache path's speed"
         if "packed_speedup_over_cache" in rt else "")
    return [_row(goal, measured, net <= 0.25 and pen <= 0.10 and mem is not None and mem <= 0.10)]


def train_goals(res: dict | None) -> list[dict]:
    goal = "first GPU training run at Qwen2-0.5B shapes, bf16: step time, peak memory, reward share"
    runs = (res or {}).get("runs") or {}
    if set(runs) != {"grpo", "l2t"} or not all(runs.values()):
        return [_row(goal, None, None)]
    last = {k: v[-1] for k, v in runs.items()}
    mem = {k: r.get("peak_mem_gb") for k, r in last.items()}
    measured = (f"step GRPO {last['grpo']['time_s']:.2f} s, L2T {last['l2t']['time_s']:.2f} s; peak memory "
                + (f"{mem['grpo']:.1f} / {mem['l2t']:.1f} GB" if None not in mem.values() else "not measured")
                + f"; reward {100 * res['reward_share_of_step']:.1f}% of L2T's step")
    return [_row(goal, measured, None)]


def tiny_goals(folder: str) -> list[dict]:
    """``l2t train --preset tiny-arith --device cuda``'s metrics rows (tiny_arith/metrics.jsonl): every number
    finite, and the GPU's peak memory recorded."""
    goal = "l2t train --preset tiny-arith on cuda: metrics rows sane"
    path = os.path.join(folder, "tiny_arith", "metrics.jsonl")
    if not os.path.exists(path):
        return [_row(goal, None, None)]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    nums = [v for r in rows for v in r.values() if isinstance(v, (int, float))]
    ok = bool(rows) and all(math.isfinite(v) for v in nums) and all("peak_mem_gb" in r for r in rows)
    last = rows[-1] if rows else {}
    measured = f"{len(rows)} steps; last step {last.get('time_s', float('nan')):.2f} s, peak " \
        f"{last.get('peak_mem_gb', float('nan')):.2f} GB"
    return [_row(goal, measured, ok)]


def summarize(folder: str) -> list[dict]:
    bench = _load(folder, "bench_gpu.json")
    return (kernel_goals(bench["results"] if bench else []) + reward_goals(_load(folder, "bench_reward_gpu.json"))
            + reward_goals(_load(folder, "bench_reward_gpu_flex.json"), "flex_attention")
            + train_goals(_load(folder, "bench_train_step.json")) + tiny_goals(folder))


def markdown(rows: list[dict]) -> str:
    lines = ["| goal | measured | status |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {r['goal']} | {r['measured']} | {r['status']} |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    md = markdown(summarize(args.folder))
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
