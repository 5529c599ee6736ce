"""The differentiation rules of ``indexed_linear``, shared by the reference and the kernels.

Both implementations are grouped matmuls over rows sorted by index (``e3kernels.grouping``)
and differ only in how they evaluate two linear maps, supplied by an *engine*:

* ``engine.apply(plan, x, weights, biases, grouping, fill)``: the op itself, ``(N, dim_out)``
  of ``x``'s dtype, rows of the invalid group set to ``fill``;
* ``engine.weight_grad(plan, x, g, grouping)``: per block, the ``(S, mul_in, mul_out)``
  sum (float32, or float64 for float64 inputs) ``path_weight * sum_{n in s, m} x[n, :, m]^T g[n, :, m]``.

The rules below are ``jax.custom_vjp``s that close under differentiation, so gradients of
any order (force training differentiates twice) run on the engine's own code:

* input gradient: ``apply`` with the transposed plan and weights ``swapaxes(W, 1, 2)``;
  invalid rows get zero gradient;
* weight gradient: ``weight_grad``, itself a ``custom_vjp`` whose backward is two ``apply``
  calls (a transposed one for ``x``, a forward one for ``g``);
* bias gradient: a per-index sum of the bias columns of the cotangent (one-hot matmul).

Engines are static (hashable); ``engine.num_groups`` is the number of weight sets ``S``.
:func:`indexed_linear` is both backends' entry: it settles the degenerate sizes, sorts the
rows by index and builds the engine for the sizes it sees.
A ``custom_vjp`` has no forward-mode (``jax.jvp``) rule: reverse mode only, on every backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from e3kernels.grouping import Grouping, group_rows, sum_by_group
from e3kernels.irreps import LinearPlan, transposed_plan, without_biases


class Engine(Protocol):
    """What the rules below need of an implementation (hashable: a ``custom_vjp`` static)."""

    #: the number of weight sets ``S``
    num_groups: int

    def apply(self, plan: LinearPlan, x, weights, biases, grouping: Grouping, fill: float) -> jax.Array:
        """``(N, plan.dim_out)`` of ``x``'s dtype; rows of the invalid group set to ``fill``."""

    def weight_grad(self, plan: LinearPlan, x, g, grouping: Grouping) -> tuple[jax.Array, ...]:
        """Per block ``(S, mul_in, mul_out)``: ``alpha * sum_{n in s, m} x[n, :, m]^T g[n, :, m]``."""


def indexed_linear(make_engine: Callable[[int, int], Engine], plan: LinearPlan, x, weights, biases,
                   indices):
    """Both backends' ``indexed_linear``: the degenerate sizes, then :func:`linear` on rows
    grouped by index, through ``make_engine(num_rows, num_sets)``.

    No weights or biases at all: zeros (nothing is selected by index, so no row is invalid).
    No rows: an empty output. No weight sets (``S = 0``): every row is invalid, so NaN.
    """
    weights, biases = tuple(weights), tuple(biases)
    num_rows, params = x.shape[0], weights + biases
    if not params:
        return jnp.zeros((num_rows, plan.dim_out), x.dtype)
    num_sets = params[0].shape[0]
    if num_rows == 0 or num_sets == 0:
        return jnp.full((num_rows, plan.dim_out), jnp.nan, x.dtype)
    grouping = group_rows(indices, num_sets)
    return linear(make_engine(num_rows, num_sets), plan, x, weights, biases, grouping)


def linear(engine, plan: LinearPlan, x, weights, biases, grouping: Grouping):
    """``indexed_linear`` through ``engine``, rows of the invalid group NaN."""
    return _linear(engine, plan, True, x, tuple(weights), tuple(biases), grouping)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear(engine, plan: LinearPlan, nan_rows: bool, x, weights, biases, grouping: Grouping):
    """The grouped matmul; rows of the invalid group are NaN (``nan_rows``) or 0 (backward)."""
    return engine.apply(plan, x, weights, biases, grouping, float("nan") if nan_rows else 0.0)


def _linear_fwd(engine, plan, nan_rows, x, weights, biases, grouping):
    out = _linear(engine, plan, nan_rows, x, weights, biases, grouping)
    return out, (x, weights, biases, grouping)


def _linear_bwd(engine, plan, nan_rows, residuals, g):
    x, weights, biases, grouping = residuals
    dx = _transposed_linear(engine, plan, g, weights, grouping)
    dw = _weight_grad(engine, without_biases(plan), x, g, grouping)
    dw = tuple(d.astype(w.dtype) for d, w in zip(dw, weights))
    db = _bias_grad(plan, engine.num_groups, g, grouping, biases)
    return dx, dw, db, None


_linear.defvjp(_linear_fwd, _linear_bwd)


def _transposed_linear(engine, plan, g, weights, grouping):
    """``g -> dx``: the transposed plan with transposed weights; invalid rows get 0."""
    weights_t = tuple(jnp.swapaxes(w, 1, 2) for w in weights)
    return _linear(engine, transposed_plan(plan), False, g, weights_t, (), grouping)


def _bias_grad(plan, num_groups, g, grouping: Grouping, biases):
    valid = (grouping.groups < num_groups)[:, None]  # NaN cotangents of invalid rows stay out
    return tuple(
        (b.path_weight * sum_by_group(jnp.where(valid, g[:, b.out_start : b.out_start + b.mul], 0),
                                      grouping.groups, num_groups)).astype(bias.dtype)
        for b, bias in zip(plan.biases, biases)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weight_grad(engine, plan: LinearPlan, x, g, grouping: Grouping):
    """Per-index weight gradient in the accumulation dtype; linear in ``x`` and in ``g``."""
    return engine.weight_grad(plan, x, g, grouping)


def _weight_grad_fwd(engine, plan, x, g, grouping):
    return _weight_grad(engine, plan, x, g, grouping), (x, g, grouping)


def _weight_grad_bwd(engine, plan, residuals, dw_bar):
    x, g, grouping = residuals
    dx = _transposed_linear(engine, plan, g, dw_bar, grouping).astype(x.dtype)
    dg = _linear(engine, plan, False, x, tuple(dw_bar), (), grouping).astype(g.dtype)
    return dx, dg, None


_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)
