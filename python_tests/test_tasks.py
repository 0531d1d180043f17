"""Task generators and verifiers."""

from __future__ import annotations

import json
import random

import pytest

from l2t_ext.tasks import arith, load_verifier
from l2t_ext.tasks import math as mt


@pytest.mark.parametrize("tier", [1, 2, 3, 4])
def test_arith_generator_tiers_and_traces(tier):
    rng = random.Random(tier)
    for _ in range(50):
        p = arith.generate_problem(rng, tier)
        assert len(p.ops) == tier + 1
        assert all(0 <= r <= 9 for *_, r in p.steps())
        for style in arith.STYLES:
            t = arith.trace(p, style, rng)
            assert arith.verify(t, p.answer) == 1.0
            assert t.count(arith.END_THINK) >= 1 and t.endswith("A:" + p.answer)
        concise = arith.trace(p, "concise")
        assert concise.count(arith.END_THINK) == tier + 1
    assert arith.trace(p, "terse", rng).count(arith.END_THINK) <= tier + 1


def test_arith_verbose_check_prob():
    p = arith.generate_problem(random.Random(3), 3)
    assert arith.trace(p, "verbose", random.Random(0), check_prob=0.0) == arith.trace(p, "concise")
    full = arith.trace(p, "verbose", random.Random(0), check_prob=1.0)
    assert full.count(arith.THINK + "check ") == len(p.ops) and full.count(arith.END_THINK) == 2 * len(p.ops)
    with pytest.raises(ValueError, match="check_prob must be in"):
        arith.trace(p, "verbose", check_prob=1.5)
    with pytest.raises(ValueError, match="check_form must be one of"):
        arith.trace(p, "verbose", check_form="twice")


def test_arith_inverse_checks_are_true_and_redundant():
    rng = random.Random(7)
    for _ in range(200):
        p = arith.generate_problem(rng, 4)
        t = arith.trace(p, "verbose", rng, check_prob=1.0, check_form="inverse")
        assert arith.verify(t, p.answer) == 1.0
        checks = [e.split(arith.END_THINK)[0][len("check "):] for e in t.split(arith.THINK) if e.startswith("check")]
        assert len(checks) == len(p.ops)
        for c, (a, _o, d, r) in zip(checks, p.steps()):
            lhs, rhs = c.split("=")
            op = next(x for x in "+-*" if x in lhs[1:])
            x, y = lhs[0], lhs[2:]
            assert arith._apply(int(x), op, int(y)) == int(rhs)  # a true statement
            assert {int(x), int(y), int(rhs)} <= {a, d, r}  # about the step it re-checks: nothing new


def test_arith_verifier_cases():
    assert arith.verify("<think>1+1=2</think>A:2", "2") == 1.0
    assert arith.verify("<think>1+1=2</think>A:3", "2") == 0.0
    assert arith.verify("<think>A:2</think>no answer", "2") == 0.0  # the answer must follow the last marker
    assert arith.verify("", "2") == 0.0 and arith.verify("garbage", "x") == 0.0
    assert arith.verify("A:2", "2") == 1.0  # no episodes at all is still gradable
    with pytest.raises(ValueError, match="tier must be"):
        arith.generate_problem(random.Random(0), 5)


@pytest.mark.parametrize("completion,reference,score", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("x = \\boxed{{3}}", "3", 1.0),  # nested braces
    ("first \\boxed{2} then \\boxed{4}", "4", 1.0),  # the last box counts
    ("The answer is #### 1,234", "1234", 1.0),
    ("#### 72", "71", 0.0),
    ("it is 12.50 dollars", "12.5", 1.0),
    ("no digits here", "5", 0.0),
    ("\\boxed{", "5", 0.0),  # unbalanced: unparseable scores 0, never raises
    ("\\boxed{x^2+}", "x^2", 0.0),
])
def test_math_verifier(completion, reference, score):
    assert mt.verify(completion, reference) == score


def test_math_loader(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "steps #### 2"}) + "\n" +
                 json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    rows = mt.load_dataset(str(f))
    assert rows == [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="row 0 has no"):
        mt.load_dataset(str(bad))
    with pytest.raises(FileNotFoundError):
        mt.load_dataset(str(tmp_path / "missing.jsonl"))


def test_load_verifier():
    assert load_verifier("arith") is arith.verify
    assert load_verifier("l2t_ext.tasks.math:verify") is mt.verify
    with pytest.raises(ValueError, match="cannot load verifier"):
        load_verifier("nope.module:fn")
    with pytest.raises(ValueError, match="module:function"):
        load_verifier("something")
