"""A task where over-thinking is the habit (``task: overthink``; the experiment behind ``l2t demo``).

The problems are the arithmetic chains of ``l2t_ext.tasks.arith`` (tier t = t + 1 operations mod 10, prompt
``Q:3+5*2-4``); what changes is the warm start's traces, built so that the premises of L2T hold and can be
checked on the policy before any comparison:

- steps are noisy: a step's result is a wrong digit with probability ``STEP_ERROR[tier]`` (0 on tier 1, rising
  with the tier), so a model that imitates the traces makes mistakes, more of them on hard problems;
- a check can catch and fix a mistake: ``<think>chk3+5=8</think>`` re-does the step from its operands, always
  correctly, and the chain carries on from the check's value. After a wrong step a check always follows; after
  a right one with probability ``CHECK_PROB``. On tier 1 (no errors) a check is pure redundancy; on tier 4 it is
  often the episode that saves the answer;
- some long styles are harmful: a distractor ``<think>by7*3=1</think>`` (a side computation on digits that are
  not in the problem) follows a step with probability ``DISTRACT_PROB``, and with probability ``CORRUPT_PROB``
  the next step (or the answer) picks up the distractor's value instead of the running one.

The warm start mixes ``overthink`` traces (steps + checks + distractors, ``WARM_MIX`` 80%) with ``concise`` ones
(noisy steps only, no checks), so the warm-started policy over-thinks by habit at about twice the concise
length, and its accuracy after k episodes rises, peaks and falls (a distractor as the last episode read so
far corrupts the forced answer). The optimum is a concise trace with no mistakes; a policy gets there only by
making its steps reliable and dropping checks where they add nothing.

Problems are split by a hash of the prompt: ``test`` (1/8 of all problems), ``val`` (1/8) and ``train`` (the
rest); the RL prompt stream draws from ``train`` only, evaluation draws from ``val`` (tuning) or ``test``.
"""

from __future__ import annotations

import hashlib
import random

from l2t_ext.tasks import arith

THINK, END_THINK, ANSWER_CUE = arith.THINK, arith.END_THINK, arith.ANSWER_CUE
STYLES = ("concise", "overthink")
WARM_MIX = {"overthink": 0.8, "concise": 0.2}
STEP_ERROR = {1: 0.0, 2: 0.05, 3: 0.1, 4: 0.2}  # chance that a step's written result is a wrong digit
CHECK_PROB = 0.7  # chance of a check after a right step (after a wrong one: always)
DISTRACT_PROB = 0.3  # chance of a distractor episode after a step
CORRUPT_PROB = 0.3  # chance that what follows a distractor carries the distractor's value
CHECK, DISTRACT = "chk", "by"
SPLITS = ("train", "val", "test")
KINDS = ("step", "check", "distractor", "other")


def split_of(prompt: str) -> str:
    """The split a problem belongs to, fixed by its prompt text (stable across Python versions and machines)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "little") % 8
    return "test" if h == 0 else "val" if h == 1 else "train"


def trace(problem: arith.Problem, style: str, rng: random.Random) -> str:
    """The response text of ``problem`` in ``style`` (``concise`` or ``overthink``), ending with ``A:<answer>``.
    The answer is the value the trace ends with, which is wrong when a step error went unchecked (concise) or a
    distractor corrupted the chain."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    err = STEP_ERROR[problem.tier]
    eps, v = [], problem.start
    for o, d in problem.ops:
        right = arith._apply(v, o, d)
        written = right if rng.random() >= err else (right + rng.randint(1, 9)) % 10
        eps.append(f"{v}{o}{d}={written}")
        v = written
        if style == "concise":
            continue
        if written != right or rng.random() < CHECK_PROB:
            eps.append(f"{CHECK}{eps[-1].split('=')[0]}={right}")
            v = right
        if rng.random() < DISTRACT_PROB:
            a, o2, d2 = rng.randint(0, 9), rng.choice("+-*"), rng.randint(1, 9)
            side = arith._apply(a, o2, d2)
            eps.append(f"{DISTRACT}{a}{o2}{d2}={side}")
            if rng.random() < CORRUPT_PROB:
                v = side
    return "".join(f"{THINK}{e}{END_THINK}" for e in eps) + f"{ANSWER_CUE}{v}"


def episode_kind(text: str) -> str:
    """``step``, ``check``, ``distractor`` or ``other`` for the text of one episode (markers included or not)."""
    body = text.replace(THINK, "").replace(END_THINK, "").strip()
    if body.startswith(CHECK):
        return "check"
    if body.startswith(DISTRACT):
        return "distractor"
    return "step" if body[:1].isdigit() and "=" in body else "other"


def _draw(rng: random.Random, tier: int, split: str) -> arith.Problem:
    while True:  # rejection: about 3/4 of the draws are train problems, 1/8 each val and test
        p = arith.generate_problem(rng, tier)
        if split_of(p.prompt) == split:
            return p


def problems(split: str, n: int, seed: int, tiers=(1, 2, 3, 4)) -> list[dict]:
    """``n`` problems of ``split``, tiers in turn, drawn from ``seed`` (distinct problems where the split allows)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng, out, seen = random.Random(seed), [], set()
    for i in range(n):
        t = tiers[i % len(tiers)]
        for _ in range(50):  # avoid duplicates (tier 1 has 7290 problems, 1/8 of them per held-out split)
            p = _draw(rng, t, split)
            if p.prompt not in seen:
                break
        seen.add(p.prompt)
        out.append({"prompt": p.prompt, "answer": p.answer, "tier": p.tier})
    return out


class OverthinkTask:
    """The over-thinking arithmetic task (module docstring) over difficulty ``tiers``."""

    name = "overthink"
    default_verifier = "arith"
    default_cue = ANSWER_CUE
    answer_prefix = ""
    has_traces = True
    extract_answer = staticmethod(arith.extract_answer)
    episode_kind = staticmethod(episode_kind)

    def __init__(self, tiers=(1, 2, 3, 4)):
        self.tiers = tuple(tiers)

    def sample(self, rng: random.Random, n: int) -> list[dict]:
        """``n`` training-split problems drawn from ``rng`` (the tier uniformly, then the problem)."""
        out = []
        for _ in range(n):
            p = _draw(rng, rng.choice(self.tiers), "train")
            out.append({"prompt": p.prompt, "answer": p.answer, "tier": p.tier})
        return out

    def eval_problems(self, n: int, seed: int, split: str = "val") -> list[dict]:
        """``n`` held-out problems of ``split`` (validation unless told: the test split is for reports)."""
        return problems(split, n, seed + 10_000, self.tiers)

    def sft_pairs(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        """``n`` warm-start examples from the training split, styles drawn from ``WARM_MIX``."""
        styles, weights = zip(*WARM_MIX.items())
        out = []
        for _ in range(n):
            p = _draw(rng, rng.choice(self.tiers), "train")
            out.append((p.prompt, trace(p, rng.choices(styles, weights)[0], rng)))
        return out

    def default_instruction(self, marker: str) -> str:
        return ""
