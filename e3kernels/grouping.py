"""Rows grouped by weight index, and the static-size tile schedules over them.

Pure jax.numpy, shared by the Pallas kernels and the CPU reference of ``indexed_linear``.

A call sorts its rows by index once (:func:`group_rows`); every kernel of the call, forward
and backward, then derives from that sort a tile schedule (:func:`tile_schedule`): tiles of
``tile_rows`` consecutive sorted rows that never straddle two groups, so that each tile
multiplies by a single weight set. Rows whose index lies outside ``[0, S)`` form an extra
group ``S``, sorted last; kernels write them as NaN (forward) or zero (backward).

The number of tiles is static, ``cdiv(N, tile_rows) + S``: a sum of ``S + 1`` ceilings
exceeds the ceiling of the sum by at most ``S``. Tiles past the last used one are empty
(``start == end == N``) and belong to group ``S``.

Which rows and edges count is decided here once for every implementation: a row by
:func:`in_range`, an edge of the convolution by :func:`edge_in_range` (both ends), and
:func:`counted_edges` gives a dropped edge's ends the node past the last, so that the
convolution's node partials, which sort edges by the node they sum into, leave it out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Grouping(NamedTuple):
    """Rows sorted by weight index: computed once per call, shared by all its kernels."""

    #: (N,) int32 row ids ordered by group (stable), invalid rows (group S) last
    order: jax.Array
    #: (S + 2,) int32: group g occupies ``order[bounds[g]:bounds[g + 1]]``
    bounds: jax.Array
    #: (N,) int32 group of each row, in the original row order (S where invalid)
    groups: jax.Array


class RowTiles(NamedTuple):
    """The one tile schedule of every kernel: tiles of at most ``tile_rows`` rows, each inside
    one group (all int32 arrays; ``T`` tiles, ``N`` rows)."""

    #: ``(N,)`` row ids in tile order (``None``: rows stay in place, as with shared weights)
    order: jax.Array | None
    #: ``(T,)`` group of each tile (``S`` for invalid rows and for unused tiles)
    group: jax.Array
    #: ``(T,)`` position in ``order`` of each tile's first row
    start: jax.Array
    #: ``(T,)`` one past its last position (``start == end`` for an empty tile)
    end: jax.Array
    #: ``(N,)`` each row's slot ``tile * tile_rows + i`` in the tiled, padded layout
    slot: jax.Array
    #: ``(S + 2,)`` group ``g``'s tiles are ``first[g]`` to ``first[g + 1]``; ``first[S + 1]``
    #: is the number of tiles in use. With :attr:`bounds`, the schedule in a size that grows
    #: with the groups, not the rows: what a Mosaic kernel keeps in SMEM (1 MiB), reading a
    #: tile back with :func:`locate_tile`
    first: jax.Array
    #: ``(S + 2,)`` group ``g``'s rows are the positions ``bounds[g]`` to ``bounds[g + 1]`` of
    #: :attr:`order` (:attr:`Grouping.bounds`)
    bounds: jax.Array

    def rows_of_slots(self, tile_rows: int) -> jax.Array:
        """``(T * tile_rows,)``: the row each slot of the tiled layout holds, ``N`` for
        padding (gather with a fill value). The inverse of :attr:`slot`."""
        return _rows_of_slots(self, tile_rows)


# The schedule's functions are jitted: an op call and each of its derivatives ask for the
# same schedule, and JAX then traces it once per shape, not once per call (in the MACE
# model's energy and forces, 28 traces cost 0.37 s of its 1.4 s of lowering).


@functools.partial(jax.jit, static_argnums=1, inline=True)
def _rows_of_slots(tiles: RowTiles, tile_rows: int) -> jax.Array:
    num_rows = tiles.slot.shape[0]
    offset = jnp.arange(tile_rows, dtype=jnp.int32)
    position = tiles.start[:, None] + offset
    if tiles.order is not None:
        position = tiles.order[jnp.clip(position, 0, max(num_rows - 1, 0))]
    return jnp.where(offset < (tiles.end - tiles.start)[:, None], position, num_rows).reshape(-1)


def in_range(indices: jax.Array, size: int) -> jax.Array:
    """Where ``indices`` address one of ``size`` rows: the one rule of every op and kernel
    (a traced out-of-range index drops its row or edge). Evaluate it before any cast that
    could wrap. Works on arrays inside Pallas kernels too."""
    return (indices >= 0) & (indices < size)


def edge_in_range(senders, receivers, num_nodes: int) -> jax.Array:
    """The edges that count: both ends in ``[0, N)``. Every implementation selects with
    this mask (``where``, never a product: a dropped edge's data may be NaN or inf, as the
    harmonics and radial features of zero-length padding edges are)."""
    return in_range(senders, num_nodes) & in_range(receivers, num_nodes)


def counted_edges(senders, receivers, num_nodes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(counted, senders, receivers)``: :func:`edge_in_range`, and the ends as int32 with
    both ends of every other edge set to ``num_nodes``, the node past the last. A gather
    with ``mode="fill"`` reads that node as zero; sums into it and grouped schedules
    (:func:`group_rows`, its extra group) leave it out. The reference and both kernel
    families drop edges here, once, before any cast that could wrap an index into range."""
    counted = edge_in_range(senders, receivers, num_nodes)
    dropped = lambda index: jnp.where(counted, index, num_nodes).astype(jnp.int32)
    return counted, dropped(senders), dropped(receivers)


@functools.partial(jax.jit, static_argnums=1, inline=True)
def group_rows(indices: jax.Array, num_groups: int) -> Grouping:
    """Sort rows by index; out-of-range indices go to the extra group ``num_groups``."""
    valid = in_range(indices, num_groups)
    groups = jnp.where(valid, indices, num_groups).astype(jnp.int32)
    order = jnp.argsort(groups, stable=True).astype(jnp.int32)
    bounds = jnp.searchsorted(
        groups[order], jnp.arange(num_groups + 2, dtype=jnp.int32), side="left", method="compare_all"
    ).astype(jnp.int32)
    return Grouping(order, bounds, groups)


def num_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """The static tile count covering ``num_rows`` rows in ``num_groups + 1`` groups."""
    return -(-num_rows // tile_rows) + num_groups


@functools.partial(jax.jit, static_argnums=1, inline=True)
def tile_schedule(grouping: Grouping, tile_rows: int) -> RowTiles:
    """Cut every group into tiles of ``tile_rows`` rows (the last one of a group shorter)."""
    bounds = grouping.bounds
    num_rows, invalid = grouping.order.shape[0], bounds.shape[0] - 2
    sizes = bounds[1:] - bounds[:-1]
    first = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(-(-sizes // tile_rows))])
    first = first.astype(jnp.int32)
    tile = jnp.arange(num_tiles(num_rows, invalid, tile_rows), dtype=jnp.int32)
    # the last group whose first tile is <= tile (empty groups share their successor's first)
    group = jnp.clip(jnp.searchsorted(first, tile, side="right", method="compare_all") - 1, 0, invalid)
    start = bounds[group] + (tile - first[group]) * tile_rows
    end = jnp.minimum(start + tile_rows, bounds[group + 1])
    used = tile < first[-1]
    # sorted position p of group g sits in slot first[g] * tile_rows + (p - bounds[g])
    position = jnp.arange(num_rows, dtype=jnp.int32)
    sorted_group = grouping.groups[grouping.order]
    slot_of_position = first[sorted_group] * tile_rows + position - bounds[sorted_group]
    slot = jnp.zeros(num_rows, jnp.int32).at[grouping.order].set(slot_of_position, unique_indices=True)
    return RowTiles(
        order=grouping.order,
        group=jnp.where(used, group, invalid).astype(jnp.int32),
        start=jnp.where(used, start, num_rows).astype(jnp.int32),
        end=jnp.where(used, end, num_rows).astype(jnp.int32),
        slot=slot,
        first=first,
        bounds=bounds,
    )


def locate_tile(first, bounds, tile, tile_rows: int):
    """``(group, count)`` of tile ``tile`` from a schedule's :attr:`RowTiles.first` and
    :attr:`RowTiles.bounds`: its group (``S`` for invalid rows and unused tiles) and its
    number of rows, as in :func:`tile_schedule`. Scalar code, a binary search over the
    ``S + 2`` entries: ``first`` and ``bounds`` may be SMEM refs, read in a kernel or its
    index maps."""
    size = first.shape[0]
    group = jnp.int32(0)  # the last group whose first tile is <= tile (first[0] == 0)
    step = 1 << max(size - 1, 1).bit_length() - 1
    while step:
        candidate = group + step
        later = first[jnp.minimum(candidate, size - 1)] <= tile
        group = jnp.where((candidate < size) & later, candidate, group)
        step //= 2
    group = jnp.minimum(group, size - 2)
    start = bounds[group] + (tile - first[group]) * tile_rows
    count = jnp.clip(bounds[group + 1] - start, 0, tile_rows)
    return group, count


def one_hot_groups(groups: jax.Array, num_groups: int) -> jax.Array:
    """(len(groups), num_groups) float32 membership; group ``num_groups`` (invalid) is dropped."""
    return (groups[:, None] == jnp.arange(num_groups, dtype=groups.dtype)[None, :]).astype(jnp.float32)


def sum_by_group(values: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
    """``out[s] = sum of values[i] over i with groups[i] == s``, deterministic, in float32
    (float64 for float64 values).

    A one-hot matmul at full precision rather than a scatter-add: scatter-adds of
    floats are not deterministic on GPU, and the sums here are small (tiles or bias columns).
    Entries of the dropped group must be finite (they are multiplied by zero).
    """
    acc = jnp.promote_types(jnp.float32, values.dtype)
    flat = values.reshape(values.shape[0], -1).astype(acc)
    one_hot = one_hot_groups(groups, num_groups).astype(acc)
    summed = jnp.dot(one_hot.T, flat, precision=jax.lax.Precision.HIGHEST)
    return summed.reshape((num_groups,) + values.shape[1:])

def shared_row_tiles(num_rows: int, tile_rows: int) -> RowTiles:
    """Consecutive rows, one group (shared weights)."""
    start = jnp.arange(cdiv(num_rows, tile_rows), dtype=jnp.int32) * tile_rows
    return RowTiles(
        order=None,
        group=jnp.zeros_like(start),
        start=start,
        end=jnp.minimum(start + tile_rows, num_rows),
        slot=jnp.arange(num_rows, dtype=jnp.int32),
        first=jnp.array([0, start.shape[0], start.shape[0]], jnp.int32),  # no invalid rows
        bounds=jnp.array([0, num_rows, num_rows], jnp.int32),
    )


def grouped_row_tiles(indices: jax.Array, num_groups: int, tile_rows: int) -> RowTiles:
    """Rows sorted by ``indices``, tiles never mixing two groups."""
    return tile_schedule(group_rows(indices, num_groups), tile_rows)


def cdiv(a, b: int):
    """Ceiling division of an int or int array by a positive int."""
    return (a + b - 1) // b
