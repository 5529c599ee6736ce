"""e3kernels: e3nn-compatible Haiku layers whose hot ops run as fused Pallas kernels.

Public surface:

* :mod:`e3kernels.haiku`: ``Linear``, ``MultiLayerPerceptron``, ``BatchNorm``, ``Dropout``,
  ``SymmetricTensorProduct`` (drop-in for ``e3nn_jax.haiku``), and
  ``MessagePassingConvolution`` (MACE's and NequIP's message passing);
* :mod:`e3kernels.flax`: the same six for Flax linen (drop-in for ``e3nn_jax.flax``);
* :mod:`e3kernels.nnx`: the same six for Flax NNX, and parameter conversion between the
  three frameworks (imported on first use: Flax is needed only for these two);
* :mod:`e3kernels.ops`: the functional ops ``indexed_linear``, ``symmetric_contraction``,
  ``equivariant_convolution``;
* :mod:`e3kernels.models`: a complete MACE potential on these modules, and its data helpers;
* backend selection: :func:`set_backend`, :func:`use_backend`, :func:`get_backend`
  (see :mod:`e3kernels.backend`);
* :func:`gpu_target`: the GPU to lower CUDA kernels for on a host without one.
"""

import importlib

from e3kernels import haiku, ops
from e3kernels.backend import BACKENDS, get_backend, set_backend, use_backend
from e3kernels.dispatch import gpu_target

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "flax", "get_backend", "gpu_target", "haiku", "nnx", "ops", "set_backend", "use_backend",
]


def __getattr__(name: str):
    if name in ("flax", "nnx"):  # Flax is imported only by those who use it
        return importlib.import_module(f"e3kernels.{name}")
    raise AttributeError(f"module 'e3kernels' has no attribute {name!r}")
