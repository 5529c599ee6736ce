"""The reference symmetric contraction (the term loop of ``reference.sparse_polynomial``)
against a direct dense contraction with ``plan.basis``, values and derivatives, under jit,
and the size of its programs: constant in the term count and the derivative order.

(Parity of the whole module with e3nn-jax is in test_symmetric_tensor_product.py.)
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from e3kernels import spec
from e3kernels.irreps import symmetric_plan
from e3kernels.reference import symmetric_contraction as ref
from e3kernels.symmetric_terms import symmetric_terms

PLANS = [  # irreps per channel, orders, keep
    ("0e + 1o + 2e", (1, 2, 3), "0e + 1o"),
    ("0e + 1o", (2, 4), "0e + 1o + 2e"),
    ("2x0e + 1o", (1, 2), None),
    ("1o + 1e", (1, 2, 3), "0e + 1o"),
]


def plan_of(irreps, orders, keep):
    keep = None if keep is None else frozenset(ir for _, ir in e3nn.Irreps(keep))
    return symmetric_plan(e3nn.Irreps(irreps), orders, keep)


def dense(x, weights, indices, plan):
    """The definition (``e3kernels.spec``): the dense basis contracted ``order`` times."""
    return spec.symmetric_contraction(x, weights, plan, indices)


def contraction(x, weights, indices, plan):
    return ref.symmetric_contraction(x, weights, indices, plan=plan)


def inputs(plan, n=6, c=3, num=3, indexed=True, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(plan.paths) + 1)
    x = jax.random.normal(keys[0], (n, c, plan.dim_in))
    lead = (num,) if indexed else ()
    weights = [jax.random.normal(k, lead + (p.mul, c)) for k, p in zip(keys[1:], plan.paths)]
    indices = jnp.arange(n) % num if indexed else None
    return x, weights, indices


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("irreps, orders, keep", PLANS)
def test_matches_dense(irreps, orders, keep, indexed):
    plan = plan_of(irreps, orders, keep)
    x, weights, indices = inputs(plan, indexed=indexed)
    f = jax.jit(contraction, static_argnums=3)
    out = f(x, weights, indices, plan)
    assert out.shape == (6, 3, plan.dim_out) and out.dtype == x.dtype
    assert_close(out, dense(x, weights, indices, plan), rtol=1e-5, atol=1e-5)


def test_out_of_range_rows_are_nan():
    plan = plan_of(*PLANS[0])
    x, weights, _ = inputs(plan, n=5, num=3)
    indices = jnp.array([0, 3, -1, 2, 7])
    out = jax.jit(contraction, static_argnums=3)(x, weights, indices, plan)
    bad = np.array([False, True, True, False, True])
    assert np.isnan(np.asarray(out[bad])).all()
    good = jnp.array([0, 0, 0, 2, 0])
    assert_close(out[~bad], dense(x, weights, good, plan)[~bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, c", [(0, 3), (4, 0), (0, 0)])
def test_empty(n, c):
    plan = plan_of(*PLANS[0])
    for indexed in (True, False):
        x, weights, indices = inputs(plan, n=n, c=c, indexed=indexed)
        out = jax.jit(contraction, static_argnums=3)(x, weights, indices, plan)
        assert out.shape == (n, c, plan.dim_out)


def test_output_has_the_dtype_of_x():
    """Computed in the promoted dtype (here float32), returned in ``x``'s."""
    plan = plan_of(*PLANS[0])
    x, weights, indices = inputs(plan)
    out = jax.jit(contraction, static_argnums=3)(x.astype(jnp.bfloat16), weights, indices, plan)
    assert out.dtype == jnp.bfloat16
    expected = dense(x.astype(jnp.bfloat16).astype(jnp.float32), weights, indices, plan)
    assert_close(out.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


def force_loss(f, plan):
    """An energy-and-forces style loss: its gradient is a second-order derivative of ``f``."""

    def loss(weights, x, indices):
        energy = lambda x: jnp.sum(f(x, weights, indices, plan) ** 2)
        e, forces = jax.value_and_grad(energy)(x)
        return e + jnp.sum(jnp.sin(x) * forces)

    return loss


@pytest.mark.parametrize("plan_args, indexed", [(PLANS[0], True), (PLANS[0], False), (PLANS[1], True)])
def test_gradients(plan_args, indexed):
    """First and second order gradients match autodiff of the dense form."""
    plan = plan_of(*plan_args)
    x, weights, indices = inputs(plan, n=5, indexed=indexed)

    def gradients(f):
        first = lambda w, x, i: jnp.sum(jnp.cos(f(x, w, i, plan)))
        second = force_loss(f, plan)
        return jax.grad(first, argnums=(0, 1))(weights, x, indices), jax.grad(second, argnums=(0, 1))(
            weights, x, indices
        )

    expected = jax.tree.leaves(jax.jit(gradients, static_argnums=0)(dense))
    got = jax.tree.leaves(jax.jit(gradients, static_argnums=0)(contraction))
    for a, b in zip(got, expected):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


def optimized_size(fn, *args) -> int:
    """Instructions of ``fn``'s optimized HLO: what XLA compiles, machine-independent."""
    text = jax.jit(fn).trace(*args).lower().compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


def test_program_size_grows_with_neither_terms_nor_order():
    """The forward, gradient and force-style second order of a 94-term plan (keep ``0e``)
    and of a 7,824-term plan (keep every irrep) compile to programs within 1.5x of each
    other (the larger has more paths, hence more weights and outputs; measured 1.2-1.33x on
    JAX 0.10 and 0.12): term lists are data, and every derivative is the same evaluator
    with another list."""

    def programs(plan):
        x, weights, indices = inputs(plan, n=8, c=2)
        first = lambda w, x: jnp.sum(jnp.cos(contraction(x, w, indices, plan)))
        second = lambda w, x: force_loss(contraction, plan)(w, x, indices)
        orders = (first, jax.grad(first, (0, 1)), jax.grad(second, (0, 1)))
        return [optimized_size(f, weights, x) for f in orders]

    sizes = {}
    for keep in ("0e", None):
        plan = plan_of("0e + 1o + 2e + 3o", (1, 2, 3), keep)
        sizes[len(symmetric_terms(plan).polynomial.terms)] = programs(plan)
    (small, small_sizes), (large, large_sizes) = sorted(sizes.items())
    assert large > 50 * small, sizes
    for a, b in zip(small_sizes, large_sizes):
        assert b <= 1.5 * a, sizes
    forward, first, second = large_sizes
    assert second < 4 * forward, sizes
