"""Haiku modules, drop-in replacements for ``e3nn_jax.haiku``'s."""

from e3kernels.haiku.convolution import MessagePassingConvolution
from e3kernels.haiku.linear import Linear
from e3kernels.haiku.others import BatchNorm, Dropout, MultiLayerPerceptron
from e3kernels.haiku.symmetric_tensor_product import SymmetricTensorProduct

__all__ = [
    "Linear", "MultiLayerPerceptron", "BatchNorm", "Dropout", "SymmetricTensorProduct",
    "MessagePassingConvolution",
]
