"""GPU (Triton lowering) Pallas kernels for sparse polynomials and row reductions.

Inputs stay in their natural ``(N, C, size)`` layout. A program owns one row tile of a
:class:`~e3kernels.grouping.RowTiles` schedule (``row_block`` rows of one weight
set, gathered through the sort order; ``ROW_BLOCK`` by default) and ``channel_block``
channels. It loads each variable it needs once, as a ``(row_block, channel_block)`` strided
gather (the ``size`` columns of a row share cache lines, so one row's variables come from
L1 after the first), each coefficient row once as a ``(channel_block,)`` slice of its
tile's weight set, and runs the unrolled term list in float32 registers; empty tiles (the
schedule's spares) skip the work. The channel block is sized from the term list's peak
number of live tiles so that a thread keeps about ``_REGISTER_BUDGET`` floats live.

A row reduction writes one partial sum per tile, ``(T, Q, C)``, and XLA sums each group's
tiles with a one-hot matmul (deterministic, unlike a scatter-add). Tiles of invalid rows
and the empty spares (group ``S``) run with every row masked, so they write finite zeros
(every reduction term has a variable), which that sum drops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from e3kernels.grouping import RowTiles, cdiv, sum_by_group
from e3kernels.kernels._common import KernelConfig
from e3kernels.kernels._term_unrolling import (
    coefficient_term,
    ordered_for_registers,
    peak_live_tiles,
    row_sum,
    scaled,
    unroll_terms,
)
from e3kernels.symmetric_terms import SparsePolynomial

ROW_BLOCK = 32  # default rows per tile: the grouping granularity of RowTiles
#: float32 values per thread for live tiles. A reduction also keeps its open sums: at 128
#: the second-order reduction spilled 208 B on H100, at 64 none (``make compile-check``)
_REGISTER_BUDGET = {"polynomial": 128, "reduction": 64}
_MAX_LIVE_TILES = 64  # beyond this, reductions give up prefix sharing (see ordered_for_registers)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _channel_block(terms, num_channels: int, config: KernelConfig, kind: str) -> int:
    """Channels per program: a power of two keeping ``peak live tiles x elements per
    thread`` near the register budget of the kernel's ``kind``."""
    per_thread = min(8, _pow2_floor(_REGISTER_BUDGET[kind] // max(peak_live_tiles(terms), 1)))
    block = max(1, per_thread * 32 * config.num_warps // config.tile_rows)
    return min(block, _pow2_ceil(num_channels))


class _TileView:
    """The rows and channels of one program, and masked loads and stores on them."""

    def __init__(self, schedule_refs, num_rows: int, num_channels: int, row_block: int, channel_block: int):
        group_ref, begin_ref, count_ref, *order_ref = schedule_refs
        tile = pl.program_id(0)
        self.group, self.count = group_ref[tile], count_ref[tile]
        position = begin_ref[tile] + jnp.arange(row_block, dtype=jnp.int32)
        row_ok = jnp.arange(row_block, dtype=jnp.int32) < self.count
        if order_ref:  # rows out of the tile point past the end, so no store can clash
            position = plgpu.load(order_ref[0].at[position], mask=row_ok, other=num_rows)
        self.channel_slice = pl.ds(pl.program_id(1) * channel_block, channel_block)
        self.channels = self.channel_slice.start + jnp.arange(channel_block, dtype=jnp.int32)
        self.channel_ok = self.channels < num_channels
        self.rows = position
        self.mask = row_ok[:, None] & self.channel_ok[None, :]

    def load(self, ref, column: int) -> jax.Array:
        """``ref[rows, channels, column]`` as float32; 0 outside the tile."""
        index = ref.at[self.rows[:, None], self.channels[None, :], column]
        return _as_float32(plgpu.load(index, mask=self.mask, other=0))

    def store(self, ref, column: int, value: jax.Array) -> None:
        value = jnp.broadcast_to(value, self.mask.shape).astype(ref.dtype)
        plgpu.store(ref.at[self.rows[:, None], self.channels[None, :], column], value, mask=self.mask)

    def load_coefficients(self, ref, group, row: int) -> jax.Array:
        """``ref[group, row, channels]`` as a float32 ``(1, channels)`` row."""
        index = ref.at[group, jnp.int32(row), self.channel_slice]  # a slice: cheap to interpret
        return lax.expand_dims(_as_float32(plgpu.load(index, mask=self.channel_ok, other=0)), (0,))


def _as_float32(value):
    return value if value.dtype == jnp.float32 else lax.convert_element_type(value, jnp.float32)


def _schedule_operands(tiles: RowTiles, count: jax.Array) -> tuple[jax.Array, ...]:
    """What ``_TileView`` reads: each tile's group, first position, row count, and the order."""
    order = () if tiles.order is None else (tiles.order,)
    return (tiles.group, tiles.start, count) + order


def polynomial(poly: SparsePolynomial, fill: float, out_dtypes, zs, coefs, tiles: RowTiles, *,
               config: KernelConfig):
    """``poly`` evaluated per row with its tile's coefficient row set (see symmetric_terms)."""
    num_rows, num_channels = zs[0].shape[:2]
    terms = ordered_for_registers(poly.terms, _MAX_LIVE_TILES)
    row_block, channel_block = config.tile_rows, _channel_block(terms, num_channels, config, "polynomial")
    schedule = _schedule_operands(tiles, tiles.end - tiles.start)
    kernel = functools.partial(
        _polynomial_kernel, poly=poly, terms=terms, fill=fill, num_schedule=len(schedule),
        num_groups=coefs.shape[0], num_rows=num_rows, num_channels=num_channels,
        row_block=row_block, channel_block=channel_block,
    )
    out_shape = [
        jax.ShapeDtypeStruct((num_rows, num_channels, size), dtype)
        for size, dtype in zip(poly.out_sizes, out_dtypes)
    ]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(tiles.group.shape[0], cdiv(num_channels, channel_block)),
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="sparse_polynomial",
    )(*schedule, *zs, coefs)


def _polynomial_kernel(*refs, poly, terms, fill, num_schedule, num_groups, num_rows, num_channels,
                       row_block, channel_block):
    schedule_refs, refs = refs[:num_schedule], refs[num_schedule:]
    num_in = len(poly.in_sizes)
    z_refs, coef_ref, out_refs = refs[:num_in], refs[num_in], refs[num_in + 1 :]
    tile = _TileView(schedule_refs, num_rows, num_channels, row_block, channel_block)
    valid = tile.group < num_groups
    group = jnp.minimum(tile.group, num_groups - 1)  # invalid tiles load some set, then write fill

    def load_var(var):
        array, column = poly.locate_input(var)
        return tile.load(z_refs[array], column)

    def term_value(term, monomial):
        coefficient = tile.load_coefficients(coef_ref, group, term.coef)
        return coefficient_term(monomial, coefficient, term.scale, tile.mask.shape)

    def finish(out, total):
        array, column = poly.locate_output(out)
        tile.store(out_refs[array], column, jnp.where(valid, total, fill))

    @pl.when(tile.count > 0)
    def _():
        written = unroll_terms(terms, load_var, term_value, finish)
        for out in sorted(set(range(poly.num_out)) - written):
            finish(out, jnp.zeros(tile.mask.shape, jnp.float32))


def row_reduction(reduction: SparsePolynomial, num_groups: int, zs, tiles: RowTiles, *,
                  config: KernelConfig):
    """``(S, Q, C)`` float32: per group, the sum over its rows of the reduction's terms."""
    assert all(t.vars for t in reduction.terms), "masked rows must contribute 0"
    num_rows, num_channels = zs[0].shape[:2]
    terms = ordered_for_registers(reduction.terms, _MAX_LIVE_TILES)
    row_block, channel_block = config.tile_rows, _channel_block(terms, num_channels, config, "reduction")
    active_rows = jnp.where(tiles.group < num_groups, tiles.end - tiles.start, 0)  # group S: all masked
    schedule = _schedule_operands(tiles, active_rows)
    num_tiles = tiles.group.shape[0]
    kernel = functools.partial(
        _reduction_kernel, reduction=reduction, terms=terms, num_schedule=len(schedule),
        num_rows=num_rows, num_channels=num_channels, row_block=row_block, channel_block=channel_block,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tiles, reduction.num_out, num_channels), jnp.float32),
        grid=(num_tiles, cdiv(num_channels, channel_block)),
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="sparse_row_reduction",
    )(*schedule, *zs)
    return sum_by_group(partials, tiles.group, num_groups)


def _reduction_kernel(*refs, reduction, terms, num_schedule, num_rows, num_channels, row_block,
                      channel_block):
    schedule_refs, refs = refs[:num_schedule], refs[num_schedule:]
    z_refs, partial_ref = refs[:-1], refs[-1]
    tile = _TileView(schedule_refs, num_rows, num_channels, row_block, channel_block)
    tile_index = pl.program_id(0)

    def load_var(var):
        array, column = reduction.locate_input(var)
        return tile.load(z_refs[array], column)

    def term_value(term, monomial):
        return scaled(monomial, term.scale)

    def finish(out, total):
        index = partial_ref.at[tile_index, jnp.int32(out), tile.channel_slice]
        plgpu.store(index, row_sum(total), mask=tile.channel_ok)

    written = unroll_terms(terms, load_var, term_value, finish)
    for out in sorted(set(range(reduction.num_out)) - written):
        finish(out, jnp.zeros(tile.mask.shape, jnp.float32))
