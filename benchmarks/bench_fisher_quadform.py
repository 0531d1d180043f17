"""Benchmark fisher_quadform (and its baselines); writes JSON. Same as `l2t bench --ops fisher_quadform`."""

import sys

from l2t_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--json") for a in args):
        args += ["--json", "bench_fisher_quadform.json"]
    sys.exit(main(["bench", "--ops", "fisher_quadform", *args]))
