"""Reference (pure jax.numpy) species-indexed linear map: a sort-and-tile grouped matmul.

What it computes (the specification, see :func:`e3kernels.ops.indexed_linear`): for every
block ``b`` of the plan and every row ``n`` with ``s = indices[n]`` in ``[0, S)``::

    out[n, out_b + v * d + m] += alpha_b * sum_u x[n, in_b + u * d + m] * W_b[s, u, v]
    out[n, bias_k + v]        += alpha_k * B_k[s, v]

on e3nn's flat layout (``d`` the irrep dimension, ``alpha`` the path weights); output
columns no block writes are zero, and a row whose index lies outside ``[0, S)`` is a row
of NaN (never another index's weights).

Algorithm. Gathering ``W[indices]`` would copy ``mul_in * mul_out`` weights per row and
block (1 GB at the MACE size, ``N = 4000``); a grouped matmul needs only the ``S`` sets:

1. Sort the rows by index once (``e3kernels.grouping.group_rows``, the sort the Pallas
   kernels use too) and cut every group into tiles of ``tile_rows`` rows that never
   straddle two groups (``tile_schedule``); in the tile-padded layout of ``padded_slots``,
   tile ``t`` owns slots ``t * tile_rows`` to ``(t + 1) * tile_rows``. The tile count is
   static (``cdiv(N, tile_rows) + S``), so everything jits.
2. Per block, gather ``x``'s rows into that layout, components first
   (``(slots, d, mul_in)``, padding slots zero), and multiply every tile by its group's
   weights: one batched matmul ``(tiles, tile_rows * d, mul_in) @ (tiles, mul_in,
   mul_out)``, all components ``m`` of the block being rows of the same product. Weights
   are gathered per tile (zero for the invalid group ``S`` and unused tiles), never per row.
3. Gather the rows back to their original order by ``slot_of_row`` (the inverse
   permutation), scale by ``alpha``, transpose back to the ``v * d + m`` layout, and set
   invalid rows to NaN (a ``where``, which also gives them zero gradients). The output is
   the concatenation of these chunks (summed where several blocks, or a bias, share one)
   and of zero chunks for the columns no block writes.

Why this shape (measured on a 2-core CPU at the MACE size): the matmuls run at nearly
dense speed on ``(cdiv(N, tile_rows) + S) * tile_rows`` rows (17% padding at the default
tile size), and the rest is memory passes that XLA fuses: slice, transpose and gather of
step 2 make one pass over ``x``; gather, scale, transpose and ``where`` of step 3 one pass
per chunk. That memory traffic (~4x that of a plain matmul with the same FLOPs, whose
layout needs no permutation or transpose) is most of the remaining cost. The chunks are
concatenated rather than written in place with ``dynamic_update_slice``: under autodiff
the latter copies the whole cotangent once per chunk, a ``concatenate`` transposes to
slices. Everything is plain ``jax.numpy``, so gradients of any order (and forward mode)
come from JAX autodiff: the gathers transpose to scatter-adds onto unique slots, the
batched matmul to batched matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from e3kernels.grouping import group_rows, padded_slots, tile_schedule
from e3kernels.irreps import LinearPlan


def indexed_linear(
    x: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array],
    indices: jax.Array,
    *,
    plan: LinearPlan,
    tile_rows: int | None = None,
) -> jax.Array:
    """``(N, plan.dim_out)`` output of ``x``'s dtype (see the module doc).

    ``weights[k]``: ``(S, mul_in, mul_out)`` for ``plan.blocks[k]``; ``biases[k]``:
    ``(S, mul)`` for ``plan.biases[k]``; ``indices``: ``(N,)`` integers. ``tile_rows``
    (static) defaults to :func:`default_tile_rows`; the result does not depend on it.
    """
    weights, biases = tuple(weights), tuple(biases)
    n = x.shape[0]
    params = weights + biases
    if not params:  # nothing is selected by index, so no row can be invalid
        return jnp.zeros((n, plan.dim_out), x.dtype)
    num_sets = params[0].shape[0]
    if n == 0 or num_sets == 0:  # no rows, or no valid index
        return jnp.full((n, plan.dim_out), jnp.nan, x.dtype)
    tile_rows = tile_rows or default_tile_rows(n, num_sets)

    grouping = group_rows(indices, num_sets)
    tiles = tile_schedule(grouping, tile_rows)
    slot_of_row, row_of_slot = padded_slots(grouping, tiles, tile_rows)
    num_tiles = tiles.group.shape[0]

    chunks: dict[int, list[jax.Array]] = {}  # output column -> (N, width) terms starting there
    for b, w in zip(plan.blocks, weights):
        d, mul_in, mul_out = b.ir_dim, b.mul_in, b.mul_out
        xb = x[:, b.in_start : b.in_start + mul_in * d].reshape(n, mul_in, d)
        x_tiled = jnp.take(xb.swapaxes(1, 2), row_of_slot, axis=0, mode="fill", fill_value=0)
        w_tiled = jnp.take(w, tiles.group, axis=0, mode="fill", fill_value=0)
        y_tiled = jnp.matmul(
            x_tiled.reshape(num_tiles, tile_rows * d, mul_in),
            w_tiled,
            preferred_element_type=jnp.promote_types(jnp.result_type(x, w), jnp.float32),
        )
        y = y_tiled.reshape(num_tiles * tile_rows, d, mul_out)[slot_of_row]  # (N, d, mul_out)
        chunks.setdefault(b.out_start, []).append((b.path_weight * y).swapaxes(1, 2).reshape(n, mul_out * d))
    for b, w in zip(plan.biases, biases):
        bias = jnp.take(w, grouping.groups, axis=0, mode="fill", fill_value=0)
        chunks.setdefault(b.out_start, []).append(b.path_weight * bias)

    column = 0  # zero chunks for the columns no block writes
    for start, terms in sorted(chunks.items()):
        if start > column:
            chunks[column] = [jnp.zeros((n, start - column), x.dtype)]
        column = start + terms[0].shape[1]
    if column < plan.dim_out:
        chunks[column] = [jnp.zeros((n, plan.dim_out - column), x.dtype)]

    valid = (grouping.groups < num_sets)[:, None]
    nan = jnp.array(jnp.nan, x.dtype)
    return jnp.concatenate(
        [jnp.where(valid, sum(t[1:], t[0]).astype(x.dtype), nan) for _, t in sorted(chunks.items())], axis=1
    )


def default_tile_rows(num_rows: int, num_sets: int) -> int:
    """A power of two near ``3.2 * sqrt(N / S)``, between 8 and 256.

    Padding adds up to ``S * tile_rows`` rows to every matmul and gather, while each tile
    copies a weight set (``cdiv(N, tile_rows) + S`` copies per block): the sum is smallest
    near ``tile_rows ~ sqrt(N / S)``. At the MACE size (N = 4000, S = 10) this gives 64,
    which measured best (32 at N = 800).
    """
    target = 3.2 * math.sqrt(num_rows / num_sets)
    return min(256, max(8, 1 << round(math.log2(max(target, 1.0)))))
