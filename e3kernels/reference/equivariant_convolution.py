r"""Reference (pure jax.numpy) equivariant convolution, and the differentiation rule every
implementation of the op shares.

The op as a multilinear form. With ``T`` the plan's table (``out[q] = sum_ij T[i, j, q]
x[i] sh[j]``) and ``p(q)`` the path of output column ``q``, the scalar

.. math::

    F(x, sh, w, g) = \sum_e \sum_c \sum_{ijq} T_{ijq}\, x[s_e, c, i]\, sh[e, j]\,
                     w[e, p(q), c]\, g[r_e, c, q]

is linear in each of its four arguments, and the convolution is its partial derivative
in ``g`` (before the ``1 / avg_num_neighbors`` scale).

Fused radial weights. When the weights are the radial network's last layer, ``w[e, p, c]
= sum_k h[e, k] W[k, p, c]``, the form takes ``(x, sh, h, g, W)`` instead: still linear in
each argument, with two partials more in place of ``dF/dw``. ``dF/dh`` ``(E, H)`` is per
edge (``dF/dw`` contracted with ``W``) and ``dF/dW`` ``(H, P, C)`` sums over edges
(``h`` contracted with ``dF/dw``), in a fixed order like the node sums. The ``(E, P, C)``
weights are formed one block of edges at a time and never exist whole. Every derivative of a partial is
again a partial: the VJP of ``dF/da`` in ``b`` with cotangent ``t`` is ``dF/db`` with ``a``
replaced by ``t``. So an implementation provides the four partials (:class:`Partials`) and
:func:`form_partial` differentiates them to any order (forces, then training), each
derivative running that implementation again:

* ``dF/dg`` (the convolution) and ``dF/dx`` sum over edges into nodes (receivers, senders);
* ``dF/dw`` ``(E, P, C)`` and ``dF/dsh`` ``(E, dim_sh)`` are per edge.

The reference. A plain formulation materialises ``(E, C, dim_out)`` edge messages (e3nn
does, in every derivative as well); on CPU, writing such fresh arrays of ~100 MB costs more
than the arithmetic. Here every partial runs over blocks of edges in a ``lax.scan``:
a block's messages stay in one reused buffer of about a megabyte, sums over edges
accumulate into the scan's carry (``segment_sum``: a scatter-add, sequential and so
deterministic on CPU, run with float atomics on GPU), and per-edge
outputs come out as the scan's stacked results. Per block, ``A[e, i, q] = sum_j T[i, j, q]
sh[e, j]`` folds the spherical harmonics into the table, so each partial is a few small
einsums. Edges whose sender or receiver lies outside ``[0, N)`` contribute nothing
(:func:`e3kernels.grouping.counted_edges`): exactly zero, whatever their harmonics,
weights or end nodes hold.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from e3kernels.grouping import counted_edges
from e3kernels.irreps import ConvolutionPlan
from e3kernels.spec import accumulation_dtype

#: the arguments of the form, in order; a partial's ``which`` is a position here. With
#: fused radial weights, ``WEIGHTS`` holds ``h`` ``(E, H)`` and ``MATRIX`` ``W`` ``(H, P, C)``
X, SH, WEIGHTS, OUT, MATRIX = range(5)

#: elements of one block's ``(edges, C, dim_out)`` message buffer
_BLOCK_ELEMENTS = 1 << 18


class Partials(Protocol):
    """An implementation of the form's four partial derivatives.

    ``__call__(which, out_dtype, args, senders, receivers, num_nodes)`` returns ``dF /
    d args[which]`` as ``out_dtype``; ``args`` is ``(x, sh, weights, g)``, or ``(x, sh, h,
    g, W)`` with fused radial weights, with ``None`` at ``which``. Instances are static
    (hashable) arguments of :func:`form_partial`.
    """

    def __call__(self, which: int, out_dtype, args, senders, receivers, num_nodes: int) -> jax.Array: ...


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def form_partial(partials: Partials, which: int, out_dtype, num_nodes: int, args, senders, receivers):
    """``dF / d args[which]`` computed by ``partials``, differentiable to any order."""
    return partials(which, out_dtype, args, senders, receivers, num_nodes)


def _form_partial_fwd(partials, which, out_dtype, num_nodes, args, senders, receivers):
    out = form_partial(partials, which, out_dtype, num_nodes, args, senders, receivers)
    return out, (args, senders, receivers)


def _form_partial_bwd(partials, which, out_dtype, num_nodes, residuals, cotangent):
    del out_dtype
    args, senders, receivers = residuals
    grads = []
    for b, arg in enumerate(args):
        if arg is None:  # the slot of `which`
            grads.append(None)
            continue
        others = list(args)
        others[which], others[b] = cotangent, None
        grads.append(form_partial(partials, b, arg.dtype, num_nodes, tuple(others), senders, receivers))
    return tuple(grads), None, None


form_partial.defvjp(_form_partial_fwd, _form_partial_bwd)


def equivariant_convolution(x, sh, weights, senders, receivers, *, plan: ConvolutionPlan,
                            avg_num_neighbors: float):
    """The op (see :func:`e3kernels.ops.equivariant_convolution`) on the reference."""
    return convolve(ReferencePartials(plan), x, sh, weights, senders, receivers, avg_num_neighbors)


def radial_equivariant_convolution(x, sh, hidden, matrix, senders, receivers, *, plan: ConvolutionPlan,
                                   avg_num_neighbors: float, precision=None):
    """The op with fused radial weights (``weights[e] = hidden[e] @ matrix``, ``matrix``
    ``(H, P, C)``, multiplied at ``precision``) on the reference."""
    return convolve(ReferencePartials(plan, precision), x, sh, hidden, senders, receivers, avg_num_neighbors,
                    matrix)


def convolve(partials: Partials, x, sh, weights, senders, receivers, avg_num_neighbors: float, matrix=None):
    """The op on ``partials``: the form's partial in ``g``, scaled, then rounded once to
    ``x``'s dtype (16-bit inputs: the sums and the scale in float32). With ``matrix``,
    ``weights`` is the radial network's last hidden layer ``h`` (fused radial weights)."""
    acc = accumulation_dtype(x, sh, weights, *(() if matrix is None else (matrix,)))
    args = (x, sh, weights, None) + (() if matrix is None else (matrix,))
    out = form_partial(partials, OUT, acc, x.shape[0], args, senders, receivers)
    if avg_num_neighbors != 1.0:
        out = out * jnp.asarray(1.0 / avg_num_neighbors, acc)
    return out.astype(x.dtype)


def partial_shape(plan: ConvolutionPlan, which: int, args, num_edges: int, num_nodes: int) -> tuple[int, ...]:
    """The shape of ``dF / d args[which]`` (``args`` as in :class:`Partials`)."""
    x, _, weights, g = args[:4]
    num_channels = (x if x is not None else g).shape[1]  # only one of x and g is the slot
    fused = len(args) > MATRIX
    if fused:  # h (E, H) or W (H, P, C)
        num_hidden = weights.shape[1] if weights is not None else args[MATRIX].shape[0]
    return {
        X: (num_nodes, num_channels, plan.dim_in),
        SH: (num_edges, plan.dim_sh),
        WEIGHTS: (num_edges, num_hidden) if fused else (num_edges, plan.num_paths, num_channels),
        OUT: (num_nodes, num_channels, plan.dim_out),
        MATRIX: (num_hidden, plan.num_paths, num_channels) if fused else None,
    }[which]


def has_no_work(args, senders, num_nodes: int) -> bool:
    """No edge, no node or no channel: every partial is zero."""
    x, _, _, g = args[:4]
    channels = x.shape[1] if x is not None else g.shape[1]
    return senders.shape[0] == 0 or num_nodes == 0 or channels == 0


class ReferencePartials:
    """The form's partials over blocks of edges (see the module's docstring); ``precision``:
    of the fused radial weights' matmuls."""

    def __init__(self, plan: ConvolutionPlan, precision=None):
        self.plan, self.precision = plan, precision

    def __hash__(self):
        return hash((type(self), self.plan, self.precision))

    def __eq__(self, other):
        return type(other) is type(self) and (other.plan, other.precision) == (self.plan, self.precision)

    def __call__(self, which, out_dtype, args, senders, receivers, num_nodes):
        plan = self.plan
        acc = accumulation_dtype(*(a for a in args if a is not None))
        x, sh, weights, g, *rest = (None if a is None else a.astype(acc) for a in args)
        fused = len(args) > MATRIX
        matrix = rest[0] if fused else None
        num_edges = senders.shape[0]
        out_shape = partial_shape(plan, which, args, num_edges, num_nodes)
        if has_no_work(args, senders, num_nodes):
            return jnp.zeros(out_shape, out_dtype)
        num_channels = (x if x is not None else g).shape[1]
        block = max(8, _BLOCK_ELEMENTS // (num_channels * max(plan.dim_out, plan.dim_in)))
        block = min(block, num_edges)
        num_blocks = -(-num_edges // block)
        pad = num_blocks * block - num_edges

        def blocked(a, fill):  # (E, ...) -> (num_blocks, block, ...), padded with `fill`
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
            return a.reshape((num_blocks, block) + a.shape[1:])

        # a dropped edge's ends are the node `num_nodes`: gathered as 0, left out of sums
        counted, senders, receivers = counted_edges(senders, receivers, num_nodes)
        edges = {"s": blocked(senders, num_nodes), "r": blocked(receivers, num_nodes),
                 "ok": blocked(counted, False)}
        if sh is not None:
            edges["sh"] = blocked(sh, 0)
        if weights is not None:
            edges["w"] = blocked(weights, 0)  # h (E, H) with fused radial weights
        table = jnp.asarray(plan.table, acc)  # (i, j, q)
        path_of = jnp.asarray(plan.path_of_column)
        path_ranges = _path_ranges(plan.path_of_column)
        hi = jax.lax.Precision.HIGHEST
        radial = dict(precision=self.precision, preferred_element_type=acc)
        # channels last, the axis every product runs along: (N, size, C)
        x_t = None if x is None else x.transpose(0, 2, 1)
        g_t = None if g is None else g.transpose(0, 2, 1)

        def gather(nodes, index):
            return jnp.take(nodes, index, axis=0, mode="fill", fill_value=0)

        def folded(e):  # A[e, i, q] = sum_j T[i, j, q] sh[e, j]
            return jnp.einsum("ej,ijq->eiq", e["sh"], table, precision=hi)

        def product(a, xs):  # sum_i A[e, i, q] x[e, i, c]: (B, Q, C), a fused sum of din terms
            return jnp.sum(a[:, :, :, None] * xs[:, :, None, :], axis=1)

        def edge_weights(e):  # (B, P, C); fused: formed here, from h masked like any edge datum
            if not fused:
                return e["w"]
            hidden = jnp.where(e["ok"][:, None], e["w"], 0)
            return jnp.einsum("bk,kpc->bpc", hidden, matrix, **radial)

        def weights_partial(e):  # dF/dw of the block's edges: (B, P, C)
            v = product(folded(e), gather(x_t, e["s"])) * gather(g_t, e["r"])
            return jnp.stack([jnp.sum(v[:, a:b], axis=1) for a, b in path_ranges], axis=1)

        def block_value(e):  # a dropped edge's values are exactly 0, whatever its data
            if which == MATRIX:  # sum over the block's edges of h (x) dF/dw
                hidden = jnp.where(e["ok"][:, None], e["w"], 0)
                partial = jnp.where(e["ok"][:, None, None], weights_partial(e), 0)
                return jnp.einsum("bk,bpc->kpc", hidden, partial, **radial)
            ok = e["ok"].reshape((-1,) + (1,) * (len(out_shape) - 1))
            value = jnp.where(ok, edge_values(e), 0)
            if which in (X, OUT):
                return jax.ops.segment_sum(value, e["r" if which == OUT else "s"], num_nodes)
            return value

        def edge_values(e):  # per edge: messages (node partials) or the edge partial
            if which == OUT:
                return product(folded(e), gather(x_t, e["s"])) * edge_weights(e)[:, path_of]
            if which == X:  # a batched matmul: as a product summed over q (a middle axis), XLA:CPU
                # ran 10x slower on 16 columns (MACE's first layer, l_max 3)
                t = edge_weights(e)[:, path_of] * gather(g_t, e["r"])
                return jnp.einsum("biq,bqc->bic", folded(e), t, precision=hi)
            if which == WEIGHTS:
                if fused:  # dF/dh = dF/dw contracted with W
                    return jnp.einsum("bpc,kpc->bk", weights_partial(e), matrix, **radial)
                return weights_partial(e)
            t = edge_weights(e)[:, path_of] * gather(g_t, e["r"])
            b = jnp.einsum("bic,bqc->biq", gather(x_t, e["s"]), t, precision=hi)
            return jnp.einsum("eiq,ijq->ej", b, table, precision=hi)

        if which in (X, OUT, MATRIX):  # sums over edges: accumulate over the blocks
            def step(total, e):
                return total + block_value(e), None

            if which == MATRIX:
                total, _ = jax.lax.scan(step, jnp.zeros(out_shape, acc), edges)
                return total.astype(out_dtype)
            nodes_t = (out_shape[0], out_shape[2], out_shape[1])
            total, _ = jax.lax.scan(step, jnp.zeros(nodes_t, acc), edges)
            return total.transpose(0, 2, 1).astype(out_dtype)
        _, per_edge = jax.lax.scan(lambda c, e: (c, block_value(e).astype(out_dtype)), 0, edges)
        return per_edge.reshape((num_blocks * block,) + per_edge.shape[2:])[:num_edges]


def _path_ranges(path_of_column) -> tuple[tuple[int, int], ...]:
    """The output columns ``[start, end)`` of each path (they are contiguous)."""
    bounds = np.searchsorted(np.asarray(path_of_column), np.arange(max(path_of_column, default=-1) + 2))
    return tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
