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
"""

from __future__ import annotations

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


class TileSchedule(NamedTuple):
    """Tiles of at most ``tile_rows`` sorted rows, each inside one group."""

    #: (T,) int32 group of each tile (S for invalid rows and for unused tiles)
    group: jax.Array
    #: (T,) int32 first position of the tile in ``Grouping.order``
    start: jax.Array
    #: (T,) int32 one past its last position (``start == end`` for an empty tile)
    end: jax.Array
    #: (S + 2,) int32 index of each group's first tile (``first[S + 1]`` = tiles used)
    first: jax.Array


def group_rows(indices: jax.Array, num_groups: int) -> Grouping:
    """Sort rows by index; out-of-range indices go to the extra group ``num_groups``."""
    valid = (indices >= 0) & (indices < num_groups)  # before any cast that could wrap
    groups = jnp.where(valid, indices, num_groups).astype(jnp.int32)
    order = jnp.argsort(groups, stable=True).astype(jnp.int32)
    bounds = jnp.searchsorted(
        groups[order], jnp.arange(num_groups + 2, dtype=jnp.int32), side="left", method="compare_all"
    ).astype(jnp.int32)
    return Grouping(order, bounds, groups)


def num_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """The static tile count covering ``num_rows`` rows in ``num_groups + 1`` groups."""
    return -(-num_rows // tile_rows) + num_groups


def tile_schedule(grouping: Grouping, tile_rows: int) -> TileSchedule:
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
    return TileSchedule(
        group=jnp.where(used, group, invalid).astype(jnp.int32),
        start=jnp.where(used, start, num_rows).astype(jnp.int32),
        end=jnp.where(used, end, num_rows).astype(jnp.int32),
        first=first,
    )


def padded_slots(grouping: Grouping, tiles: TileSchedule, tile_rows: int) -> tuple[jax.Array, jax.Array]:
    """A layout where tile ``t`` owns rows ``t * tile_rows`` to ``(t + 1) * tile_rows``.

    Returns ``(slot_of_row, row_of_slot)``: where each row goes, shape (N,), and which row
    each of the ``T * tile_rows`` slots holds, ``N`` for padding (gather it with a fill).
    """
    num_rows = grouping.order.shape[0]
    position = jnp.arange(num_rows, dtype=jnp.int32)
    group = grouping.groups[grouping.order]
    slot_of_position = tiles.first[group] * tile_rows + position - grouping.bounds[group]
    num_slots = tiles.group.shape[0] * tile_rows
    row_of_slot = jnp.full(num_slots, num_rows, jnp.int32).at[slot_of_position].set(
        grouping.order, unique_indices=True
    )
    slot_of_row = jnp.zeros(num_rows, jnp.int32).at[grouping.order].set(
        slot_of_position, unique_indices=True
    )
    return slot_of_row, row_of_slot


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

class RowTiles(NamedTuple):
    """A tile schedule (all int32 arrays; ``T`` tiles, ``N`` rows)."""

    #: ``(N,)`` rows sorted by group (``None``: rows stay in place, as with shared weights)
    order: jax.Array | None
    #: ``(T,)`` group of each tile; ``S`` for invalid rows and unused tiles
    group: jax.Array
    #: ``(T,)`` position in ``order`` of each tile's first row
    begin: jax.Array
    #: ``(T,)`` rows in each tile, ``0..block``
    count: jax.Array
    #: ``(N,)`` each row's place ``tile * block + i`` in the tiled, padded row layout
    slot: jax.Array


def shared_row_tiles(num_rows: int, block: int) -> RowTiles:
    """Consecutive rows, one group (shared weights)."""
    begin = jnp.arange(cdiv(num_rows, block), dtype=jnp.int32) * block
    return RowTiles(
        order=None,
        group=jnp.zeros_like(begin),
        begin=begin,
        count=jnp.minimum(block, num_rows - begin),
        slot=jnp.arange(num_rows, dtype=jnp.int32),
    )


def grouped_row_tiles(indices: jax.Array, num_groups: int, block: int) -> RowTiles:
    """Rows sorted by ``indices``, tiles never mixing two groups (``e3kernels.grouping``'s schedule)."""
    grouping = group_rows(indices, num_groups)
    schedule = tile_schedule(grouping, block)
    slot, _ = padded_slots(grouping, schedule, block)
    return RowTiles(
        order=grouping.order,
        group=schedule.group,
        begin=schedule.start,
        count=schedule.end - schedule.start,
        slot=slot,
    )


def cdiv(a, b: int):
    """Ceiling division of an int or int array by a positive int."""
    return (a + b - 1) // b
