"""Public kernel API (docs/architecture.md, "Kernels and backends"). Every op takes
``backend="auto"|"cuda"|"triton"|"cpu"|"torch"`` and is a ``torch.library`` custom op (``torch.ops.l2t_ext.*``)
with a fake implementation for torch.compile. ``l2t_ext.ops.reference`` is the torch backend, importable by
tests. Each op's module names its implementation per backend and its ``auto`` order."""

from l2t_ext.ops import reference
from l2t_ext.ops._alloc import poison
from l2t_ext.ops.fisher import fisher_accumulate, fisher_quadform
from l2t_ext.ops.rsvd import project, rsvd
from l2t_ext.ops.segment_grad_outer import segment_grad_outer

__all__ = ["rsvd", "project", "segment_grad_outer", "fisher_quadform", "fisher_accumulate", "reference", "poison"]
