"""TPU (Mosaic) Pallas kernels for sparse polynomials and row reductions.

TPU blocks are rectangular DMAs, so rows cannot be gathered inside the kernel. The
wrapper lays every input out as ``(size, T * row_block, C_pad)`` float32: variables
first, then rows in tile order (sorted by weight set, each tile padded with zero rows),
channels padded to the 128 lanes. A variable of a block is then a clean ``(8, 128)``
vreg slab ``z[v, rows, :]`` (rows on sublanes, channels on lanes). Each grid step takes one
tile of ``row_block`` rows (``ROW_BLOCK`` by default; few steps, as each costs ~0.35 us);
its weight set is found by the coefficient table's ``index_map`` in the schedule's per-group
summary (``RowTiles.first`` and ``bounds``, in scalar prefetch: it does not grow with the
rows, SMEM has 1 MiB), and an inner loop runs the unrolled term list on 8-row slabs
(16 inputs, a few open sums and prefix products fit the 64 vregs). Empty tiles skip the work.

A row reduction accumulates into its group's ``(1, Q, 128)`` output block over consecutive
tiles (the row grid axis is ``arbitrary``), zeroing it on the group's first tile. Tiles of
invalid rows (group ``S``) skip the work and their block is dropped; groups without rows
are never visited, and read as zero.

Every input and output passes through such an XLA relayout (gather, transpose, pad): HBM
traffic is about three times the Triton kernels', the price of rectangular DMAs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from e3kernels.grouping import RowTiles, cdiv, locate_tile
from e3kernels.kernels._common import KernelConfig
from e3kernels.kernels._term_unrolling import (
    coefficient_term,
    ordered_for_registers,
    row_sum,
    scaled,
    unroll_terms,
)
from e3kernels.symmetric_terms import SparsePolynomial

ROW_BLOCK = 64  # default rows per tile: the grouping granularity of RowTiles
SUBLANES, LANES = 8, 128
_MAX_LIVE_TILES = 48  # of the 64 vregs (see ordered_for_registers)


def _padded_channels(num_channels: int) -> int:
    return cdiv(num_channels, LANES) * LANES


def _to_tiled(z: jax.Array, source_rows: jax.Array) -> jax.Array:
    """``(N, C, size)`` -> ``(size, T * row_block, C_pad)`` float32 (padding zeros)."""
    num_channels = z.shape[1]
    tiled = jnp.take(z, source_rows, axis=0, mode="fill", fill_value=0)
    tiled = jnp.transpose(tiled, (2, 0, 1)).astype(jnp.float32)
    return jnp.pad(tiled, ((0, 0), (0, 0), (0, _padded_channels(num_channels) - num_channels)))


def _from_tiled(tiled: jax.Array, slot: jax.Array, num_channels: int, dtype) -> jax.Array:
    return jnp.transpose(tiled[:, slot, :num_channels], (1, 2, 0)).astype(dtype)


def _pad_channels(table: jax.Array) -> jax.Array:
    pad = _padded_channels(table.shape[-1]) - table.shape[-1]
    return jnp.pad(table.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))


def _for_each_slab(row_block: int, body) -> None:
    """Run ``body(rows)`` on each 8-row slab of a tile."""

    def step(i, carry):
        body(pl.ds(pl.multiple_of(i * SUBLANES, SUBLANES), SUBLANES))
        return carry

    jax.lax.fori_loop(0, row_block // SUBLANES, step, 0)


def polynomial(poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles: RowTiles, *,
               config: KernelConfig):
    """``poly`` evaluated per row with its tile's coefficient row set (see symmetric_terms)."""
    row_block = config.tile_rows
    assert row_block % SUBLANES == 0, row_block
    num_rows, num_channels = zs[0].shape[:2]
    num_groups, num_coef = coefs.shape[:2]
    tiled_zs = [_to_tiled(z, tiles.rows_of_slots(row_block)) for z in zs]
    rows_block = lambda size: pl.BlockSpec((size, row_block, LANES), lambda c, t, *_: (0, t, c))
    coef_block = pl.BlockSpec(
        (1, num_coef, LANES),
        lambda c, t, *summary: (jnp.minimum(locate_tile(*summary, t, row_block)[0], num_groups - 1), 0, c),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(_padded_channels(num_channels) // LANES, tiles.group.shape[0]),
        in_specs=[rows_block(size) for size in poly.in_sizes] + [coef_block],
        out_specs=[rows_block(size) for size in poly.out_sizes],
    )
    kernel = functools.partial(
        _polynomial_kernel, poly=poly, terms=ordered_for_registers(poly.terms, _MAX_LIVE_TILES),
        fill=fill, num_groups=num_groups, row_block=row_block,
    )
    tiled_shape = lambda size: (size,) + tiled_zs[0].shape[1:]
    out_shape = [jax.ShapeDtypeStruct(tiled_shape(size), jnp.float32) for size in poly.out_sizes]
    tiled_outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=config.pallas_interpret,
        name="sparse_polynomial",
    )(tiles.first, tiles.bounds, *tiled_zs, _pad_channels(coefs))
    return [_from_tiled(out, tiles.slot, num_channels, dtype) for out, dtype in zip(tiled_outs, out_dtypes)]


def _polynomial_kernel(first_ref, bounds_ref, *refs, poly, terms, fill, num_groups, row_block):
    num_in = len(poly.in_sizes)
    z_refs, coef_ref, out_refs = refs[:num_in], refs[num_in], refs[num_in + 1 :]
    group, count = locate_tile(first_ref, bounds_ref, pl.program_id(1), row_block)
    valid = group < num_groups

    def slab(rows):
        def load_var(var):
            array, column = poly.locate_input(var)
            return z_refs[array][column, rows, :]

        def term_value(term, monomial):
            coefficient = coef_ref[0, pl.ds(term.coef, 1), :]
            return coefficient_term(monomial, coefficient, term.scale, (SUBLANES, LANES))

        def finish(out, total):
            array, column = poly.locate_output(out)
            total = jnp.where(valid, total, fill)
            out_refs[array][column, rows, :] = jnp.broadcast_to(total, (SUBLANES, LANES))

        written = unroll_terms(terms, load_var, term_value, finish)
        for out in sorted(set(range(poly.num_out)) - written):
            finish(out, jnp.zeros((SUBLANES, LANES), jnp.float32))

    @pl.when(count > 0)  # empty tiles' rows are never read back
    def _():
        _for_each_slab(row_block, slab)


def row_reduction(reduction: SparsePolynomial, num_groups: int, zs, tiles: RowTiles, *,
                  config: KernelConfig):
    """``(S, Q, C)`` float32: per group, the sum over its rows of the reduction's terms."""
    assert all(t.vars for t in reduction.terms), "padding rows must contribute 0"
    row_block = config.tile_rows
    assert row_block % SUBLANES == 0, row_block
    num_rows, num_channels = zs[0].shape[:2]
    tiled_zs = [_to_tiled(z, tiles.rows_of_slots(row_block)) for z in zs]
    group = tiles.group
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(_padded_channels(num_channels) // LANES, group.shape[0]),
        in_specs=[
            pl.BlockSpec((size, row_block, LANES), lambda c, t, *_: (0, t, c)) for size in reduction.in_sizes
        ],
        out_specs=pl.BlockSpec(
            (1, reduction.num_out, LANES),
            lambda c, t, *summary: (locate_tile(*summary, t, row_block)[0], 0, c),
        ),
    )
    kernel = functools.partial(
        _reduction_kernel, reduction=reduction, num_groups=num_groups,
        terms=ordered_for_registers(reduction.terms, _MAX_LIVE_TILES), row_block=row_block,
    )
    out_shape = (num_groups + 1, reduction.num_out, tiled_zs[0].shape[-1])
    sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=config.pallas_interpret,
        name="sparse_row_reduction",
    )(tiles.first, tiles.bounds, *tiled_zs)
    visited = jnp.zeros(num_groups + 1, bool).at[group].set(True)[:num_groups]  # others: never written
    return jnp.where(visited[:, None, None], sums[:num_groups, :, :num_channels], 0.0)


def _reduction_kernel(first_ref, bounds_ref, *refs, reduction, num_groups, terms, row_block):
    z_refs, sum_ref = refs[:-1], refs[-1]
    tile = pl.program_id(1)
    group, count = locate_tile(first_ref, bounds_ref, tile, row_block)

    @pl.when(tile == first_ref[group])  # tiles of a group are consecutive: accumulate in place
    def _():
        sum_ref[...] = jnp.zeros_like(sum_ref)

    def slab(rows):
        def load_var(var):
            array, column = reduction.locate_input(var)
            return z_refs[array][column, rows, :]

        def term_value(term, monomial):
            return scaled(monomial, term.scale)

        def finish(out, total):
            row = pl.ds(out, 1)
            sum_ref[0, row, :] = lax.add(sum_ref[0, row, :], row_sum(total, keepdims=True))

        unroll_terms(terms, load_var, term_value, finish)

    @pl.when((count > 0) & (group < num_groups))  # group S is dropped
    def _():
        _for_each_slab(row_block, slab)
