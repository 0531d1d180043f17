"""Episode markers matched in decoded text (see ``l2t_ext.reward.episodes`` for the contract): built-in modes,
literal strings and regexes, the text each response token contributes, and the tokens that close a match.
Lives below ``reward`` and ``eval`` because both cut responses at the same markers."""

from __future__ import annotations

import os
import re

import torch

# a mode's pattern, and the text written where a marker is forced (e.g. before an answer cue in evaluation)
MODES = {
    "think": re.compile(re.escape("</think>")),
    "paragraph": re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*"),
    "line": re.compile(r"\n+"),
    "sentence": re.compile(r"[.!?]+(?=\s)"),
}
_WINDOW = 4  # tokens of left context when decoding one token's text (byte-level BPE, SentencePiece spaces)


def text_patterns(markers) -> list[re.Pattern] | None:
    """Compiled text patterns for ``markers``, or None when they are token-id markers (lists of ints)."""
    if isinstance(markers, (str, re.Pattern)):
        markers = [markers]
    if not isinstance(markers, (list, tuple)) or not markers:
        raise ValueError("segment_episodes: markers must be a non-empty list (mode names, strings, regexes or "
                         "token-id lists), e.g. ['paragraph'] or [tokenizer.encode('</think>', "
                         "add_special_tokens=False)]")
    if all(isinstance(m, (str, re.Pattern)) for m in markers):
        out = []
        for m in markers:
            if isinstance(m, re.Pattern):
                out.append(m)
            elif not m:
                raise ValueError("segment_episodes: an empty string is not a marker")
            elif m in MODES:
                out.append(MODES[m])
            elif m.startswith("re:"):
                try:
                    out.append(re.compile(m[3:]))
                except re.error as e:
                    raise ValueError(f"segment_episodes: marker {m!r} is not a valid regex ({e})") from None
            else:
                out.append(re.compile(re.escape(m)))
        return out
    if any(isinstance(m, (str, re.Pattern)) for m in markers):
        raise ValueError(f"segment_episodes: markers mix text and token ids: {markers!r}")
    return None


def token_texts(tokenizer, rows: list[list[int]]) -> list[list[str]]:
    """The text each token adds to its row's decoded text, so that ``"".join(texts[b])`` is the row's text
    (special tokens skipped). Decoded with ``_WINDOW`` tokens of left context, so that SentencePiece's leading
    spaces and byte-level BPE's merged bytes come out as in a full decode; two batched decode calls in all."""
    wins, prevs = [], []
    for ids in rows:
        for i in range(len(ids)):
            lo = max(0, i - _WINDOW)
            wins.append(ids[lo:i + 1])
            prevs.append(ids[lo:i])
    full = tokenizer.batch_decode(wins, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    head = tokenizer.batch_decode(prevs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    out, k = [], 0
    for ids in rows:
        texts = []
        for _ in ids:
            a, b = head[k], full[k]
            n = len(os.path.commonprefix([a, b]))  # shorter than a when an incomplete UTF-8 char became U+FFFD
            texts.append(b[n:])
            k += 1
        out.append(texts)
    return out


def closing_positions(tokenizer, rows: list[list[int]], patterns) -> list[list[int]]:
    """Per row of token ids: the sorted indices of the tokens that hold the last character of a match."""
    out = []
    for texts in token_texts(tokenizer, rows):
        owner = [j for j, piece in enumerate(texts) for _ in piece]
        text = "".join(texts)
        out.append(sorted({owner[m.end() - 1] for pat in patterns for m in pat.finditer(text) if m.end() > m.start()}))
    return out


def text_marker_ends(input_ids: torch.Tensor, response_mask: torch.Tensor, patterns, tokenizer) -> torch.Tensor:
    """(B, L) bool: True at the response token holding the last character of each text-marker match."""
    B, L = input_ids.shape
    ends = torch.zeros(B, L, dtype=torch.bool)
    cols = [torch.nonzero(response_mask[b].cpu()).flatten().tolist() for b in range(B)]
    ids_cpu = input_ids.cpu()
    found = closing_positions(tokenizer, [ids_cpu[b, c].tolist() for b, c in enumerate(cols)], patterns)
    for b, js in enumerate(found):
        ends[b, [cols[b][j] for j in js]] = True
    return ends.to(input_ids.device)


MODE_TEXT = {"think": "</think>", "paragraph": "\n\n", "line": "\n", "sentence": ". "}


def marker_text(marker: str) -> str:
    """The text that writes ``marker`` (a mode name, a literal, or ``re:`` pattern: not writable)."""
    if marker in MODE_TEXT:
        return MODE_TEXT[marker]
    if marker.startswith("re:"):
        raise ValueError(f"a regex marker ({marker!r}) cannot be written as text; put a literal marker first")
    return marker
