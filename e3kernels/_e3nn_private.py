"""The one place that imports e3nn-jax's private modules (``e3nn_jax._src``).

e3kernels reuses e3nn-jax's own machinery rather than re-deriving its rules (path
weights, instruction order, initialisers, batch statistics, dropout masks). These names
are not public in e3nn-jax 0.21, so a new e3nn-jax release can move them: this module is
what to update then.
"""

from __future__ import annotations

import types

from e3nn_jax._src.batchnorm.bn import batch_norm
from e3nn_jax._src.dropout_haiku import Dropout as _HaikuDropout
from e3nn_jax._src.linear import (
    FunctionalLinear,
    linear_mixed,
    linear_mixed_per_channel,
    linear_vanilla,
    parse_gradient_normalization,
)
from e3nn_jax._src.utils.dtype import get_pytree_dtype

__all__ = [
    "FunctionalLinear",
    "batch_norm",
    "dropout_body",
    "get_pytree_dtype",
    "linear_mixed",
    "linear_mixed_per_channel",
    "linear_vanilla",
    "parse_gradient_normalization",
]


def dropout_body(rng, x, p: float, irreps):
    """e3nn's Haiku ``Dropout.__call__`` in training mode, as a plain function.

    e3nn-jax has the equivariant mask only inside its Haiku module; its method needs no
    Haiku state (only ``p`` and ``irreps``), so the unwrapped method runs here with those
    two attributes, outside any Haiku transform.
    """
    module = types.SimpleNamespace(p=p, irreps=irreps)
    return _HaikuDropout.__call__.__wrapped__(module, rng, x, True)
