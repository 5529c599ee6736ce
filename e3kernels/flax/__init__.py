"""Flax linen modules, drop-in replacements for ``e3nn_jax.flax``'s, plus ``Dropout`` and
``SymmetricTensorProduct`` (which e3nn-jax has for Haiku only) and
``MessagePassingConvolution`` (the linen form of ``e3kernels.haiku``'s).

``Linear``, ``MultiLayerPerceptron`` and ``BatchNorm`` subclass e3nn-jax 0.21's linen
modules: same fields, call forms, parameter trees, initial values for the same key and
numbers. The indexed ``Linear(i, x)``, ``SymmetricTensorProduct`` and
``MessagePassingConvolution`` run e3kernels' ops (Pallas kernels on GPU/TPU). Each module
takes a ``backend`` field: ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (the
current setting when called).
"""

from e3kernels.flax.modules import (
    BatchNorm,
    Dropout,
    Linear,
    MessagePassingConvolution,
    MultiLayerPerceptron,
    SymmetricTensorProduct,
)

__all__ = [
    "Linear", "MultiLayerPerceptron", "BatchNorm", "Dropout", "SymmetricTensorProduct",
    "MessagePassingConvolution",
]
