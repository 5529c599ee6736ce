"""One exception type per kind of mistake, across ops, plans and modules: a wrong dtype is
a ``TypeError``, a wrong value or shape a ``ValueError``; each names the op or module and
the argument."""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import e3kernels
from e3kernels import ops

FLOAT_INDICES = jnp.array([0.0, 1.0, 2.0, 0.0])


def _init(module_fn, *args):
    return hk.without_apply_rng(hk.transform(module_fn)).init(jax.random.PRNGKey(0), *args)


def test_float_indices_are_a_type_error_everywhere():
    """(The Linear's own case is in test_linear.py: test_error_float_weights_with_num_indexed_weights.)"""
    xs = e3nn.normal("0e + 1o", jax.random.PRNGKey(0), (4, 3))
    with pytest.raises(TypeError, match=r"SymmetricTensorProduct: indices \(the first argument\) must be"):
        _init(lambda i, x: e3kernels.haiku.SymmetricTensorProduct((1, 2), num_indexed_weights=3)(i, x),
              FLOAT_INDICES, xs)
    linear = ops.linear_plan("0e + 1o", "0e")
    with pytest.raises(TypeError, match="indexed_linear: indices must have an integer dtype; got float32"):
        ops.indexed_linear(jnp.ones((4, 4)), [jnp.ones((3, 1, 1))], FLOAT_INDICES, linear)
    plan = ops.symmetric_contraction_plan("0e + 1o", (1, 2))
    weights = [jnp.ones((3, p.mul, 3)) for p in plan.paths]
    with pytest.raises(TypeError, match="symmetric_contraction: indices must have an integer dtype"):
        ops.symmetric_contraction(xs.array, weights, plan, indices=FLOAT_INDICES)
    conv = ops.convolution_plan("0e", "0e", "0e")
    with pytest.raises(TypeError, match="equivariant_convolution: receivers must have an integer dtype"):
        ops.equivariant_convolution(jnp.ones((3, 2, 1)), jnp.ones((2, 1)), jnp.ones((2, 1, 2)),
                                    jnp.array([0, 1]), jnp.array([0.0, 1.0]), conv)


@pytest.mark.parametrize("keep", ["2x0e", "0e + 2x1o"])
def test_plan_refuses_what_the_module_refuses(keep):
    """``keep_irrep_out`` lists irreps without multiplicity, for the plan as for the module."""
    message = "keep_irrep_out must list each irrep once"
    with pytest.raises(ValueError, match=f"symmetric_contraction_plan: {message}"):
        ops.symmetric_contraction_plan("0e + 1o", (1, 2), keep_irrep_out=keep)
    x = e3nn.normal("0e + 1o", jax.random.PRNGKey(0), (4, 3))
    with pytest.raises(ValueError, match=f"SymmetricTensorProduct: {message}"):
        _init(lambda x: e3kernels.haiku.SymmetricTensorProduct((1, 2), keep)(x), x)
    with pytest.raises(ValueError, match="symmetric_contraction_plan: orders must be a non-empty sequence"):
        ops.symmetric_contraction_plan("0e + 1o", ())


def test_plan_takes_input_irreps_with_multiplicities_as_the_module_does():
    """e3nn's module (and ours) accept ``2x0e`` per channel: so does the plan."""
    plan = ops.symmetric_contraction_plan("2x0e", (1, 2))
    x = e3nn.normal("2x0e", jax.random.PRNGKey(0), (4, 3))
    params = _init(lambda x: e3kernels.haiku.SymmetricTensorProduct((1, 2))(x), x)
    shapes = {name: p.shape for name, p in params["symmetric_tensor_product"].items()}
    assert shapes == {p.parameter_name: (p.mul, 3) for p in plan.paths}
