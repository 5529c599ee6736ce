"""Differentiable sparse-polynomial and row-reduction ops over Pallas kernels.

``polynomial`` (P) and ``row_reduction`` (R) are ``jax.custom_vjp`` ops whose backward
passes are again P and R calls with derived term lists (``e3kernels.symmetric_terms``):

* P's gradient w.r.t. its inputs is a P of ``(inputs, cotangents)`` with the same
  coefficient table; w.r.t. its coefficient table, an R of ``(inputs, cotangents)``;
* R's gradient w.r.t. its inputs is a P whose coefficient table is R's cotangent.

So gradients of any order (force training differentiates twice) run Pallas kernels only,
and every call shares one :class:`~e3kernels.grouping.RowTiles` schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from e3kernels.kernels import _sparse_polynomial_mosaic, _sparse_polynomial_triton
from e3kernels.symmetric_terms import (
    SparsePolynomial,
    coefficient_gradient,
    input_gradient,
    reduction_input_gradient,
)


@dataclasses.dataclass(frozen=True)
class KernelStyle:
    """Which kernels run: ``"triton"`` (GPU) or ``"mosaic"`` (TPU), and their ``interpret``
    argument (``True`` for Triton-style on CPU, ``pltpu.InterpretParams()`` for Mosaic)."""

    family: str
    interpret: Any = False
    #: rows per tile (``None``: the kernels' ``ROW_BLOCK``); a tuning knob, and small
    #: blocks keep interpret-mode tests fast while still spanning several tiles
    rows_per_tile: int | None = None

    @property
    def kernels(self):
        return {"triton": _sparse_polynomial_triton, "mosaic": _sparse_polynomial_mosaic}[self.family]

    @property
    def row_block(self) -> int:
        """Rows per tile of the schedule the kernels expect."""
        return self.rows_per_tile or self.kernels.ROW_BLOCK

    def options(self) -> dict[str, Any]:
        return {"row_block": self.row_block, "interpret": self.interpret}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def polynomial(style: KernelStyle, poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles):
    """``poly`` on inputs ``zs`` (each ``(N, C, size)``) with coefficient table ``coefs``
    ``(S, Q, C)``; rows of tiles in group ``S`` (invalid indices) are written as ``fill``.
    Returns one ``(N, C, size)`` array per output, of the dtypes ``out_dtypes``."""
    outs = style.kernels.polynomial(poly, fill, out_dtypes, zs, coefs, tiles, **style.options())
    return tuple(outs)


def _polynomial_fwd(style, poly, fill, out_dtypes, zs, coefs, tiles):
    return polynomial(style, poly, fill, out_dtypes, zs, coefs, tiles), (zs, coefs, tiles)


def _polynomial_bwd(style, poly, fill, out_dtypes, residuals, cotangents):
    del fill, out_dtypes  # invalid rows' gradients are 0, as through jnp.where
    zs, coefs, tiles = residuals
    with_cotangents = tuple(zs) + tuple(cotangents)
    grad_zs = polynomial(style, input_gradient(poly), 0.0, _dtypes(zs), with_cotangents, coefs, tiles)
    grad_coefs = row_reduction(style, coefficient_gradient(poly), coefs.shape[0], with_cotangents, tiles)
    return grad_zs, grad_coefs, _no_cotangent(tiles)


polynomial.defvjp(_polynomial_fwd, _polynomial_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def row_reduction(style: KernelStyle, reduction: SparsePolynomial, num_groups: int, zs, tiles):
    """``(S, Q, C)`` float32: per weight set, the sum over its rows of ``reduction``'s terms
    (rows with invalid indices left out)."""
    return style.kernels.row_reduction(reduction, num_groups, zs, tiles, **style.options())


def _row_reduction_fwd(style, reduction, num_groups, zs, tiles):
    return row_reduction(style, reduction, num_groups, zs, tiles), (zs, tiles)


def _row_reduction_bwd(style, reduction, num_groups, residuals, cotangent):
    del num_groups
    zs, tiles = residuals
    poly = reduction_input_gradient(reduction)
    grad_zs = polynomial(style, poly, 0.0, _dtypes(zs), tuple(zs), cotangent, tiles)
    return grad_zs, _no_cotangent(tiles)


row_reduction.defvjp(_row_reduction_fwd, _row_reduction_bwd)


def _dtypes(arrays) -> tuple:
    return tuple(a.dtype for a in arrays)


def _no_cotangent(tiles):
    return jax.tree.map(lambda _: None, tiles)
