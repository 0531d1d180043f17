"""Where the L2T reward goes, episode by episode: the information gain, the raw and normalised compression
penalty, the surprise (mean token negative log-likelihood) and the length of every valid episode of a batch,
with the episode's text and kind when a tokenizer and a labeller are given. ``episode_anatomy`` turns one
``DenseProcessReward`` output into rows; ``summarize`` groups them (by kind) and ranks the penalty against
surprise and length. ``l2t inspect RUN_DIR`` runs both on a trained run's rollouts.

Why surprise: the penalty is a quadratic form in the episode's log-likelihood gradient, and that gradient
vanishes as the episode's probability goes to 1, so habitual episodes tend to get small penalties and unusual
ones large ones, whatever their length or use. The rank correlations in ``summarize`` measure how much of the
penalty that explains on a given policy.
"""

from __future__ import annotations

import collections
import statistics

import torch

from l2t_ext.reward.dense import RewardOutput

FIELDS = ("gain", "penalty", "penalty_normalized", "surprise", "tokens")


def episode_anatomy(out: RewardOutput, episode_ids: torch.Tensor, input_ids: torch.Tensor | None = None,
                    tokenizer=None, kind=None, outcome: torch.Tensor | None = None) -> list[dict]:
    """One row per valid episode: ``rollout``, ``k``, ``tokens``, ``gain`` (Jr after - Jr before), ``penalty``
    (raw P), ``penalty_normalized`` (Pbar), ``surprise`` (mean -log pi of the episode's tokens), plus ``text``
    (with ``input_ids`` and ``tokenizer``), ``kind`` (``kind(text)``) and ``outcome`` (per rollout) when given.

    Shapes: ``out`` fields (B, K) and ``out.token_logprobs`` (B, L) where entry t scores token t + 1;
    ``episode_ids`` (B, L) (-1 outside episodes); ``input_ids`` (B, L); ``outcome`` (B,)."""
    B, K = out.valid.shape
    if episode_ids.shape != out.token_logprobs.shape or episode_ids.shape[0] != B:
        raise ValueError(f"episode_anatomy: episode_ids {tuple(episode_ids.shape)} must match token_logprobs "
                         f"{tuple(out.token_logprobs.shape)} with B={B}")
    ids = episode_ids.cpu()
    nll = -out.token_logprobs.detach().double().cpu()
    scored = torch.full_like(ids, -1)  # scored[t] = the episode of token t + 1, whose log-prob sits at t
    scored[:, :-1] = ids[:, 1:]
    cols = {f: getattr(out, a).detach().double().cpu() for f, a in
            (("gain", "jr_gain"), ("penalty", "penalty"), ("penalty_normalized", "penalty_normalized"))}
    valid = out.valid.cpu()
    rows = []
    for b in range(B):
        for k in range(K):
            if not valid[b, k]:
                continue
            at = scored[b] == k
            n = int(at.sum())
            row = {"rollout": b, "k": k, "tokens": n, **{f: float(cols[f][b, k]) for f in cols},
                   "surprise": float(nll[b][at].mean()) if n else 0.0}
            if input_ids is not None and tokenizer is not None:
                row["text"] = tokenizer.decode(input_ids[b][ids[b] == k].tolist())
                if kind is not None:
                    row["kind"] = kind(row["text"])
            if outcome is not None:
                row["outcome"] = float(outcome[b])
            rows.append(row)
    return rows


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=x.__getitem__)
    r = [0.0] * len(x)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for m in range(i, j + 1):
            r[order[m]] = (i + j) / 2
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (None with fewer than 3 points or a constant input)."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def summarize(rows: list[dict], by: str = "kind") -> dict:
    """``{"groups": {value of by: {"n", "share_of_penalty", mean of each field}}, "spearman": {...}}``: rows grouped
    by ``by`` (one group ``all`` when the rows lack it), and the rank correlation of the raw penalty with surprise
    and with tokens over all rows."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r.get(by, "all")].append(r)
    total_p = sum(r["penalty"] for r in rows) or 1.0
    out = {"groups": {}, "n": len(rows)}
    for g, rs in sorted(groups.items()):
        out["groups"][g] = {"n": len(rs), "share_of_penalty": sum(r["penalty"] for r in rs) / total_p,
                            **{f: statistics.fmean(r[f] for r in rs) for f in FIELDS}}
    p = [r["penalty"] for r in rows]
    out["spearman"] = {"penalty_surprise": spearman(p, [r["surprise"] for r in rows]),
                       "penalty_tokens": spearman(p, [float(r["tokens"]) for r in rows]),
                       "gain_surprise": spearman([r["gain"] for r in rows], [r["surprise"] for r in rows])}
    return out


def format_summary(summary: dict) -> str:
    """A markdown table of ``summarize``'s groups and its correlations."""
    lines = ["| group | episodes | tokens | gain | penalty P | Pbar | surprise | share of P |",
             "|---|---|---|---|---|---|---|---|"]
    for g, s in summary["groups"].items():
        lines.append(f"| {g} | {s['n']} | {s['tokens']:.1f} | {s['gain']:+.4f} | {s['penalty']:.3g} | "
                     f"{s['penalty_normalized']:.3f} | {s['surprise']:.3f} | {s['share_of_penalty']:.2f} |")
    sp = summary["spearman"]

    def f(v):
        return "-" if v is None else f"{v:+.2f}"

    lines.append("")
    lines.append(f"Spearman over {summary['n']} episodes: penalty~surprise {f(sp['penalty_surprise'])}, "
                 f"penalty~tokens {f(sp['penalty_tokens'])}, gain~surprise {f(sp['gain_surprise'])}.")
    return "\n".join(lines)
