"""GPU (Triton lowering) Pallas kernels for the equivariant convolution's partials.

Tiles are ``(EDGE_BLOCK edges, channel_block channels)`` in float32. Node features are
gathered inside the kernel, row by row through the edges' node indices (a row's
``size`` columns share cache lines, so after the first column the rest come from L1),
the weights as contiguous channel slices, the spherical harmonics as one value per edge.

A node partial runs one program per (node, channel block): it walks the node's edges, in
the order of the sort, a block at a time (a loop whose trip count is the node's degree /
``EDGE_BLOCK``), keeping one ``(channel_block,)`` sum per output column. So the node's sum
has one fixed order: deterministic, with no atomics and no partial sums in memory.

Fused radial weights (``weights = (hidden, matrix)``, see :class:`_TileWeights`): a tile's
weights are formed where they are used, ``h[edges] @ W[:, p, channels]``, one tensor-core
dot per path of ``(EDGE_BLOCK, H) @ (H, channel_block)``, so the ``(E, P, C)`` array never
reaches memory. ``dF/dh`` contracts each path's weight-gradient tile with ``W`` (a dot per
path, per channel block; XLA adds the blocks), and ``dF/dW`` sums ``h^T @ dF/dw`` over a
chunk of ``EDGE_CHUNK`` blocks per program, one path at a time, the chunks added by XLA in
a fixed order.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from e3kernels.grouping import cdiv, edge_in_range, group_rows
from e3kernels.irreps import ConvolutionPlan
from e3kernels.kernels._common import KernelConfig, dot, power_of_two_block, row_sum
from e3kernels.kernels.equivariant_convolution._columns import (
    column_terms,
    term_sum,
    used_harmonics,
    used_inputs,
)
from e3kernels.reference.equivariant_convolution import OUT

EDGE_BLOCK = 16
CHANNEL_BLOCK = 32
MAX_OPEN_SUMS = 8
#: the smallest dot operand dimension the Triton lowering accepts
DOT_MIN = 16
#: edge blocks per program of ``dF/dW``: its partial sums are ``E / (16 * 64)`` matrices
EDGE_CHUNK = 64
#: warps of ``dF/dh``'s programs: with 4, its ``(edges, H)`` sum beside the gathered inputs
#: took 255 registers and spilled 88 B on H100 (ptxas, ``make compile-check``)
HIDDEN_PARTIAL_WARPS = 8


def _f32(value):
    return value if value.dtype == jnp.float32 else lax.convert_element_type(value, jnp.float32)


class _EdgeTile:
    """One block of edges and channels: masked gathers of their data."""

    def __init__(self, edges, edge_ok, channels, channel_ok):
        self.edges, self.channels = edges, channels
        self.edge_ok, self.channel_ok = edge_ok, channel_ok
        self.mask = edge_ok[:, None] & channel_ok[None, :]

    def node_index(self, index_ref):
        """The edges' node indices (``num_nodes`` for a dropped edge, see ``counted_edges``)."""
        return plgpu.load(index_ref.at[self.edges], mask=self.edge_ok, other=0)

    def node_column(self, ref, nodes, node_ok, column: int):
        """``ref[nodes, channels, column]``; 0 for invalid edges."""
        mask = node_ok[:, None] & self.channel_ok[None, :]
        return _f32(plgpu.load(ref.at[nodes[:, None], self.channels[None, :], column], mask=mask, other=0))

    def weight(self, ref, path: int):
        """``weights[edges, path, channels]``."""
        index = ref.at[self.edges[:, None], jnp.int32(path), self.channels[None, :]]
        return _f32(plgpu.load(index, mask=self.mask, other=0))

    def harmonic(self, ref, j: int):
        """``sh[edges, j]`` as an ``(edges, 1)`` column."""
        value = _f32(plgpu.load(ref.at[self.edges, jnp.int32(j)], mask=self.edge_ok, other=0))
        return lax.expand_dims(value, (1,))


class _TileWeights:
    """A tile's weights ``w[edges, p, channels]``: loaded from the formed ``(E, P, C)`` array
    (``refs = (weights,)``), or formed here from the radial network's last layer (``refs =
    (hidden, matrix)``, ``(E, H)`` and ``(H, P, C)``) as ``h[edges] @ W[:, p, channels]``.
    ``rows_ok`` masks the hidden rows read: a dropped edge's ``h`` (NaN for padding) is never
    loaded."""

    def __init__(self, tile: _EdgeTile, refs, rows_ok, precision):
        self.tile, self.refs, self.precision = tile, refs, precision
        if len(refs) == 2:
            self.hidden = _hidden_rows(refs[0], tile, rows_ok)

    def __call__(self, path: int):
        if len(self.refs) == 1:
            return self.tile.weight(self.refs[0], path)
        return dot(self.hidden, _matrix_tile(self.refs[1], path, self.tile.channels, self.tile.channel_ok),
                   self.precision)


def _hidden_block(num_hidden: int) -> int:
    return max(DOT_MIN, power_of_two_block(num_hidden))


def _hidden_rows(hidden_ref, tile: _EdgeTile, rows_ok):
    """``h[edges]``, ``(edges, hidden block)``, 0 where not ``rows_ok`` and past ``H``."""
    hidden = jnp.arange(_hidden_block(hidden_ref.shape[1]), dtype=jnp.int32)
    mask = rows_ok[:, None] & (hidden < hidden_ref.shape[1])[None, :]
    return plgpu.load(hidden_ref.at[tile.edges[:, None], hidden[None, :]], mask=mask, other=0)


def _matrix_tile(matrix_ref, path: int, channels, channel_ok, transposed: bool = False):
    """``W[:, path, channels]``, ``(hidden block, channels)`` (its transpose with
    ``transposed``), 0 past ``H``."""
    hidden = jnp.arange(_hidden_block(matrix_ref.shape[0]), dtype=jnp.int32)
    hidden_ok = hidden < matrix_ref.shape[0]
    if transposed:
        index = matrix_ref.at[hidden[None, :], jnp.int32(path), channels[:, None]]
        return plgpu.load(index, mask=channel_ok[:, None] & hidden_ok[None, :], other=0)
    index = matrix_ref.at[hidden[:, None], jnp.int32(path), channels[None, :]]
    return plgpu.load(index, mask=hidden_ok[:, None] & channel_ok[None, :], other=0)


def _channel_block(num_channels: int, fused: bool) -> int:
    """Channels per program; a dot operand dimension (at least ``DOT_MIN``) when fused."""
    block = power_of_two_block(num_channels, CHANNEL_BLOCK)
    return max(block, DOT_MIN) if fused else block


def _harmonics(tile: _EdgeTile, sh_ref, columns) -> dict:
    used = used_harmonics(columns)
    return {j: tile.harmonic(sh_ref, j) for j in used}


# ---- node partials: sums over a node's edges ---------------------------------------------


def node_partial(plan: ConvolutionPlan, which: int, nodes, sh, weights: tuple, sources, destinations,
                 out_dtype, *, config: KernelConfig, precision=None):
    """``which == OUT``: the convolution (``nodes`` = x at the senders, summed into the
    receivers); ``X``: its gradient in x (``nodes`` = g at the receivers, into the senders).
    ``weights``: ``(w,)`` or, fused, ``(hidden, matrix)`` (:class:`_TileWeights`)."""
    num_nodes, num_channels = nodes.shape[:2]
    out_size = plan.dim_out if which == OUT else plan.dim_in
    grouping = group_rows(destinations, num_nodes)  # dropped edges sort last, unvisited
    channel_block = _channel_block(num_channels, len(weights) == 2)
    kernel = functools.partial(
        _node_kernel, which=which, passes=_node_passes(which, column_terms(plan), out_size),
        out_size=out_size, num_channels=num_channels, channel_block=channel_block, precision=precision,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_nodes, num_channels, out_size), out_dtype),
        grid=(num_nodes, cdiv(num_channels, channel_block)),
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="convolution_node_partial",
    )(grouping.bounds, grouping.order, sources, nodes, sh, *weights)


def _node_passes(which: int, columns, out_size: int):
    """The node kernel's passes over a node's edges: ``(outputs, columns)`` each. The
    convolution keeps one ``(channels,)`` sum per output column across the edge loop, and
    ``MAX_OPEN_SUMS`` of them at a time (whole paths, so a path's weight tile is loaded once
    per block): at MACE's 40 columns in one pass the H100 kernel needed 255 registers and
    spilled. Each pass gathers the sender rows again, from L2."""
    if which != OUT:
        return ((tuple(range(out_size)), columns),)
    passes, current = [], []
    for path in sorted({p for _, p, _ in columns}):
        members = [c for c in columns if c[1] == path]
        if current and len(current) + len(members) > MAX_OPEN_SUMS:
            passes.append(current)
            current = []
        current = current + members
    passes.append(current)
    return tuple((tuple(q for q, _, _ in group), tuple(group)) for group in passes if group)


def _node_kernel(bounds_ref, order_ref, sources_ref, nodes_ref, sh_ref, *refs, which, passes, out_size,
                 num_channels, channel_block, precision):
    *weight_refs, out_ref = refs
    node = pl.program_id(0)
    channels = pl.program_id(1) * channel_block + jnp.arange(channel_block, dtype=jnp.int32)
    channel_ok = channels < num_channels
    start, end = bounds_ref[node], bounds_ref[node + 1]

    def block_sums(outputs, columns):
        def block(k, sums):
            position = start + k * EDGE_BLOCK + jnp.arange(EDGE_BLOCK, dtype=jnp.int32)
            in_block = position < end
            edges = plgpu.load(order_ref.at[position], mask=in_block, other=0)
            tile = _EdgeTile(edges, in_block, channels, channel_ok)
            other = tile.node_index(sources_ref)  # in range: the schedule holds no dropped edge
            sh = _harmonics(tile, sh_ref, columns)
            sums = dict(zip(outputs, sums))
            weights = _TileWeights(tile, weight_refs, in_block, precision)
            weight = {}

            def path_weight(p):
                if p not in weight:
                    weight.clear()  # a path's columns are consecutive: one weight tile live
                    weight[p] = weights(p)
                return weight[p]

            if which == OUT:  # out[q] += sum_e w[p(q)] * sum_ij T x[i] sh[j]
                used = used_inputs(columns)
                xs = {i: tile.node_column(nodes_ref, other, in_block, i) for i in used}
                for q, p, terms in columns:
                    message = term_sum(terms, xs, sh) * path_weight(p)
                    sums[q] = sums[q] + row_sum(message)
            else:  # gx[i] += sum_e sum_jq T sh[j] w[p(q)] g[q]
                parts = {}
                for q, p, terms in columns:
                    t = tile.node_column(nodes_ref, other, in_block, q) * path_weight(p)
                    for i, j, coef in terms:
                        value = t * (sh[j] * jnp.float32(coef))
                        parts[i] = value if i not in parts else parts[i] + value
                for i, part in parts.items():
                    sums[i] = sums[i] + row_sum(part)
            return tuple(sums[o] for o in outputs)

        zero = jnp.zeros((channel_block,), jnp.float32)
        num_blocks = (end - start + EDGE_BLOCK - 1) // EDGE_BLOCK
        return lax.fori_loop(0, num_blocks, block, (zero,) * len(outputs))

    def store(column, total):
        index = out_ref.at[node, channels, jnp.int32(column)]
        plgpu.store(index, total.astype(out_ref.dtype), mask=channel_ok)

    written = set()
    for outputs, columns in passes:
        for column, total in zip(outputs, block_sums(outputs, columns)):
            store(column, total)
        written.update(outputs)
    for column in sorted(set(range(out_size)) - written):  # columns without terms
        store(column, jnp.zeros((channel_block,), jnp.float32))


# ---- edge partials -------------------------------------------------------------------------


def _edge_grid(num_edges: int, num_channels: int, fused: bool = False):
    channel_block = _channel_block(num_channels, fused)
    return channel_block, (cdiv(num_edges, EDGE_BLOCK), cdiv(num_channels, channel_block))


def _edge_tile(first_edge, num_edges, channels, num_channels, num_nodes, senders_ref, receivers_ref):
    """The tile of ``EDGE_BLOCK`` edges from ``first_edge``, its edges' ends and which it
    counts (both ends in range: a dropped edge adds nothing)."""
    edges = first_edge + jnp.arange(EDGE_BLOCK, dtype=jnp.int32)
    tile = _EdgeTile(edges, edges < num_edges, channels, channels < num_channels)
    senders, receivers = tile.node_index(senders_ref), tile.node_index(receivers_ref)
    counted = tile.edge_ok & edge_in_range(senders, receivers, num_nodes)
    return tile, senders, receivers, counted


def _program_tile(num_edges, num_channels, channel_block, num_nodes, senders_ref, receivers_ref):
    """The tile of grid program ``(edge block, channel block)``."""
    channels = pl.program_id(1) * channel_block + jnp.arange(channel_block, dtype=jnp.int32)
    return _edge_tile(pl.program_id(0) * EDGE_BLOCK, num_edges, channels, num_channels, num_nodes,
                      senders_ref, receivers_ref)


def _weight_gradients(columns, tile: _EdgeTile, senders, receivers, counted, x_ref, sh_ref, g_ref):
    """``dF/dw`` of the tile, one path at a time: ``(path, (edges, channels))`` as each path's
    columns are summed, 0 on edges not ``counted`` (their ``sh`` may be NaN)."""
    xs = {i: tile.node_column(x_ref, senders, counted, i) for i in used_inputs(columns)}
    sh = _harmonics(tile, sh_ref, columns)
    sums = {}
    last_column_of = {p: q for q, p, _ in columns}
    for q, p, terms in columns:
        value = term_sum(terms, xs, sh) * tile.node_column(g_ref, receivers, counted, q)
        sums[p] = value if p not in sums else sums[p] + value
        if last_column_of[p] == q:
            yield p, jnp.where(counted[:, None], sums.pop(p), 0.0)


def weights_partial(plan: ConvolutionPlan, x, sh, g, senders, receivers, out_dtype, *, config: KernelConfig):
    """``gw[e, p, c] = sum_{q in p} g[r_e, c, q] sum_ij T x[s_e, c, i] sh[e, j]``."""
    num_nodes, num_channels = x.shape[:2]
    num_edges = senders.shape[0]
    channel_block, grid = _edge_grid(num_edges, num_channels)
    kernel = functools.partial(
        _weights_kernel, columns=column_terms(plan), num_paths=plan.num_paths, num_nodes=num_nodes,
        num_edges=num_edges, num_channels=num_channels, channel_block=channel_block,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_edges, plan.num_paths, num_channels), out_dtype),
        grid=grid,
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="convolution_weights_partial",
    )(senders, receivers, x, sh, g)


def _weights_kernel(senders_ref, receivers_ref, x_ref, sh_ref, g_ref, out_ref, *, columns, num_paths,
                    num_nodes, num_edges, num_channels, channel_block):
    tile, senders, receivers, counted = _program_tile(num_edges, num_channels, channel_block, num_nodes,
                                                      senders_ref, receivers_ref)
    written = set()
    for p, value in _weight_gradients(columns, tile, senders, receivers, counted, x_ref, sh_ref, g_ref):
        _store_path(out_ref, tile, p, value)
        written.add(p)
    for p in sorted(set(range(num_paths)) - written):
        _store_path(out_ref, tile, p, jnp.zeros((EDGE_BLOCK, channel_block), jnp.float32))


def _store_path(out_ref, tile: _EdgeTile, path: int, value):
    index = out_ref.at[tile.edges[:, None], jnp.int32(path), tile.channels[None, :]]
    plgpu.store(index, value.astype(out_ref.dtype), mask=tile.mask)


def hidden_partial(plan: ConvolutionPlan, x, sh, g, matrix, senders, receivers, out_dtype, *,
                   config: KernelConfig, precision):
    """Fused radial weights' ``dF/dh[e, k] = sum_{p, c} gw[e, p, c] W[k, p, c]``: per channel
    block in the kernel (a dot per path), the blocks summed by XLA."""
    num_nodes, num_channels = x.shape[:2]
    num_edges, num_hidden = senders.shape[0], matrix.shape[0]
    channel_block, grid = _edge_grid(num_edges, num_channels, fused=True)
    kernel = functools.partial(
        _hidden_kernel, columns=column_terms(plan), num_nodes=num_nodes, num_edges=num_edges,
        num_channels=num_channels, channel_block=channel_block, precision=precision,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_edges, grid[1], num_hidden), jnp.float32),
        grid=grid,
        compiler_params=dataclasses.replace(config, num_warps=HIDDEN_PARTIAL_WARPS).triton_params(),
        interpret=config.pallas_interpret,
        name="convolution_hidden_partial",
    )(senders, receivers, x, sh, g, matrix)
    return jnp.sum(partials, axis=1).astype(out_dtype)


def _hidden_kernel(senders_ref, receivers_ref, x_ref, sh_ref, g_ref, matrix_ref, out_ref, *, columns,
                   num_nodes, num_edges, num_channels, channel_block, precision):
    tile, senders, receivers, counted = _program_tile(num_edges, num_channels, channel_block, num_nodes,
                                                      senders_ref, receivers_ref)
    num_hidden = matrix_ref.shape[0]
    hidden = jnp.arange(_hidden_block(num_hidden), dtype=jnp.int32)
    total = jnp.zeros((EDGE_BLOCK, hidden.shape[0]), jnp.float32)
    for p, value in _weight_gradients(columns, tile, senders, receivers, counted, x_ref, sh_ref, g_ref):
        matrix_t = _matrix_tile(matrix_ref, p, tile.channels, tile.channel_ok, transposed=True)
        total = total + dot(value, matrix_t, precision)
    index = out_ref.at[tile.edges[:, None], pl.program_id(1), hidden[None, :]]
    plgpu.store(index, total, mask=tile.edge_ok[:, None] & (hidden < num_hidden)[None, :])


def matrix_partial(plan: ConvolutionPlan, x, sh, g, hidden, senders, receivers, out_dtype, *,
                   config: KernelConfig, precision):
    """Fused radial weights' ``dF/dW[k, p, c] = sum_e h[e, k] gw[e, p, c]``: one program per
    chunk of ``EDGE_CHUNK`` edge blocks and channel block, summing ``h^T @ gw`` over its
    blocks one path at a time; XLA adds the chunks (a fixed order: deterministic)."""
    num_nodes, num_channels = x.shape[:2]
    num_edges, num_hidden = senders.shape[0], hidden.shape[1]
    channel_block = _channel_block(num_channels, fused=True)
    num_chunks = cdiv(num_edges, EDGE_CHUNK * EDGE_BLOCK)
    kernel = functools.partial(
        _matrix_kernel, columns=column_terms(plan), num_paths=plan.num_paths, num_nodes=num_nodes,
        num_edges=num_edges, num_channels=num_channels, channel_block=channel_block, precision=precision,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_chunks, num_hidden, plan.num_paths, num_channels), jnp.float32),
        grid=(num_chunks, cdiv(num_channels, channel_block)),
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="convolution_matrix_partial",
    )(senders, receivers, x, sh, g, hidden)
    return jnp.sum(partials, axis=0).astype(out_dtype)


def _matrix_kernel(senders_ref, receivers_ref, x_ref, sh_ref, g_ref, hidden_ref, out_ref, *, columns,
                   num_paths, num_nodes, num_edges, num_channels, channel_block, precision):
    chunk = pl.program_id(0)
    channels = pl.program_id(1) * channel_block + jnp.arange(channel_block, dtype=jnp.int32)
    num_hidden = hidden_ref.shape[1]
    hidden = jnp.arange(_hidden_block(num_hidden), dtype=jnp.int32)
    first = chunk * (EDGE_CHUNK * EDGE_BLOCK)
    num_blocks = jnp.minimum(EDGE_CHUNK, (num_edges - first + EDGE_BLOCK - 1) // EDGE_BLOCK)
    out_mask = (hidden < num_hidden)[:, None] & (channels < num_channels)[None, :]

    def store(path, value):
        index = out_ref.at[chunk, hidden[:, None], jnp.int32(path), channels[None, :]]
        plgpu.store(index, value, mask=out_mask)

    for path in range(num_paths):  # one (H, channels) sum live at a time
        members = tuple(c for c in columns if c[1] == path)
        if not members:
            store(path, jnp.zeros((hidden.shape[0], channel_block), jnp.float32))
            continue

        def block(k, total, members=members):
            ends = (num_nodes, senders_ref, receivers_ref)
            tile, senders, receivers, counted = _edge_tile(first + k * EDGE_BLOCK, num_edges, channels,
                                                           num_channels, *ends)
            ((_, gradient),) = _weight_gradients(members, tile, senders, receivers, counted, x_ref, sh_ref,
                                                 g_ref)
            hidden_rows = _hidden_rows(hidden_ref, tile, counted)
            return total + dot(hidden_rows, gradient, precision, contract_rows=True)

        zero = jnp.zeros((hidden.shape[0], channel_block), jnp.float32)
        store(path, lax.fori_loop(0, num_blocks, block, zero))


def sh_partial(plan: ConvolutionPlan, x, weights: tuple, g, senders, receivers, out_dtype, *,
               config: KernelConfig, precision=None):
    """``gsh[e, j] = sum_c sum_iq T x[s_e, c, i] w[e, p(q), c] g[r_e, c, q]``: per channel
    block in the kernel, the blocks summed by XLA. ``weights`` as in :func:`node_partial`."""
    num_nodes, num_channels = x.shape[:2]
    num_edges = senders.shape[0]
    channel_block, grid = _edge_grid(num_edges, num_channels, fused=len(weights) == 2)
    kernel = functools.partial(
        _sh_kernel, columns=column_terms(plan), dim_sh=plan.dim_sh, num_nodes=num_nodes, num_edges=num_edges,
        num_channels=num_channels, channel_block=channel_block, precision=precision,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_edges, grid[1], plan.dim_sh), jnp.float32),
        grid=grid,
        compiler_params=config.triton_params(),
        interpret=config.pallas_interpret,
        name="convolution_sh_partial",
    )(senders, receivers, x, g, *weights)
    return jnp.sum(partials, axis=1).astype(out_dtype)


def _sh_kernel(senders_ref, receivers_ref, x_ref, g_ref, *refs, columns, dim_sh, num_nodes, num_edges,
               num_channels, channel_block, precision):
    *weight_refs, out_ref = refs
    tile, senders, receivers, counted = _program_tile(num_edges, num_channels, channel_block, num_nodes,
                                                      senders_ref, receivers_ref)
    weights = _TileWeights(tile, weight_refs, counted, precision)
    used = used_inputs(columns)
    xs = {i: tile.node_column(x_ref, senders, counted, i) for i in used}
    sums = {}
    weight = {}
    for q, p, terms in columns:
        if p not in weight:
            weight.clear()
            weight[p] = weights(p)
        t = tile.node_column(g_ref, receivers, counted, q) * weight[p]
        by_input = {}
        for i, j, coef in terms:
            by_input.setdefault(i, []).append((j, coef))
        for i, js in by_input.items():
            channel_sum = lax.reduce(xs[i] * t, np.array(0, np.float32), lax.add, (1,))  # (edges,)
            for j, coef in js:
                value = channel_sum * jnp.float32(coef)
                sums[j] = value if j not in sums else sums[j] + value
    block = pl.program_id(1)
    for j in range(dim_sh):  # selected: a dropped edge's weights may be NaN
        value = jnp.where(counted, sums[j], 0.0) if j in sums else jnp.zeros((EDGE_BLOCK,), jnp.float32)
        plgpu.store(out_ref.at[tile.edges, block, jnp.int32(j)], value, mask=tile.edge_ok)
