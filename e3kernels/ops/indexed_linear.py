"""``indexed_linear``: the species-indexed matmul behind ``Linear(i, x)``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from e3kernels import backend as _backend
from e3kernels.irreps import LinearPlan
from e3kernels.ops._checks import check_array, check_indices_in_range, matmul_precision
from e3kernels.reference import indexed_linear as _reference

OP = "indexed_linear"


def _kernels():
    """The Pallas module, imported when a kernel may run (the reference needs no Pallas)."""
    from e3kernels.kernels import indexed_linear

    return indexed_linear


def indexed_linear(
    x: jax.Array,
    weights: Sequence[jax.Array],
    indices: jax.Array,
    plan: LinearPlan,
    *,
    biases: Sequence[jax.Array] = (),
    precision: lax.PrecisionLike = None,
    backend: str | None = None,
) -> jax.Array:
    r"""Apply, to every row, the linear map selected by that row's index.

    For every block ``b`` of ``plan`` and every row ``n``, with ``s = indices[n]``:

    .. math::

        \mathrm{out}[n, v, m] \mathrel{+}= \alpha_b \sum_u x[n, u, m]\, W_b[s, u, v]

    on the flat e3nn layout (block columns ordered ``u * ir_dim + m``), plus
    ``alpha * biases[k][s]`` on the scalar columns of each bias block. No per-row copy
    of the weights is ever formed.

    Args:
      x: ``(N, plan.dim_in)`` floating input.
      weights: one ``(S, mul_in, mul_out)`` array per ``plan.blocks``.
      indices: ``(N,)`` integers in ``[0, S)``. Concrete out-of-range indices raise a
        ValueError; traced ones give rows of NaN (never another species' weights).
      plan: the static :class:`~e3kernels.irreps.LinearPlan`.
      biases: one ``(S, mul)`` array per ``plan.biases``.
      precision: of the matmuls, as in :func:`jax.numpy.dot`: ``None`` (JAX's default, or
        the ``jax.default_matmul_precision`` in force), ``"default"``, ``"high"``,
        ``"highest"`` or a :class:`jax.lax.Precision`; the same on every backend.
      backend: ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (current setting).

    Returns:
      ``(N, plan.dim_out)`` array of ``x``'s dtype, accumulated in float32 (float64 for
      float64 inputs). 16-bit inputs and weights multiply in their dtype.

    >>> import jax.numpy as jnp
    >>> from e3kernels.ops import linear_plan
    >>> plan = linear_plan("2x0e", "1x0e")
    >>> w = jnp.array([[[1.0], [1.0]], [[2.0], [0.0]]])  # S=2 species, (S, 2, 1)
    >>> indexed_linear(jnp.array([[1.0, 2.0], [1.0, 2.0]]), [w], jnp.array([0, 1]), plan)
    Array([[2.1213202],
           [1.4142135]], dtype=float32)
    """
    weights, biases = tuple(weights), tuple(biases)
    num_indexed = _validate(x, weights, biases, indices, plan)
    if num_indexed is not None:
        check_indices_in_range(OP, "indices", indices, num_indexed)
    precision = matmul_precision(OP, precision)
    dtype = jnp.result_type(x, *weights, *biases)
    impl = _backend.select(
        OP,
        backend,
        functools.partial(_reference.indexed_linear, plan=plan, precision=precision),
        lambda: _kernels().implementations(plan, precision, dtype),
        jax.ShapeDtypeStruct((x.shape[0], plan.dim_out), x.dtype),
        key=(plan, precision),
        row_axes=(0, None, None, 0),
        # a batch of calls is one call: rows (and species, for per-element weights) folded
        spaces=("row", "species", "species", "row -> species"),
        out_spaces="row",
    )
    return impl(x, weights, biases, indices)


def _validate(x, weights, biases, indices, plan: LinearPlan) -> int | None:
    check_array(OP, "x", x, (None, plan.dim_in), "f")
    check_array(OP, "indices", indices, (x.shape[0],), "i")
    if len(weights) != len(plan.blocks) or len(biases) != len(plan.biases):
        raise ValueError(
            f"{OP}: expected {len(plan.blocks)} weights and {len(plan.biases)} biases "
            f"(one per plan block); got {len(weights)} and {len(biases)}"
        )
    arrays = weights + biases
    if not arrays:
        return None
    num_indexed = arrays[0].shape[0] if arrays[0].ndim else None
    for k, (w, b) in enumerate(zip(weights, plan.blocks)):
        check_array(OP, f"weights[{k}]", w, (num_indexed, b.mul_in, b.mul_out), "f")
    for k, (w, b) in enumerate(zip(biases, plan.biases)):
        check_array(OP, f"biases[{k}]", w, (num_indexed, b.mul), "f")
    return num_indexed
