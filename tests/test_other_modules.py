"""MultiLayerPerceptron, BatchNorm, Dropout: identical to e3nn-jax's, plus clear errors."""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, assert_trees_close, check_parity

import e3kernels

KEY = jax.random.PRNGKey(0)


@pytest.fixture
def backend():
    """These modules have no kernels; their ``backend=`` is validated and passed on, so one
    non-default name checks that it changes nothing."""
    return "pallas"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(with_bias=True, gradient_normalization="element"),
        dict(output_activation=False, gradient_normalization=0.5),
        dict(output_activation=jnp.tanh, name="mlp"),
    ],
)
@pytest.mark.parametrize("irreps_array", [False, True])
def test_mlp(kwargs, irreps_array, backend):
    x = jax.random.normal(KEY, (5, 4))
    if irreps_array:
        x = e3nn.IrrepsArray("4x0e", x)
    build = lambda ns, **kw: ns.MultiLayerPerceptron([8, 3], jax.nn.silu, **kwargs, **kw)
    check_parity(build, (x,), backend)


BN_CASES = [
    dict(),
    dict(affine=False, reduce="max", normalization="norm"),
    dict(instance=True),
    dict(instance=True, affine=False, normalization="component", reduce="max"),
    dict(irreps="2x0e + 1o + 2e", momentum=0.3, eps=1e-3),
]


@pytest.mark.parametrize("kwargs", BN_CASES)
def test_batch_norm(kwargs, backend):
    x = e3nn.normal("2x0e + 1o + 2e", KEY, (6, 2)) * 3.0
    x = x + e3nn.IrrepsArray("2x0e + 1o + 2e", jnp.concatenate([jnp.ones(2), jnp.zeros(8)]))

    def make(ns, **kw):
        return hk.transform_with_state(lambda x, t: ns.BatchNorm(**kwargs, **kw)(x, t))

    ours, theirs = make(e3kernels.haiku, backend=backend), make(e3nn.haiku)
    params, state = ours.init(KEY, x, True)
    p2, s2 = theirs.init(KEY, x, True)
    assert_trees_close((params, state), (p2, s2))
    for is_training in (True, False, True):  # statistics update, then are used, then update
        (y, state), (y2, s2) = (
            ours.apply(params, state, None, x, is_training),
            theirs.apply(params, s2, None, x, is_training),
        )
        assert y.irreps == y2.irreps
        assert_close(y, y2)
        assert_trees_close(state, s2)

    grad = lambda t: jax.grad(lambda p, x: jnp.sum(t.apply(p, state, None, x, True)[0].array ** 3),
                              argnums=(0, 1))(params, x)
    assert_trees_close(grad(ours), grad(theirs), 1e-4, 1e-4)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("is_training", [True, False])
def test_dropout(p, is_training, backend):
    x = e3nn.normal("2x0e + 3x1o", KEY, (4, 2))

    def make(ns, **kw):
        return hk.transform(lambda x: ns.Dropout(p, **kw)(hk.next_rng_key(), x, is_training))

    ours, theirs = make(e3kernels.haiku, backend=backend), make(e3nn.haiku)
    y, y2 = ours.apply({}, KEY, x), theirs.apply({}, KEY, x)
    assert y.irreps == y2.irreps and y.zero_flags == y2.zero_flags
    assert_close(y, y2, 0, 0)


def test_dropout_is_equivariant():
    """The mask acts per irrep, so rotating before or after gives the same result."""
    x = e3nn.normal("2x0e + 3x1o + 2e", KEY, (4,))
    f = hk.transform(lambda x: e3kernels.haiku.Dropout(0.5)(hk.next_rng_key(), x))
    angles = jnp.array([0.3, 1.2, -0.7])
    for parity in (0, 1):
        a = f.apply({}, KEY, x.transform_by_angles(*angles, k=parity))
        b = f.apply({}, KEY, x).transform_by_angles(*angles, k=parity)
        assert_close(a, b, 1e-5, 1e-5)


def _make(module):
    return hk.transform_with_state(lambda *a: module()(*a))


@pytest.mark.parametrize(
    "module, error, match",
    [
        (lambda: e3kernels.haiku.BatchNorm(reduce="sum"), ValueError,
         r"reduce must be 'mean' or 'max'; got 'sum'"),
        (lambda: e3kernels.haiku.BatchNorm(normalization="l2"), ValueError,
         r"normalization must be 'norm', 'component' or None; got 'l2'"),
        (lambda: e3kernels.haiku.BatchNorm(backend="cpu"), ValueError, r"backend: expected one of"),
        (lambda: e3kernels.haiku.Dropout(1.5), ValueError,
         r"p must be a probability in \[0, 1\]; got 1.5"),
        (lambda: e3kernels.haiku.MultiLayerPerceptron([4, 0], jax.nn.relu), ValueError,
         r"list_neurons must be positive ints; got \[4, 0\]"),
        (lambda: e3kernels.haiku.MultiLayerPerceptron([4], jax.nn.relu, output_activation="relu"),
         TypeError, r"output_activation must be a bool or a callable"),
    ],
)
def test_errors(module, error, match):
    with pytest.raises(error, match=match):
        _make(module).init(KEY, e3nn.normal("0e", KEY, (3,)))


def test_mlp_rejects_non_scalars():
    with pytest.raises(ValueError, match="scalar"):
        _make(lambda: e3kernels.haiku.MultiLayerPerceptron([4], None)).init(
            KEY, e3nn.normal("1o", KEY, (3,)))


@pytest.mark.parametrize("is_training", [True, False])
def test_batch_norm_is_equivariant(is_training):
    x = e3nn.normal("2x0e + 1o + 2e + 0o", KEY, (8, 3))
    bn = hk.transform_with_state(lambda x: e3kernels.haiku.BatchNorm(instance=False)(x, is_training))
    params, state = bn.init(None, x)
    angles = jnp.array([0.4, -1.1, 2.3])
    for parity in (0, 1):
        a, _ = bn.apply(params, state, None, x.transform_by_angles(*angles, k=parity))
        b = bn.apply(params, state, None, x)[0].transform_by_angles(*angles, k=parity)
        assert_close(a, b, 1e-4, 1e-4)
