"""Task generators and verifiers."""

from __future__ import annotations

import json
import os
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


# (response, reference, expected grade): every format the verifier reads, right and wrong answers
VERIFIER_TABLE = [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0), ("so \\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0), ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0), ("\\boxed{-\\frac{3}{4}}", "0.75", 0.0),
    ("x = \\boxed{{3}}", "3", 1.0),  # nested braces
    ("first \\boxed{2} then \\boxed{4}", "4", 1.0), ("first \\boxed{4} then \\boxed{2}", "4", 0.0),
    ("The answer is #### 1,234", "1234", 1.0), ("#### 72", "71", 0.0),
    ("it is 12.50 dollars", "12.5", 1.0), ("it is 12.50 dollars", "12.6", 0.0),
    ("no digits here", "5", 0.0),
    ("\\boxed{", "5", 0.0),  # unbalanced: unparseable scores 0, never raises
    ("\\boxed{x^2+}", "x^2", 0.0), ("\\boxed{x^2+1}", "1+x^2", 1.0), ("\\boxed{x^2+2}", "1+x^2", 0.0),
    ("The answer is \u22125.", "-5", 1.0), ("The answer is \u22125.", "5", 0.0),  # unicode minus
    ("The answer is - 5", "-5", 1.0), ("The answer is - 5", "5", 0.0),
    ("\\boxed{\\$42}", "42", 1.0), ("\\boxed{\\$42}", "24", 0.0),
    ("\\boxed{x=5}", "5", 1.0), ("The answer is x = 5.", "5", 1.0), ("The answer is x = 6.", "5", 0.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0), ("\\boxed{5 \\text{ cm}}", "50", 0.0),
    ("The answer is 7 apples.", "7", 1.0), ("The answer is 8 apples.", "7", 0.0),
    ("Final answer: 1,234", "1234", 1.0), ("Final answer: 1,243", "1234", 0.0),
    ("answer: 3.5", "7/2", 1.0), ("answer: 3.25", "7/2", 0.0),
    ("The answer is 50%.", "50", 1.0),
    ("The answer is 0 and 392.", "392", 0.0),  # several numbers offered: no credit for one of them
    ("It is 3 or 4", "4", 0.0), ("We get 3, 4", "4", 0.0),
    ("First 3, then 4.\nSo 7.", "7", 1.0), ("First 3, then 4.\nSo 7.", "4", 0.0),  # last number, last sentence
    ("The answer is 12. Then I add 5 to get 17", "12", 1.0),  # an explicit statement beats a later number
    ("Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nThe answer is 14", "14", 1.0),
    ("Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nThe answer is 14", "7", 0.0),
]


@pytest.mark.parametrize("completion,reference,score", VERIFIER_TABLE)
def test_math_verifier(completion, reference, score):
    assert mt.verify(completion, reference) == score


def test_verifier_table_covers_both_directions():
    assert len(VERIFIER_TABLE) >= 40
    assert sum(score == 1.0 for _, _, score in VERIFIER_TABLE) >= 15 <= sum(s == 0.0 for _, _, s in VERIFIER_TABLE)


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
    math_style = tmp_path / "m.jsonl"
    math_style.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}."}) + "\n")
    assert mt.load_dataset(str(math_style)) == [{"question": "Half of 1?", "answer": "\\frac{1}{2}"}]
    math_style.write_text(json.dumps({"problem": "Half of 1?", "solution": "one half"}) + "\n")
    with pytest.raises(ValueError, match="no .boxed"):
        mt.load_dataset(str(math_style))


def test_load_verifier():
    assert load_verifier("arith") is arith.verify
    assert load_verifier("l2t_ext.tasks.math:verify") is mt.verify
    with pytest.raises(ValueError, match="cannot load verifier"):
        load_verifier("nope.module:fn")
    with pytest.raises(ValueError, match="module:function"):
        load_verifier("something")


@pytest.mark.skipif(not os.environ.get("L2T_DM_MATH_PYTHON"),
                    reason="opt-in: L2T_DM_MATH_PYTHON=<python of a venv with mathematics_dataset and sympy==1.5>")
def test_dm_math_converter_writes_a_task_file(tmp_path):
    """scripts/dm_math_to_jsonl.py in its own environment, then the file as an l2t task graded by math."""
    import subprocess

    from l2t_ext.tasks import load_task

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "dm_math_to_jsonl.py")
    out = tmp_path / "dm.jsonl"
    subprocess.run([os.environ["L2T_DM_MATH_PYTHON"], script, "--n", "20", "--seed", "1", "--out", str(out)],
                   check=True)
    task = load_task(str(out))
    assert len(task.rows) == 40  # two matching modules x 20
    assert all(mt.verify(f"The answer is {r['answer']}.", r["answer"]) == 1.0 for r in task.rows)


# ------------------------------------------------------------------------------------------- overthink task
def test_overthink_traces_checks_fix_errors_and_distractors_can_corrupt():
    from l2t_ext.tasks import overthink as ot

    rng = random.Random(0)
    stats = {t: {"concise": [], "overthink": []} for t in (1, 2, 3, 4)}
    for _ in range(3000):
        t = rng.choice((1, 2, 3, 4))
        p = arith.generate_problem(rng, t)
        for style in ot.STYLES:
            tr = ot.trace(p, style, rng)
            eps = [e.split(ot.END_THINK)[0] for e in tr.split(ot.THINK)[1:]]
            kinds = [ot.episode_kind(e) for e in eps]
            assert kinds.count("step") == len(p.ops) and "other" not in kinds
            if style == "concise":
                assert kinds == ["step"] * len(p.ops)
            for i, (e, k) in enumerate(zip(eps, kinds)):  # every check is a true statement about the step before
                if k == "check":
                    assert kinds[i - 1] == "step" and e[len(ot.CHECK):].split("=")[0] == eps[i - 1].split("=")[0]
                    lhs, rhs = e[len(ot.CHECK):].split("=")
                    assert arith._apply(int(lhs[0]), lhs[1], int(lhs[2])) == int(rhs)
                if style == "overthink" and k == "step" and i + 1 < len(eps):  # a wrong step: its check follows
                    lhs, rhs = e.split("=")
                    if arith._apply(int(lhs[0]), lhs[1], int(lhs[2])) != int(rhs):
                        assert kinds[i + 1] == "check"
            if "distractor" not in kinds and style == "overthink":
                assert arith.verify(tr, p.answer) == 1.0  # checks fix every error
            stats[t][style].append(arith.verify(tr, p.answer))
    acc = {t: {s: sum(v) / len(v) for s, v in d.items()} for t, d in stats.items()}
    assert acc[1]["concise"] == 1.0 and acc[1]["overthink"] < 0.95  # tier 1: checks useless, distractors hurt
    assert acc[4]["overthink"] > acc[4]["concise"] + 0.15  # tier 4: checks save answers
    assert acc[4]["concise"] < acc[2]["concise"]  # steps are noisier on harder tiers
    with pytest.raises(ValueError, match="style must be one of"):
        ot.trace(p, "terse", rng)


def test_overthink_splits_are_disjoint_and_stable():
    from l2t_ext.tasks import load_task
    from l2t_ext.tasks import overthink as ot

    assert ot.split_of("Q:3+5*2\n") == ot.split_of("Q:3+5*2\n")
    assert ot.split_of("Q:1+1\n") == "train"  # fixed by the prompt bytes (blake2b), not by Python's hash seed
    val, test = ot.problems("val", 80, 0), ot.problems("test", 80, 0)
    assert {ot.split_of(p["prompt"]) for p in val} == {"val"} and {ot.split_of(p["prompt"]) for p in test} == {"test"}
    assert len({p["prompt"] for p in val}) == 80 and [p["tier"] for p in val[:4]] == [1, 2, 3, 4]
    task = load_task("overthink")
    train = task.sample(random.Random(0), 400)
    assert {ot.split_of(p["prompt"]) for p in train} == {"train"}
    assert {ot.split_of(p) for p, _ in task.sft_pairs(random.Random(1), 200)} == {"train"}
    assert task.eval_problems(8, 0)[0]["prompt"] in {p["prompt"] for p in ot.problems("val", 8, 10_000)}
    with pytest.raises(ValueError, match="split must be one of"):
        ot.problems("dev", 4, 0)
    assert [ot.episode_kind(x) for x in ("<think>chk1+2=3</think>", "by4*2=8", "3+4=7", "hmm")] == [
        "check", "distractor", "step", "other"]
