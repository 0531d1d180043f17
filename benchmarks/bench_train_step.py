"""Training steps at real shapes: time per phase, peak memory, the reward's share (l2t_ext/bench/train_step.py)."""

import sys

from l2t_ext.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
