"""Token plans for ``segment_grad_outer`` and ``project``, computed with torch ops on the tokens' device.

The chunked path, shared by the cpu backend's ``segment_grad_outer`` and every backend's ``project``: a token plan,
then the backend's three building blocks.

Tokens with ``seg >= 0`` are stably sorted by segment; each segment's run is cut into chunks of at most
``chunk`` tokens. Kernels then reduce each chunk to one partial (r, r) block and each segment sums its
chunks in order, so the result is deterministic (no float atomics) and long segments still spread over
many threads. Building the plan reads sizes back to the host (on a GPU: three synchronisations); ``project``'s
plan of rows in order (``rows_plan``) is built from sizes the host knows.

The span plan, shared by the GPU backends' ``segment_grad_outer`` (no sort, nothing read back to the host): each
segment's token span [first, last] (``segment_spans``), cut into ``pieces`` equal parts; a kernel reduces each
part's tokens of that segment in token order, and the parts are summed in a fixed order. Episodes are contiguous
runs of tokens, so a span holds its own segment's tokens only (interleaved ids stay correct: the kernels skip
other segments' tokens inside a span).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


def segment_plan(seg: torch.Tensor, num_segments: int, chunk: int):
    """Returns (order (T',) int64, chunk_start (C+1,) int64, seg_chunk_start (S+1,) int64)."""
    dev = seg.device
    order = torch.nonzero(seg >= 0).squeeze(1)
    seg_v = seg[order]
    perm = torch.argsort(seg_v, stable=True)
    order, seg_v = order[perm].contiguous(), seg_v[perm]
    counts = torch.bincount(seg_v, minlength=num_segments)
    nchunks = (counts + chunk - 1) // chunk
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    seg_chunk_start = torch.cat([zero, torch.cumsum(nchunks, 0)])
    tok_start = torch.cat([zero, torch.cumsum(counts, 0)])
    C = int(seg_chunk_start[-1])
    chunk_seg = torch.repeat_interleave(torch.arange(num_segments, device=dev), nchunks, output_size=C)
    local = torch.arange(C, device=dev) - seg_chunk_start[chunk_seg]
    starts = tok_start[chunk_seg] + local * chunk
    chunk_start = torch.cat([starts, torch.full((1,), order.numel(), dtype=torch.int64, device=dev)])
    return order, chunk_start.contiguous(), seg_chunk_start.contiguous()


def segment_spans(seg: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (S,), last (S,)) int64 token index of each segment; an empty segment has first = T > last = -1.
    Tokens with seg < 0 belong to no segment; ids must be < S. Integer min/max reductions: the same result in any
    order."""
    T, S = seg.numel(), num_segments
    pos = torch.arange(T, device=seg.device)
    bins = torch.where(seg >= 0, seg, S)  # masked tokens go to an extra bin that is dropped
    first = torch.full((S + 1,), T, dtype=torch.int64, device=seg.device).scatter_reduce_(0, bins, pos, "amin")
    last = torch.full((S + 1,), -1, dtype=torch.int64, device=seg.device).scatter_reduce_(0, bins, pos, "amax")
    return first[:S], last[:S]


def pieces(T: int, S: int, sm_count: int) -> int:
    """Parts per segment span: enough (segment, part) programs for about four per SM, but parts of at least 32
    tokens on average (T4096 with 64 episodes: 128 programs of ~32 tokens instead of 64 of ~64)."""
    return max(1, min(-(-4 * sm_count // S), T // (32 * S)))


def rows_plan(n: int, chunk: int, device):
    """``segment_plan`` of one segment holding rows 0..n-1 (used by ``project``): rows in order, chunks of ``chunk``
    rows, the last one shorter. Its sizes are known on the host, so nothing is sorted or read back."""
    C = -(-n // chunk)
    order = torch.arange(n, device=device)
    chunk_start = (torch.arange(C + 1, device=device) * chunk).clamp_(max=n)
    return order, chunk_start, torch.arange(2, device=device) * C


@dataclasses.dataclass(frozen=True)
class Chunked:
    """A backend's building blocks for the chunked path (its CHUNK and three kernel launchers); ``acc`` is the
    dtype of U in ``project`` (None: float64 for float64 inputs, else float32)."""

    chunk: int
    row_project: Callable  # (X (T, n), idx (T',) or None, V (n, r)) -> X[idx] @ V  (T', r)
    chunk_outer: Callable  # (A (T', ra), B (T', rb), chunk_start (C+1,)) -> per-chunk sums of A^T B  (C, ra, rb)
    segment_sum: Callable  # (P (C, ...), seg_chunk_start (S+1,)) -> per-segment sums of chunks, in order  (S, ...)
    acc: torch.dtype | None = None


def chunked_segment_grad_outer(k: Chunked, X, D, seg, num_segments: int, U, V) -> torch.Tensor:
    """G (S, r, r') by one projection pass over X and D, per-chunk outer products and per-segment sums."""
    order, chunk_start, seg_chunk_start = segment_plan(seg, num_segments, k.chunk)
    A = k.row_project(D, order, U)  # (T', r) = D[order] @ U
    B = k.row_project(X, order, V)  # (T', r') = X[order] @ V
    P = k.chunk_outer(A, B, chunk_start)  # (C, r, r') per-chunk sums of outer products
    return k.segment_sum(P, seg_chunk_start)  # (S, r, r')


def chunked_project(k: Chunked, M, U, V) -> torch.Tensor:
    """(B, r1, r2) = U^T M V per batch entry: M V by rows, then U^T (M V) as one segment of row chunks."""
    acc = k.acc or (torch.float64 if M.dtype == torch.float64 else torch.float32)
    _, chunk_start, seg_start = rows_plan(M.shape[1], k.chunk, M.device)
    out = []
    for b in range(M.shape[0]):
        MV = k.row_project(M[b], None, V[b])  # (m, r2) = M V
        P = k.chunk_outer(U[b].to(acc).contiguous(), MV, chunk_start)  # partial U^T (M V) per row chunk
        out.append(k.segment_sum(P, seg_start)[0])
    return torch.stack(out)
