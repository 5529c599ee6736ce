"""TPU (Mosaic) Pallas kernels for the equivariant convolution's partials.

Layout: edges on sublanes, 128 channels on lanes; a grid step takes one tile of
``ROW_BLOCK`` edges and one channel block, and works on slabs of 8 edges.

* Node features stay in HBM, as ``(N, size, C_pad)`` (an XLA transpose of the node array,
  node-sized), and each tile gathers its edges' rows with one DMA per edge, the node
  indices coming through scalar prefetch: the gathered rows exist only in VMEM.
* Per-edge inputs are laid out by XLA in the tiles' edge order: the weights as
  ``(P, slots, C_pad)`` (a slab of one path is one vreg), the spherical harmonics as
  ``(slots, dim_sh + 1)``, whose last column says whether the slot holds a valid edge; a
  harmonic's column is broadcast over the lanes in the kernel.
* Node partials sort the edges by the node they sum into
  (:func:`e3kernels.grouping.grouped_row_tiles`) and accumulate into that node's output
  block over its consecutive tiles (the tile grid axis is ``arbitrary``), as the symmetric
  contraction's row reduction does; nodes without edges are never visited and read as zero.
* ``dF/dsh`` sums over the lanes in the kernel and XLA adds the channel blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from e3kernels.grouping import cdiv, grouped_row_tiles, shared_row_tiles
from e3kernels.irreps import ConvolutionPlan
from e3kernels.kernels._common import KernelConfig
from e3kernels.kernels._sparse_polynomial_mosaic import LANES, SUBLANES, _for_each_slab
from e3kernels.kernels._term_unrolling import row_sum
from e3kernels.reference.equivariant_convolution import OUT

ROW_BLOCK = 16


def _row_block(config: KernelConfig) -> int:
    return config.tile_rows or ROW_BLOCK


def _padded(num_channels: int) -> int:
    return cdiv(num_channels, LANES) * LANES


def _nodes_in_hbm(nodes: jax.Array) -> jax.Array:
    """``(N, C, size)`` -> ``(N, size, C_pad)`` float32, what the DMAs gather rows from."""
    num_channels = nodes.shape[1]
    nodes = jnp.transpose(nodes, (0, 2, 1)).astype(jnp.float32)
    return jnp.pad(nodes, ((0, 0), (0, 0), (0, _padded(num_channels) - num_channels)))


def _per_slot(array: jax.Array, slots: jax.Array) -> jax.Array:
    return jnp.take(array, slots, axis=0, mode="fill", fill_value=0)


def _weights_in_slots(weights, slots):
    """``(E, P, C)`` -> ``(P, slots, C_pad)`` float32."""
    num_channels = weights.shape[2]
    tiled = jnp.transpose(_per_slot(weights, slots), (1, 0, 2)).astype(jnp.float32)
    return jnp.pad(tiled, ((0, 0), (0, 0), (0, _padded(num_channels) - num_channels)))


def _harmonics_in_slots(sh, slots, valid):
    """``(slots, dim_sh + 1)`` float32, the last column 1 where the slot's edge counts."""
    return jnp.concatenate([_per_slot(sh, slots).astype(jnp.float32), valid[:, None].astype(jnp.float32)], 1)


def _node_index(index, num_nodes):
    ok = (index >= 0) & (index < num_nodes)
    return jnp.where(ok, index, 0).astype(jnp.int32), ok


class _Gather:
    """One DMA per slot of the tile: ``buffer[k] = nodes[index[slot k], :, channel block]``."""

    def __init__(self, index_ref, nodes_hbm, buffer, semaphores, row_block):
        tile, block = pl.program_id(1), pl.program_id(0)
        self.copies = [
            pltpu.make_async_copy(
                nodes_hbm.at[index_ref[tile * row_block + k], :, pl.ds(block * LANES, LANES)],
                buffer.at[k], semaphores.at[k],
            )
            for k in range(row_block)
        ]

    def __enter__(self):
        for copy in self.copies:
            copy.start()
        for copy in self.copies:
            copy.wait()
        return self

    def __exit__(self, *exc):
        return False


def _harmonic_columns(sh_ref, rows, columns, dim_sh):
    used = _kernels().used_harmonics(columns)
    shape = (SUBLANES, LANES)
    sh = {j: jnp.broadcast_to(sh_ref[rows, pl.ds(j, 1)], shape) for j in used}
    valid = jnp.broadcast_to(sh_ref[rows, pl.ds(dim_sh, 1)], shape) > 0
    return sh, valid


def _term_sum(terms, left, right):
    total = None
    for a, b, coef in terms:
        value = left[a] * right[b] * jnp.float32(coef)
        total = value if total is None else total + value
    return total


# ---- node partials ---------------------------------------------------------------------------


def node_partial(plan: ConvolutionPlan, which: int, nodes, sh, weights, sources, destinations, out_dtype, *,
                 config: KernelConfig):
    """``which == OUT``: the convolution (``nodes`` = x, gathered at the senders, summed into
    the receivers); ``X``: its gradient in x (``nodes`` = g at the receivers, into the senders)."""
    from e3kernels.kernels.equivariant_convolution import column_terms

    num_nodes, num_channels, in_size = nodes.shape
    num_edges = sources.shape[0]
    out_size = plan.dim_out if which == OUT else plan.dim_in
    row_block = _row_block(config)
    tiles = grouped_row_tiles(destinations, num_nodes, row_block)  # invalid destinations: group N
    slots = tiles.rows_of_slots(row_block)  # num_edges: padding
    source, source_ok = _node_index(_per_slot(sources, slots), num_nodes)
    valid = (slots < num_edges) & source_ok
    group = tiles.group
    first = jnp.concatenate([jnp.ones(1, bool), group[1:] != group[:-1]]).astype(jnp.int32)
    count = tiles.end - tiles.start
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(_padded(num_channels) // LANES, group.shape[0]),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((row_block, plan.dim_sh + 1), lambda c, t, *_: (t, 0)),
            pl.BlockSpec((plan.num_paths, row_block, LANES), lambda c, t, *_: (0, t, c)),
        ],
        out_specs=pl.BlockSpec((1, out_size, LANES), lambda c, t, group, *_: (group[t], 0, c)),
        scratch_shapes=[pltpu.VMEM((row_block, in_size, LANES), jnp.float32),
                        pltpu.SemaphoreType.DMA((row_block,))],
    )
    kernel = functools.partial(
        _node_kernel, which=which, columns=column_terms(plan), dim_sh=plan.dim_sh, num_nodes=num_nodes,
        row_block=row_block,
    )
    sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_nodes + 1, out_size, _padded(num_channels)), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=config.pallas_interpret,
        name="convolution_node_partial",
    )(group, first, count, source, _nodes_in_hbm(nodes), _harmonics_in_slots(sh, slots, valid),
      _weights_in_slots(weights, slots))
    visited = jnp.zeros(num_nodes + 1, bool).at[group].set(True)[:num_nodes]  # others: never written
    sums = jnp.where(visited[:, None, None], sums[:num_nodes, :, :num_channels], 0.0)
    return jnp.transpose(sums, (0, 2, 1)).astype(out_dtype)


def _node_kernel(group_ref, first_ref, count_ref, source_ref, nodes_hbm, sh_ref, weights_ref, out_ref, buffer,
                 semaphores, *, which, columns, dim_sh, num_nodes, row_block):
    tile = pl.program_id(1)

    @pl.when(first_ref[tile] == 1)  # a node's tiles are consecutive: accumulate in place
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    def slab(rows):
        sh, valid = _harmonic_columns(sh_ref, rows, columns, dim_sh)
        gathered = lambda column: buffer[rows, column, :]
        weight = lambda p: weights_ref[p, rows, :]
        if which == OUT:
            used = _kernels().used_inputs(columns)
            xs = {i: gathered(i) for i in used}
            totals = {q: _term_sum(terms, xs, sh) * weight(p) for q, p, terms in columns}
        else:
            totals = {}
            for q, p, terms in columns:
                t = gathered(q) * weight(p)
                for i, j, coef in terms:
                    value = t * sh[j] * jnp.float32(coef)
                    totals[i] = value if i not in totals else totals[i] + value
        for column, total in totals.items():
            row = pl.ds(column, 1)
            total = jnp.where(valid, total, 0.0)  # padding slots may have gathered anything
            out_ref[0, row, :] = out_ref[0, row, :] + row_sum(total, keepdims=True)

    @pl.when((count_ref[tile] > 0) & (group_ref[tile] < num_nodes))
    def _():
        with _Gather(source_ref, nodes_hbm, buffer, semaphores, row_block):
            _for_each_slab(row_block, slab)


# ---- edge partials ---------------------------------------------------------------------------


def _edge_operands(senders, receivers, num_nodes, row_block):
    num_edges = senders.shape[0]
    tiles = shared_row_tiles(num_edges, row_block)
    slots = tiles.rows_of_slots(row_block)  # num_edges: padding
    sender, sender_ok = _node_index(_per_slot(senders, slots), num_nodes)
    receiver, receiver_ok = _node_index(_per_slot(receivers, slots), num_nodes)
    valid = (slots < num_edges) & sender_ok & receiver_ok
    return tiles, slots, sender, receiver, valid


def weights_partial(plan: ConvolutionPlan, x, sh, g, senders, receivers, out_dtype, *, config: KernelConfig):
    """``gw[e, p, c] = sum_{q in p} g[r_e, c, q] sum_ij T x[s_e, c, i] sh[e, j]``."""
    from e3kernels.kernels.equivariant_convolution import column_terms

    num_nodes, num_channels, _ = x.shape
    num_edges = senders.shape[0]
    row_block = _row_block(config)
    _, slots, sender, receiver, valid = _edge_operands(senders, receivers, num_nodes, row_block)
    num_slots = slots.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(_padded(num_channels) // LANES, num_slots // row_block),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((row_block, plan.dim_sh + 1), lambda c, t, *_: (t, 0)),
        ],
        out_specs=pl.BlockSpec((plan.num_paths, row_block, LANES), lambda c, t, *_: (0, t, c)),
        scratch_shapes=[pltpu.VMEM((row_block, plan.dim_in, LANES), jnp.float32),
                        pltpu.VMEM((row_block, plan.dim_out, LANES), jnp.float32),
                        pltpu.SemaphoreType.DMA((row_block,)), pltpu.SemaphoreType.DMA((row_block,))],
    )
    kernel = functools.partial(_weights_kernel, columns=column_terms(plan), num_paths=plan.num_paths,
                               dim_sh=plan.dim_sh, row_block=row_block)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.num_paths, num_slots, _padded(num_channels)), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=config.pallas_interpret,
        name="convolution_weights_partial",
    )(sender, receiver, _nodes_in_hbm(x), _nodes_in_hbm(g), _harmonics_in_slots(sh, slots, valid))
    return jnp.transpose(out[:, :num_edges, :num_channels], (1, 0, 2)).astype(out_dtype)


def _weights_kernel(sender_ref, receiver_ref, x_hbm, g_hbm, sh_ref, out_ref, x_buffer, g_buffer, x_sems,
                    g_sems, *, columns, num_paths, dim_sh, row_block):
    def slab(rows):
        sh, valid = _harmonic_columns(sh_ref, rows, columns, dim_sh)
        used = _kernels().used_inputs(columns)
        xs = {i: x_buffer[rows, i, :] for i in used}
        sums = {}
        for q, p, terms in columns:
            value = _term_sum(terms, xs, sh) * g_buffer[rows, q, :]
            sums[p] = value if p not in sums else sums[p] + value
        for p in range(num_paths):
            total = sums.get(p, jnp.zeros((SUBLANES, LANES), jnp.float32))
            out_ref[p, rows, :] = jnp.where(valid, total, 0.0)

    with _Gather(sender_ref, x_hbm, x_buffer, x_sems, row_block), \
            _Gather(receiver_ref, g_hbm, g_buffer, g_sems, row_block):
        _for_each_slab(row_block, slab)


def sh_partial(plan: ConvolutionPlan, x, weights, g, senders, receivers, out_dtype, *, config: KernelConfig):
    """``gsh[e, j] = sum_c sum_iq T x[s_e, c, i] w[e, p(q), c] g[r_e, c, q]``: lanes summed in
    the kernel, channel blocks by XLA."""
    from e3kernels.kernels.equivariant_convolution import column_terms

    num_nodes, num_channels, _ = x.shape
    num_edges = senders.shape[0]
    row_block = _row_block(config)
    _, slots, sender, receiver, valid = _edge_operands(senders, receivers, num_nodes, row_block)
    num_slots = slots.shape[0]
    blocks = _padded(num_channels) // LANES
    validity = valid[:, None].astype(jnp.float32)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(blocks, num_slots // row_block),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((plan.num_paths, row_block, LANES), lambda c, t, *_: (0, t, c)),
            pl.BlockSpec((row_block, 1), lambda c, t, *_: (t, 0)),
        ],
        out_specs=pl.BlockSpec((1, row_block, plan.dim_sh), lambda c, t, *_: (c, t, 0)),
        scratch_shapes=[pltpu.VMEM((row_block, plan.dim_in, LANES), jnp.float32),
                        pltpu.VMEM((row_block, plan.dim_out, LANES), jnp.float32),
                        pltpu.SemaphoreType.DMA((row_block,)), pltpu.SemaphoreType.DMA((row_block,))],
    )
    kernel = functools.partial(_sh_kernel, columns=column_terms(plan), dim_sh=plan.dim_sh,
                               row_block=row_block)
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks, num_slots, plan.dim_sh), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=config.pallas_interpret,
        name="convolution_sh_partial",
    )(sender, receiver, _nodes_in_hbm(x), _nodes_in_hbm(g), _weights_in_slots(weights, slots), validity)
    return jnp.sum(partials[:, :num_edges], axis=0).astype(out_dtype)


def _sh_kernel(sender_ref, receiver_ref, x_hbm, g_hbm, weights_ref, valid_ref, out_ref, x_buffer, g_buffer,
               x_sems, g_sems, *, columns, dim_sh, row_block):
    def slab(rows):
        valid = jnp.broadcast_to(valid_ref[rows, :], (SUBLANES, LANES)) > 0
        used = _kernels().used_inputs(columns)
        xs = {i: x_buffer[rows, i, :] for i in used}
        sums = {}
        for q, p, terms in columns:
            t = g_buffer[rows, q, :] * weights_ref[p, rows, :]
            for i, j, coef in terms:
                value = xs[i] * t * jnp.float32(coef)
                sums[j] = value if j not in sums else sums[j] + value
        for j in range(dim_sh):
            total = jnp.where(valid, sums[j], 0.0) if j in sums else jnp.zeros((SUBLANES, LANES), jnp.float32)
            out_ref[0, rows, pl.ds(j, 1)] = lax.reduce(total, np.array(0, np.float32), lax.add, (1,))[:, None]

    with _Gather(sender_ref, x_hbm, x_buffer, x_sems, row_block), \
            _Gather(receiver_ref, g_hbm, g_buffer, g_sems, row_block):
        _for_each_slab(row_block, slab)


def _kernels():
    """The op's kernel module (imported late: it imports this one)."""
    from e3kernels.kernels import equivariant_convolution

    return equivariant_convolution
