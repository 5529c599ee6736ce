"""e3kernels: e3nn-compatible Haiku layers whose hot ops run as fused Pallas kernels.

Public surface:

* :mod:`e3kernels.haiku`: ``Linear``, ``MultiLayerPerceptron``, ``BatchNorm``, ``Dropout``,
  ``SymmetricTensorProduct`` (drop-in for ``e3nn_jax.haiku``);
* :mod:`e3kernels.ops`: the functional ops ``indexed_linear``, ``symmetric_contraction``;
* backend selection: :func:`set_backend`, :func:`use_backend`, :func:`get_backend`
  (see :mod:`e3kernels.backend`).
"""

from e3kernels import haiku, ops
from e3kernels.backend import BACKENDS, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["BACKENDS", "get_backend", "haiku", "ops", "set_backend", "use_backend"]
