"""GPU (Triton lowering) Pallas kernels for sparse polynomials and row reductions, the
symmetric contraction's evaluator (:mod:`e3kernels.sparse_polynomial` calls them).

The inputs arrive in the tiled layout of :mod:`._term_loop`:
``(V + 1, T * row_block, C_pad)`` planes, channels padded to a multiple of the channel
block, so that no load needs a mask. A program owns one row tile of a
:class:`~e3kernels.grouping.RowTiles` schedule (``row_block`` rows of one weight set;
``ROW_BLOCK`` by default) and ``CHANNEL_BLOCK`` channels; a variable is one contiguous
``(row_block, channel_block)`` load of its plane (from L1/L2 after the first term that
reads it), and the body is :func:`._term_loop.run_terms`, whose
accumulator and product stay in registers. Empty tiles (the schedule's spares) skip it.

A row reduction writes one partial sum per tile, ``(T, Q, C_pad)``, and XLA sums each
group's tiles with a one-hot matmul (deterministic, unlike a scatter-add). Tiles of
invalid rows and the empty spares (group ``S``) write zeros, which that sum drops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from e3kernels.grouping import RowTiles, cdiv, sum_by_group
from e3kernels.kernels._common import KernelConfig, power_of_two_block, row_sum
from e3kernels.kernels.symmetric_contraction._term_loop import (
    run_terms,
    table_operands,
    term_coefficients,
    term_scales,
)
from e3kernels.reference.sparse_polynomial import from_tiled, tiled_planes
from e3kernels.symmetric_terms import SparsePolynomial, term_table

ROW_BLOCK = 32  # default rows per tile: the grouping granularity of RowTiles
#: channels per program: a (32, 32) float32 tile is 8 values per thread at 4 warps, so
#: the accumulator, the product and a plane take ~24 registers
CHANNEL_BLOCK = 32


def _launch(kernel, out_shape, grid, config: KernelConfig, name: str):
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, compiler_params=config.triton_params(),
                          interpret=config.pallas_interpret, name=name)


def _operands(poly: SparsePolynomial, zs, tiles: RowTiles, row_block: int):
    """``(channel block, padded channels, term table, its operands, tiled planes)``."""
    block = power_of_two_block(zs[0].shape[1], CHANNEL_BLOCK)
    padded = cdiv(zs[0].shape[1], block) * block
    table = term_table(poly)
    planes = tiled_planes(zs, tiles, row_block, padded, jnp.float32)
    return block, padded, table, table_operands(table), planes


def polynomial(poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles: RowTiles, *,
               config: KernelConfig):
    """``poly`` evaluated per row with its tile's coefficient row set (see symmetric_terms)."""
    row_block, num_channels = config.tile_rows, zs[0].shape[1]
    block, padded, table, operands, planes = _operands(poly, zs, tiles, row_block)
    kernel = functools.partial(_polynomial_kernel, num_out=poly.num_out, num_table=len(operands), fill=fill,
                               num_groups=coefs.shape[0], row_block=row_block, channel_block=block)
    out_shape = jax.ShapeDtypeStruct((poly.num_out,) + planes.shape[1:], jnp.float32)
    tiled = _launch(kernel, out_shape, (tiles.group.shape[0], padded // block), config, "sparse_polynomial")(
        tiles.group, tiles.end - tiles.start, *operands, planes, term_coefficients(table, coefs, padded))
    return from_tiled(poly, tiled, tiles, num_channels, out_dtypes)


def _polynomial_kernel(group_ref, count_ref, *refs, num_out, num_table, fill, num_groups, row_block,
                       channel_block):
    table_refs, (z_ref, coef_ref, out_ref) = refs[:num_table], refs[num_table:]
    tile = pl.program_id(0)
    group = group_ref[tile]
    coefficient_set = jnp.minimum(group, num_groups - 1)  # invalid tiles read some set, then write fill
    rows = pl.ds(tile * row_block, row_block)
    channels = pl.ds(pl.program_id(1) * channel_block, channel_block)

    def coefficient(t):
        return coef_ref[coefficient_set, pl.ds(t, 1), channels]

    def finish(o, total):
        out_ref[o, rows, channels] = jnp.where(group < num_groups, total, fill)

    @pl.when(count_ref[tile] > 0)
    def _():
        run_terms(table_refs, num_out, lambda v: z_ref[v, rows, channels], coefficient, finish,
                  (row_block, channel_block))


def row_reduction(reduction: SparsePolynomial, num_groups: int, zs, tiles: RowTiles, *,
                  config: KernelConfig):
    """``(S, Q, C)`` float32: per group, the sum over its rows of the reduction's terms."""
    assert all(t.vars for t in reduction.terms), "masked rows must contribute 0"
    row_block, num_channels = config.tile_rows, zs[0].shape[1]
    block, padded, table, operands, planes = _operands(reduction, zs, tiles, row_block)
    num_tiles = tiles.group.shape[0]
    active = jnp.where(tiles.group < num_groups, tiles.end - tiles.start, 0)  # group S: zeros
    kernel = functools.partial(_reduction_kernel, num_out=reduction.num_out, num_table=len(operands),
                               row_block=row_block, channel_block=block)
    out_shape = jax.ShapeDtypeStruct((num_tiles, reduction.num_out, padded), jnp.float32)
    partials = _launch(kernel, out_shape, (num_tiles, padded // block), config, "sparse_row_reduction")(
        active, *operands, planes, term_scales(table, padded))
    return sum_by_group(partials[:, :, :num_channels], tiles.group, num_groups)


def _reduction_kernel(count_ref, *refs, num_out, num_table, row_block, channel_block):
    table_refs, (z_ref, scale_ref, partial_ref) = refs[:num_table], refs[num_table:]
    tile = pl.program_id(0)
    rows = pl.ds(tile * row_block, row_block)
    channels = pl.ds(pl.program_id(1) * channel_block, channel_block)
    active = count_ref[tile] > 0

    def finish(o, total):
        partial_ref[tile, pl.ds(o, 1), channels] = jnp.where(active, row_sum(total, keepdims=True), 0.0)

    run_terms(table_refs, num_out, lambda v: z_ref[v, rows, channels],
              lambda t: scale_ref[0, pl.ds(t, 1), channels], finish, (row_block, channel_block))
