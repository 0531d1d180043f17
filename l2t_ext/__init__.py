"""l2t_ext: Learning to Think (L2T) dense process rewards with C++/CUDA/Triton kernels.

Layers (docs/architecture.md): ``ops`` (kernels behind one API) <- ``lm`` <- ``reward`` <- ``rl``. Nothing
below imports from above.
"""

from l2t_ext._backend import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__"]
