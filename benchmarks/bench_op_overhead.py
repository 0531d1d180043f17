"""Host time per call that the public op layer adds (argument checks, backend pick, dispatch, autocast handling)
on top of the computation, measured at tiny sizes where the computation itself is a few microseconds: each
public op with ``backend="torch"`` against the same reference function called directly. On a GPU this host time
sets the pace of any call whose kernels run for less than it (``--device cuda``: the same calls on GPU tensors,
each round of calls closed by one synchronisation, so what is timed is the host's launch rate). Writes JSON.

    python benchmarks/bench_op_overhead.py --threads 1 --json op_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from l2t_ext import __version__, ops
from l2t_ext.bench import _harness as H
from l2t_ext.ops import reference


def _calls(device: str):
    g = torch.Generator().manual_seed(0)
    X, D = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    seg, U, V = torch.zeros(8, dtype=torch.int64), torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    M = torch.randn(16, 16, generator=g)
    delta, grads, F = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(8, 8, generator=g)
    X, D, seg, U, V, M, delta, grads, F = (t.to(device) for t in (X, D, seg, U, V, M, delta, grads, F))
    return {  # name: (public op call, the reference function it runs)
        "segment_grad_outer": (lambda: ops.segment_grad_outer(X, D, seg, 1, U, V, backend="torch"),
                               lambda: reference.segment_grad_outer(X, D, seg, 1, U, V)),
        "segment_grad_outer(check_ids=False)": (
            lambda: ops.segment_grad_outer(X, D, seg, 1, U, V, backend="torch", check_ids=False),
            lambda: reference.segment_grad_outer(X, D, seg, 1, U, V)),
        "project": (lambda: ops.project(M, U, V, backend="torch"), lambda: reference.project(M, U, V)),
        "fisher_quadform": (lambda: ops.fisher_quadform(delta, grads, damping=1e-3, backend="torch"),
                            lambda: reference.fisher_quadform_implicit(delta, grads, 1e-3)),
        "fisher_accumulate": (lambda: ops.fisher_accumulate(grads, F, 0.9, backend="torch"),
                              lambda: reference.fisher_accumulate(grads, F, 0.9)),
    }


def _us(fn, n: int, rounds: int, device: str) -> float:
    """Best of ``rounds`` mean microseconds over ``n`` calls (after a warm-up), one synchronisation per round."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(rounds):
        H.sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        H.sync(device)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=3000, help="calls per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="op_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for name, (op, ref) in _calls(args.device).items():
        o, r = _us(op, args.calls, args.rounds, args.device), _us(ref, args.calls, args.rounds, args.device)
        rows[name] = {"op_us": round(o, 1), "reference_us": round(r, 1), "overhead_us": round(o - r, 1)}
        print(f"{name:38s} op {o:7.1f} us   reference {r:7.1f} us   op layer {o - r:6.1f} us")
    out = {"machine": H.machine_info(args.device), "device": args.device, "threads": args.threads,
           "l2t_ext": __version__, "results": rows}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
