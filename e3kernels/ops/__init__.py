"""Functional ops. Each validates its inputs and dispatches, at trace time, to
``e3kernels.reference`` or ``e3kernels.kernels`` through :mod:`e3kernels.backend`.

Their static plans come from irreps: :func:`linear_plan`, :func:`symmetric_contraction_plan`
and :func:`convolution_plan`.
"""

from e3kernels.irreps import convolution_plan, linear_plan, symmetric_contraction_plan
from e3kernels.ops.equivariant_convolution import RadialWeights, equivariant_convolution
from e3kernels.ops.indexed_linear import indexed_linear
from e3kernels.ops.symmetric_contraction import symmetric_contraction

__all__ = [
    "RadialWeights", "convolution_plan", "equivariant_convolution", "indexed_linear", "linear_plan",
    "symmetric_contraction", "symmetric_contraction_plan",
]
