"""Benchmark segment_grad_outer (and its baselines); writes JSON. Same as `l2t bench --ops segment_grad_outer`."""

import sys

from l2t_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--json") for a in args):
        args += ["--json", "bench_segment_grad_outer.json"]
    sys.exit(main(["bench", "--ops", "segment_grad_outer", *args]))
