"""A task is where prompts come from and how answers are read: ``load_task(spec)`` gives the synthetic
arithmetic task (``"arith"``) or a file of ``{question, answer}`` rows (.jsonl / .parquet). Each task owns its
prompt format, its training prompt stream, its held-out problems, its answer extractor and, when it has
reference traces, the examples of a supervised warm start. Problems are dicts ``{"prompt", "answer"}`` with an
optional difficulty ``"tier"``."""

from __future__ import annotations

import random

from l2t_ext.errors import InputError
from l2t_ext.tasks import arith
from l2t_ext.tasks import math as math_task


class ArithTask:
    """Synthetic multi-step arithmetic (``l2t_ext.tasks.arith``) over difficulty ``tiers``."""

    name = "arith"
    default_verifier = "arith"
    default_cue = "A:"  # the warm start's traces end with "A: <answer>"
    answer_prefix = ""  # what separates the cue from the answer when Jr scores it
    has_traces = True  # reference solutions for the supervised warm start
    extract_answer = staticmethod(arith.extract_answer)

    def __init__(self, tiers=(1, 2, 3, 4)):
        self.tiers = tuple(tiers)

    def sample(self, rng: random.Random, n: int) -> list[dict]:
        """``n`` training problems drawn from ``rng`` (the tier uniformly, then the problem)."""
        out = []
        for _ in range(n):
            p = arith.generate_problem(rng, rng.choice(list(self.tiers)))
            out.append({"prompt": p.prompt, "answer": p.answer, "tier": p.tier})
        return out

    def eval_problems(self, n: int, seed: int) -> list[dict]:
        """``n`` held-out problems, tiers in turn, from a seed disjoint from the training stream's."""
        return [{"prompt": p.prompt, "answer": p.answer, "tier": p.tier}
                for p in arith.dataset(n, seed=seed + 10_000, tiers=self.tiers)]

    def sft_pairs(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        return arith.sft_pairs(rng, n, self.tiers)

    def default_instruction(self, marker: str) -> str:
        return ""  # the prompt format is the warm start's


class FileTask:
    """Rows of a .jsonl / .parquet file; the prompt is the question and a newline."""

    default_verifier = "math"
    default_cue = "The answer is"
    answer_prefix = " "
    has_traces = False
    extract_answer = staticmethod(math_task.extract_answer)

    def __init__(self, path: str):
        self.name = path
        self.rows = [{"prompt": r["question"] + "\n", "answer": r["answer"]} for r in math_task.load_dataset(path)]

    def sample(self, rng: random.Random, n: int) -> list[dict]:
        return [rng.choice(self.rows) for _ in range(n)]

    def eval_problems(self, n: int, seed: int) -> list[dict]:
        return self.rows[:n]

    def default_instruction(self, marker: str) -> str:
        return step_instruction(marker, self.default_cue)

    def sft_pairs(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        raise InputError(f"task {self.name!r} has no reference traces for a supervised warm start; set sft_steps 0")


def step_instruction(marker: str, cue: str) -> str:
    """An instruction asking for steps in the episode format ``marker`` finds, and for the answer after ``cue``."""
    how = {"paragraph": "Write each step as its own paragraph, separated by a blank line.",
           "line": "Write each step on its own line.",
           "sentence": "Keep each step to one sentence.",
           "think": "End each step with </think>."}.get(marker, f"End each step with {marker}.")
    return f"Solve the problem step by step. {how} Finish with a last line of the form '{cue} <number>'."


def load_task(spec: str, tiers=(1, 2, 3, 4)):
    """``"arith"`` (synthetic arithmetic), ``"overthink"`` (the same chains with a warm start that over-thinks),
    ``"word"`` (generated word problems) or the path of a file of
    {question, answer} / {problem, solution} rows."""
    if spec == "arith":
        return ArithTask(tiers)
    if spec == "overthink":
        from l2t_ext.tasks.overthink import OverthinkTask

        return OverthinkTask(tiers)
    if spec == "word":
        from l2t_ext.tasks.word import WordTask

        return WordTask(tiers)
    return FileTask(spec)


def load_extractor(verifier: str):
    """The final-answer extractor that matches a built-in verifier (maj@k voting)."""
    return arith.extract_answer if verifier == "arith" else math_task.extract_answer
