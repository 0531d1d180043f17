"""``l2t demo``: the embedded default experiment (DESIGN.md section 6)."""

from l2t_ext.demo.run import run_demo

__all__ = ["run_demo"]
