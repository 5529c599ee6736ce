"""Flax NNX modules: ``Linear`` (every call form), ``MultiLayerPerceptron``, ``BatchNorm``,
``Dropout``, ``SymmetricTensorProduct`` (species-indexed weights included) and
``MessagePassingConvolution``, with the numbers of the Haiku and linen modules, and exact
parameter conversion between the three frameworks (:func:`load_haiku`, :func:`to_haiku`,
:func:`load_linen`, :func:`to_linen`).

NNX creates parameters eagerly, so each module takes its input irreps (and the sizes its
parameters depend on) in the constructor, with keyword-only ``rngs: nnx.Rngs``, ``dtype``
(of the computation; ``None`` promotes the input's with the parameters') and
``param_dtype``. Inputs are ``e3nn.IrrepsArray`` or raw arrays of the given irreps.
"""

from e3kernels.nnx.convert import load_haiku, load_linen, to_haiku, to_linen
from e3kernels.nnx.modules import (
    BatchNorm,
    Dropout,
    Linear,
    MessagePassingConvolution,
    MultiLayerPerceptron,
    SymmetricTensorProduct,
)

__all__ = [
    "Linear",
    "MultiLayerPerceptron",
    "BatchNorm",
    "Dropout",
    "SymmetricTensorProduct",
    "MessagePassingConvolution",
    "load_haiku",
    "to_haiku",
    "load_linen",
    "to_linen",
]
