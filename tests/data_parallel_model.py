"""A small MACE-style block of the Haiku modules, trained on energy and forces: the
data-parallel step that test_multi_device.py runs on 4 devices and
test_multi_process.py on 2 processes."""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

import e3kernels

SPECIES, CHANNELS, ROWS = 3, 4, 32


def _energy(species, positions):
    sh = e3nn.spherical_harmonics("0e + 1o", positions, normalize=False)
    embed = hk.get_parameter("embed", (SPECIES, CHANNELS), init=hk.initializers.RandomNormal())
    h = e3nn.IrrepsArray(sh.irreps, embed[species][:, :, None] * sh.array[:, None, :]).axis_to_mul()
    h = e3kernels.haiku.Linear(h.irreps, num_indexed_weights=SPECIES)(species, h)
    h = e3kernels.haiku.SymmetricTensorProduct((1, 2), "0e + 1o", num_indexed_weights=SPECIES)(
        species, h.mul_to_axis(CHANNELS))
    h = e3kernels.haiku.Linear("4x0e")(h.axis_to_mul())
    out = e3kernels.haiku.MultiLayerPerceptron([4, 1], jax.nn.silu, output_activation=False)(h)
    return jnp.sum(out.array)


MODEL = hk.without_apply_rng(hk.transform(_energy))


def inputs():
    """``(params, species, positions, force_projection)``, the same in every process."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    positions = jax.random.normal(keys[0], (ROWS, 3))
    species = jax.random.randint(keys[1], (ROWS,), 0, SPECIES)
    projection = jax.random.normal(keys[2], (ROWS, 3))
    return MODEL.init(jax.random.PRNGKey(1), species, positions), species, positions, projection


def loss(params, species, positions, projection):
    """Energy and forces with fixed random weights: its gradient is second order."""
    energy, grad = jax.value_and_grad(MODEL.apply, argnums=2)(params, species, positions)
    return 0.1 * energy + jnp.sum(projection * grad)


#: one training step's loss and parameter gradients
step = jax.jit(jax.value_and_grad(loss))
