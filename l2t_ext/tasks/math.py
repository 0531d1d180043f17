"""Math word-problem data: JSONL/Parquet loaders and answer checking (``\\boxed{...}``, GSM8K ``#### N``).

Equivalence uses ``math-verify`` when installed, else ``sympy``, else exact/numeric comparison of the
normalised strings (fractions, thousands separators, trailing zeros). Unparseable answers score 0; nothing
raises.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

from l2t_ext.errors import InputError, MissingFileError


def load_dataset(path: str, question_key: str = "question", answer_key: str = "answer") -> list[dict]:
    """Rows ``{"question", "answer"}`` from a .jsonl or .parquet file. GSM8K answers (``... #### 42``) are
    reduced to the final answer."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"dataset not found: {path}")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as exc:
            raise InputError(f"{path}: reading .parquet needs pandas + pyarrow: pip install pandas pyarrow") from exc
        records = pd.read_parquet(p).to_dict("records")
    elif p.suffix in (".jsonl", ".json"):
        records = []
        with open(p) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
    else:
        raise InputError(f"dataset must be .jsonl or .parquet, got {path}")
    rows = []
    for i, rec in enumerate(records):
        if question_key not in rec or answer_key not in rec or rec[answer_key] in (None, ""):
            raise InputError(f"{path}: row {i} has no {question_key!r}/{answer_key!r} (keys: {sorted(rec)})")
        ans = str(rec[answer_key])
        gsm = extract_gsm8k(ans)
        rows.append({"question": str(rec[question_key]), "answer": gsm if gsm is not None else ans})
    if not rows:
        raise InputError(f"{path}: the dataset has no rows")
    return rows


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


def extract_answer(completion: str) -> str | None:
    """\\boxed{} first, then GSM8K ``####``, then the last number in the text."""
    for fn in (extract_boxed, extract_gsm8k):
        got = fn(completion)
        if got:
            return got
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?", completion)
    return nums[-1].replace(",", "") if nums else None


def _to_number(s: str) -> Fraction | None:
    s = s.strip().replace(",", "").replace("$", "").replace("\\%", "").rstrip(".")
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"\\frac(\d)(\d)", s)
    try:
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
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


def equivalent(pred: str, ref: str) -> bool:
    if pred is None or ref is None:
        return False
    a, b = _strip_braces(pred), _strip_braces(ref)
    if a == b:
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return na == nb
    try:
        from math_verify import parse
        from math_verify import verify as mv_verify

        return bool(mv_verify(parse("$" + b + "$"), parse("$" + a + "$")))
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a verifier must never raise on model output
        return False
    try:
        import sympy

        return bool(sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0)
    except Exception:  # noqa: BLE001
        return False


def verify(completion: str, reference: str) -> float:
    try:
        return 1.0 if equivalent(extract_answer(completion), str(reference)) else 0.0
    except Exception:  # noqa: BLE001 - unparseable answers score 0, never raise
        return 0.0
