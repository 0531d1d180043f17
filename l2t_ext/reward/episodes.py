"""Episode segmentation (paper section 4.1; docs/architecture.md, "The reward").

A response is split into episodes at markers. Two kinds of marker, one contract:

* **text markers** (strings, regexes or a built-in mode) are matched in the *decoded text* of each response and
  mapped back to tokens: the token holding a match's last character closes the episode. A marker split across
  tokens, with or without a leading space (``" </think>"``), or a blank line emitted as two ``"\n"`` tokens is
  found however the tokenizer cut it. Modes: ``think`` (``</think>``), ``paragraph`` (a blank line: a newline,
  optional spaces/tabs, a newline), ``line`` (a run of newlines), ``sentence`` (``.``, ``!`` or ``?`` followed
  by whitespace). Any other string is a literal; ``"re:<pattern>"`` or an ``re.Pattern`` is a regex.
* **token-id markers** (lists of ints) match exact id sequences, never text.

A closing token belongs to the episode it closes; tokens after the last marker (the final answer), prompt and
padding get -1; a response without a marker is one episode; episodes beyond ``max_episodes`` merge into the last.
"""

from __future__ import annotations

import torch

from l2t_ext.lm.markers import text_marker_ends, text_patterns


def _check_markers(marker_ids) -> list[list[int]]:
    if not isinstance(marker_ids, (list, tuple)) or not marker_ids:
        raise ValueError("segment_episodes: token-id markers must be a non-empty list of token-id lists, e.g. "
                         "[tokenizer.encode('</think>', add_special_tokens=False)]")
    out = []
    for i, m in enumerate(marker_ids):
        if isinstance(m, int):
            m = [m]
        if not isinstance(m, (list, tuple)) or not m or not all(isinstance(t, int) for t in m):
            raise ValueError(f"segment_episodes: markers[{i}] must be a non-empty list of ints, got {m!r}")
        out.append(list(m))
    return out


def marker_ends(input_ids: torch.Tensor, response_mask: torch.Tensor, marker_ids) -> torch.Tensor:
    """(B, L) bool: True at the last token of every marker occurrence lying entirely inside the response."""
    B, L = input_ids.shape
    ends = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
    for m in _check_markers(marker_ids):
        n = len(m)
        if n > L:
            continue
        pat = torch.tensor(m, dtype=input_ids.dtype, device=input_ids.device)
        win = input_ids.unfold(1, n, 1)  # (B, L - n + 1, n)
        hit = (win == pat).all(-1) & response_mask.unfold(1, n, 1).all(-1)
        ends[:, n - 1:] |= hit
    return ends


def segment_episodes(input_ids: torch.Tensor, response_mask: torch.Tensor, markers, *, tokenizer=None,
                     max_episodes: int = 30) -> torch.Tensor:
    """Episode id of every token.

    Args:
        input_ids: (B, L) int token ids (prompt + response + padding).
        response_mask: (B, L) bool, True on response tokens.
        markers: text markers (mode names ``think``/``paragraph``/``line``/``sentence``, literal strings,
            ``"re:<pattern>"`` or ``re.Pattern``; need ``tokenizer``) or token-id markers (lists of ints, matched
            as id sequences). See the module docstring.
        tokenizer: decodes the responses for text markers (a Hugging Face tokenizer).
        max_episodes: K cap (>= 1); later episodes merge into episode ``max_episodes - 1``.

    Returns:
        (B, L) int64: 0-based episode per response token; -1 for prompt, padding and the final answer.
        Rows with no response tokens are all -1. Episodes per row = ``episode_ids.max(1).values + 1``.
    """
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"segment_episodes: input_ids must be a (B, L) integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if not torch.is_tensor(response_mask) or response_mask.shape != input_ids.shape:
        raise ValueError(f"segment_episodes: response_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{getattr(response_mask, 'shape', type(response_mask))}")
    if not isinstance(max_episodes, int) or max_episodes < 1:
        raise ValueError(f"segment_episodes: max_episodes must be an int >= 1, got {max_episodes!r}")
    patterns = text_patterns(markers)
    if patterns is not None and tokenizer is None:
        raise ValueError("segment_episodes: text markers need tokenizer= to decode the responses")
    resp = response_mask.to(torch.bool).to(input_ids.device)
    if patterns is not None:
        ends = text_marker_ends(input_ids, resp, patterns, tokenizer)
    else:
        ends = marker_ends(input_ids, resp, markers)
    before = torch.cumsum(ends.to(torch.int64), 1) - ends.to(torch.int64)  # markers strictly before t
    total = ends.sum(1, keepdim=True)
    ep = before.clamp(max=max_episodes - 1)
    after_last = (before >= total) & (total > 0)  # the final answer (no marker -> whole response is episode 0)
    return torch.where(resp & ~after_last, ep, torch.full_like(ep, -1))


def episode_counts(episode_ids: torch.Tensor) -> torch.Tensor:
    """(B,) number of episodes per row (0 for rows without response tokens)."""
    return episode_ids.max(1).values.clamp(min=-1) + 1


def boundary_positions(episode_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix end positions of the probes s_0..s_K.

    Returns (pos (B, K+1) int64, valid (B, K+1) bool) with K = max episodes in the batch: pos[b, 0] is the last
    token before the response (the prompt's end), pos[b, k] (k >= 1) the last token of episode k-1. Rows with
    fewer episodes have valid == False beyond theirs.
    """
    B, L = episode_ids.shape
    K = int(episode_counts(episode_ids).max()) if B else 0
    ar = torch.arange(L, device=episode_ids.device).expand(B, L)
    first_resp = torch.where(response_mask.bool(), ar, torch.full_like(ar, L)).min(1).values
    pos = torch.full((B, K + 1), -1, dtype=torch.int64, device=episode_ids.device)
    pos[:, 0] = first_resp - 1
    for k in range(K):
        last = torch.where(episode_ids == k, ar, torch.full_like(ar, -1)).max(1).values
        pos[:, k + 1] = last
    valid = pos >= 0
    valid[:, 0] &= first_resp < L
    valid[:, 1:] &= valid[:, :1]
    return pos, valid
