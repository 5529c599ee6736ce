"""Reference (pure jax.numpy) species-indexed linear map: a grouped matmul, tile by tile.

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
   straddle two groups (``tile_schedule``, ``RowTiles.rows_of_slots``): tile ``t`` holds the rows
   ``row_of_slot[t * tile_rows : (t + 1) * tile_rows]`` (``N`` marks padding), all of one
   group. The tile count is static (``cdiv(N, tile_rows) + S``), so everything jits.
2. A ``lax.scan`` over the tiles: gather the tile's rows of ``x``, multiply each block by
   the group's weights, add the group's biases, and write the rows of ``out`` (a scatter
   into the loop carry, in place). Tiles of the invalid group and unused tiles are skipped
   (``lax.cond``), so the work follows the tiles actually used; their rows keep the fill.
   With one weight set (shared weights) and at most ``OneSet.max_rows`` rows there is
   nothing to group: :class:`OneSet` multiplies every row at once, with neither scan nor
   gather.
3. Gradients: the ``custom_vjp`` rules of ``e3kernels.grouped_linear`` (shared with the
   kernels), with this module's scans as the engine: the input gradient is step 2 with
   the transposed plan and weights, the weight gradient a scan adding each tile's
   ``x_t^T g_t`` into its group's slot. Gradients of any order come out of the same scans.

Why this shape (measured on a 2-core x86 CPU, XLA:CPU, at the MACE size): a whole-array
pass that reorders e3nn's interleaved ``(mul, ir_dim)`` layout (a gather or transpose of
all of ``x`` or ``out``) can cost as much as a dense matmul of the op's FLOPs, since
XLA:CPU computes such indices element by element over arrays far larger than the cache;
the previous whole-array version spent half its time there. A tile of 128 rows (1 MB)
stays in cache, so its gather, transposes and scatter cost about what its dots cost, and
the dots (``(mul_out, mul_in) @ (mul_in, tile_rows * d)``) run at dense speed, where one
batched matmul over many small tiles ran at half of it. Plain autodiff of the scan would
add a full-size cotangent of ``x`` once per tile (six times slower), hence the
``custom_vjp``, which has no forward mode (``jax.jvp``), as on the Pallas backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from e3kernels import grouped_linear
from e3kernels.grouping import Grouping, tile_schedule
from e3kernels.irreps import LinearBlock, LinearPlan, output_segments
from e3kernels.spec import accumulation_dtype


def indexed_linear(
    x: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array],
    indices: jax.Array,
    *,
    plan: LinearPlan,
    precision: lax.Precision = lax.Precision.DEFAULT,
    tile_rows: int | None = None,
) -> jax.Array:
    """``(N, plan.dim_out)`` output of ``x``'s dtype (see the module doc).

    ``weights[k]``: ``(S, mul_in, mul_out)`` for ``plan.blocks[k]``; ``biases[k]``:
    ``(S, mul)`` for ``plan.biases[k]``; ``indices``: ``(N,)`` integers. The dots run at
    ``precision`` and accumulate in float32 (float64 for float64 inputs). ``tile_rows``
    (static) defaults to :func:`default_tile_rows`; the result does not depend on it.
    """
    def make_engine(num_rows: int, num_sets: int) -> TileScan | OneSet:
        if num_sets == 1 and tile_rows is None and num_rows <= OneSet.max_rows:
            return OneSet(precision)
        return TileScan(num_sets, tile_rows or default_tile_rows(num_rows, num_sets), precision)

    return grouped_linear.indexed_linear(make_engine, plan, x, weights, biases, indices)


def default_tile_rows(num_rows: int, num_sets: int) -> int:
    """A power of two near ``6.4 * sqrt(N / S)``, between 8 and 256.

    A tile wastes up to ``tile_rows - 1`` rows at the end of every group, while each tile
    costs a loop step and a weight read: the sum is smallest near ``sqrt(N / S)``. At the
    MACE size (N = 4000, S = 10) this gives 128: 64 measured the same and 256 about 10 %
    slower; 128 takes half the loop steps of 64.
    """
    target = 6.4 * math.sqrt(num_rows / num_sets)
    return min(256, max(8, 1 << round(math.log2(max(target, 1.0)))))


@dataclasses.dataclass(frozen=True)
class TileScan:
    """The engine of ``e3kernels.grouped_linear``: scans over tiles of one group each."""

    num_groups: int
    tile_rows: int
    precision: lax.Precision

    def _tiles(self, grouping: Grouping) -> tuple[jax.Array, jax.Array]:
        """``(T, tile_rows)`` row ids per tile (``N`` for padding) and ``(T,)`` groups."""
        tiles = tile_schedule(grouping, self.tile_rows)
        return tiles.rows_of_slots(self.tile_rows).reshape(-1, self.tile_rows), tiles.group

    def _used(self, group: jax.Array, work, skipped):
        """``work()`` for a tile of a valid group, ``skipped`` for the others."""
        return lax.cond(group < self.num_groups, work, lambda: skipped)

    def apply(self, plan, x, weights, biases, grouping: Grouping, fill: float):
        n = x.shape[0]

        def tile(out, tile):
            rows, group = tile

            def work():
                xt = x.at[rows].get(mode="fill", fill_value=0)
                return _rows(plan, xt, weights, biases, group, self.precision).astype(x.dtype)

            values = self._used(group, work, jnp.zeros((self.tile_rows, plan.dim_out), x.dtype))
            rows = jnp.where(group < self.num_groups, rows, n)  # skipped tiles write nothing
            return out.at[rows].set(values, mode="drop", unique_indices=True), None

        out = jnp.full((n, plan.dim_out), fill, x.dtype)
        return lax.scan(tile, out, self._tiles(grouping))[0]

    def weight_grad(self, plan, x, g, grouping: Grouping):
        acc = accumulation_dtype(x, g)

        def tile(sums, tile):
            rows, group = tile

            def work():
                xt = x.at[rows].get(mode="fill", fill_value=0)
                gt = g.at[rows].get(mode="fill", fill_value=0)
                return tuple(_block_outer(b, xt, gt, self.precision) for b in plan.blocks)

            zeros = tuple(jnp.zeros((b.mul_in, b.mul_out), acc) for b in plan.blocks)
            parts = self._used(group, work, zeros)
            return tuple(s.at[group].add(p, mode="drop") for s, p in zip(sums, parts)), None

        sums = tuple(jnp.zeros((self.num_groups, b.mul_in, b.mul_out), acc) for b in plan.blocks)
        return lax.scan(tile, sums, self._tiles(grouping))[0]


@dataclasses.dataclass(frozen=True)
class OneSet:
    """The engine for one weight set (shared weights) and rows that fit in a few tiles:
    every row at once, no sort, no scan. At such sizes the scan's steps, gathers and
    branches cost compile time (3-5x) and save nothing; at thousands of rows the tiles'
    cache-sized layout changes win at run time (25-40 % on the gradient, 2-core CPU)."""

    precision: lax.Precision
    num_groups: int = 1
    max_rows: ClassVar[int] = 256

    def apply(self, plan, x, weights, biases, grouping: Grouping, fill: float):
        out = _rows(plan, x, weights, biases, 0, self.precision).astype(x.dtype)
        return jnp.where((grouping.groups == 0)[:, None], out, jnp.asarray(fill, x.dtype))

    def weight_grad(self, plan, x, g, grouping: Grouping):
        valid = (grouping.groups == 0)[:, None]
        x, g = jnp.where(valid, x, 0), jnp.where(valid, g, 0)
        return tuple(_block_outer(b, x, g, self.precision)[None] for b in plan.blocks)


def _rows(plan: LinearPlan, xt, weights, biases, group, precision) -> jax.Array:
    """``(rows, dim_out)`` in the accumulation dtype: rows ``xt`` through weight set ``group``."""
    return jnp.concatenate([_segment(plan, seg, xt, weights, biases, group, precision)
                            for seg in output_segments(plan)], axis=1)


def _segment(plan: LinearPlan, seg, xt, weights, biases, group, precision) -> jax.Array:
    """One output segment of a tile: its blocks and biases summed in the accumulation dtype."""
    rows, acc = xt.shape[0], accumulation_dtype(xt, *weights, *biases)
    total = jnp.zeros((rows, seg.width), acc)
    for k in seg.blocks:
        total = total + _block_product(plan.blocks[k], xt, weights[k][group], precision, acc)
    for k in seg.biases:
        total = total + plan.biases[k].path_weight * biases[k][group].astype(acc)
    return total


def _block_product(b: LinearBlock, xt, w, precision, acc) -> jax.Array:
    """``(rows, mul_out * d)``: ``y[r, v, m] = alpha * sum_u x[r, u, m] w[u, v]``.

    Computed as ``w^T @ x`` on ``(mul_in, rows * d)``: moving whole ``d``-vectors is all
    the reordering e3nn's layout needs (for ``d = 1``, plain ``x @ w``).
    """
    rows, d = xt.shape[0], b.ir_dim
    dtype = jnp.promote_types(xt.dtype, w.dtype)  # both operands in one dtype, as the kernels
    xb, w = xt[:, b.in_start : b.in_start + b.mul_in * d].astype(dtype), w.astype(dtype)
    dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=acc)
    if d == 1:
        y = dot(xb, w)
    else:
        xb = xb.reshape(rows, b.mul_in, d).swapaxes(0, 1).reshape(b.mul_in, rows * d)
        y = dot(w.T, xb)
        y = y.reshape(b.mul_out, rows, d).swapaxes(0, 1).reshape(rows, b.mul_out * d)
    return b.path_weight * y


def _block_outer(b: LinearBlock, xt, gt, precision) -> jax.Array:
    """``(mul_in, mul_out)`` in the accumulation dtype: ``alpha * sum_{r, m} x[r, u, m] g[r, v, m]``."""
    rows, d, acc = xt.shape[0], b.ir_dim, accumulation_dtype(xt, gt)
    dtype = jnp.promote_types(xt.dtype, gt.dtype)
    xt, gt = xt.astype(dtype), gt.astype(dtype)
    xb = xt[:, b.in_start : b.in_start + b.mul_in * d].reshape(rows, b.mul_in, d)
    gb = gt[:, b.out_start : b.out_start + b.mul_out * d].reshape(rows, b.mul_out, d)
    xb = xb.swapaxes(1, 2).reshape(rows * d, b.mul_in)
    gb = gb.swapaxes(1, 2).reshape(rows * d, b.mul_out)
    return b.path_weight * jnp.dot(xb.T, gb, precision=precision, preferred_element_type=acc)
