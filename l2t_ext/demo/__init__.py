"""``l2t demo``: the embedded default experiment (docs/architecture.md, "The demo")."""

from l2t_ext.demo.run import run_demo

__all__ = ["run_demo"]
