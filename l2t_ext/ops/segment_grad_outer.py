"""Segmented projected gradient outer products (docs/architecture.md, "Kernels and backends").

For a Linear layer y = W x with input rows X (T, n) and output gradients D (T, m), the gradient of the loss
restricted to the tokens of segment s, projected onto the rank-r bases U (m, r), V (n, r), is

    G[s] = U^T (sum_{t: seg[t]==s} D[t] X[t]^T) V = sum_{t: seg[t]==s} (U^T D[t]) (V^T X[t])^T.

The compiled backends evaluate the right-hand side: one pass over X and D projects each token to two r-vectors,
then the outer products are summed per segment in a fixed order (deterministic, no float atomics, never a
(S, m, n) gradient). The cpu backend sums per-chunk partials of the tokens sorted by segment. The GPU backends
work on each segment's token span (episodes are contiguous runs of tokens) and never wait on the host: the
Triton backend in one pass, each program owning a part of one segment's span, projecting its tokens on the fly
(the projections never reach memory) and accumulating their outer products (large float32 inputs: two passes,
which measured faster there); the cuda backend in two passes (two GEMMs, then a reduction per part of a span).
"""

from __future__ import annotations

import torch

from l2t_ext.ops._common import check_same_device, check_tensor, implementation, l2t_op, out_dtype, pick

# segment_grad_outer per backend ("module.function" under l2t_ext/ops/); tests: python_tests/test_segment_grad_outer.py,
# benchmark: l2t_ext/bench/segment_grad_outer.py (benchmarks/bench_segment_grad_outer.py)
IMPLEMENTATIONS = {
    "torch": "reference.segment_grad_outer",  # the reference: index_add_ of per-token outer products
    "cpu": "_cpu.segment_grad_outer",  # C++/OpenMP building blocks on the chunked path (_plan.py)
    "cuda": "_cuda.segment_grad_outer",  # CUDA C++ GEMMs and span reduction on the span plan (_plan.py)
    "triton": "_triton.segment_grad_outer",  # single pass (two-pass for large float32 inputs), no host sync
}
# the largest (S, r1, r2) output segment_grad_outer allocates; a bigger num_segments is almost surely a bug (an
# episode count is at most the number of tokens) and used to be found by the OOM killer instead
MAX_OUTPUT_BYTES = 4 * 2**30


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Fastest first, measured by ``l2t bench`` (benchmarks/README.md): on CPU (2-core AMD EPYC) the C++ kernel
    beats torch; on an H100 Triton's single-pass kernel is 3.2-4.5x ``torch_best`` called directly (bf16, both
    measured sizes), and the CUDA C++ backend (bf16 GEMMs on tensor cores) measured 0.17-0.34x ``torch_best`` on the
    chunked plan it has since left (its span plan is not measured yet)."""
    return ("cpu", "torch") if device.type == "cpu" else ("triton", "torch", "cuda")


@l2t_op("segment_grad_outer")
def _segment_grad_outer_op(X: torch.Tensor, D: torch.Tensor, seg: torch.Tensor, num_segments: int,
                           U: torch.Tensor, V: torch.Tensor, backend: str, check_ids: bool = True) -> torch.Tensor:
    # The segment-id check. On the CPU it runs before any kernel. On a GPU, reading seg.max() first would leave
    # the GPU idle while the host launches the kernels, so the maximum is queued first and read after them: the
    # kernels see out-of-range ids masked, and a failed check discards the result (nothing the caller owns is
    # written). check_ids=False: no check, no synchronisation, out-of-range ids dropped like masked tokens.
    late = check_after_launch(seg.device)
    top = ready = None
    if check_ids and seg.numel():
        if late:
            top, ready = _queue_max(seg)
        else:
            _check_top(int(seg.max()), num_segments)
    if late or not check_ids:
        seg = torch.where(seg < num_segments, seg, -1)
    G = implementation(IMPLEMENTATIONS[backend])(X, D, seg, num_segments, U, V)
    if top is not None:
        if ready is not None:
            ready.synchronize()  # waits for the maximum and its copy only, not for the kernels queued after them
        _check_top(int(top), num_segments)
    return G


def _queue_max(seg: torch.Tensor) -> tuple[torch.Tensor, object]:
    """seg's maximum queued now; on CUDA copied into pinned host memory behind an event, so that the later read
    waits for this reduction only and the host is free again while the kernels run (``int()`` of the device
    value would wait for everything queued before it). Returns (value, event or None)."""
    top = seg.max()
    if seg.device.type != "cuda":
        return top, None
    host = torch.empty((), dtype=top.dtype, pin_memory=True)
    host.copy_(top, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def check_after_launch(device: torch.device) -> bool:
    """Whether the id check is read after the kernels are queued: on devices that run asynchronously to the host."""
    return device.type != "cpu"


def _check_top(top: int, num_segments: int) -> None:
    if top >= num_segments:
        raise ValueError(f"l2t_ext.ops.segment_grad_outer: seg contains id {top} >= num_segments={num_segments}")


@_segment_grad_outer_op.register_fake
def _(X, D, seg, num_segments, U, V, backend, check_ids=True):
    return X.new_empty((num_segments, U.shape[1], V.shape[1]), dtype=out_dtype(X.dtype))


def segment_grad_outer(X: torch.Tensor, D: torch.Tensor, seg: torch.Tensor, num_segments: int, U: torch.Tensor,
                       V: torch.Tensor, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """Per-segment projected gradients of a Linear layer.

    Args:
        X: (T, n) layer inputs per token (float32/float64; bfloat16 on cuda/triton/torch). Read through its
            strides (no copy).
        D: (T, m) gradients w.r.t. the layer outputs, same dtype as X.
        seg: (T,) int64 (or int32, converted) segment id per token; ``seg < 0`` tokens are ignored.
        num_segments: S >= 1; every id must be < S; the (S, r1, r2) output may take at most MAX_OUTPUT_BYTES (4 GiB).
        U: (m, r) left basis; V: (n, r') right basis (used in the accumulation dtype, made contiguous).
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".
        check_ids: raise if an id is >= num_segments (default; on a GPU the ids' maximum is queued before the
            kernels and read after they are queued: the host waits for that reduction only, not for the kernels).
            False: no check and no synchronisation, ids >= num_segments are dropped like negative ones (the
            reward: its ids are valid by construction).

    Returns:
        G (S, r, r') in float32 (float64 for float64 inputs); empty segments are exact zeros.
    """
    op = "segment_grad_outer"
    check_tensor(op, "X", X, 2)
    check_tensor(op, "D", D, 2)
    check_tensor(op, "U", U, 2)
    check_tensor(op, "V", V, 2)
    check_tensor(op, "seg", seg, 1, floating=False)
    device = check_same_device(op, X=X, D=D, seg=seg, U=U, V=V)
    if seg.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"l2t_ext.ops.{op}: seg must be int64 or int32, got {seg.dtype}")
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
        raise ValueError(f"l2t_ext.ops.{op}: num_segments must be an int >= 1, got {num_segments!r}")
    T = X.shape[0]
    if D.shape[0] != T:
        raise ValueError(f"l2t_ext.ops.{op}: D has {D.shape[0]} rows but X has {T}")
    if seg.shape[0] != T:
        raise ValueError(f"l2t_ext.ops.{op}: seg has length {seg.shape[0]} but X has {T} rows")
    if X.dtype != D.dtype:
        raise TypeError(f"l2t_ext.ops.{op}: X and D must share a dtype, got {X.dtype} and {D.dtype}")
    if U.shape[0] != D.shape[1]:
        raise ValueError(f"l2t_ext.ops.{op}: U must be (m, r) with m = D.shape[1] = {D.shape[1]}, got "
                         f"{tuple(U.shape)}")
    if V.shape[0] != X.shape[1]:
        raise ValueError(f"l2t_ext.ops.{op}: V must be (n, r) with n = X.shape[1] = {X.shape[1]}, got "
                         f"{tuple(V.shape)}")
    out_bytes = num_segments * U.shape[1] * V.shape[1] * (8 if X.dtype == torch.float64 else 4)
    if out_bytes > MAX_OUTPUT_BYTES:  # checked before the (S, r1, r2) output is allocated
        raise ValueError(f"l2t_ext.ops.{op}: the output (num_segments={num_segments}, {U.shape[1]}, {V.shape[1]}) "
                         f"would take {out_bytes / 2**30:.1f} GiB, over the {MAX_OUTPUT_BYTES // 2**30} GiB limit; "
                         "num_segments should be the number of episodes (seg.max() + 1)")
    if not isinstance(check_ids, bool):
        raise TypeError(f"l2t_ext.ops.{op}: check_ids must be a bool, got {check_ids!r}")
    name = pick(op, backend, device, X.dtype, auto_order(device))
    return _segment_grad_outer_op(X, D, seg.to(torch.int64), num_segments, U, V, name, check_ids)
