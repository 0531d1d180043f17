"""The ``l2t`` command: ``info`` (build and backends), ``bench`` (kernel benchmarks), ``train`` (RL loop),
``eval`` (evaluation with plots)."""

from __future__ import annotations

import argparse
import json
import os
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


def _train_config(args):
    from l2t_ext.rl.config import TrainConfig, preset

    cfg = preset(args.preset) if args.preset else TrainConfig()
    if args.config:
        import dataclasses

        base = dataclasses.asdict(cfg)
        loaded = TrainConfig.from_yaml(args.config)
        base.update({k: v for k, v in dataclasses.asdict(loaded).items() if k in _yaml_keys(args.config)})
        cfg = TrainConfig.from_dict(base)
    pairs = list(args.set or [])
    for key in ("method", "steps", "out", "model", "task"):
        val = getattr(args, key, None)
        if val is not None:
            pairs.append(f"{key}={val}")
    return cfg.override(pairs) if pairs else cfg


def _yaml_keys(path):
    import yaml

    with open(path) as f:
        return set((yaml.safe_load(f) or {}).keys())


def _cmd_train(args) -> int:
    from l2t_ext.rl.trainer import Trainer, log

    cfg = _train_config(args)
    trainer = Trainer(cfg, resume=args.resume)
    rows = trainer.train()
    if rows:
        log(f"done: step {rows[-1]['step']}, accuracy {rows[-1]['accuracy']:.3f}, metrics in {cfg.out}/metrics.jsonl")
    if trainer.world > 1:  # torchrun: rank 0 evaluates the (identical) final model
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if trainer.rank != 0:
            return 0
    if cfg.eval_problems > 0:
        from l2t_ext.eval import evaluate, plot_report

        res = evaluate(trainer.model, trainer.tok, _eval_problems(cfg.task, cfg.eval_problems, cfg.seed, cfg.tiers),
                       trainer.verify, _extractor(cfg.verifier), n_samples=2, max_new_tokens=cfg.max_new_tokens,
                       answer_cue=cfg.answer_cue, marker=cfg.markers[0])
        plot_report({cfg.method: res}, cfg.out)
        log(f"eval: pass@1 {res['overall']['pass@1']:.3f}, tokens {res['overall']['response_tokens']:.1f} "
            f"({cfg.out}/eval.json)")
    return 0


def _eval_problems(task: str, n: int, seed: int, tiers=(1, 2, 3, 4)) -> list[dict]:
    if task == "arith":
        from l2t_ext.tasks import arith

        return [{"prompt": p.prompt, "answer": p.answer, "tier": p.tier}
                for p in arith.dataset(n, seed=seed + 10_000, tiers=tuple(tiers))]
    from l2t_ext.tasks.math import load_dataset

    return [{"prompt": r["question"] + "\n", "answer": r["answer"]} for r in load_dataset(task)[:n]]


def _extractor(verifier: str):
    from l2t_ext.tasks import arith
    from l2t_ext.tasks import math as math_task

    return arith.extract_answer if verifier == "arith" else math_task.extract_answer


def _cmd_eval(args) -> int:
    import json

    import torch

    from l2t_ext.eval import evaluate, plot_report
    from l2t_ext.rl.checkpoint import resolve
    from l2t_ext.rl.modeling import load_local
    from l2t_ext.tasks import load_verifier

    try:
        path = resolve(args.model)
    except FileNotFoundError:
        path = args.model
    model, tok = load_local(path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(model, tok, _eval_problems(args.task, args.n, args.seed), load_verifier(args.verifier),
                   _extractor(args.verifier), n_samples=args.samples, max_new_tokens=args.max_new_tokens,
                   answer_cue=args.answer_cue)
    os.makedirs(args.out, exist_ok=True)
    paths = plot_report({os.path.basename(os.path.normpath(path)): res}, args.out)
    print(json.dumps(res["overall"], indent=1))
    print("wrote", ", ".join(paths + [os.path.join(args.out, "eval.json")]))
    return 0


def _cmd_demo(args) -> int:
    from l2t_ext.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds, threads=args.threads)
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


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

    pt = sub.add_parser("train", help="RL fine-tuning with L2T / GRPO / length-penalty rewards")
    pt.add_argument("--preset", default=None, help="named preset, e.g. tiny-arith")
    pt.add_argument("--config", default=None, help="YAML config (keys of l2t_ext.rl.config.TrainConfig)")
    pt.add_argument("--method", choices=["grpo", "length_penalty", "l2t"], default=None)
    pt.add_argument("--steps", type=int, default=None)
    pt.add_argument("--out", default=None, help="output directory (metrics.jsonl, checkpoints/, eval.json)")
    pt.add_argument("--model", default=None, help="'tiny' or a local Hugging Face model directory")
    pt.add_argument("--task", default=None, help="'arith' or a .jsonl/.parquet file of {question, answer}")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    pt.add_argument("--resume", default=None, help="run or checkpoint directory to continue from")
    pt.set_defaults(func=_cmd_train)

    pe = sub.add_parser("eval", help="pass@1, maj@k, tokens, accuracy vs budget, Acc(k)/T(k); JSON + PNG")
    pe.add_argument("--model", required=True, help="checkpoint, run directory or local HF model directory")
    pe.add_argument("--task", default="arith")
    pe.add_argument("--verifier", default="arith")
    pe.add_argument("--n", type=int, default=64, help="questions")
    pe.add_argument("--samples", type=int, default=4, help="samples per question (pass@1 average, maj@k)")
    pe.add_argument("--max-new-tokens", type=int, default=128)
    pe.add_argument("--answer-cue", default="A:")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--out", default="l2t_eval")
    pe.set_defaults(func=_cmd_eval)

    pd = sub.add_parser("demo", help="L2T vs GRPO vs length penalty on a synthetic task (CPU, minutes)")
    pd.add_argument("--quick", action="store_true", help="< 2 minutes; results are noisy")
    pd.add_argument("--seeds", type=int, default=1)
    pd.add_argument("--out", default="l2t_demo")
    pd.add_argument("--threads", type=int, default=None)
    pd.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
