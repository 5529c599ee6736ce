"""``symmetric_contraction``: the contraction behind ``SymmetricTensorProduct``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from e3kernels import backend as _backend
from e3kernels.irreps import SymmetricPlan
from e3kernels.ops._checks import check_array, check_indices_in_range
from e3kernels.reference import symmetric_contraction as _reference

OP = "symmetric_contraction"


def symmetric_contraction(
    x: jax.Array,
    weights: Sequence[jax.Array],
    plan: SymmetricPlan,
    *,
    indices: jax.Array | None = None,
    backend: str | None = None,
) -> jax.Array:
    r"""Per channel, a weighted sum of symmetric powers of ``x`` projected on ``plan.irreps_out``.

    For every row ``n``, channel ``c`` and path ``p = (order, ir_out)`` of ``plan``:

    .. math::

        \mathrm{out}[n, c, \mathrm{ir}] \mathrel{+}= \sum_k w_p[k, c]
        \sum_{j_1..j_\nu} U_p[j_1, .., j_\nu, k, :]\, x[n, c, j_1] \cdots x[n, c, j_\nu]

    with ``U_p`` e3nn's reduced symmetric basis divided by its multiplicity, exactly as
    ``e3nn.haiku.SymmetricTensorProduct``.

    Args:
      x: ``(N, C, plan.dim_in)`` floating input.
      weights: one array per ``plan.paths``: ``(mul, C)`` shared by all rows, or
        ``(S, mul, C)`` with ``indices``.
      plan: the static :class:`~e3kernels.irreps.SymmetricPlan`
        (:func:`e3kernels.ops.symmetric_contraction_plan`).
      indices: ``None``, or ``(N,)`` integers in ``[0, S)`` selecting each row's weights.
        Concrete out-of-range indices raise; traced ones give rows of NaN.
      backend: ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (current setting).

    Returns:
      ``(N, C, plan.dim_out)`` array of ``x``'s dtype. The products and sums run in
      float32 (float64 for float64 inputs) on every backend; there is no matmul, so no
      ``precision`` setting applies.

    >>> import jax.numpy as jnp
    >>> from e3kernels.ops import symmetric_contraction_plan
    >>> plan = symmetric_contraction_plan("0e + 1o", (1, 2), keep_irrep_out="0e")
    >>> [(p.parameter_name, p.mul) for p in plan.paths]
    [('w2_0e', 2), ('w1_0e', 1)]
    >>> weights = [jnp.ones((p.mul, 3)) for p in plan.paths]
    >>> symmetric_contraction(jnp.ones((5, 3, 4)), weights, plan).shape
    (5, 3, 1)
    """
    weights = tuple(weights)
    num_indexed = _validate(x, weights, indices, plan)
    if num_indexed is not None:
        check_indices_in_range(OP, "indices", indices, num_indexed)
    if num_indexed == 0:  # no weight set at all: every row's index is out of range
        return jnp.full(x.shape[:2] + (plan.dim_out,), jnp.nan, x.dtype)
    impl = _backend.select(
        OP,
        backend,
        functools.partial(_reference.symmetric_contraction, plan=plan),
        lambda: _kernels().implementations(plan, jnp.result_type(x, *weights)),
        jax.ShapeDtypeStruct(x.shape[:2] + (plan.dim_out,), x.dtype),
        key=plan,
        row_axes=(0, None, 0),
        # a batch of calls is one call: rows (and species, for per-element weights) folded;
        # shared weights have no space, so a batch of them (an ensemble) maps instead
        spaces=("row", "" if indices is None else "species", "row -> species"),
        out_spaces="row",
    )
    return impl(x, weights, indices)


def _kernels():
    """The Pallas module, imported when a kernel may run (the reference needs no Pallas)."""
    from e3kernels.kernels import symmetric_contraction

    return symmetric_contraction


def _validate(x, weights, indices, plan: SymmetricPlan) -> int | None:
    check_array(OP, "x", x, (None, None, plan.dim_in), "f")
    n, c, _ = x.shape
    if len(weights) != len(plan.paths):
        raise ValueError(
            f"{OP}: expected {len(plan.paths)} weights (one per plan path); got {len(weights)}"
        )
    if indices is None:
        for k, (w, p) in enumerate(zip(weights, plan.paths)):
            check_array(OP, f"weights[{k}] ({p.parameter_name})", w, (p.mul, c), "f")
        return None
    check_array(OP, "indices", indices, (n,), "i")
    num_indexed = weights[0].shape[0] if weights and weights[0].ndim == 3 else None
    for k, (w, p) in enumerate(zip(weights, plan.paths)):
        check_array(OP, f"weights[{k}] ({p.parameter_name})", w, (num_indexed, p.mul, c), "f")
    return num_indexed
