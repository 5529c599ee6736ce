"""equivariant_convolution's Triton kernels run for real on a CUDA GPU (``make gpu-check``; not CI).

Each partial of the multilinear form against the reference's, at an odd size and at MACE's
second interaction (4000 nodes, 120000 edges, 128 channels, l <= 3), the force-training
gradient against the reference, bf16; the same for fused radial weights (64 hidden units).
The reference's tensor product has no matmul at default precision (its einsums run at
``HIGHEST``); the fused radial matmul follows the op's ``precision``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from test_convolution import force_training_loss

from e3kernels import ops
from e3kernels.kernels import equivariant_convolution as kernels
from e3kernels.reference import equivariant_convolution as reference

pytestmark = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu",
    reason=f"needs a CUDA GPU; the default JAX device is {jax.devices()[0].platform}",
)

MACE = ops.convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")
SIZES = {  # nodes, edges, channels
    "odd": (333, 7001, 37),
    "mace": (4000, 120000, 128),
}


def graph(nodes, edges, channels, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((nodes, channels, MACE.dim_in)), jnp.float32)
    sh = jnp.asarray(rng.standard_normal((edges, MACE.dim_sh)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((edges, MACE.num_paths, channels)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((nodes, channels, MACE.dim_out)), jnp.float32)
    senders = jnp.asarray(rng.integers(0, nodes, edges), jnp.int32)
    receivers = jnp.asarray(np.sort(rng.integers(0, nodes, edges)), jnp.int32)[rng.permutation(edges)]
    return x, sh, w, g, senders, receivers


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("which", ["x", "sh", "weights", "out"])
def test_partials_match_the_reference(size, which):
    nodes, edges, channels = SIZES[size]
    x, sh, w, g, senders, receivers = graph(nodes, edges, channels)
    k = ("x", "sh", "weights", "out").index(which)
    assert_partial_matches(k, [x, sh, w, g], senders, receivers, nodes)


def assert_partial_matches(which: int, args: list, senders, receivers, nodes, precision=None):
    """The Triton kernels' partial ``which`` of the form at ``args`` against the reference's."""
    args[which] = None
    args = tuple(args)
    partials_kernel = kernels.KernelPartials(MACE, kernels.TRITON, precision)
    partials_reference = reference.ReferencePartials(MACE, precision)
    ours = jax.jit(lambda a, s, r: partials_kernel(which, jnp.float32, a, s, r, nodes))
    theirs = jax.jit(lambda a, s, r: partials_reference(which, jnp.float32, a, s, r, nodes))
    got, expected = ours(args, senders, receivers), theirs(args, senders, receivers)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5 * scale)


def test_force_training_gradient_at_mace_size():
    x, sh, w, _, senders, receivers = graph(*SIZES["mace"])
    projection = jax.random.normal(jax.random.PRNGKey(1), (x.shape[0], x.shape[1], MACE.dim_out))

    def op(backend):
        def f(x, params, edges):
            return ops.equivariant_convolution(x, *params, *edges, MACE, avg_num_neighbors=30.0,
                                               backend=backend)

        return jax.jit(jax.grad(force_training_loss(f, (senders, receivers), projection), argnums=(0, 1)))

    ours, theirs = op("pallas"), op("reference")
    assert_trees_close(ours((sh, w), x), theirs((sh, w), x), rtol=1e-3, atol=1e-3)


def test_bfloat16():
    x, sh, w, _, senders, receivers = graph(*SIZES["odd"])
    f = lambda *a: ops.equivariant_convolution(*a, MACE, backend="pallas")
    x, sh, w = (a.astype(jnp.bfloat16) for a in (x, sh, w))
    out = jax.jit(f)(x, sh, w, senders, receivers)
    expected = jax.jit(lambda *a: ops.equivariant_convolution(*a, MACE, backend="reference"))(
        *(a.astype(jnp.float32) for a in (x, sh, w)), senders, receivers)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), rtol=2e-2, atol=2e-2)


# ---- fused radial weights ----------------------------------------------------------------------

HIDDEN = 64  # MACE's radial MLP [64, 64, 64]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("which", ["x", "sh", "hidden", "out", "matrix"])
def test_fused_partials_match_the_reference(size, which):
    """The five partials of the fused form, the weights formed per tile on tensor cores
    (at ``HIGHEST``, IEEE float32 dots, to compare closely)."""
    nodes, edges, channels = SIZES[size]
    x, sh, _, g, senders, receivers = graph(nodes, edges, channels)
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((edges, HIDDEN)), jnp.float32)
    matrix = jnp.asarray(rng.standard_normal((HIDDEN, MACE.num_paths, channels)) / 8, jnp.float32)
    k = ("x", "sh", "hidden", "out", "matrix").index(which)
    assert_partial_matches(k, [x, sh, h, g, matrix], senders, receivers, nodes, jax.lax.Precision.HIGHEST)


def test_fused_force_training_gradient_at_mace_size():
    """RadialWeights through the op, pallas against the reference, at the default (TF32)
    precision of the radial matmul: the training gradient in x, sh, hidden and matrix."""
    x, sh, _, _, senders, receivers = graph(*SIZES["mace"])
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.standard_normal((sh.shape[0], HIDDEN)), jnp.float32)
    matrix = jnp.asarray(rng.standard_normal((HIDDEN, MACE.num_paths * x.shape[1])) / 8, jnp.float32)
    projection = jax.random.normal(jax.random.PRNGKey(1), (x.shape[0], x.shape[1], MACE.dim_out))

    def loss(backend):
        def f(x, sh, h, matrix):
            def energy(x, sh):
                weights = ops.RadialWeights(h, matrix)
                out = ops.equivariant_convolution(x, sh, weights, senders, receivers, MACE,
                                                  avg_num_neighbors=30.0, backend=backend)
                return jnp.sum(projection * out)

            gx, gsh = jax.grad(energy, argnums=(0, 1))(x, sh)
            return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gsh))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    got, expected = loss("pallas")(x, sh, h, matrix), loss("reference")(x, sh, h, matrix)
    assert_trees_close(got, expected, rtol=2e-2, atol=2e-2)
