"""TPU (Mosaic) kernels of the indexed linear map; see the package's ``__init__``.

Mosaic works on (8, 128)-tiled blocks that BlockSpecs DMA in, so rows are not gathered in
the kernel: the wrapper gathers ``x`` into a padded layout where every tile of
``tile_rows`` slots holds rows of one group (:meth:`e3kernels.grouping.RowTiles.rows_of_slots`), and lays
each block out component-major, ``(ir_dim, slots, mul)``. The kernels are then grouped
matmuls whose weight block is picked by the tile's group (as in megablox's gmm):
``out[m, tile] = sum_b pw_b * x_b[m, tile] @ W_b[group[tile]]``. Scalar prefetch holds the
schedule's per-group summary (``RowTiles.first`` and ``bounds``), whose size does not grow
with the rows (SMEM has 1 MiB); the index maps find a tile's group in it.
The wrapper undoes the layout and the sort; XLA fuses these copies with the gathers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from e3kernels.grouping import Grouping, locate_tile, tile_schedule
from e3kernels.irreps import LinearBlock, LinearPlan, Segment, output_segments
from e3kernels.kernels._common import KernelConfig, dot

#: rows per weight-gradient tile: the lane dimension of its (ir_dim, mul, rows) blocks
WGRAD_TILE_ROWS = 128


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel",))


def _component_major(rows, start: int, mul: int, ir_dim: int, rows_last: bool = False):
    """Columns ``start + u * ir_dim + m`` of ``rows`` as ``(ir_dim, rows, mul)`` (or
    ``(ir_dim, mul, rows)`` with ``rows_last``)."""
    block = rows[:, start : start + mul * ir_dim].reshape(rows.shape[0], mul, ir_dim)
    return block.transpose(2, 1, 0) if rows_last else block.transpose(2, 0, 1)


# ---- forward / input gradient --------------------------------------------------------------


def apply(plan: LinearPlan, x, weights, biases, grouping: Grouping, num_groups: int, fill: float,
          *, precision, config: KernelConfig):
    """As :func:`._triton.apply`: rows of the invalid group are set to ``fill``."""
    tile_rows = config.tile_rows
    tiles = tile_schedule(grouping, tile_rows)
    padded = jnp.take(x, tiles.rows_of_slots(tile_rows), axis=0, mode="fill", fill_value=0)
    columns = []
    for seg in output_segments(plan):
        if seg.blocks or seg.biases:
            y = _segment_call(seg, plan, padded, weights, biases, tiles, num_groups,
                              precision=precision, config=config)
            columns.append(y.transpose(1, 2, 0).reshape(padded.shape[0], seg.width))
        else:
            columns.append(jnp.zeros((padded.shape[0], seg.width), x.dtype))
    out = jnp.concatenate(columns, axis=1)[tiles.slot]
    return jnp.where((grouping.groups < num_groups)[:, None], out, jnp.asarray(fill, out.dtype))


def _segment_call(seg: Segment, plan, padded, weights, biases, tiles, num_groups,
                  *, precision, config: KernelConfig):
    """One output segment, ``(ir_dim, slots, mul)``, as a grouped matmul over the tiles."""
    blocks = [plan.blocks[k] for k in seg.blocks]
    tile_rows = config.tile_rows
    weight_set = lambda t, *summary: (_weight_set(summary, t, tile_rows, num_groups), 0, 0)
    row_tile = lambda t, *summary: (0, t, 0)
    operands = [_component_major(padded, b.in_start, b.mul_in, b.ir_dim) for b in blocks]
    in_specs = [pl.BlockSpec((b.ir_dim, tile_rows, b.mul_in), row_tile) for b in blocks]
    operands += [weights[k] for k in seg.blocks]
    in_specs += [pl.BlockSpec((None, b.mul_in, b.mul_out), weight_set) for b in blocks]
    operands += [biases[k].reshape(num_groups, 1, seg.mul) for k in seg.biases]
    in_specs += [pl.BlockSpec((None, 1, seg.mul), weight_set) for _ in seg.biases]
    kernel = functools.partial(
        _segment_kernel, blocks=blocks, bias_weights=[plan.biases[k].path_weight for k in seg.biases],
        ir_dim=seg.ir_dim, precision=precision,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((seg.ir_dim, padded.shape[0], seg.mul), padded.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(tiles.group.shape[0],),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((seg.ir_dim, tile_rows, seg.mul), row_tile),
        ),
        interpret=config.pallas_interpret,
        compiler_params=_compiler_params(),
        name="indexed_linear_tpu",
    )
    return call(tiles.first, tiles.bounds, *operands)


def _weight_set(summary, tile, tile_rows, num_groups):
    """The weight set of ``tile`` (any valid one for the invalid rows' tiles, which the
    wrapper overwrites)."""
    group, _ = locate_tile(*summary, tile, tile_rows)
    return jnp.minimum(group, num_groups - 1)


def _segment_kernel(first_ref, bounds_ref, *refs, blocks: list[LinearBlock], bias_weights, ir_dim, precision):
    del first_ref, bounds_ref  # used by the index maps only
    n = len(blocks)
    x_refs, w_refs, b_refs, out_ref = refs[:n], refs[n : 2 * n], refs[2 * n : -1], refs[-1]
    for m in range(ir_dim):
        acc = jnp.zeros(out_ref.shape[1:], jnp.float32)
        for block, x_ref, w_ref in zip(blocks, x_refs, w_refs):
            acc += block.path_weight * dot(x_ref[m], w_ref[...], precision, split_high=True)
        for path_weight, b_ref in zip(bias_weights, b_refs):
            acc += path_weight * b_ref[...].astype(jnp.float32)
        out_ref[m] = acc.astype(out_ref.dtype)


# ---- weight gradient -------------------------------------------------------------------------


def weight_partials(plan: LinearPlan, x, g, grouping: Grouping, num_groups: int,
                    *, precision, config: KernelConfig):
    """As :func:`._triton.weight_partials`, on tiles of :data:`WGRAD_TILE_ROWS` slots."""
    tiles = tile_schedule(grouping, WGRAD_TILE_ROWS)
    row_of_slot = tiles.rows_of_slots(WGRAD_TILE_ROWS)
    x_padded = jnp.take(x, row_of_slot, axis=0, mode="fill", fill_value=0)
    g_padded = jnp.take(g, row_of_slot, axis=0, mode="fill", fill_value=0)
    partials = [
        _weight_call(b, x_padded, g_padded, tiles, num_groups, precision=precision,
                     config=config) if b.mul_in and b.mul_out else None
        for b in plan.blocks
    ]
    return partials, tiles.group


def _weight_call(block: LinearBlock, x_padded, g_padded, tiles, num_groups, *, precision,
                 config: KernelConfig):
    ir, rows = block.ir_dim, WGRAD_TILE_ROWS
    num_tiles = tiles.group.shape[0]
    call = pl.pallas_call(
        functools.partial(_weight_kernel, block=block, num_groups=num_groups, precision=precision),
        out_shape=jax.ShapeDtypeStruct((num_tiles, block.mul_in, block.mul_out), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_tiles,),
            in_specs=[
                pl.BlockSpec((ir, block.mul_in, rows), lambda t, *_: (0, 0, t)),
                pl.BlockSpec((ir, rows, block.mul_out), lambda t, *_: (0, t, 0)),
            ],
            out_specs=pl.BlockSpec((None, block.mul_in, block.mul_out), lambda t, *_: (t, 0, 0)),
        ),
        interpret=config.pallas_interpret,
        compiler_params=_compiler_params(),
        name="indexed_linear_weight_grad_tpu",
    )
    x_t = _component_major(x_padded, block.in_start, block.mul_in, ir, rows_last=True)
    g_m = _component_major(g_padded, block.out_start, block.mul_out, ir)
    return call(tiles.first, tiles.bounds, x_t, g_m)


def _weight_kernel(first_ref, bounds_ref, x_ref, g_ref, out_ref, *, block, num_groups, precision):
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for m in range(block.ir_dim):
        acc += dot(x_ref[m], g_ref[m], precision, split_high=True)
    group, _ = locate_tile(first_ref, bounds_ref, pl.program_id(0), WGRAD_TILE_ROWS)
    invalid = group >= num_groups
    out_ref[...] = jnp.where(invalid, 0.0, block.path_weight * acc)
