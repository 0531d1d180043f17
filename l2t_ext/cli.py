"""The ``l2t`` command. Subcommands: ``info`` (build and backend report), ``bench`` (kernel benchmarks)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from l2t_ext import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, val in info.items():
            print(f"{key:<{width}}  {val}")
    return 0


def _cmd_bench(args) -> int:
    from l2t_ext.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2t", description="Learning to Think (L2T) toolkit")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="print how l2t_ext was built and which backends can run here")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="kernel benchmarks against the baselines users would write")
    pb.add_argument("--quick", action="store_true", help="small shape set (< 5 min on 2 CPU cores)")
    pb.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    pb.add_argument("--ops", default="segment_grad_outer,fisher_quadform,rsvd,project",
                    help="comma-separated ops to benchmark")
    pb.add_argument("--dtype", default=None, help="float32 | bfloat16 | both (GPU default: both)")
    pb.add_argument("--json", dest="json_path", default=None, help="write results JSON here")
    pb.add_argument("--markdown", dest="md_path", default=None, help="write markdown tables here")
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
