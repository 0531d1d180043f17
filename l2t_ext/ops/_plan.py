"""Token plan shared by the compiled backends of ``segment_grad_outer`` and ``project``.

Tokens with ``seg >= 0`` are stably sorted by segment; each segment's run is cut into chunks of at most
``chunk`` tokens. Kernels then reduce each chunk to one partial (r, r) block and each segment sums its
chunks in order, so the result is deterministic (no float atomics) and long segments still spread over
many threads. Computed with torch ops on the tokens' device.
"""

from __future__ import annotations

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


def rows_plan(n: int, chunk: int, device):
    """Plan for one segment holding rows 0..n-1 (used by ``project``)."""
    return segment_plan(torch.zeros(n, dtype=torch.int64, device=device), 1, chunk)
