"""Write DeepMind mathematics_dataset problems as a JSONL task file for ``l2t train --task FILE``.

mathematics_dataset needs sympy 1.5-era APIs, while l2t_ext's grader (math-verify) needs a recent sympy: the
two cannot share an environment, so this script runs in its own venv and only writes a file::

    python3 -m venv ~/.venvs/dm_math && ~/.venvs/dm_math/bin/pip install mathematics_dataset "sympy==1.5"
    ~/.venvs/dm_math/bin/python scripts/dm_math_to_jsonl.py --filter arithmetic__add_or_sub \\
        --regime train-easy --n 2000 --seed 0 --out dm_add_sub.jsonl
    l2t train --task dm_add_sub.jsonl ...

Each row is ``{"question", "answer", "module", "regime"}``. It imports nothing from l2t_ext.
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", default="arithmetic__add_or_sub", help="module name substring (generate.py --filter)")
    p.add_argument("--regime", default="train-easy",
                   choices=["train-easy", "train-medium", "train-hard", "interpolate", "extrapolate"])
    p.add_argument("--n", type=int, default=1000, help="problems per matching module")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import numpy as np
    from absl import flags
    from mathematics_dataset import generate

    random.seed(args.seed)
    np.random.seed(args.seed)
    flags.FLAGS(["dm_math_to_jsonl", f"--filter={args.filter}", "--per_train_module=3", "--per_test_module=1"])
    generate.init_modules(train_split=True)
    modules = generate.filtered_modules[args.regime]
    if not modules:
        raise SystemExit(f"no module of regime {args.regime} matches --filter {args.filter!r}")
    with open(args.out, "w") as f:
        for name, module in modules.items():
            for _ in range(args.n):
                problem, _dropped = generate.sample_from_module(module)
                f.write(json.dumps({"question": str(problem.question), "answer": str(problem.answer),
                                    "module": name, "regime": args.regime}) + "\n")
    print(f"wrote {args.n * len(modules)} rows from {len(modules)} module(s) to {args.out}")


if __name__ == "__main__":
    main()
