"""rsvd accuracy and time against torch.svd_lowrank over many sketch draws (the timing table shows one draw):
the same matrix (4096 x 1024, spectrum 0.9^i + 1e-3, as in ``l2t bench``), ``--draws`` seeds each, rank 16,
2 power iterations, each ``--oversample`` (extra sketch columns) for both. The baseline is svd_lowrank with 8
(q = rank + 8); a larger sketch for l2t spends rsvd's speed margin on accuracy. Reports each one's median time
(interleaved rounds, same run) and speed against the baseline, the median, 90th percentile and worst draw of
the top-r singular values' max relative error and of the reconstruction error over the optimal rank-r error,
and whether each l2t error distribution differs from the baseline's and from svd_lowrank's with the same
sketch: a bootstrap 95% interval of the ratio of medians (l2t over svd_lowrank) and the Mann-Whitney rank
statistic z (|z| > 1.96: a difference at the 5% level; < 0: l2t more accurate). Writes JSON.

    python benchmarks/bench_rsvd_accuracy.py --draws 1000 --oversample 8 12 --json bench_rsvd_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from l2t_ext import ops
from l2t_ext.bench.rsvd import make_inputs, recon_ratio

BASE = 8  # the baseline: svd_lowrank with q = rank + 8


def _quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "p90": xs[int(0.9 * (len(xs) - 1))], "max": xs[-1]}


def _compare(a: list[float], b: list[float], resamples: int = 1000) -> dict:
    """Ratio of medians a/b with a bootstrap 95% interval, and the Mann-Whitney z of a against b (normal
    approximation; > 0 when a tends to be larger, i.e. less accurate)."""
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                  for _ in range(resamples))
    ranked = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    n1, n2 = len(a), len(b)
    u = sum(i + 1 for i, (_, g) in enumerate(ranked) if g == 0) - n1 * (n1 + 1) / 2
    z = (u - n1 * n2 / 2) / (n1 * n2 * (n1 + n2 + 1) / 12) ** 0.5
    return {"median_ratio": statistics.median(a) / statistics.median(b),
            "median_ratio_ci95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples)]], "mann_whitney_z": z}


def _times_ms(fns: dict, rounds: int, reps: int) -> dict:
    """Median ms per call of each function, timed in interleaved rounds (drift on a shared machine hits all)."""
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn(0)
            t = time.perf_counter()
            for _ in range(reps):
                fn(0)
            ts[name].append((time.perf_counter() - t) / reps * 1e3)
    return {name: statistics.median(v) for name, v in ts.items()}


def _errors(fn, draws: int, inp: dict) -> tuple[list[float], list[float]]:
    """Per sketch seed: the top-r singular values' max relative error and the reconstruction error over optimal."""
    sv_err, recon = [], []
    for seed in range(draws):
        out = fn(seed)
        sv_err.append(float(((out[1].double() - inp["sv"]).abs() / inp["sv"]).max()))
        recon.append(recon_ratio(inp, out))
    return sv_err, recon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--oversample", type=int, nargs="+", default=[8], help="extra sketch columns (each)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (0: no timing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench_rsvd_accuracy.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    inp = make_inputs(dict(B=1, m=a.m, n=a.n, r=a.rank), "cpu", torch.float32)
    W = inp["W"]

    def svd_lowrank(seed, o):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=a.rank + o, niter=2)
        return U[:, :a.rank], S[:a.rank], V[:, :a.rank]

    fns = {}
    for o in sorted(set(a.oversample) | {BASE}):
        fns[f"l2t:cpu o={o}"] = lambda seed, o=o: ops.rsvd(W, a.rank, oversample=o, n_iter=2, seed=seed,
                                                           backend="cpu")
        fns[f"svd_lowrank o={o}"] = lambda seed, o=o: svd_lowrank(seed, o)
    base = f"svd_lowrank o={BASE}"
    ms = _times_ms(fns, a.rounds, 5) if a.rounds else {}
    res, raw = {}, {}
    for name, fn in fns.items():
        sv_err, recon = _errors(fn, a.draws, inp)
        res[name] = {"sv_rel_error": _quantiles(sv_err), "recon_over_opt": _quantiles(recon)}
        if ms:
            res[name].update(ms=ms[name], speed_vs_baseline=ms[base] / ms[name])
        raw[name] = {"sv_rel_error": sv_err, "recon_over_opt": [x - 1 for x in recon]}
    pairs = [(name, other) for name in fns if name.startswith("l2t")
             for other in dict.fromkeys([base, name.replace("l2t:cpu", "svd_lowrank")])]
    compare = {f"{name} / {other}": {key: _compare(raw[name][key], raw[other][key]) for key in raw[name]}
               for name, other in pairs}
    print(f"{a.m}x{a.n}, rank {a.rank}, {a.draws} draws ({a.threads} threads): median / p90 / worst")
    for name, r in res.items():
        e, q = r["sv_rel_error"], r["recon_over_opt"]
        speed = f"{r['ms']:.2f} ms ({r['speed_vs_baseline']:.2f}x); " if ms else ""
        print(f"  {name:18s} {speed}singular values {e['median']:.2e} / {e['p90']:.2e} / {e['max']:.2e}; "
              f"recon/opt {q['median']:.6f} / {q['p90']:.6f} / {q['max']:.6f}")
    for name, cmp in compare.items():
        for key, c in cmp.items():
            lo, hi = c["median_ratio_ci95"]
            print(f"  {name} {key}: median ratio {c['median_ratio']:.3f} [{lo:.3f}, {hi:.3f}], "
                  f"Mann-Whitney z {c['mann_whitney_z']:+.2f}")
    with open(a.json, "w") as f:
        json.dump({"shape": [a.m, a.n], "rank": a.rank, "draws": a.draws, "threads": a.threads, "baseline": base,
                   "results": res, "l2t_vs_svd_lowrank": compare}, f, indent=1)


if __name__ == "__main__":
    main()
