"""GPU (Triton lowering) kernels of the indexed linear map; see the package's ``__init__``.

Both kernels read rows straight from e3nn's flat layout through the sorted row ids: a
tile's rows are gathered with an integer row index and its columns ``u * ir_dim + m`` with
an integer column index (strided, masked to the multiplicity), so no permuted or
transposed copy of ``x`` or of the output is ever formed. Every loaded value has a
power-of-two shape (rows, chunk); dot operands are at least 16 wide.

* :func:`apply`: grid (tile, output chunk); one program computes, for each irrep component
  ``m``, ``sum_b path_weight_b * x_b[rows, :, m] @ W_b[group]`` over the blocks of one
  output segment, adds the biases and scatters the result to the tile's rows.
* :func:`weight_partials`: grid (tile, weight chunk); one program sums
  ``x_b[rows, :, m].T @ g_b[rows, :, m]`` over its tile's rows and ``m``; the caller sums
  the per-tile partials by group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from e3kernels.grouping import Grouping, tile_schedule
from e3kernels.irreps import LinearPlan, Segment, output_segments
from e3kernels.kernels._common import KernelConfig, dot

#: Widest chunk of a multiplicity in one dot operand, measured with ptxas on H100 (``make
#: compile-check``) for zero spills. Tensor-core dots: the forward keeps 64 x 64 weight
#: tiles live across the irrep components; the weight gradient fits 128 x 128 (its only
#: live tile is the accumulator). Float32 FMA dots (``HIGHEST``): 32 x 32 in both.
FORWARD_CHUNK, WGRAD_CHUNK, FMA_CHUNK = 64, 128, 32
#: smallest dot operand dimension the Triton lowering accepts
MIN_DOT = 16
#: the largest weight tile kept in registers across the irrep components, in elements
HOIST_LIMIT = 2 * 128 * 128
#: rows summed by one weight-gradient program, in sub-tiles of ``config.tile_rows``
WGRAD_TILE_ROWS = 128


def chunks(size: int, widest: int) -> list[tuple[int, int]]:
    """``(start, width)`` chunks of ``range(size)``: power-of-two widths, >= 16, <= ``widest``."""
    width = min(max(MIN_DOT, 1 << (size - 1).bit_length()), widest)
    return [(start, width) for start in range(0, size, width)]


def widest_chunk(precision, tensor_core_chunk: int) -> int:
    """:data:`FMA_CHUNK` where the dots are FMAs (``HIGHEST``), else ``tensor_core_chunk``."""
    return FMA_CHUNK if precision == lax.Precision.HIGHEST else tensor_core_chunk


def _load(ref, rows, cols, ok_rows, ok_cols, *leading):
    """A masked gather ``ref[*leading, rows, cols]`` (zeros where masked)."""
    return plgpu.load(ref.at[(*leading, rows[:, None], cols[None, :])],
                      mask=ok_rows[:, None] & ok_cols[None, :], other=0)


def _tile_rows(order_ref, start, end, size):
    """Row ids of sorted positions ``start : start + size`` and which are inside the tile.

    Positions past the tile get row id ``N`` (out of range). Every access to them is
    masked; interpret mode, which implements a masked store as gather-select-scatter,
    then drops their writes instead of racing them against a real row's.
    """
    position = start + jnp.arange(size, dtype=jnp.int32)
    inside = position < end
    return plgpu.load(order_ref.at[position], mask=inside, other=order_ref.shape[0]), inside


# ---- forward / input gradient --------------------------------------------------------------


def apply(plan: LinearPlan, x, weights, biases, grouping: Grouping, num_groups: int, fill: float,
          *, precision, config: KernelConfig):
    """``out[n] = sum_b pw_b * x_b[n] W_b[s] + biases`` with ``s`` the group of row ``n``.

    Rows of the invalid group ``num_groups`` are set to ``fill``.
    """
    tiles = tile_schedule(grouping, config.tile_rows)
    widest = widest_chunk(precision, FORWARD_CHUNK)
    work = tuple(
        (seg, start, width) for seg in output_segments(plan) for start, width in chunks(seg.mul, widest)
    )
    kernel = functools.partial(
        _apply_kernel, plan=plan, work=work, num_groups=num_groups, fill=fill,
        precision=precision, tile_rows=config.tile_rows,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((x.shape[0], plan.dim_out), x.dtype),
        grid=(tiles.group.shape[0], len(work)),
        interpret=config.pallas_interpret,
        compiler_params=config.triton_params(),
        name="indexed_linear_gpu",
    )
    return call(tiles.group, tiles.start, tiles.end, grouping.order, x, *weights, *biases)


def _apply_kernel(group_ref, start_ref, end_ref, order_ref, x_ref, *refs, plan, work, num_groups,
                  fill, precision, tile_rows):
    w_refs, b_refs = refs[: len(plan.blocks)], refs[len(plan.blocks) : -1]
    out_ref = refs[-1]
    tile, item = pl.program_id(0), pl.program_id(1)
    group = group_ref[tile]
    rows, inside = _tile_rows(order_ref, start_ref[tile], end_ref[tile], tile_rows)
    weight_set = jnp.minimum(group, num_groups - 1)  # invalid rows are overwritten by `fill`
    for k, (seg, v_start, v_width) in enumerate(work):
        write = functools.partial(
            _write_chunk, seg, v_start, v_width, plan=plan, rows=rows, inside=inside,
            weight_set=weight_set, invalid=group >= num_groups, fill=fill, precision=precision,
            x_ref=x_ref, w_refs=w_refs, b_refs=b_refs, out_ref=out_ref,
        )
        pl.when(item == k)(write)


def _write_chunk(seg: Segment, v_start, v_width, *, plan, rows, inside, weight_set, invalid, fill,
                 precision, x_ref, w_refs, b_refs, out_ref):
    """Output columns of multiplicities ``v_start : v_start + v_width`` of one segment."""
    v = v_start + jnp.arange(v_width)
    v_ok = v < seg.mul
    terms = _weight_terms(seg, v, v_ok, plan, weight_set, w_refs, widest_chunk(precision, FORWARD_CHUNK))

    def component(m, carry):
        acc = jnp.zeros((rows.shape[0], v_width), jnp.float32)
        for block, u, u_ok, weight in terms:
            x = _load(x_ref, rows, block.in_start + u * block.ir_dim + m, inside, u_ok)
            acc += block.path_weight * dot(x, weight(), precision)
        for k in seg.biases:
            bias = plgpu.load(b_refs[k].at[weight_set, v], mask=v_ok, other=0)
            acc += plan.biases[k].path_weight * bias.astype(jnp.float32)[None, :]
        acc = jnp.where(invalid, fill, acc)
        cols = seg.out_start + v * seg.ir_dim + m
        plgpu.store(out_ref.at[rows[:, None], cols[None, :]], acc.astype(out_ref.dtype),
                    mask=inside[:, None] & v_ok[None, :])
        return carry

    # a loop, not unrolled: unrolled, the compiler keeps every component's addresses live
    lax.fori_loop(0, seg.ir_dim, component, 0)


def _weight_terms(seg: Segment, v, v_ok, plan, weight_set, w_refs, widest):
    """``(block, u, u_ok, weight)`` per block and input chunk; ``weight()`` gives the tile.

    Weight tiles are loaded once for all irrep components when they are small enough to
    stay in registers, and reloaded per component (from cache) otherwise.
    """
    terms = []
    for k in seg.blocks:
        block = plan.blocks[k]
        for u_start, u_width in chunks(block.mul_in, widest):
            u = u_start + jnp.arange(u_width)
            u_ok = u < block.mul_in
            load = functools.partial(_load, w_refs[k], u, v, u_ok, v_ok, weight_set)
            terms.append((block, u, u_ok, load))
    hoist = seg.ir_dim > 1 and sum(u.shape[0] * v.shape[0] for _, u, _, _ in terms) <= HOIST_LIMIT
    if hoist:
        terms = [(block, u, u_ok, _constant(load())) for block, u, u_ok, load in terms]
    return terms


def _constant(value):
    return lambda: value


# ---- weight gradient -------------------------------------------------------------------------


def weight_partials(plan: LinearPlan, x, g, grouping: Grouping, num_groups: int,
                    *, precision, config: KernelConfig):
    """Per-tile partial weight gradients, ``(T, mul_in, mul_out)`` float32 per block, and
    the group of each tile. Blocks with an empty weight get ``None``.

    ``partial[t] = pw * sum over the tile's rows n and m of x_b[n, :, m]^T g_b[n, :, m]``,
    zero for tiles of the invalid group.
    """
    tiles = tile_schedule(grouping, WGRAD_TILE_ROWS)
    num_tiles = tiles.group.shape[0]
    active = [k for k, b in enumerate(plan.blocks) if b.mul_in and b.mul_out]
    widest = widest_chunk(precision, WGRAD_CHUNK)
    work = tuple(
        (slot, k, u_start, u_width, v_start, v_width)
        for slot, k in enumerate(active)
        for u_start, u_width in chunks(plan.blocks[k].mul_in, widest)
        for v_start, v_width in chunks(plan.blocks[k].mul_out, widest)
    )
    if not work:
        return [None] * len(plan.blocks), tiles.group
    kernel = functools.partial(
        _weight_kernel, plan=plan, work=work, num_groups=num_groups, precision=precision,
        tile_rows=config.tile_rows,
    )
    out_shape = [jax.ShapeDtypeStruct((num_tiles, plan.blocks[k].mul_in, plan.blocks[k].mul_out),
                                      jnp.float32) for k in active]
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_tiles, len(work)),
        interpret=config.pallas_interpret,
        compiler_params=config.triton_params(),
        name="indexed_linear_weight_grad_gpu",
    )
    partials = call(tiles.group, tiles.start, tiles.end, grouping.order, x, g)
    by_block = dict(zip(active, partials))
    return [by_block.get(k) for k in range(len(plan.blocks))], tiles.group


def _weight_kernel(group_ref, start_ref, end_ref, order_ref, x_ref, g_ref, *out_refs, plan, work,
                   num_groups, precision, tile_rows):
    tile, item = pl.program_id(0), pl.program_id(1)
    for k, (slot, block_index, u_start, u_width, v_start, v_width) in enumerate(work):
        write = functools.partial(
            _weight_chunk, plan.blocks[block_index], u_start + jnp.arange(u_width),
            v_start + jnp.arange(v_width), tile=tile, group=group_ref[tile], start=start_ref[tile],
            end=end_ref[tile], num_groups=num_groups, precision=precision, tile_rows=tile_rows,
            order_ref=order_ref, x_ref=x_ref, g_ref=g_ref, out_ref=out_refs[slot],
        )
        pl.when(item == k)(write)


def _weight_chunk(block, u, v, *, tile, group, start, end, num_groups, precision, tile_rows, order_ref,
                  x_ref, g_ref, out_ref):
    """``out[tile, u, v] = pw * sum over the tile's rows and m of x[:, u, m]^T g[:, v, m]``."""
    u_ok, v_ok = u < block.mul_in, v < block.mul_out

    def add_sub_tile(j, acc):
        rows, inside = _tile_rows(order_ref, start + j * tile_rows, end, tile_rows)
        for m in range(block.ir_dim):
            x = _load(x_ref, rows, block.in_start + u * block.ir_dim + m, inside, u_ok)
            g = _load(g_ref, rows, block.out_start + v * block.ir_dim + m, inside, v_ok)
            acc += dot(x, g, precision, contract_rows=True)
        return acc

    num_sub_tiles = (end - start + tile_rows - 1) // tile_rows
    acc = lax.fori_loop(0, num_sub_tiles, add_sub_tile, jnp.zeros((u.shape[0], v.shape[0]), jnp.float32))
    acc = jnp.where(group >= num_groups, 0.0, block.path_weight * acc)  # drops invalid rows' NaN
    plgpu.store(out_ref.at[tile, u[:, None], v[None, :]], acc, mask=u_ok[:, None] & v_ok[None, :])
