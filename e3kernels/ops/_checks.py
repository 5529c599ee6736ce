"""Input checks shared by the ops: each error names the argument, what was expected, what came."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_array(op: str, argument: str, value, shape: Sequence[int | None], dtype_kind: str):
    """Check rank, the dimensions given in ``shape`` (``None``: any) and the dtype kind."""
    got_shape = getattr(value, "shape", None)
    got_dtype = getattr(value, "dtype", None)
    expected = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
    if got_shape is None or len(got_shape) != len(shape) or any(
        d is not None and d != g for d, g in zip(shape, got_shape)
    ):
        raise ValueError(f"{op}: {argument} must have shape {expected}; got {got_shape}")
    kinds = {"f": ("a floating", jnp.floating), "i": ("an integer", jnp.integer)}
    name, kind = kinds[dtype_kind]
    if not jnp.issubdtype(got_dtype, kind):  # bfloat16 is floating too (numpy kind 'V')
        raise TypeError(f"{op}: {argument} must have {name} dtype; got {got_dtype}")


def check_indices_in_range(op: str, argument: str, indices, num_indexed_weights: int,
                           bound: str | None = None):
    """Raise for concrete indices outside ``[0, num_indexed_weights)``; traced ones pass.
    ``bound`` says where the bound comes from (default: ``num_indexed_weights=...``)."""
    if isinstance(indices, jax.core.Tracer):
        return
    indices = np.asarray(indices)
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_indexed_weights:
        raise ValueError(
            f"{op}: {argument} must lie in [0, {num_indexed_weights}) "
            f"({bound or f'num_indexed_weights={num_indexed_weights}'}); got values in [{low}, {high}]"
        )


def matmul_precision(op: str, precision: jax.lax.PrecisionLike) -> jax.lax.Precision:
    """``precision`` as one :class:`jax.lax.Precision`, JAX's way: ``None`` is the
    ``jax_default_matmul_precision`` in force at trace time, else ``DEFAULT``; an error
    names ``op``.

    >>> matmul_precision("op", "highest"), matmul_precision("op", None)
    (Precision.HIGHEST, Precision.DEFAULT)
    >>> with jax.default_matmul_precision("tensorfloat32"):
    ...     matmul_precision("op", None)
    Precision.HIGH
    """
    if precision is None:  # lax.Precision reads the setting's names too ("tensorfloat32", ...)
        precision = jax.config.jax_default_matmul_precision
    if isinstance(precision, tuple):  # JAX allows one per operand; the ops use one for both
        if precision[0] != precision[1]:
            raise ValueError(f"{op}: precision must be the same for both operands; got {precision}")
        precision = precision[0]
    try:
        return jax.lax.Precision(precision) if precision is not None else jax.lax.Precision.DEFAULT
    except ValueError as error:
        raise ValueError(
            f"{op}: precision must be None, 'default', 'high', 'highest' or a lax.Precision; "
            f"got {precision!r}"
        ) from error
