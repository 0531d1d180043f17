"""Easy arithmetic word problems with known integer answers, generated (no download): one to three steps of
buying, giving away, packing and sharing. Sized for small instruct models: SmolLM2-135M-Instruct answers a
useful share of them greedily (docs/real_model/), so outcome rewards are not all zero from the first step."""

from __future__ import annotations

import random

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemi", "Liam"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


def _step(rng: random.Random, total: int, item: str) -> tuple[str, int]:
    """One more sentence acting on ``total``: (text, new total), never negative, small numbers."""
    kind = rng.choice(["buy", "give", "double"] if total <= 20 else ["buy", "give"])
    if kind == "buy":
        b = rng.randint(2, 9)
        return f"Then they buy {b} more {item}.", total + b
    if kind == "give" and total > 2:
        b = rng.randint(1, min(9, total - 1))
        return f"Then they give {b} {item} to a friend.", total - b
    return f"Then the number of {item} doubles.", total * 2


def generate_problem(rng: random.Random, steps: int) -> dict:
    """``{"prompt", "answer", "tier"}`` with ``steps`` arithmetic steps (tier = steps)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        total = rng.randint(3, 15)
        text = [f"{name} has {total} {item}."]
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 6)
        total = a * b
        text = [f"{name} has {a} bags with {b} {item} in each bag."]
    for _ in range(steps - 1):
        sentence, total = _step(rng, total, item)
        text.append(sentence)
    text.append(f"How many {item} does {name} have now?")
    return {"prompt": " ".join(text), "answer": str(total), "tier": steps}


class WordTask:
    """Generated word problems over difficulty ``tiers`` (1-3 steps), graded by the math verifier."""

    name = "word"
    default_verifier = "math"
    default_cue = "The answer is"
    answer_prefix = " "
    has_traces = False

    def __init__(self, tiers=(1, 2, 3)):
        self.tiers = tuple(t for t in tiers if t <= 3) or (1, 2, 3)

    def sample(self, rng: random.Random, n: int) -> list[dict]:
        return [generate_problem(rng, rng.choice(self.tiers)) for _ in range(n)]

    def eval_problems(self, n: int, seed: int) -> list[dict]:
        """``n`` held-out problems, tiers in turn, from a seed disjoint from the training stream's."""
        rng = random.Random(seed + 20_000)
        return [generate_problem(rng, self.tiers[i % len(self.tiers)]) for i in range(n)]

    def default_instruction(self, marker: str) -> str:
        from l2t_ext.tasks.task import step_instruction

        return step_instruction(marker, self.default_cue)
