"""Math word-problem data: JSONL/Parquet loaders and answer checking (``\\boxed{...}``, GSM8K ``#### N``).

Numbers compare exactly after normalising their surface form (fractions, thousands separators, unicode minus,
units, dollar signs); other expressions go to ``math-verify``. ``extract_answer`` documents which part of a
response is the answer. Unparseable answers score 0; nothing raises.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

from l2t_ext.errors import InputError, MissingFileError


def load_dataset(path: str, question_key: str | None = None, answer_key: str | None = None) -> list[dict]:
    """Rows ``{"question", "answer"}`` from a .jsonl or .parquet file of ``{question, answer}`` rows (GSM8K
    answers ``... #### 42`` are reduced to the final answer) or ``{problem, solution}`` rows (MATH style: the
    answer is the solution's last ``\\boxed{}``). ``question_key`` / ``answer_key`` name other columns."""
    records = _read_records(path)
    rows = []
    for i, rec in enumerate(records):
        q_key = question_key or ("question" if "question" in rec else "problem")
        a_key = answer_key or ("answer" if "answer" in rec or q_key == "question" else "solution")
        if rec.get(q_key) in (None, "") or rec.get(a_key) in (None, ""):
            raise InputError(f"{path}: row {i} has no {q_key!r}/{a_key!r} (keys: {sorted(rec)}); rows need "
                             "{question, answer} or {problem, solution}")
        text = str(rec[a_key])
        ans = extract_boxed(text) if a_key == "solution" else (extract_gsm8k(text) or text)
        if not ans:
            raise InputError(f"{path}: row {i}: no \\boxed{{}} answer in its solution")
        rows.append({"question": str(rec[q_key]), "answer": ans})
    if not rows:
        raise InputError(f"{path}: the dataset has no rows")
    return rows


def _read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"dataset not found: {path}")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as exc:
            raise InputError(f"{path}: reading .parquet needs pandas + pyarrow: pip install pandas pyarrow") from exc
        return pd.read_parquet(p).to_dict("records")
    if p.suffix not in (".jsonl", ".json"):
        raise InputError(f"dataset must be .jsonl or .parquet, got {path}")
    records = []
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
    return records


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces handled), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i == -1:
            return None
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
            j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_gsm8k(text: str) -> str | None:
    m = re.search(r"####\s*([^\n]+)", text)
    return m.group(1).strip().replace(",", "") if m else None


# "The answer is 42", "Final answer: 42", "answer = 42" (the last such statement counts)
_FINAL = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+?)\s*(?:\.\s*$|\.\s|\n|$)",
                    re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(completion: str) -> str | None:
    """The response's final answer, by the first rule that applies:

    1. the last ``\\boxed{...}``; 2. a GSM8K ``#### n``; 3. the last explicit statement "the answer is X" /
    "final answer: X" (X up to the end of its sentence or line); 4. only when none of these is present, the last
    number of the last sentence that has one, unless that sentence offers several numbers joined by "and", "or"
    or commas (an ambiguous answer gets no credit)."""
    for fn in (extract_boxed, extract_gsm8k):
        got = fn(completion)
        if got:
            return got
    stated = _FINAL.findall(completion)
    if stated:
        return stated[-1].strip()
    sentences = [x for x in re.split(r"(?<=[.!?])\s+|\n+", completion) if _NUMBER.search(x.replace("- ", "-"))]
    if not sentences:
        return None
    last = sentences[-1]
    nums = _NUMBER.findall(_normalize(last))
    if len(nums) > 1 and re.search(r"\d\s*(?:,|\band\b|\bor\b)\s*-?\d", last):
        return None
    return nums[-1].replace(",", "") if nums else None


def _normalize(s: str) -> str:
    """Surface forms that mean the same number: unicode minus, "- 5", dollar signs, percent, units in
    ``\\text{}`` or as trailing words, a leading "x =", ``\\dfrac``/``\\tfrac``, a final period."""
    s = s.strip().replace("\u2212", "-").replace("\u2013", "-").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}", "", s)  # units: \text{ cm}
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s.strip())  # x = 5
    s = re.sub(r"^-\s+(?=\d)", "-", s.strip())  # "- 5"
    s = re.sub(r"(?<=\d)\s*[A-Za-z][A-Za-z ]*\.?$", "", s)  # 5 cm, 12 dollars, 3 apples.
    return s.strip().rstrip(".").strip()


def _to_number(s: str) -> Fraction | None:
    s = _normalize(s).replace(",", "")
    sign = -1 if s.startswith("-") else 1
    m = re.fullmatch(r"-?\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"-?\\frac(\d)(\d)", s)
    try:
        if m:
            return sign * Fraction(int(m.group(1)), int(m.group(2)))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _strip_braces(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, ch in enumerate(s):
            depth += (ch == "{") - (ch == "}")
            if depth == 0 and i < len(s) - 1:
                return s  # the first brace closes early: not one outer pair
        s = s[1:-1].strip()
    return s


def equivalent(pred: str | None, ref: str | None) -> bool:
    """Numbers compare exactly (as fractions, after ``_normalize``); anything else goes to math-verify
    (a required dependency: the grade never depends on what else is installed)."""
    if pred is None or ref is None:
        return False
    a, b = _strip_braces(pred), _strip_braces(ref)
    if a == b:
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return na == nb
    if (na is None) != (nb is None) and re.search(r"\d\s*(?:,|\band\b|\bor\b)\s*-?\d", a):
        return False  # several numbers offered for one
    from math_verify import parse
    from math_verify import verify as mv_verify

    try:
        return bool(mv_verify(parse("$" + _normalize(b) + "$"), parse("$" + _normalize(a) + "$")))
    except Exception:  # noqa: BLE001 - a verifier must never raise on model output
        return False


def verify(completion: str, reference: str) -> float:
    try:
        return 1.0 if equivalent(extract_answer(completion), str(reference)) else 0.0
    except Exception:  # noqa: BLE001 - unparseable answers score 0, never raise
        return 0.0
