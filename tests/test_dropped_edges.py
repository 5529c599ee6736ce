"""Dropped edges never leak: an edge with a sender or receiver out of range contributes
exactly nothing, whatever its data holds. Padding edges are where non-finite data appears
(zero-length vectors: NaN radial features and harmonic derivatives), so the dropped edges
here carry NaN and inf in their harmonics and weights, and the one node they reach, in its
features and cotangent. Every partial of the form on every implementation, and the op to
second order, must equal the same graph without those edges, and give dropped edges
exactly zero gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from test_convolution import PLAN, Graph, force_training_loss, projection_for

from e3kernels.kernels import equivariant_convolution as kernels
from e3kernels.reference import equivariant_convolution as reference

NODES, VALID = 7, 24
#: (sender, receiver) of the dropped edges; node 6 has no valid edge and is reached only here
DROPPED = [(-1, 2), (7, 6), (100, 0), (6, -2), (3, 7), (6, 2**31 - 1), (-5, 9)]
POISON = [jnp.nan, jnp.inf, -jnp.inf]

IMPLEMENTATIONS = {
    "reference": reference.ReferencePartials(PLAN),
    "triton": kernels.KernelPartials(PLAN, kernels.TRITON_INTERPRET),
    "mosaic": kernels.KernelPartials(PLAN, dataclasses.replace(kernels.MOSAIC_INTERPRET, tile_rows=8)),
}


def graphs():
    """The graph with its dropped edges interleaved among the valid ones, and without them."""
    clean = Graph(PLAN, nodes=NODES, edges=VALID, channels=3)  # node 6 has no edge
    order = np.random.default_rng(1).permutation(VALID + len(DROPPED))
    dropped = order >= VALID  # positions of the dropped edges in the full graph
    full = Graph(PLAN, nodes=NODES, edges=VALID + len(DROPPED), channels=3)
    where = jnp.asarray(np.flatnonzero(~dropped))
    bad = jnp.asarray(np.flatnonzero(dropped))
    poison = lambda shape, k: jnp.full(shape, POISON[k % len(POISON)], jnp.float32)
    full.sh = full.sh.at[where].set(clean.sh)
    full.weights = full.weights.at[where].set(clean.weights)
    full.senders = full.senders.at[where].set(clean.senders)
    full.receivers = full.receivers.at[where].set(clean.receivers)
    for k, (e, (s, r)) in enumerate(zip(bad.tolist(), DROPPED)):
        full.sh = full.sh.at[e].set(poison(full.sh.shape[1:], k))
        full.weights = full.weights.at[e].set(poison(full.weights.shape[1:], k + 1))
        full.senders, full.receivers = full.senders.at[e].set(s), full.receivers.at[e].set(r)
    clean.x = clean.x.at[6].set(jnp.nan)  # never read by a valid edge
    full.x = clean.x
    return full, clean, jnp.asarray(dropped)


def cotangent(poisoned_node=True):
    g = np.random.default_rng(3).standard_normal((NODES, 3, PLAN.dim_out)).astype(np.float32)
    if poisoned_node:
        g[6] = np.inf
    return jnp.asarray(g)


@pytest.mark.parametrize("which", ["x", "sh", "weights", "out"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_partial_ignores_dropped_edges(implementation, which):
    which = ("x", "sh", "weights", "out").index(which)
    full, clean, dropped = graphs()
    partials = IMPLEMENTATIONS[implementation]

    def partial(g):
        args = [g.x, g.sh, g.weights, cotangent()]
        args[which] = None
        return partials(which, jnp.float32, tuple(args), *g.edges, NODES)

    ours, expected = partial(full), partial(clean)
    if which in (reference.X, reference.OUT):  # node sums: node 6 has no valid edge
        assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert bool(jnp.all(ours[6] == 0))
    else:  # per edge: the valid edges' values, and exactly 0 for the dropped ones
        assert_close(ours[~dropped], expected, rtol=1e-5, atol=1e-5)
        assert bool(jnp.all(ours[dropped] == 0)), ours[dropped]


def op(implementation):
    partials = IMPLEMENTATIONS[implementation]

    def f(x, params, edges):
        return reference.convolve(partials, x, *params, *edges, avg_num_neighbors=2.5)

    return f


# Every derivative runs the partials above (form_partial), on every implementation; the
# Mosaic ones, slow in interpret mode, are checked partial by partial only.
@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_op_to_second_order_ignores_dropped_edges(implementation):
    """Forces on x and sh, then a training gradient of a loss on them (second order)."""
    full, clean, dropped = graphs()
    projection = projection_for(clean)
    f = op(implementation)

    def run(g):
        out = jax.jit(f)(g.x, (g.sh, g.weights), g.edges)
        loss = force_training_loss(f, g.edges, projection)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))((g.sh, g.weights), g.x)
        return out, grads

    (out, ((gsh, gw), gx)), (out_clean, ((gsh_c, gw_c), gx_c)) = run(full), run(clean)
    assert_close(out, out_clean, rtol=1e-5, atol=1e-5)
    assert_close(gx[:6], gx_c[:6], rtol=2e-4, atol=2e-4)
    assert bool(jnp.all(gx[6] == 0))  # only dropped edges reach it
    for ours, expected in ((gsh, gsh_c), (gw, gw_c)):
        assert_close(ours[~dropped], expected, rtol=2e-4, atol=2e-4)
        assert bool(jnp.all(ours[dropped] == 0))
