"""Differentiable sparse-polynomial and row-reduction ops, on any evaluator: the jax.numpy
term loop (:mod:`e3kernels.reference.sparse_polynomial`, the CPU path) or the Pallas kernels
(Triton, Mosaic).

``polynomial`` (P) and ``row_reduction`` (R) are ``jax.custom_vjp`` ops whose backward
passes are again P and R calls with derived term lists (``e3kernels.symmetric_terms``):

* P's gradient w.r.t. its inputs is a P of ``(inputs, cotangents)`` with the same
  coefficient table; w.r.t. its coefficient table, an R of ``(inputs, cotangents)``;
* R's gradient w.r.t. its inputs is a P whose coefficient table is R's cotangent.

So a gradient of any order is the same few evaluator programs with other term lists,
never autodiff of an evaluation (force training differentiates twice), and every call
shares one :class:`~e3kernels.grouping.RowTiles` schedule.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from e3kernels.reference import sparse_polynomial as reference
from e3kernels.symmetric_terms import (
    SparsePolynomial,
    coefficient_gradient,
    input_gradient,
    reduction_input_gradient,
)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """The jax.numpy evaluator's config (static, as a ``KernelConfig`` is for kernels)."""

    family: str = "reference"
    tile_rows: int | None = None


REFERENCE = ReferenceConfig()


def with_tile_rows(config):
    """``config`` with its ``tile_rows`` set (the family's default when ``None``): the rows
    per tile of the :class:`~e3kernels.grouping.RowTiles` the evaluator is given."""
    if config.tile_rows is not None:
        return config
    return dataclasses.replace(config, tile_rows=_family(config).ROW_BLOCK)


def _family(config):
    if config.family == "reference":
        return reference
    # imported only when a kernel runs: the reference needs no Pallas
    from e3kernels.kernels.symmetric_contraction import _mosaic, _triton

    return {"triton": _triton, "mosaic": _mosaic}[config.family]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def polynomial(config, poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles):
    """``poly`` on inputs ``zs`` (each ``(N, C, size)``) with coefficient table ``coefs``
    ``(S, Q, C)``; rows of tiles in group ``S`` (invalid indices) are written as ``fill``.
    Returns one ``(N, C, size)`` array per output, of the dtypes ``out_dtypes``."""
    outs = _family(config).polynomial(poly, fill, out_dtypes, zs, coefs, tiles, config=config)
    return tuple(outs)


def _polynomial_fwd(config, poly, fill, out_dtypes, zs, coefs, tiles):
    return polynomial(config, poly, fill, out_dtypes, zs, coefs, tiles), (zs, coefs, tiles)


def _polynomial_bwd(config, poly, fill, out_dtypes, residuals, cotangents):
    del fill, out_dtypes  # invalid rows' gradients are 0, as through jnp.where
    zs, coefs, tiles = residuals
    with_cotangents = tuple(zs) + tuple(cotangents)
    grad_zs = polynomial(config, input_gradient(poly), 0.0, _dtypes(zs), with_cotangents, coefs, tiles)
    grad_coefs = row_reduction(config, coefficient_gradient(poly), coefs.shape[0], with_cotangents, tiles)
    return grad_zs, grad_coefs.astype(coefs.dtype), _no_cotangent(tiles)


polynomial.defvjp(_polynomial_fwd, _polynomial_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def row_reduction(config, reduction: SparsePolynomial, num_groups: int, zs, tiles):
    """``(S, Q, C)`` float32: per weight set, the sum over its rows of ``reduction``'s terms
    (rows with invalid indices left out)."""
    return _family(config).row_reduction(reduction, num_groups, zs, tiles, config=config)


def _row_reduction_fwd(config, reduction, num_groups, zs, tiles):
    return row_reduction(config, reduction, num_groups, zs, tiles), (zs, tiles)


def _row_reduction_bwd(config, reduction, num_groups, residuals, cotangent):
    del num_groups
    zs, tiles = residuals
    poly = reduction_input_gradient(reduction)
    grad_zs = polynomial(config, poly, 0.0, _dtypes(zs), tuple(zs), cotangent, tiles)
    return grad_zs, _no_cotangent(tiles)


row_reduction.defvjp(_row_reduction_fwd, _row_reduction_bwd)


def _dtypes(arrays) -> tuple:
    return tuple(a.dtype for a in arrays)


def _no_cotangent(tiles):
    return jax.tree.map(lambda _: None, tiles)
