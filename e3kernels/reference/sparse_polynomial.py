"""Sparse polynomials and row reductions (:mod:`e3kernels.symmetric_terms`) in jax.numpy:
the CPU path, as a program whose size grows with neither the term count nor the
derivative order.

Layout, as the Mosaic kernels': the inputs' variables are gathered in tile order
(:class:`~e3kernels.grouping.RowTiles`, so a tile of ``ROW_BLOCK`` rows has one weight set)
into ``(T, V + 1, R, C)`` planes, variables first, plus a plane of ones.

Algorithm: a loop over tiles and, inside it, a ``fori_loop`` over the terms, reading four
static tables: each term's variables (padded to the degree with the ones plane), output,
coefficient row and scale. A term is one product of ``(R, C)`` planes, times its
coefficient row, added into its output plane (a row reduction adds its row sum into its
output row instead). With ``R = 8`` rows and 128 channels, a plane is 4 kB: a tile's planes
stay in L1 while the terms loop over them.

Why a loop, not the polynomial unrolled: an unrolled graph (MACE-M's forward: 410 terms
and 478 shared prefix products) is a few times faster to run, but its compile time grows
with the term count, and its autodiff's with the derivative order (the force-training
second order of MACE-M: 36,633 optimized HLO instructions, 20 s to compile, against 1,035
instructions and 1.2 s for e3nn-jax's dense contraction). Here every order is this same
small program with another term list (:mod:`e3kernels.sparse_polynomial`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from e3kernels.grouping import RowTiles
from e3kernels.symmetric_terms import SparsePolynomial, term_table

#: rows per tile: 8 x 128 channels x 4 B is a 4 kB plane, so a tile's 17 planes (MACE-M)
#: and its outputs stay in L1. Measured on a 2-core x86 (MACE-M, N = 1000, forward /
#: gradient / force-style second order): 8 rows 31 / 85 / 271 ms, 16 rows 32 / 84 / 262 ms,
#: 32 rows 37 / 152 / 483 ms. Unrolling the term loop 4 or 8 times gained nothing.
ROW_BLOCK = 8


def _table(poly: SparsePolynomial, dtype):
    """``(variables (T, degree), output (T,), coefficient row (T,), scale (T,))`` as arrays."""
    table = term_table(poly)
    out = np.repeat(np.arange(poly.num_out, dtype=np.int32), np.diff(table.offsets))
    variables = jnp.asarray(np.stack(table.variables, axis=1))
    return variables, jnp.asarray(out), jnp.asarray(table.coef), jnp.asarray(table.scale, dtype)


def tiled_planes(zs, tiles: RowTiles, tile_rows: int, padded_channels: int, dtype) -> jax.Array:
    """``(V + 1, T * tile_rows, padded_channels)`` of ``dtype``: the inputs' variables in
    tile order, then a plane of ones; padding rows and channels zero. The layout of this
    evaluator and of both kernel families."""
    num_channels = zs[0].shape[1]
    z = jnp.concatenate([jnp.asarray(z, dtype) for z in zs], axis=-1)  # (N, C, V)
    z = jnp.take(z, tiles.rows_of_slots(tile_rows), axis=0, mode="fill", fill_value=0)
    z = jnp.concatenate([z, jnp.ones(z.shape[:2] + (1,), dtype)], axis=-1)
    z = jnp.transpose(z, (2, 0, 1))
    return jnp.pad(z, ((0, 0), (0, 0), (0, padded_channels - num_channels)))


def from_tiled(poly: SparsePolynomial, tiled: jax.Array, tiles: RowTiles, num_channels: int, out_dtypes):
    """The outputs ``(N, C, size)`` from ``(O, T * rows, C_pad)`` tiled outputs."""
    total = jnp.transpose(tiled[:, tiles.slot, :num_channels], (1, 2, 0))
    outs = jnp.split(total, np.cumsum(poly.out_sizes)[:-1].tolist(), axis=-1)
    return [o.astype(d) for o, d in zip(outs, out_dtypes)]


def _planes_per_tile(zs, tiles: RowTiles, tile_rows: int, dtype) -> jax.Array:
    """:func:`tiled_planes` as ``(T, V + 1, R, C)``, what the loop over tiles maps over."""
    planes = tiled_planes(zs, tiles, tile_rows, zs[0].shape[1], dtype)
    return jnp.moveaxis(planes.reshape(planes.shape[0], -1, tile_rows, planes.shape[-1]), 1, 0)


def _monomial(planes, variables, term):
    """The product of term ``term``'s variables: an ``(R, C)`` plane."""
    product = None
    for j in range(variables.shape[1]):
        plane = lax.dynamic_index_in_dim(planes, variables[term, j], 0, keepdims=False)
        product = plane if product is None else product * plane
    return product


def polynomial(poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles: RowTiles, *, config):
    """``poly`` on inputs ``zs`` (each ``(N, C, size)``) with coefficient table ``coefs``
    ``(S, Q, C)``, row ``n`` reading the set of its tile's group; rows of group ``S``
    (invalid indices) are ``fill``. Sums in ``coefs``' dtype."""
    num_rows, num_channels = zs[0].shape[:2]
    num_groups, dtype = coefs.shape[0], coefs.dtype
    if not poly.terms or num_rows == 0 or num_channels == 0:
        shapes = zip(poly.out_sizes, out_dtypes)
        return [jnp.zeros((num_rows, num_channels, size), d) for size, d in shapes]
    variables, out, coef, scale = _table(poly, dtype)
    planes = _planes_per_tile(zs, tiles, config.tile_rows, dtype)

    def tile(args):
        z, group = args
        coefficient_set = lax.dynamic_index_in_dim(coefs, jnp.minimum(group, num_groups - 1), 0, False)

        def term(t, acc):
            row = lax.dynamic_index_in_dim(coefficient_set, coef[t], 0, keepdims=True)  # (1, C)
            value = (scale[t] * row) * _monomial(z, variables, t)
            current = lax.dynamic_index_in_dim(acc, out[t], 0, keepdims=False)
            return lax.dynamic_update_index_in_dim(acc, current + value, out[t], 0)

        zeros = jnp.zeros((poly.num_out,) + z.shape[1:], dtype)
        acc = lax.fori_loop(0, len(poly.terms), term, zeros)
        return jnp.where(group < num_groups, acc, jnp.asarray(fill, dtype))

    tiled = lax.map(tile, (planes, tiles.group))  # (T, O, R, C)
    tiled = jnp.moveaxis(tiled, 1, 0).reshape(poly.num_out, -1, num_channels)
    return from_tiled(poly, tiled, tiles, num_channels, out_dtypes)


def row_reduction(reduction: SparsePolynomial, num_groups: int, zs, tiles: RowTiles, *, config):
    """``(S, Q, C)``: per group, the sum over its rows of ``reduction``'s terms (rows of
    group ``S`` left out), in float32 (float64 for float64 inputs)."""
    assert all(t.vars for t in reduction.terms), "padding rows must contribute 0"
    num_rows, num_channels = zs[0].shape[:2]
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*zs))
    shape = (num_groups, reduction.num_out, num_channels)
    if not reduction.terms or num_rows == 0 or num_channels == 0:
        return jnp.zeros(shape, dtype)
    variables, out, _, scale = _table(reduction, dtype)
    planes = _planes_per_tile(zs, tiles, config.tile_rows, dtype)

    def tile(sums, args):
        z, group = args

        def term(t, acc):
            value = scale[t] * jnp.sum(_monomial(z, variables, t), axis=0, keepdims=True)  # (1, C)
            current = lax.dynamic_index_in_dim(acc, out[t], 0, keepdims=True)
            return lax.dynamic_update_index_in_dim(acc, current + value, out[t], 0)

        partial = lax.fori_loop(0, len(reduction.terms), term, jnp.zeros(shape[1:], dtype))
        current = lax.dynamic_index_in_dim(sums, group, 0, keepdims=True)
        return lax.dynamic_update_index_in_dim(sums, current + partial[None], group, 0), None

    # group S collects the invalid rows and unused tiles, and is dropped
    sums, _ = lax.scan(tile, jnp.zeros((num_groups + 1,) + shape[1:], dtype), (planes, tiles.group))
    return sums[:num_groups]
