"""TPU (Mosaic) Pallas kernels for the equivariant convolution's partials.

Layout: edges on sublanes, 128 channels on lanes; a kernel works on tiles of ``ROW_BLOCK``
edges and one channel block, in slabs of 8 edges.

* Every per-edge or per-node operand stays where it is in HBM, in its own dtype: a tile
  gathers its edges' rows with one DMA per edge and operand (node features, weights,
  spherical harmonics), so the gathered rows exist only in VMEM and no per-edge array is
  copied or converted to float32. Node features are read as ``(N, size, C_pad)`` (an XLA
  transpose of the node array, node-sized), a row of one node being ``(size, 128)``; per-edge
  weights as ``(P, E, C_pad)``, the layout XLA gives ``(E, P, C)`` on TPU (edges on
  sublanes, so ``P`` is not padded to 8 rows), where the transpose is free.
* SMEM holds no array that grows with the edges (it has 1 MiB): the edge indices a tile needs
  are DMAed into SMEM scratch per tile, as a blocked SMEM input (edge partials) or by hand,
  one tile ahead (node partials).
* Node partials sort the edges by the node they sum into
  (:func:`e3kernels.grouping.grouped_row_tiles`); a grid step owns a block of
  ``NODE_BLOCK`` nodes, its output block, and loops over those nodes' tiles, accumulating each
  tile into its node's row. Both grid axes are then ``parallel``, every node is written (zero
  without edges), and no output block index depends on data.
* An edge with an end out of range contributes nothing: node partials drop it from the
  schedule, edge partials skip its DMAs; slots without an edge keep stale VMEM, which the
  kernels mask with ``jnp.where``.
* ``dF/dsh`` sums over the lanes in the kernel and XLA adds the channel blocks.
* Fused radial weights (``weights = (hidden, matrix)``): a tile gathers its edges' hidden
  rows ``h (row_block, H)`` instead of their weights, and forms the weights in VMEM, one
  MXU matmul ``h @ W[p]`` per path (``W`` as ``(P, H, C_pad)``, one channel block of it in
  VMEM). ``dF/dh`` contracts each path's weight-gradient tile with ``W[p]`` (XLA adds the
  channel blocks); ``dF/dW`` accumulates ``h^T @ dF/dw`` over the edge tiles into its
  output block, the tiles visited in order (deterministic).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from e3kernels.grouping import cdiv, edge_in_range, grouped_row_tiles
from e3kernels.irreps import ConvolutionPlan
from e3kernels.kernels._common import LANES, SUBLANES, KernelConfig, dot, for_each_slab, lane_padded, row_sum
from e3kernels.kernels.equivariant_convolution._columns import (
    column_terms,
    term_sum,
    used_harmonics,
    used_inputs,
)
from e3kernels.reference.equivariant_convolution import OUT

ROW_BLOCK = 16
#: nodes per grid step of a node partial: the rows of its output block
NODE_BLOCK = 8
#: a node partial's per-tile record (:func:`_node_schedule`): its node within the node
#: block, its edge count, then per slot its edge and the edge's other end
_NODE, _COUNT, _SLOTS = 0, 1, 2


def _row_block(config: KernelConfig) -> int:
    return config.tile_rows or ROW_BLOCK


def _channels_padded(array: jax.Array) -> jax.Array:
    """The last (channel) axis padded to whole lane blocks (no copy when it is one already)."""
    pad = lane_padded(array.shape[-1]) - array.shape[-1]
    return jnp.pad(array, ((0, 0),) * (array.ndim - 1) + ((0, pad),)) if pad else array


def _nodes_in_hbm(nodes: jax.Array) -> jax.Array:
    """``(N, C, size)`` -> ``(N, size, C_pad)``, what the DMAs gather rows from."""
    return _channels_padded(jnp.transpose(nodes, (0, 2, 1)))


def _paths_first(weights: jax.Array) -> jax.Array:
    """``(E, P, C)`` -> ``(P, E, C_pad)`` (see the module's docstring)."""
    return jnp.transpose(_channels_padded(weights), (1, 0, 2))


def _matrix_in_hbm(matrix: jax.Array) -> jax.Array:
    """Fused radial weights' ``(H, P, C)`` -> ``(P, H, C_pad)``: ``W[p]`` a plain matrix."""
    return _channels_padded(jnp.transpose(matrix, (1, 0, 2)))


def _matrix_spec(matrix_in_hbm, grid_index):
    """One channel block of ``(P, H, C_pad)``, in VMEM."""
    num_paths, num_hidden, _ = matrix_in_hbm.shape
    return pl.BlockSpec((num_paths, num_hidden, LANES), grid_index)


def _form_weights(formed, hidden, matrix_ref, precision):
    """``formed[p] = hidden @ W[p]``: a tile's weights, ``(P, rows, LANES)`` float32."""
    for p in range(formed.shape[0]):
        formed[p] = dot(hidden, matrix_ref[p], precision, split_high=True)


def _lanes(block) -> pl.Slice:
    return pl.ds(pl.multiple_of(block * LANES, LANES), LANES)


def _gather(copies, keep, mask):
    """One tile's gathers: the DMAs ``copies[k]`` of slot ``k``, made where ``keep[k]``. Row
    ``k`` of ``mask`` then says whether the slot holds an edge: the others hold stale or
    uninitialised data, which the kernels drop with ``jnp.where``."""
    for k, (slot_copies, slot_kept) in enumerate(zip(copies, keep)):
        mask[pl.ds(k, 1), :] = jnp.broadcast_to(jnp.where(slot_kept, 1.0, 0.0), (1, LANES))
        pl.when(slot_kept)(functools.partial(_start, slot_copies))
    for slot_copies, slot_kept in zip(copies, keep):
        pl.when(slot_kept)(functools.partial(_wait, slot_copies))


def _start(copies):
    for copy in copies:
        copy.start()


def _wait(copies):
    for copy in copies:
        copy.wait()


def _slab_mask(mask, rows):
    return mask[rows, :] > 0


def _harmonic_columns(sh, rows, columns):
    """The harmonics the terms read, each an 8-edge column broadcast over the lanes."""
    shape = (SUBLANES, LANES)
    return {j: jnp.broadcast_to(sh[rows, pl.ds(j, 1)].astype(jnp.float32), shape)
            for j in used_harmonics(columns)}


# ---- node partials ---------------------------------------------------------------------------


def _node_schedule(sources, destinations, num_nodes, row_block):
    """The tiles of a node partial and which belong to each node block.

    Returns ``block_tiles``, ``(node blocks, 1, 2)``: the first and one-past-last tile of each
    block of ``NODE_BLOCK`` nodes (a node's tiles are consecutive), and ``tile_slots``,
    ``(tiles, 2 + 2 * row_block)`` int32: per tile its node (within its block), its edge
    count and, per slot, the edge and the node at its other end (0 for an empty slot, whose
    DMAs are skipped). Dropped edges (destination ``N``, see ``counted_edges``) form the
    extra group ``N``, whose tiles no block visits.
    """
    num_edges = sources.shape[0]
    tiles = grouped_row_tiles(destinations, num_nodes, row_block)
    edge = tiles.rows_of_slots(row_block).reshape(-1, row_block)
    has_edge = edge < num_edges
    edge = jnp.where(has_edge, edge, 0)
    source = jnp.where(has_edge, sources[edge], 0)
    tile_slots = jnp.concatenate(
        [(tiles.group % NODE_BLOCK)[:, None], (tiles.end - tiles.start)[:, None], edge, source], axis=1
    ).astype(jnp.int32)
    block_starts = jnp.minimum(jnp.arange(cdiv(num_nodes, NODE_BLOCK) + 1) * NODE_BLOCK, num_nodes)
    first_tile = jnp.searchsorted(tiles.group, block_starts.astype(jnp.int32), side="left").astype(jnp.int32)
    block_tiles = jnp.stack([first_tile[:-1], first_tile[1:]], axis=1)[:, None, :]
    return block_tiles, tile_slots


def node_partial(plan: ConvolutionPlan, which: int, nodes, sh, weights: tuple, sources, destinations,
                 out_dtype, *, config: KernelConfig, precision=None):
    """``which == OUT``: the convolution (``nodes`` = x, gathered at the senders, summed into
    the receivers); ``X``: its gradient in x (``nodes`` = g at the receivers, into the senders).
    ``weights``: ``(w,)`` or, fused, ``(hidden, matrix)`` (see the module's docstring)."""
    num_nodes, num_channels, in_size = nodes.shape
    out_size = plan.dim_out if which == OUT else plan.dim_in
    row_block = _row_block(config)
    block_tiles, tile_slots = _node_schedule(sources, destinations, num_nodes, row_block)
    fused = len(weights) == 2
    kernel = functools.partial(_node_kernel, which=which, columns=column_terms(plan), row_block=row_block,
                               fused=fused, precision=precision)
    if fused:  # the hidden rows are gathered like the weights; W's channel block sits in VMEM
        hidden, matrix = weights
        per_edge, matrix_in = hidden, (_matrix_in_hbm(matrix),)
        matrix_specs = [_matrix_spec(matrix_in[0], lambda c, b: (0, 0, c))]
        edge_buffer = pltpu.VMEM((row_block, hidden.shape[1]), hidden.dtype)
        formed = [pltpu.VMEM((plan.num_paths, row_block, LANES), jnp.float32)]
    else:
        per_edge, matrix_in, matrix_specs, formed = _paths_first(weights[0]), (), [], []
        edge_buffer = pltpu.VMEM((row_block, plan.num_paths, LANES), weights[0].dtype)
    sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_nodes, out_size, lane_padded(num_channels)), jnp.float32),
        grid=(lane_padded(num_channels) // LANES, block_tiles.shape[0]),
        in_specs=[
            pl.BlockSpec((None, 1, 2), lambda c, b: (b, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ] + matrix_specs,
        out_specs=pl.BlockSpec((NODE_BLOCK, out_size, LANES), lambda c, b: (b, 0, c)),
        scratch_shapes=[
            pltpu.SMEM((2,) + tile_slots.shape[1:], jnp.int32), pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((row_block, in_size, LANES), nodes.dtype),
            edge_buffer,
            pltpu.VMEM((row_block, plan.dim_sh), sh.dtype),
            pltpu.VMEM((row_block, LANES), jnp.float32),
            pltpu.SemaphoreType.DMA((3, row_block)),
        ] + formed,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=config.pallas_interpret,
        name="convolution_node_partial",
    )(block_tiles, tile_slots, _nodes_in_hbm(nodes), sh, per_edge, *matrix_in)
    return jnp.transpose(sums[:, :, :num_channels], (0, 2, 1)).astype(out_dtype)


def _node_kernel(block_tiles_ref, tile_slots_hbm, nodes_hbm, sh_hbm, edge_hbm, *refs, which, columns,
                 row_block, fused, precision):
    """``edge_hbm``: the weights ``(P, E, C_pad)``, or fused the hidden rows ``(E, H)`` (then
    ``refs`` starts with ``W``'s channel block and ends with the formed weights' scratch)."""
    if fused:
        matrix_ref, *refs, formed = refs
    out_ref, tile_slots, tile_slot_sems, node_buffer, edge_buffer, sh_buffer, mask, sems = refs
    first, end = block_tiles_ref[0, 0], block_tiles_ref[0, 1]
    lanes = _lanes(pl.program_id(0))
    out_ref[...] = jnp.zeros_like(out_ref)  # nodes without edges stay zero

    def fetch_slots(tile):  # double-buffered: tile t's record goes to tile_slots[t % 2]
        parity = lax.rem(tile, 2)
        return pltpu.make_async_copy(tile_slots_hbm.at[tile], tile_slots.at[parity],
                                     tile_slot_sems.at[parity])

    @pl.when(first < end)
    def _():
        fetch_slots(first).start()

    def tile_step(tile, carry):
        fetch_slots(tile).wait()

        @pl.when(tile + 1 < end)
        def _():
            fetch_slots(tile + 1).start()

        record = tile_slots.at[lax.rem(tile, 2)]
        node, count = record[_NODE], record[_COUNT]
        copies = []
        for k in range(row_block):
            edge, source = record[_SLOTS + k], record[_SLOTS + row_block + k]
            edge_row = edge_hbm.at[edge] if fused else edge_hbm.at[:, edge, lanes]
            copies.append((
                pltpu.make_async_copy(nodes_hbm.at[source, :, lanes], node_buffer.at[k], sems.at[0, k]),
                pltpu.make_async_copy(edge_row, edge_buffer.at[k], sems.at[1, k]),
                pltpu.make_async_copy(sh_hbm.at[edge], sh_buffer.at[k], sems.at[2, k]),
            ))

        def slab(rows):
            sh = _harmonic_columns(sh_buffer, rows, columns)
            valid = _slab_mask(mask, rows)
            gathered = lambda column: node_buffer[rows, column, :].astype(jnp.float32)
            if fused:
                weight = lambda p: formed[p, rows, :]
            else:
                weight = lambda p: edge_buffer[rows, p, :].astype(jnp.float32)
            if which == OUT:
                xs = {i: gathered(i) for i in used_inputs(columns)}
                totals = {q: term_sum(terms, xs, sh) * weight(p) for q, p, terms in columns}
            else:
                totals = {}
                for q, p, terms in columns:
                    t = gathered(q) * weight(p)
                    for i, j, coef in terms:
                        value = t * sh[j] * jnp.float32(coef)
                        totals[i] = value if i not in totals else totals[i] + value
            for column, total in totals.items():
                row = pl.ds(column, 1)
                total = jnp.where(valid, total, 0.0)
                out_ref[node, row, :] = out_ref[node, row, :] + row_sum(total, keepdims=True)

        _gather(copies, [count > k for k in range(row_block)], mask)
        if fused:  # empty slots' rows are stale: their weights are masked with the slot
            _form_weights(formed, edge_buffer[...], matrix_ref, precision)
        for_each_slab(row_block, slab)
        return carry

    lax.fori_loop(first, end, tile_step, 0)


# ---- edge partials ---------------------------------------------------------------------------


def _edge_ends(senders, receivers, row_block):
    """``(tiles, 2, row_block)`` int32: each tile's senders and receivers, the slots past the
    last edge -1 (out of range): the edge partials' blocked SMEM input."""
    num_edges = senders.shape[0]
    pad = cdiv(num_edges, row_block) * row_block - num_edges
    ends = jnp.stack([senders, receivers]).astype(jnp.int32)
    ends = jnp.pad(ends, ((0, 0), (0, pad)), constant_values=-1)
    return jnp.transpose(ends.reshape(2, -1, row_block), (1, 0, 2))


def _gather_edge_ends(ends_ref, x_hbm, g_hbm, x_buffer, g_buffer, mask, sems, num_nodes, row_block):
    """An edge partial's gathers: ``x`` at the senders and ``g`` at the receivers of the tile's
    edges with both ends in range."""
    lanes = _lanes(pl.program_id(0))
    copies, keep = [], []
    for k in range(row_block):
        sender, receiver = ends_ref[0, k], ends_ref[1, k]
        ok = edge_in_range(sender, receiver, num_nodes)
        sender, receiver = jnp.where(ok, sender, 0), jnp.where(ok, receiver, 0)
        copies.append((
            pltpu.make_async_copy(x_hbm.at[sender, :, lanes], x_buffer.at[k], sems.at[0, k]),
            pltpu.make_async_copy(g_hbm.at[receiver, :, lanes], g_buffer.at[k], sems.at[1, k]),
        ))
        keep.append(ok)
    _gather(copies, keep, mask)


def _edge_call(kernel, plan, x, g, senders, receivers, in_specs, out_specs, out_shape, name, *,
               config: KernelConfig, scratch=(), sums_over_edges: bool = False):
    """An edge partial's ``pallas_call``: grid (channel blocks, edge tiles), the tile's edge
    ends in SMEM, the node arrays gathered from HBM, then ``in_specs``' operands; ``scratch``
    after the kernel's own. ``sums_over_edges``: the output block sums over the edge tiles,
    visited in order."""
    num_nodes, num_channels, _ = x.shape
    row_block = _row_block(config)
    ends = _edge_ends(senders, receivers, row_block)
    semantics = ("parallel", "arbitrary" if sums_over_edges else "parallel")
    return functools.partial(
        pl.pallas_call(
            functools.partial(kernel, num_nodes=num_nodes, row_block=row_block),
            out_shape=out_shape,
            grid=(lane_padded(num_channels) // LANES, ends.shape[0]),
            in_specs=[
                pl.BlockSpec((None, 2, row_block), lambda c, t: (t, 0, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ] + in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((row_block, plan.dim_in, LANES), x.dtype),
                            pltpu.VMEM((row_block, plan.dim_out, LANES), g.dtype),
                            pltpu.VMEM((row_block, LANES), jnp.float32),
                            pltpu.SemaphoreType.DMA((2, row_block))] + list(scratch),
            compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
            interpret=config.pallas_interpret,
            name=name,
        ),
        ends, _nodes_in_hbm(x), _nodes_in_hbm(g),
    )


def _weight_gradients(rows, columns, num_paths, x_buffer, g_buffer, sh_ref, valid):
    """One slab's ``dF/dw``, ``{p: (8, LANES)}`` for every path, 0 on slots without an edge."""
    sh = _harmonic_columns(sh_ref, rows, columns)
    xs = {i: x_buffer[rows, i, :].astype(jnp.float32) for i in used_inputs(columns)}
    sums = {}
    for q, p, terms in columns:
        value = term_sum(terms, xs, sh) * g_buffer[rows, q, :].astype(jnp.float32)
        sums[p] = value if p not in sums else sums[p] + value
    zero = jnp.zeros((SUBLANES, LANES), jnp.float32)
    return {p: jnp.where(valid, sums[p], 0.0) if p in sums else zero for p in range(num_paths)}


def weights_partial(plan: ConvolutionPlan, x, sh, g, senders, receivers, out_dtype, *, config: KernelConfig):
    """``gw[e, p, c] = sum_{q in p} g[r_e, c, q] sum_ij T x[s_e, c, i] sh[e, j]``, written as
    ``(P, E, C_pad)`` (see :func:`_paths_first`)."""
    num_edges = senders.shape[0]
    num_channels = x.shape[1]
    row_block = _row_block(config)
    call = _edge_call(
        functools.partial(_tile_weight_gradients, columns=column_terms(plan)),
        plan, x, g, senders, receivers,
        in_specs=[pl.BlockSpec((row_block, plan.dim_sh), lambda c, t: (t, 0))],
        out_specs=pl.BlockSpec((plan.num_paths, row_block, LANES), lambda c, t: (0, t, c)),
        out_shape=jax.ShapeDtypeStruct((plan.num_paths, num_edges, lane_padded(num_channels)), out_dtype),
        name="convolution_weights_partial", config=config,
    )
    return jnp.transpose(call(sh)[:, :, :num_channels], (1, 0, 2))


def _tile_weight_gradients(ends_ref, x_hbm, g_hbm, sh_ref, grads, x_buffer, g_buffer, mask, sems, *, columns,
                           num_nodes, row_block):
    """The tile's ``dF/dw`` into ``grads`` ``(P, row_block, LANES)``: the weights partial's
    output block (this is its kernel), or the fused partials' float32 scratch."""
    def slab(rows):
        valid = _slab_mask(mask, rows)
        values = _weight_gradients(rows, columns, grads.shape[0], x_buffer, g_buffer, sh_ref, valid)
        for p, total in values.items():
            grads[p, rows, :] = total.astype(grads.dtype)

    _gather_edge_ends(ends_ref, x_hbm, g_hbm, x_buffer, g_buffer, mask, sems, num_nodes, row_block)
    for_each_slab(row_block, slab)


def hidden_partial(plan: ConvolutionPlan, x, sh, g, matrix, senders, receivers, out_dtype, *,
                   config: KernelConfig, precision):
    """Fused radial weights' ``dF/dh[e, k] = sum_{p, c} gw[e, p, c] W[k, p, c]``: per channel
    block in the kernel (an MXU matmul per path), the blocks summed by XLA."""
    num_edges, num_hidden = senders.shape[0], matrix.shape[0]
    blocks = lane_padded(x.shape[1]) // LANES
    row_block = _row_block(config)
    matrix = _matrix_in_hbm(matrix)
    call = _edge_call(
        functools.partial(_hidden_kernel, columns=column_terms(plan), precision=precision),
        plan, x, g, senders, receivers,
        in_specs=[pl.BlockSpec((row_block, plan.dim_sh), lambda c, t: (t, 0)),
                  _matrix_spec(matrix, lambda c, t: (0, 0, c))],
        out_specs=pl.BlockSpec((1, row_block, num_hidden), lambda c, t: (c, t, 0)),
        out_shape=jax.ShapeDtypeStruct((blocks, num_edges, num_hidden), jnp.float32),
        name="convolution_hidden_partial", config=config,
        scratch=[pltpu.VMEM((plan.num_paths, row_block, LANES), jnp.float32)],
    )
    return jnp.sum(call(sh, matrix), axis=0).astype(out_dtype)


def _hidden_kernel(ends_ref, x_hbm, g_hbm, sh_ref, matrix_ref, out_ref, x_buffer, g_buffer, mask, sems,
                   grads, *, columns, precision, num_nodes, row_block):
    _tile_weight_gradients(ends_ref, x_hbm, g_hbm, sh_ref, grads, x_buffer, g_buffer, mask, sems,
                           columns=columns, num_nodes=num_nodes, row_block=row_block)
    total = sum(dot(grads[p], matrix_ref[p], precision, split_high=True, contract_columns=True)
                for p in range(grads.shape[0]))
    out_ref[0] = total


def matrix_partial(plan: ConvolutionPlan, x, sh, g, hidden, senders, receivers, out_dtype, *,
                   config: KernelConfig, precision):
    """Fused radial weights' ``dF/dW[k, p, c] = sum_e h[e, k] gw[e, p, c]``: each channel
    block's output accumulates ``h^T @ gw[p]`` (an MXU matmul per path) over the edge tiles,
    in order."""
    num_channels, num_hidden = x.shape[1], hidden.shape[1]
    row_block = _row_block(config)
    call = _edge_call(
        functools.partial(_matrix_kernel, columns=column_terms(plan), precision=precision),
        plan, x, g, senders, receivers,
        in_specs=[pl.BlockSpec((row_block, plan.dim_sh), lambda c, t: (t, 0)),
                  pl.BlockSpec((row_block, num_hidden), lambda c, t: (t, 0))],
        out_specs=pl.BlockSpec((plan.num_paths, num_hidden, LANES), lambda c, t: (0, 0, c)),
        out_shape=jax.ShapeDtypeStruct((plan.num_paths, num_hidden, lane_padded(num_channels)), jnp.float32),
        name="convolution_matrix_partial", config=config,
        scratch=[pltpu.VMEM((plan.num_paths, row_block, LANES), jnp.float32)], sums_over_edges=True,
    )
    return jnp.transpose(call(sh, hidden)[:, :, :num_channels], (1, 0, 2)).astype(out_dtype)


def _matrix_kernel(ends_ref, x_hbm, g_hbm, sh_ref, hidden_ref, out_ref, x_buffer, g_buffer, mask, sems,
                   grads, *, columns, precision, num_nodes, row_block):
    @pl.when(pl.program_id(1) == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    _tile_weight_gradients(ends_ref, x_hbm, g_hbm, sh_ref, grads, x_buffer, g_buffer, mask, sems,
                           columns=columns, num_nodes=num_nodes, row_block=row_block)
    # rows past the last edge hold whatever the block read: 0 with their slots
    hidden = jnp.where(mask[:, pl.ds(0, 1)] > 0, hidden_ref[...], 0)
    for p in range(grads.shape[0]):
        out_ref[p] = out_ref[p] + dot(hidden, grads[p], precision, split_high=True, contract_rows=True)


def sh_partial(plan: ConvolutionPlan, x, weights: tuple, g, senders, receivers, out_dtype, *,
               config: KernelConfig, precision=None):
    """``gsh[e, j] = sum_c sum_iq T x[s_e, c, i] w[e, p(q), c] g[r_e, c, q]``: lanes summed in
    the kernel, channel blocks by XLA. ``weights`` as in :func:`node_partial`."""
    num_edges = senders.shape[0]
    blocks = lane_padded(x.shape[1]) // LANES
    row_block = _row_block(config)
    fused = len(weights) == 2
    if fused:
        hidden, matrix = weights[0], _matrix_in_hbm(weights[1])
        operands = (hidden, matrix)
        in_specs = [pl.BlockSpec((row_block, hidden.shape[1]), lambda c, t: (t, 0)),
                    _matrix_spec(matrix, lambda c, t: (0, 0, c))]
        scratch = [pltpu.VMEM((plan.num_paths, row_block, LANES), jnp.float32)]
    else:
        operands = (_paths_first(weights[0]),)
        in_specs = [pl.BlockSpec((plan.num_paths, row_block, LANES), lambda c, t: (0, t, c))]
        scratch = []
    call = _edge_call(
        functools.partial(_sh_kernel, columns=column_terms(plan), dim_sh=plan.dim_sh, fused=fused,
                          precision=precision),
        plan, x, g, senders, receivers, in_specs=in_specs,
        out_specs=pl.BlockSpec((1, row_block, plan.dim_sh), lambda c, t: (c, t, 0)),
        out_shape=jax.ShapeDtypeStruct((blocks, num_edges, plan.dim_sh), jnp.float32),
        name="convolution_sh_partial", config=config, scratch=scratch,
    )
    return jnp.sum(call(*operands), axis=0).astype(out_dtype)


def _sh_kernel(ends_ref, x_hbm, g_hbm, *refs, columns, dim_sh, fused, precision, num_nodes, row_block):
    """``refs``: the weights' block ``(P, row_block, LANES)``, or fused the hidden rows' block
    and ``W``'s channel block (then the formed weights' scratch ends ``refs``)."""
    if fused:
        hidden_ref, matrix_ref, out_ref, x_buffer, g_buffer, mask, sems, weights_ref = refs
    else:
        weights_ref, out_ref, x_buffer, g_buffer, mask, sems = refs
    _gather_edge_ends(ends_ref, x_hbm, g_hbm, x_buffer, g_buffer, mask, sems, num_nodes, row_block)
    if fused:  # rows past the last edge are stale: masked with their slots below
        _form_weights(weights_ref, hidden_ref[...], matrix_ref, precision)

    def slab(rows):
        valid = _slab_mask(mask, rows)
        xs = {i: x_buffer[rows, i, :].astype(jnp.float32) for i in used_inputs(columns)}
        sums = {}
        for q, p, terms in columns:
            t = g_buffer[rows, q, :].astype(jnp.float32) * weights_ref[p, rows, :].astype(jnp.float32)
            for i, j, coef in terms:
                value = xs[i] * t * jnp.float32(coef)
                sums[j] = value if j not in sums else sums[j] + value
        for j in range(dim_sh):
            total = jnp.where(valid, sums[j], 0.0) if j in sums else jnp.zeros((SUBLANES, LANES), jnp.float32)
            out_ref[0, rows, pl.ds(j, 1)] = lax.reduce(total, np.array(0, np.float32), lax.add, (1,))[:, None]

    for_each_slab(row_block, slab)
