"""Token log-probs through the output layer with a constant head (the reward's penalty): forward + backward to the
hidden state, ``lm.head_token_logprobs`` (chunked) against full logits (``token_logprobs(head(h))``), and
optionally against another version of ``l2t_ext/lm/logprobs.py`` (``--against FILE``, e.g. an older commit's:
``git show REV:l2t_ext/lm/logprobs.py > /tmp/old.py``), whose ``_HeadLogprobs`` is swapped in. Calls of the
implementations are interleaved, medians reported, values and gradients checked against each other.

``--penalty CONFIG`` also times the whole penalty of ``benchmarks/bench_reward.py``'s CONFIG (e.g. cpu-smollm2)
with this version's and the ``--against`` version's output layer, interleaved in one process.

Usage: python benchmarks/bench_head_logprobs.py [--device cpu] [--reps 5] [--against FILE] [--penalty CONFIG]
[--json PATH]; run from outside the repository root (the installed package is the one timed).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics

import torch

from l2t_ext.bench import _harness as H
from l2t_ext.lm import logprobs as lpmod

SHAPES = [(8, 256, 576, 49152), (4, 512, 896, 151936)]  # (B, L, d, vocab): SmolLM2-135M, Qwen2-0.5B


def _load(path: str):
    """The other version's ``_HeadLogprobs``, called with as many of this version's arguments as it takes (an
    older one has no trailing ``rows``: it ignores which positions get a gradient)."""
    spec = importlib.util.spec_from_file_location("l2t_logprobs_against", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cls = mod._HeadLogprobs
    nargs = len(inspect.signature(cls.forward).parameters) - 1  # without ctx

    class Against:
        @staticmethod
        def apply(*args):
            return cls.apply(*args[:nargs])

    return Against


def _timed(fns: dict, reps: int, device: str) -> dict:
    """name -> (median s, all s, last output), the calls interleaved so that drift hits every one alike."""
    times, outs = H.time_interleaved(fns, device, reps)
    return {k: (statistics.median(v), v, outs[k]) for k, v in times.items()}


def head_case(shape, device: str, reps: int, against) -> dict:
    B, L, d, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, L, d, generator=g).to(device).requires_grad_(True)
    head = torch.nn.Linear(d, V, bias=False).to(device).requires_grad_(False)
    ids = torch.randint(0, V, (B, L), generator=g).to(device)
    w = (torch.rand(B, L, generator=g) > 0.12).float().to(device)  # ~12% of rows without a gradient (prompt)

    def chunked(cls=None):
        def run():
            real = lpmod._HeadLogprobs
            lpmod._HeadLogprobs = cls or real
            try:
                lp = lpmod.head_token_logprobs(h, head, ids, 1024, head_grads=False)
            finally:
                lpmod._HeadLogprobs = real
            return lp.detach(), torch.autograd.grad((lp * w).sum(), [h])[0]
        return run

    def full():
        lp = lpmod.token_logprobs(head(h), ids)
        return lp.detach(), torch.autograd.grad((lp * w).sum(), [h])[0]

    fns = {"chunked": chunked(), "full_logits": full}
    if against is not None:
        fns["against"] = chunked(against)
    res = _timed(fns, reps, device)
    ref_lp, ref_g = res["full_logits"][2]
    out = {"shape": dict(B=B, L=L, d=d, vocab=V), "ms": {}, "all_ms": {}, "error_vs_full": {}}
    for name, (med, alls, (lp, gh)) in res.items():
        out["ms"][name] = med * 1e3
        out["all_ms"][name] = [t * 1e3 for t in alls]
        out["error_vs_full"][name] = dict(lp=float((lp - ref_lp).abs().max()),
                                          grad=float((gh - ref_g).norm() / ref_g.norm()))
    return out


def penalty_case(config: str, reps: int, against) -> dict:
    from l2t_ext.bench import reward as R

    fns, _ = R._fns(config)
    real = lpmod._HeadLogprobs

    def with_class(cls):
        def run():
            lpmod._HeadLogprobs = cls
            try:
                return fns["penalty"]()
            finally:
                lpmod._HeadLogprobs = real
        return run

    res = _timed({"chunked": with_class(real), "against": with_class(against)}, reps, R._device(config))
    a, b = res["chunked"][2], res["against"][2]
    return {"config": config, "ms": {k: v[0] * 1e3 for k, v in res.items()},
            "all_ms": {k: [t * 1e3 for t in v[1]] for k, v in res.items()},
            "max_rel_diff": float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--against", default=None, help="another version's l2t_ext/lm/logprobs.py")
    p.add_argument("--penalty", default=None, help="a bench_reward.py config; needs --against")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.penalty and not args.against:
        p.error("--penalty compares two versions: give --against FILE")
    if args.threads:
        torch.set_num_threads(args.threads)
    against = _load(args.against) if args.against else None
    report = {"machine": H.machine_info(args.device), "cases": []}
    for shape in SHAPES:
        c = head_case(shape, args.device, args.reps, against)
        report["cases"].append(c)
        ratios = ", ".join(f"{k} {c['ms']['full_logits'] / v:.2f}x" for k, v in c["ms"].items())
        print(f"{shape}: ms {({k: round(v) for k, v in c['ms'].items()})}; speed vs full logits: {ratios}; "
              f"errors vs full {c['error_vs_full']}")
    if args.penalty:
        c = penalty_case(args.penalty, args.reps, against)
        report["penalty"] = c
        print(f"penalty ({args.penalty}): ms {({k: round(v) for k, v in c['ms'].items()})}; this version "
              f"{c['ms']['against'] / c['ms']['chunked']:.2f}x the --against version's speed; max rel diff "
              f"{c['max_rel_diff']:.1e}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
