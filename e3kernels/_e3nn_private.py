"""The one place that imports e3nn-jax's private modules (``e3nn_jax._src``).

e3kernels reuses e3nn-jax's own linear-map machinery rather than re-deriving its rules
(path weights, instruction order, initialisers). These names are not public in e3nn-jax
0.21, so a new e3nn-jax release can move them: this module is what to update then.
"""

from e3nn_jax._src.linear import FunctionalLinear
from e3nn_jax._src.utils.dtype import get_pytree_dtype

__all__ = ["FunctionalLinear", "get_pytree_dtype"]
