"""TPU (Mosaic) Pallas kernels for sparse polynomials and row reductions, the symmetric
contraction's evaluator (:mod:`e3kernels.sparse_polynomial` calls them).

The inputs arrive in the tiled layout of :mod:`._term_loop`:
``(V + 1, T * row_block, C_pad)`` planes, channels padded to the 128 lanes. A grid step
takes one tile of ``row_block`` rows (``ROW_BLOCK`` by default; few steps, as each costs
~0.35 us) and 128 channels; a variable is then the ``(row_block, 128)`` slab ``z[v]``, read
at a dynamic index of the untiled leading axis, and a term's coefficient row a dynamic
sublane row of its group's table. The tile's weight set is found by the coefficient table's
``index_map`` in the schedule's per-group summary (``RowTiles.first`` and ``bounds``, in
scalar prefetch with the term table: neither grows with the rows; SMEM has 1 MiB).
The body is :func:`._term_loop.run_terms`. Empty tiles skip the work.

A row reduction accumulates into its group's ``(1, Q, 128)`` output block over consecutive
tiles (the row grid axis is ``arbitrary``), zeroing it on the group's first tile. Tiles of
invalid rows (group ``S``) skip the work and their block is dropped; groups without rows
are never visited, and read as zero.

Every input and output passes through an XLA relayout (gather, transpose, pad): HBM
traffic is about three times the inputs', the price of rectangular DMAs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from e3kernels.grouping import RowTiles, locate_tile
from e3kernels.kernels._common import LANES, KernelConfig, lane_padded, row_sum
from e3kernels.kernels.symmetric_contraction._term_loop import (
    run_terms,
    table_operands,
    term_coefficients,
    term_scales,
)
from e3kernels.reference.sparse_polynomial import from_tiled, tiled_planes
from e3kernels.symmetric_terms import SparsePolynomial, term_table

ROW_BLOCK = 64  # default rows per tile: the grouping granularity of RowTiles


def _grid_spec(tiles: RowTiles, num_table: int, num_channels: int, in_specs, out_specs):
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2 + num_table,
        grid=(lane_padded(num_channels) // LANES, tiles.group.shape[0]),
        in_specs=in_specs,
        out_specs=out_specs,
    )


def polynomial(poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles: RowTiles, *,
               config: KernelConfig):
    """``poly`` evaluated per row with its tile's coefficient row set (see symmetric_terms)."""
    row_block = config.tile_rows
    num_channels = zs[0].shape[1]
    num_groups = coefs.shape[0]
    table = term_table(poly)
    padded = lane_padded(num_channels)
    planes = tiled_planes(zs, tiles, row_block, padded, jnp.float32)
    operands = table_operands(table)

    def coefficient_block(c, t, first, bounds, *_):
        return jnp.minimum(locate_tile(first, bounds, t, row_block)[0], num_groups - 1), 0, c

    in_specs = [
        pl.BlockSpec((planes.shape[0], row_block, LANES), lambda c, t, *_: (0, t, c)),
        pl.BlockSpec((1, len(table.coef), LANES), coefficient_block),
    ]
    out_spec = pl.BlockSpec((poly.num_out, row_block, LANES), lambda c, t, *_: (0, t, c))
    kernel = functools.partial(_polynomial_kernel, num_out=poly.num_out, num_table=len(operands), fill=fill,
                               num_groups=num_groups, row_block=row_block)
    tiled = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((poly.num_out,) + planes.shape[1:], jnp.float32),
        grid_spec=_grid_spec(tiles, len(operands), num_channels, in_specs, out_spec),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=config.pallas_interpret,
        name="sparse_polynomial",
    )(tiles.first, tiles.bounds, *operands, planes, term_coefficients(table, coefs, padded))
    return from_tiled(poly, tiled, tiles, num_channels, out_dtypes)


def _polynomial_kernel(first_ref, bounds_ref, *refs, num_out, num_table, fill, num_groups, row_block):
    table_refs, (z_ref, coef_ref, out_ref) = refs[:num_table], refs[num_table:]
    group, count = locate_tile(first_ref, bounds_ref, pl.program_id(1), row_block)
    valid = group < num_groups

    def finish(o, total):
        out_ref[o] = jnp.where(valid, total, fill)

    @pl.when(count > 0)  # empty tiles' rows are never read back
    def _():
        run_terms(table_refs, num_out, lambda v: z_ref[v], lambda t: coef_ref[0, pl.ds(t, 1), :], finish,
                  (row_block, LANES))


def row_reduction(reduction: SparsePolynomial, num_groups: int, zs, tiles: RowTiles, *,
                  config: KernelConfig):
    """``(S, Q, C)`` float32: per group, the sum over its rows of the reduction's terms."""
    assert all(t.vars for t in reduction.terms), "padding rows must contribute 0"
    row_block = config.tile_rows
    num_channels = zs[0].shape[1]
    table = term_table(reduction)
    padded = lane_padded(num_channels)
    planes = tiled_planes(zs, tiles, row_block, padded, jnp.float32)
    operands = table_operands(table)
    in_specs = [
        pl.BlockSpec((planes.shape[0], row_block, LANES), lambda c, t, *_: (0, t, c)),
        pl.BlockSpec((1, len(table.coef), LANES), lambda c, t, *_: (0, 0, c)),
    ]
    out_spec = pl.BlockSpec(
        (1, reduction.num_out, LANES),
        lambda c, t, first, bounds, *_: (locate_tile(first, bounds, t, row_block)[0], 0, c),
    )
    kernel = functools.partial(_reduction_kernel, num_out=reduction.num_out, num_table=len(operands),
                               num_groups=num_groups, row_block=row_block)
    sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups + 1, reduction.num_out, padded), jnp.float32),
        grid_spec=_grid_spec(tiles, len(operands), num_channels, in_specs, out_spec),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=config.pallas_interpret,
        name="sparse_row_reduction",
    )(tiles.first, tiles.bounds, *operands, planes, term_scales(table, padded))
    visited = jnp.zeros(num_groups + 1, bool).at[tiles.group].set(True)[:num_groups]  # others: never written
    return jnp.where(visited[:, None, None], sums[:num_groups, :, :num_channels], 0.0)


def _reduction_kernel(first_ref, bounds_ref, *refs, num_out, num_table, num_groups, row_block):
    table_refs, (z_ref, scale_ref, sum_ref) = refs[:num_table], refs[num_table:]
    tile = pl.program_id(1)
    group, count = locate_tile(first_ref, bounds_ref, tile, row_block)

    @pl.when(tile == first_ref[group])  # tiles of a group are consecutive: accumulate in place
    def _():
        sum_ref[...] = jnp.zeros_like(sum_ref)

    def finish(o, total):
        row = pl.ds(o, 1)
        sum_ref[0, row, :] = sum_ref[0, row, :] + row_sum(total, keepdims=True)

    @pl.when((count > 0) & (group < num_groups))  # group S is dropped
    def _():
        run_terms(table_refs, num_out, lambda v: z_ref[v], lambda t: scale_ref[0, pl.ds(t, 1), :], finish,
                  (row_block, LANES))
