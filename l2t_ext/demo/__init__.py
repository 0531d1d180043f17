"""``l2t demo``: the embedded default experiment (DESIGN.md section 6)."""

from l2t_ext.demo.run import main, run_demo

__all__ = ["main", "run_demo"]
