"""The ``l2t`` command: ``info`` (build and backends), ``bench`` (kernel benchmarks), ``train`` (RL loop),
``eval`` (evaluation with plots), ``inspect`` (reward anatomy of a run), ``demo``, ``convert`` (GGUF)."""

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
    """(config, checkpoint to resume or None): defaults < the resumed run's saved config or a preset < YAML <
    flags given on the command line."""
    from l2t_ext.rl import checkpoint
    from l2t_ext.rl.config import TrainConfig, resolve_config

    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.keys()}
    ckpt = base = None
    if getattr(args, "resume", None):
        ckpt = checkpoint.resolve(args.resume)
        base = checkpoint.saved_config(ckpt)
        base["out"] = checkpoint.run_dir(ckpt) or base["out"]
        changed = {k: v for k, v in flags.items() if base.get(k) != v}
        print(f"l2t: resuming {base['out']} with its saved config" + (
            f"; overridden on the command line: {', '.join(f'{k}={v}' for k, v in changed.items())}"
            if changed else ""), file=sys.stderr)
    return resolve_config(getattr(args, "preset", None), getattr(args, "config", None), base, flags), ckpt


def _cmd_train(args) -> int:
    from l2t_ext.rl.trainer import Trainer, log

    cfg, ckpt = _train_config(args)
    trainer = Trainer(cfg, resume=ckpt)
    rows = trainer.train()
    if rows:
        log(f"done: step {rows[-1]['step']}, accuracy {rows[-1]['accuracy']:.3f}, metrics in {cfg.out}/metrics.jsonl")
    trainer.close()  # torchrun: every rank leaves the group; rank 0 alone evaluates the (identical) final model
    if trainer.rank != 0:
        return 0
    if cfg.eval_problems > 0:
        from l2t_ext.eval import plot_report

        res = trainer.evaluate()
        plot_report({cfg.method: res}, cfg.out)
        log(f"eval: pass@1 {res['overall']['pass@1']:.3f}, tokens {res['overall']['response_tokens']:.1f} "
            f"({cfg.out}/eval.json)")
    return 0


def _cmd_eval(args) -> int:
    import torch

    from l2t_ext.eval import evaluate, plot_report
    from l2t_ext.lm import load_local, render_prompt
    from l2t_ext.rl import checkpoint
    from l2t_ext.rl.builders import resolve_task_defaults
    from l2t_ext.rl.config import TrainConfig, resolve_config
    from l2t_ext.tasks import load_extractor, load_task, load_verifier

    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.keys()}
    try:  # a run or checkpoint directory: its saved config gives the task, markers and cue
        path = checkpoint.resolve(flags["model"])
        base = checkpoint.saved_config(path)
    except FileNotFoundError:
        path, base = flags["model"], None
    cfg = resolve_config(args.preset, args.config, base, flags)
    task = load_task(cfg.task, cfg.tiers)
    cfg = resolve_task_defaults(cfg, task)
    model, tok = load_local(path)
    model.to("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    problems = [{**p, "prompt": render_prompt(tok, p["prompt"], cfg.instruction, cfg.chat_template)}
                for p in task.eval_problems(cfg.eval_problems, cfg.seed)]
    res = evaluate(model, tok, problems, load_verifier(cfg.verifier), load_extractor(cfg.verifier),
                   n_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, answer_cue=cfg.answer_cue,
                   marker=cfg.markers[0])
    paths = plot_report({os.path.basename(os.path.normpath(path)): res}, cfg.out)
    print(json.dumps(res["overall"], indent=1))
    print("wrote", ", ".join(paths + [os.path.join(cfg.out, "eval.json")]))
    return 0


def _cmd_inspect(args) -> int:
    """The reward anatomy of one batch of a run's rollouts (``l2t_ext.reward.anatomy``)."""
    import dataclasses
    import tempfile

    from l2t_ext.reward import episode_anatomy, format_summary, summarize
    from l2t_ext.rl import checkpoint
    from l2t_ext.rl.config import PENALTY_KIND, TrainConfig
    from l2t_ext.rl.trainer import Trainer

    path = checkpoint.resolve(args.run)
    cfg = TrainConfig.from_dict(checkpoint.saved_config(path), f"{path}/train_config.json")
    with tempfile.TemporaryDirectory() as tmp:  # the run directory is only read; the policy is the checkpoint's
        cfg = dataclasses.replace(cfg, model=path, out=tmp, eval_problems=0, prompts_per_step=args.prompts,
                                  seed=args.seed, parallel="ddp",  # one process reads the consolidated weights
                                  method=cfg.method if cfg.method in PENALTY_KIND else "l2t", device="cpu"
                                  if args.cpu else cfg.device)
        trainer = Trainer(cfg)
        batch = trainer.collect(trainer.next_problems())
        rows = episode_anatomy(batch.reward, batch.episode_ids, batch.input_ids, trainer.tok,
                               kind=getattr(trainer.task, "episode_kind", None), outcome=batch.outcome)
        trainer.close()
    summary = summarize(rows)
    print(f"{path}: {len(rows)} episodes in {batch.input_ids.shape[0]} rollouts of {args.prompts} training prompts "
          f"(method {cfg.method}, beta {cfg.beta}, penalty_norm {cfg.penalty_norm})")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "episodes": rows}, f, indent=1)
        print("wrote", args.json)
    return 0


def _cmd_demo(args) -> int:
    from l2t_ext.demo import run_demo

    run_demo(args.out, quick=args.quick, full=args.full, tune=args.tune, jobs=args.jobs, threads=args.threads,
             seeds=args.seeds, warm_starts=args.warm_starts, first_warm_start=args.first_warm_start)
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _cmd_convert(args) -> int:
    import torch

    from l2t_ext.errors import InputError
    from l2t_ext.lm.models import load_gguf

    if not args.gguf.endswith(".gguf"):
        raise InputError(f"convert: {args.gguf} is not a .gguf file")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise InputError(f"convert: {args.out} exists and is not empty")
    model, tok = load_gguf(args.gguf, getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {n / 1e6:.1f}M parameters, {args.dtype}")
    return 0


def _config_flags(model_required: bool = False) -> argparse.ArgumentParser:
    """A parent parser with one flag per ``TrainConfig`` field (``transformers.HfArgumentParser``). Defaults are
    shown in the help but not filled in, so the caller sees only the flags that were given and can layer them
    over a preset, a YAML file or a resumed run's config."""
    from transformers import HfArgumentParser

    from l2t_ext.rl.config import TrainConfig

    parent = HfArgumentParser(TrainConfig, add_help=False)
    for action in parent._actions:
        if action.dest in TrainConfig.keys() and action.default is not argparse.SUPPRESS:
            if action.option_strings and not action.option_strings[0].startswith("--no"):
                action.help = f"{action.help or ''} (default: {action.default})".strip()
            action.default = argparse.SUPPRESS
            if model_required and action.dest == "model":
                action.required = True
    return parent


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _demo_parser(sub) -> argparse.ArgumentParser:
    """``l2t demo``'s arguments."""
    pd = sub.add_parser("demo", help="does L2T cut over-thinking? L2T vs GRPO vs a tuned length penalty, with "
                                     "ablations, on a synthetic task (CPU)")
    mode = pd.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CI smoke run, < 2 minutes; every method, noisy results")
    mode.add_argument("--full", action="store_true", help="the whole grid: 3 warm starts x 2 seeds, every method")
    mode.add_argument("--tune", action="store_true", help="validation sweep of beta and the length coefficient")
    pd.add_argument("--seeds", type=_positive_int, default=None, help="RL seeds per warm start (default: setting's)")
    pd.add_argument("--warm-starts", type=_positive_int, default=None, help="warm starts (default: setting's)")
    pd.add_argument("--first-warm-start", type=int, default=0, help="seed of the first warm start (another value: "
                                                                    "an independent replication)")
    pd.add_argument("--jobs", type=_positive_int, default=None, help="parallel runs (default: 2, quick: 1)")
    pd.add_argument("--out", default="l2t_demo")
    pd.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads per job (default: cores "
                                                                        "/ jobs)")
    pd.set_defaults(func=_cmd_demo)
    return pd


def build_parser() -> argparse.ArgumentParser:
    from l2t_ext import __version__

    p = argparse.ArgumentParser(prog="l2t", description="Learning to Think (L2T) toolkit")
    p.add_argument("--version", action="version", version=f"l2t_ext {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of expected errors too")
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
    pb.add_argument("--profile", dest="profile_path", default=None,
                    help="also write a torch.profiler table (top ops by self device time) per l2t implementation")
    pb.set_defaults(func=_cmd_bench)

    pt = sub.add_parser("train", parents=[_config_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="RL fine-tuning with L2T / GRPO / length-penalty rewards",
                        description="Every TrainConfig field is a flag; --config YAML sets the same names; flags "
                                    "override YAML, YAML overrides --preset.")
    pt.add_argument("--preset", default=None, help="named preset, e.g. tiny-arith")
    pt.add_argument("--config", default=None, help="YAML file of TrainConfig keys")
    pt.add_argument("--resume", default=None, help="run or checkpoint directory to continue: its saved config is "
                                                   "reloaded (flags given here override it)")
    pt.set_defaults(func=_cmd_train)

    pe = sub.add_parser("eval", parents=[_config_flags(model_required=True)],
                        help="pass@1, maj@k, tokens, accuracy vs budget, Acc(k)/T(k); JSON + PNG",
                        description="--model: a run, checkpoint or local Hugging Face model directory (a run's saved "
                                    "config supplies the task, markers and cue). The other flags and their defaults "
                                    "are training's (eval_problems, eval_samples, max_new_tokens, answer_cue, ...); "
                                    "results go to --out.")
    pe.add_argument("--preset", default=None, help="named preset, e.g. tiny-arith")
    pe.add_argument("--config", default=None, help="YAML file of TrainConfig keys")
    pe.set_defaults(func=_cmd_eval)

    pd = _demo_parser(sub)
    ps = sub.add_parser("inspect", help="per-episode reward anatomy (gain, penalty, surprise) of a run's rollouts")
    ps.add_argument("run", help="a run or checkpoint directory")
    ps.add_argument("--prompts", type=_positive_int, default=16, help="training prompts to roll out (x group_size)")
    ps.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling")
    ps.add_argument("--json", default=None, help="write the summary and every episode's row here")
    ps.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    ps.set_defaults(func=_cmd_inspect)
    pc = sub.add_parser("convert", help="write a .gguf model as a Hugging Face directory (dequantised)")
    pc.add_argument("gguf", help="path of the .gguf file")
    pc.add_argument("out", help="output directory (created; must be empty)")
    pc.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    pc.set_defaults(func=_cmd_convert)
    for sp in (pi, pb, pt, pe, pd, ps, pc):  # also accepted after the command; SUPPRESS keeps `l2t --debug CMD` working
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _quiet_third_party() -> None:
    """Our own progress lines stay; transformers' and the Hub's bars (one per checkpoint shard written) go."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 2 an expected error (bad input, missing or corrupt files, a locked run directory:
    one ``l2t: error:`` line, the traceback only with ``--debug``), 1 anything else (a bug: full traceback)."""
    from l2t_ext.errors import L2TError

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except L2TError as e:
        if args.debug:
            raise
        print(f"l2t: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``l2t`` command. Its exit leaves the process group and, under ``torchrun``, skips the interpreter's
    finalisation (see ``exit_process``)."""
    from l2t_ext.rl.builders import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
