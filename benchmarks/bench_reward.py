"""Cost of the L2T reward vs one PPO step's forward+backward (see l2t_ext/bench/reward.py); writes JSON."""

import sys

from l2t_ext.bench.reward import main

if __name__ == "__main__":
    sys.exit(main())
