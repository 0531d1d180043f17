"""Evaluation of a policy on verifiable problems (issue: loop / ``l2t eval``; paper section 3 and F.1).

- pass@1: mean verifier score over ``n_samples`` sampled responses per question; maj@k: the majority final
  answer of the k samples graded once.
- response tokens: mean generated tokens; tokens per correct answer: total tokens / number of correct samples.
- accuracy vs token budget B: each sampled response is cut at B tokens; if it had not answered by then,
  the answer cue is appended and the answer decoded greedily, then graded.
- Acc(k) / T(k): force-stop each response at its k-th episode marker, append the answer cue, decode the
  answer greedily and grade; T(k) is the number of response tokens up to that marker. Responses with fewer
  than k episodes keep their own answer and length. Reported per difficulty tier.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch
from tqdm.auto import tqdm

from l2t_ext.lm import generate, left_pad
from l2t_ext.lm.markers import closing_positions, marker_text, text_patterns


@torch.no_grad()
def _force_answers(model, tokenizer, prefixes: list[list[int]], cue_ids: list[int], max_answer_tokens: int,
                   batch: int = 256) -> list[str]:
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, len(prefixes), batch):
        pad = tokenizer.pad_token_id
        ids, am = left_pad([p + cue_ids for p in prefixes[i:i + batch]], pad, dev)
        n = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_answer_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=False)
        outs += tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
    return outs


def evaluate(model, tokenizer, problems: list[dict], verify, extract, n_samples: int = 4, max_new_tokens: int = 256,
             budgets: tuple[int, ...] = (16, 32, 48, 64, 96, 128), max_depth: int = 8, answer_cue: str = "A:",
             marker: str = "</think>", temperature: float = 1.0, batch_prompts: int = 32,
             max_answer_tokens: int = 6, do_sample: bool = True, episode_kind=None) -> dict:
    """``problems``: dicts with ``prompt``, ``answer`` and optional ``tier``; ``do_sample=False`` decodes
    greedily (then use n_samples=1); ``episode_kind(text) -> str`` (a task's labeller) adds the mean number of
    episodes of each kind per response, overall and per tier (``episode_kinds``). Returns a JSON-able dict."""
    model.eval()
    cue_ids = tokenizer.encode(answer_cue, add_special_tokens=False)
    samples = _sample(model, tokenizer, problems, verify, n_samples, max_new_tokens, temperature, batch_prompts,
                      do_sample)
    result = _summaries(problems, samples, verify, extract, answer_cue, n_samples)
    force = lambda prefixes: _force_answers(model, tokenizer, prefixes, cue_ids, max_answer_tokens)
    result["accuracy_vs_budget"] = _accuracy_vs_budget(samples, problems, verify, budgets, force,
                                                       marker_text(marker) + answer_cue)
    ends = closing_positions(tokenizer, [rids for _, _, rids, _, _ in samples], text_patterns([marker]))
    result.update(_acc_by_depth(samples, problems, verify, max_depth, ends, force, marker_text(marker) + answer_cue))
    result["n_samples"] = n_samples
    if episode_kind is not None:
        result["episode_kinds"] = _episode_kinds(samples, problems, episode_kind, marker_text(marker))
    # episodes per response as the training loop counts them: one per marker, one when there is none
    result["overall"]["episodes_mean"] = sum(max(1, len(e)) for e in ends) / max(1, len(ends))
    return result


def _sample(model, tokenizer, problems, verify, n_samples, max_new_tokens, temperature, batch_prompts,
            do_sample) -> list[tuple]:
    """(problem index, prompt ids, response ids without <eos>, completion text, score) per sampled response."""
    samples = []
    starts = range(0, len(problems), batch_prompts)
    for i in tqdm(starts, desc="evaluate", unit="batch", disable=not sys.stderr.isatty() or len(starts) < 2,
                  leave=False):
        chunk = problems[i:i + batch_prompts]
        rb = generate(model, tokenizer, [p["prompt"] for p in chunk], n_samples, max_new_tokens, temperature,
                      do_sample=do_sample)
        for j, text in enumerate(rb.completions):
            pi = i + j // n_samples
            row = rb.input_ids[j]
            prompt_ids = row[:rb.prompt_len][rb.attention_mask[j, :rb.prompt_len].bool()].tolist()
            resp_ids = row[rb.response_mask[j]].tolist()
            if resp_ids and resp_ids[-1] == tokenizer.eos_token_id:
                resp_ids = resp_ids[:-1]
            samples.append((pi, prompt_ids, resp_ids, text, float(verify(text, problems[pi]["answer"]))))
    return samples


def _summaries(problems, samples, verify, extract, answer_cue, n_samples) -> dict:
    """pass@1, maj@k, response tokens and tokens per correct, overall and per tier."""
    by_problem = collections.defaultdict(list)
    for s in samples:
        by_problem[s[0]].append(s)

    def summary(idx: list[int]) -> dict:
        ss = [s for i in idx for s in by_problem[i]]
        correct = sum(s[4] for s in ss)
        toks = sum(len(s[2]) for s in ss)
        maj = 0.0
        for i in idx:
            answers = [a for a in (extract(s[3]) for s in by_problem[i]) if a is not None]
            if answers:
                top = collections.Counter(answers).most_common(1)[0][0]
                maj += float(verify(answer_cue + str(top), problems[i]["answer"]))
        return {"pass@1": correct / max(1, len(ss)), f"maj@{n_samples}": maj / max(1, len(idx)),
                "response_tokens": toks / max(1, len(ss)), "tokens_per_correct": toks / correct if correct else None,
                "n_questions": len(idx)}

    all_idx = list(range(len(problems)))
    tiers = sorted({p.get("tier", 0) for p in problems})
    return {"overall": summary(all_idx),
            "per_tier": {str(t): summary([i for i in all_idx if problems[i].get("tier", 0) == t]) for t in tiers}}


def _episode_kinds(samples, problems, kind, marker: str) -> dict:
    """Mean episodes of each kind per response (the text before each ``marker``), overall and per tier."""
    counts = collections.defaultdict(lambda: collections.Counter())
    n = collections.Counter()
    for pi, _pids, _rids, text, _score in samples:
        t = str(problems[pi].get("tier", 0))
        for key in ("overall", t):
            n[key] += 1
            counts[key].update(kind(e) for e in text.split(marker)[:-1])
    return {key: {k: v / n[key] for k, v in sorted(c.items())} for key, c in counts.items()}


def _accuracy_vs_budget(samples, problems, verify, budgets, force, cue) -> dict:
    """Each response cut at B tokens; one not finished by then is forced to answer after ``cue``."""
    prefixes, where = [], []
    budget_scores = {b: [0.0] * len(samples) for b in budgets}
    for si, (_pi, pids, rids, _text, score) in enumerate(samples):
        for b in budgets:
            if len(rids) <= b:
                budget_scores[b][si] = score
            else:
                prefixes.append(pids + rids[:b])
                where.append((b, si))
    for (b, si), ans in zip(where, force(prefixes)):
        budget_scores[b][si] = float(verify(cue + ans, problems[samples[si][0]]["answer"]))
    return {str(b): sum(v) / max(1, len(v)) for b, v in budget_scores.items()}


def _acc_by_depth(samples, problems, verify, max_depth, marker_ends, force, cue) -> dict:
    """Acc(k), T(k) per tier: responses force-stopped after the token closing their k-th marker (``marker_ends``:
    those token indices per sample; fewer episodes: their own answer)."""
    tiers = sorted({p.get("tier", 0) for p in problems})
    depth_prefix, depth_where = [], []
    acc = {t: {k: [] for k in range(1, max_depth + 1)} for t in tiers}
    tok = {t: {k: [] for k in range(1, max_depth + 1)} for t in tiers}
    for (pi, pids, rids, _text, score), ends in zip(samples, marker_ends):
        t = problems[pi].get("tier", 0)
        for k in range(1, max_depth + 1):
            if k <= len(ends):
                cut = ends[k - 1] + 1
                depth_prefix.append(pids + rids[:cut])
                depth_where.append((t, k, pi))
                tok[t][k].append(cut)
            else:
                acc[t][k].append(score)
                tok[t][k].append(len(rids))
    for (t, k, pi), ans in zip(depth_where, force(depth_prefix)):
        acc[t][k].append(float(verify(cue + ans, problems[pi]["answer"])))
    return {"acc_by_depth": {str(t): {str(k): sum(v) / max(1, len(v)) for k, v in acc[t].items()} for t in tiers},
            "tokens_by_depth": {str(t): {str(k): sum(v) / max(1, len(v)) for k, v in tok[t].items()} for t in tiers}}


def plot_report(results: dict[str, dict], out_dir: str, prefix: str = "") -> list[str]:
    """PNG plots (headless): accuracy vs token budget per method; Acc(k) and T(k) vs depth per tier.
    ``results``: {method name: evaluate() output}. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        bs = sorted(r["accuracy_vs_budget"], key=int)
        ax.plot([int(b) for b in bs], [r["accuracy_vs_budget"][b] for b in bs], marker="o", label=name)
    ax.set_xlabel("token budget")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs token budget")
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out_dir, f"{prefix}accuracy_vs_budget.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    tiers = sorted(next(iter(results.values()))["acc_by_depth"], key=int)
    fig, axes = plt.subplots(2, len(tiers), figsize=(3.2 * len(tiers), 5.5), squeeze=False)
    for j, t in enumerate(tiers):
        for name, r in results.items():
            ks = sorted(r["acc_by_depth"][t], key=int)
            axes[0][j].plot([int(k) for k in ks], [r["acc_by_depth"][t][k] for k in ks], marker=".", label=name)
            axes[1][j].plot([int(k) for k in ks], [r["tokens_by_depth"][t][k] for k in ks], marker=".", label=name)
        axes[0][j].set_title(f"tier {t}: Acc(k)")
        axes[1][j].set_title(f"tier {t}: T(k)")
        axes[1][j].set_xlabel("episode depth k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{prefix}acc_tokens_by_depth.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    with open(os.path.join(out_dir, f"{prefix}eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    return paths
