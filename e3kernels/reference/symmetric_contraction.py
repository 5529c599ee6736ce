"""Reference (pure jax.numpy) symmetric contraction: the plan's sparse polynomial, on the
term-loop evaluator, with its derivatives as sparse polynomials again.

What it computes (the specification, see :func:`e3kernels.ops.symmetric_contraction`)::

    out[n, c, i] = sum_paths sum_k W_p[s_n, k, c] sum_{j_1..j_nu} U_p[j_1, .., j_nu, k, i]
                   * x[n, c, j_1] * ... * x[n, c, j_nu]

:func:`~e3kernels.symmetric_terms.symmetric_terms` writes this as a sparse polynomial:
terms ``(J_t, o_t)`` (a sorted monomial ``x_J = prod_{j in J} x[.., j]``, an output column)
and a coefficient matrix ``A`` with ``B[s, t, c] = sum_k A[t, k] W[s, k, c]``, ``W`` the
paths' weights concatenated along ``mul``. Hence ("weights first")::

    out[n, c, o] = sum_{t: o_t = o} B[s_n, t, c] x_J_t[n, c]

:func:`contract` computes ``B`` with one einsum, then evaluates the polynomial with
:func:`e3kernels.sparse_polynomial.polynomial`: a ``custom_vjp`` whose derivatives are
sparse polynomials and row reductions with derived term lists, so every derivative order
is the same small program (:mod:`e3kernels.reference.sparse_polynomial`) and the weights'
gradient flows back through the einsum. The Pallas kernels run this same function with
their own evaluator (:mod:`e3kernels.kernels.symmetric_contraction`).

Per row and channel the polynomial is a few hundred multiply-adds (MACE-M: 410 terms),
where the dense basis (what e3nn contracts, per row) has ``dim_in ** order`` entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from e3kernels.grouping import grouped_row_tiles, in_range, shared_row_tiles
from e3kernels.irreps import SymmetricPlan
from e3kernels.sparse_polynomial import REFERENCE, polynomial, with_tile_rows
from e3kernels.spec import accumulation_dtype
from e3kernels.symmetric_terms import symmetric_terms


def symmetric_contraction(x, weights: Sequence[jax.Array], indices, *, plan: SymmetricPlan):
    """``(N, C, plan.dim_out)`` contraction of ``x`` ``(N, C, dim_in)`` (see module doc).

    ``weights``: one ``(mul, C)`` array per path, or ``(S, mul, C)`` selected per row by
    ``indices`` ``(N,)``; rows whose index is outside ``[0, S)`` are NaN. Sums run in
    float32 (float64 for float64 inputs).
    """
    return contract(x, tuple(weights), indices, plan, REFERENCE, accumulation_dtype(x, *weights))


def contract(x, weights, indices, plan: SymmetricPlan, config, dtype):
    """The contraction on ``config``'s evaluator (the reference's, or a kernel family's),
    the coefficient table and the sums in ``dtype``."""
    config = with_tile_rows(config)
    num_rows, num_channels, _ = x.shape
    terms = symmetric_terms(plan)
    if num_rows == 0 or num_channels == 0 or not terms.polynomial.terms:  # nothing to evaluate
        out = jnp.zeros((num_rows, num_channels, plan.dim_out), x.dtype)
        if indices is not None and weights:
            out = jnp.where(in_range(indices, weights[0].shape[0])[:, None, None], out, jnp.nan)
        return out
    coefs = coefficient_table(terms.coefficients, weights, indices is not None, dtype)
    if indices is None:
        tiles = shared_row_tiles(num_rows, config.tile_rows)
    else:
        tiles = grouped_row_tiles(indices, coefs.shape[0], config.tile_rows)
    (out,) = polynomial(config, terms.polynomial, float("nan"), (x.dtype,), (x,), coefs, tiles)
    return out


def coefficient_table(coefficients, weights, indexed: bool, dtype) -> jax.Array:
    """``(S, terms, C)`` ``B = A W``, ``W`` the weights concatenated along ``mul`` (``S = 1``
    for shared weights). ``A`` is part of the op's definition, so the product is exact to
    ``dtype`` (``HIGHEST``), whatever the matmul precision setting."""
    stacked = jnp.concatenate([jnp.asarray(w, dtype) for w in weights], axis=-2)
    if not indexed:
        stacked = stacked[None]
    a = jnp.asarray(coefficients, dtype)
    return jnp.einsum("tk,skc->stc", a, stacked, precision=jax.lax.Precision.HIGHEST)
