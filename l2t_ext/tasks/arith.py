"""Synthetic multi-step arithmetic reasoning (the embedded default task; docs/architecture.md, "Tasks").

A problem is a start digit and a chain of operations applied left to right in arithmetic modulo 10, e.g.
``Q:3+5*2-4`` means (((3 + 5) * 2) - 4) mod 10 with every intermediate reduced mod 10. Difficulty tier t in
1..4 has t + 1 operations. Single digits keep each step a small lookup a ~0.1M-parameter model learns in
minutes on a CPU, so the experiment is about the reasoning chain (how many episodes, which ones), not about
multi-digit arithmetic. A reference trace puts one step per ``<think>...</think>`` episode and then the final
answer: ``<think>3+5=8</think><think>8*2=6</think><think>6-4=2</think>A:2``.

Trace styles for the supervised warm start (so RL has something to learn):
- concise: one step per episode;
- verbose: concise plus redundant re-check episodes that add nothing to the answer, one after each step
  with probability ``check_prob``; ``check_form="copy"`` repeats the step (``<think>check 8*2=6</think>``),
  ``"inverse"`` re-derives it (``<think>check 6-5=1</think>`` after ``1+5=6``; a product is re-checked
  commuted, ``2*8=6``), a verification that costs computation like the re-checks of real reasoning models;
- terse: several steps merged into one episode (``<think>3+5*2=16</think>``), which a small model gets
  wrong more often on long chains.
"""

from __future__ import annotations

import dataclasses
import random
import re

THINK, END_THINK = "<think>", "</think>"
ANSWER_CUE = "A:"
STYLES = ("concise", "verbose", "terse")
VERBOSE_CHECK_PROB = 0.6  # chance of a redundant re-check episode after each step of a verbose trace
CHECK_FORMS = ("copy", "inverse")
VERBOSE_CHECK_FORM = "copy"
DEFAULT_MIX = {"concise": 0.4, "verbose": 0.4, "terse": 0.2}  # warm-start trace styles and their weights
CHARS = "0123456789+-*/=()., :?QAabcdefghijklmnopqrstuvwxyz\n"  # the character tokenizer's alphabet


@dataclasses.dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]
    tier: int

    @property
    def prompt(self) -> str:
        return "Q:" + str(self.start) + "".join(f"{o}{d}" for o, d in self.ops) + "\n"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, operand, result) per operation."""
        out, v = [], self.start
        for o, d in self.ops:
            r = _apply(v, o, d)
            out.append((v, o, d, r))
            v = r
        return out

    @property
    def answer(self) -> str:
        return str(self.steps()[-1][3])


def _apply(v: int, o: str, d: int) -> int:
    return (v + d if o == "+" else v - d if o == "-" else v * d) % 10


def generate_problem(rng: random.Random, tier: int) -> Problem:
    """A problem of ``tier + 1`` operations on digits (mod 10)."""
    if tier not in (1, 2, 3, 4):
        raise ValueError(f"tier must be 1..4, got {tier!r}")
    start = rng.randint(0, 9)
    ops = tuple((rng.choice("+-*"), rng.randint(1, 9)) for _ in range(tier + 1))
    return Problem(start, ops, tier)


def trace(problem: Problem, style: str = "concise", rng: random.Random | None = None,
          check_prob: float = VERBOSE_CHECK_PROB, check_form: str = VERBOSE_CHECK_FORM) -> str:
    """The response text (after the prompt) in a given style, ending with ``A:<answer>``."""
    if not 0.0 <= check_prob <= 1.0:
        raise ValueError(f"check_prob must be in [0, 1], got {check_prob!r}")
    if check_form not in CHECK_FORMS:
        raise ValueError(f"check_form must be one of {CHECK_FORMS}, got {check_form!r}")
    rng = rng or random.Random(0)
    steps = problem.steps()
    eps: list[str] = []
    if style == "concise":
        eps = [f"{a}{o}{d}={r}" for a, o, d, r in steps]
    elif style == "verbose":
        for a, o, d, r in steps:
            eps.append(f"{a}{o}{d}={r}")
            if rng.random() < check_prob:
                eps.append(f"check {_check(a, o, d, r, check_form)}")
    elif style == "terse":
        i = 0
        while i < len(steps):
            n = min(len(steps) - i, rng.choice((2, 3)))
            a = steps[i][0]
            expr = str(a) + "".join(f"{o}{d}" for _, o, d, _ in steps[i:i + n])
            eps.append(f"{expr}={steps[i + n - 1][3]}")
            i += n
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return "".join(f"{THINK}{e}{END_THINK}" for e in eps) + f"{ANSWER_CUE}{problem.answer}"


def _check(a: int, o: str, d: int, r: int, form: str) -> str:
    """The text of a redundant re-check of the step a o d = r (mod 10)."""
    if form == "copy":
        return f"{a}{o}{d}={r}"
    if o == "+":
        return f"{r}-{d}={a}"
    if o == "-":
        return f"{r}+{d}={a}"
    return f"{d}*{a}={r}"


def dataset(n: int, seed: int, tiers=(1, 2, 3, 4)) -> list[Problem]:
    rng = random.Random(seed)
    return [generate_problem(rng, tiers[i % len(tiers)]) for i in range(n)]


def tokenizer():
    """The character tokenizer of this task's tiny models (``<think>``/``</think>`` single tokens)."""
    from l2t_ext.lm.models import char_tokenizer

    return char_tokenizer(CHARS)


def sft_pairs(rng: random.Random, n: int, tiers, mix: dict[str, float] | None = None,
              check_prob: float = VERBOSE_CHECK_PROB, check_form: str = VERBOSE_CHECK_FORM) -> list[tuple[str, str]]:
    """``n`` warm-start examples (prompt, reference trace) with trace styles drawn from ``mix``."""
    styles, weights = zip(*(mix or DEFAULT_MIX).items())
    out = []
    for _ in range(n):
        p = generate_problem(rng, rng.choice(list(tiers)))
        style = rng.choices(styles, weights)[0]
        out.append((p.prompt, trace(p, style, rng, check_prob, check_form)))
    return out


_ANS_RE = re.compile(r"A:\s*(-?\d+)")


def extract_answer(completion: str) -> str | None:
    """The integer after the last ``A:`` that follows the last ``</think>`` (None if absent)."""
    tail = completion.rsplit(END_THINK, 1)[-1]
    found = _ANS_RE.findall(tail)
    return found[-1] if found else None


def verify(completion: str, reference: str) -> float:
    """1.0 if the final answer equals the reference integer exactly, else 0.0 (never raises)."""
    try:
        got = extract_answer(completion)
        return 1.0 if got is not None and int(got) == int(str(reference).strip()) else 0.0
    except (ValueError, TypeError):
        return 0.0
