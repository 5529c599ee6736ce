"""Linear: parity with e3nn_jax.haiku.Linear in every call form, equivariance, errors."""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import as_transform, assert_close, check_parity, transform
from hypothesis import given, settings
from hypothesis import strategies as st

import e3kernels

KEY = jax.random.PRNGKey(0)


def normal(irreps, *shape, key=KEY):
    return e3nn.normal(irreps, key, shape)


# The (x) and (w, x) forms are e3nn-jax's own code (Linear calls super()): their parity checks
# stop at first order; the indexed form, our op, is checked to second order.
VANILLA_CASES = [
    dict(irreps_out="0e + 1o + 2e"),
    dict(irreps_out="3x0e + 2x1o", biases=True),
    dict(irreps_out="2x0e + 1o + 0e", simplify_irreps_internally=False),
    dict(irreps_out="0e + 1o + 2e", force_irreps_out=True),
    dict(irreps_out="4x0e + 2x1o", path_normalization="path", gradient_normalization="element"),
    dict(irreps_out="4x0e + 2x1o", path_normalization=0.3, gradient_normalization=0.7),
    dict(irreps_out="0e + 1o", parameter_initializer=lambda: hk.initializers.RandomUniform()),
    dict(irreps_out="0e + 1o", irreps_in="1o + 2x0e", name="my_linear"),
]


@pytest.mark.parametrize("kwargs", VANILLA_CASES)
def test_vanilla(kwargs):
    x = normal("1o + 2x0e", 3)
    check_parity(lambda ns, **kw: ns.Linear(**kwargs, **kw), (x,), "reference", second_order=False)


def test_vanilla_channel_out():
    x = normal("2x0e + 1o", 3, 4)  # 3 rows, 4 channels
    check_parity(lambda ns, **kw: ns.Linear("0e + 1o", channel_out=5, **kw), (x,), "reference",
                 second_order=False)


def test_vanilla_instructions():
    x = normal("0e + 1o + 0e", 3)
    build = lambda ns, **kw: ns.Linear(
        "2x0e + 1o", irreps_in="0e + 1o + 0e", instructions=[(0, 0), (2, 0), (1, 1)],
        simplify_irreps_internally=False, **kw)
    check_parity(build, (x,), "reference", second_order=False)


@pytest.mark.parametrize("per_channel", [False, True])
def test_external_weights(per_channel):
    if per_channel:
        x, w = normal("0e + 1o", 6, 3), jax.random.normal(KEY, (6, 4))
    else:
        x, w = normal("1o + 2x0e", 6), jax.random.normal(KEY, (6, 4))
    build = lambda ns, **kw: ns.Linear("2x0e + 1o", biases=True, weights_per_channel=per_channel, **kw)
    check_parity(build, (w, x), "reference", second_order=False)


def test_external_weights_broadcast():
    x, w = normal("1o + 2x0e", 1, 5), jax.random.normal(KEY, (3, 1, 2))
    check_parity(lambda ns, **kw: ns.Linear("0e + 1o", **kw), (w, x), "reference", second_order=False)


INDEXED_CASES = [
    dict(irreps_out="0e + 1o"),
    dict(irreps_out="3x0e + 2x1o + 2e", biases=True),
    dict(irreps_out="0e + 1o + 3o", force_irreps_out=True, biases=True),
    dict(irreps_out="2x0e + 1o", path_normalization="path", gradient_normalization=0.25),
    dict(irreps_out="0e + 1o", simplify_irreps_internally=False),
]


# The plan options are the same on every backend (the plan is built before dispatch), so
# pallas runs the first two cases; test_kernel_indexed_linear.py covers the kernels' plans.
INDEXED_PARAMS = [(kw, "reference") for kw in INDEXED_CASES] + [(kw, "pallas") for kw in INDEXED_CASES[:2]]


@pytest.mark.parametrize("kwargs, backend", INDEXED_PARAMS)
def test_indexed(kwargs, backend):
    x = normal("1o + 2x0e + 3x1o", 7)
    i = jnp.array([2, 3, 0, 3, 3, 1, 0])
    check_parity(lambda ns, **kw: ns.Linear(**kwargs, num_indexed_weights=4, **kw), (i, x), backend)


# Broadcasting, channels and instructions are the module's work before the op, the same for
# every backend (the backend is chosen inside the op): the reference runs them.
def test_indexed_broadcast_and_channels(backend="reference"):
    x = normal("2x0e + 1o", 2, 1)  # indices broadcast over the second axis
    i = jnp.array([[0, 1, 2, 1], [2, 2, 0, 1]])
    build = lambda ns, **kw: ns.Linear("0e + 1o", channel_out=2, num_indexed_weights=3, **kw)
    check_parity(build, (i, normal("2x0e + 1o", 2, 4, 3)), backend)
    check_parity(lambda ns, **kw: ns.Linear("0e + 1o", num_indexed_weights=3, **kw),
                 (i, x), backend)


def test_indexed_instructions(backend="reference"):
    x = normal("0e + 1o + 0e", 5)
    i = jnp.array([1, 0, 1, 1, 0])
    build = lambda ns, **kw: ns.Linear(
        "2x0e + 1o", irreps_in="0e + 1o + 0e", instructions=[(0, 0), (2, 0), (1, 1)],
        simplify_irreps_internally=False, num_indexed_weights=2, biases=True, **kw)
    check_parity(build, (i, x), backend)


IRREPS = st.lists(
    st.tuples(st.integers(1, 4), st.sampled_from(["0e", "0o", "1o", "1e", "2e", "3o"])),
    min_size=1, max_size=4,
).map(lambda items: e3nn.Irreps([(m, ir) for m, ir in items]))


@settings(max_examples=6, deadline=None)
@given(irreps_in=IRREPS, irreps_out=IRREPS, biases=st.booleans(), rows=st.integers(0, 6))
def test_indexed_random_irreps(irreps_in, irreps_out, biases, rows):
    x = normal(irreps_in, rows)
    i = jax.random.randint(KEY, (rows,), 0, 3)
    build = lambda ns, **kw: ns.Linear(irreps_out, biases=biases, num_indexed_weights=3, **kw)
    check_parity(build, (i, x), "reference", second_order=False)


def test_zero_rows(backend):
    x = normal("0e + 1o", 0)
    f = as_transform(lambda i, x: e3kernels.haiku.Linear("1o", num_indexed_weights=2,
                                                         backend=backend)(i, x))
    i = jnp.zeros((0,), jnp.int32)
    y = f.apply(f.init(KEY, i, x), i, x)
    assert y.shape == (0, 3)


@pytest.mark.parametrize("call, backend", [("vanilla", "reference"), ("mixed", "reference"),
                                           ("indexed", "reference"), ("indexed", "pallas")])
def test_equivariance(call, backend):  # only the indexed form runs a kernel
    irreps_in = e3nn.Irreps("2x0e + 1o + 1e + 2e + 3o")
    x = normal(irreps_in, 6)
    i = jnp.array([0, 1, 2, 0, 1, 2])
    w = jax.random.normal(KEY, (6, 3))
    module = lambda: e3kernels.haiku.Linear(
        "3x0e + 2x1o + 1e + 2e + 3o", biases=True, backend=backend,
        num_indexed_weights=3 if call == "indexed" else None)
    args = {"vanilla": lambda x: (x,), "indexed": lambda x: (i, x), "mixed": lambda x: (w, x)}[call]
    f = as_transform(lambda *a: module()(*a))
    params = f.init(KEY, *args(x))
    for parity in (False, True):
        angles = jax.random.uniform(jax.random.PRNGKey(parity + 1), (3,), maxval=6.28)
        rotate_after = transform(f.apply(params, *args(x)), angles, parity)
        rotate_before = f.apply(params, *args(transform(x, angles, parity)))
        assert_close(rotate_before, rotate_after, 1e-4, 1e-4)


# ---- bad input -------------------------------------------------------------------------


def _init(module, *args):
    f = as_transform(lambda *a: module()(*a))
    return f.init(KEY, *args)


def test_error_irreps_in_mismatch():
    with pytest.raises(ValueError, match=r"irreps 1x1o.*irreps_in=1x0e"):
        _init(lambda: e3kernels.haiku.Linear("0e", irreps_in="0e"), normal("1o", 2))


def test_error_instructions_need_exact_irreps_in():
    module = lambda: e3kernels.haiku.Linear("0e", irreps_in="0e + 0e", instructions=[(0, 0)],
                                            simplify_irreps_internally=False)
    with pytest.raises(ValueError, match=r"must equal irreps_in=1x0e\+1x0e"):
        _init(module, normal("2x0e", 2))


def test_error_int_weights_without_num_indexed_weights():
    with pytest.raises(TypeError, match=r"dtype int32 and num_indexed_weights=None"):
        _init(lambda: e3kernels.haiku.Linear("0e"), jnp.array([0, 1]), normal("0e", 2))


def test_error_float_weights_with_num_indexed_weights():
    with pytest.raises(TypeError, match=r"dtype float32 and num_indexed_weights=3"):
        _init(lambda: e3kernels.haiku.Linear("0e", num_indexed_weights=3),
              jnp.ones((2, 4)), normal("0e", 2))


def test_error_concrete_index_out_of_range():
    f = as_transform(lambda i, x: e3kernels.haiku.Linear("0e", num_indexed_weights=3)(i, x))
    x = normal("0e", 3)
    params = f.init(KEY, jnp.array([0, 1, 2]), x)
    with pytest.raises(ValueError, match=r"^Linear: indices \(the first argument\) must lie in \[0, 3\)"
                                         r".*got values in \[0, 3\]"):
        f.apply(params, jnp.array([0, 3, 1]), x)
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        f.apply(params, jnp.array([0, -1, 1]), x)


def test_traced_index_out_of_range_gives_nan_rows(backend):
    f = as_transform(lambda i, x: e3kernels.haiku.Linear(
        "2x0e + 1o", num_indexed_weights=3, biases=True, backend=backend)(i, x))
    x = normal("0e + 1o", 4)
    params = f.init(KEY, jnp.array([0, 1, 2, 0]), x)
    y = np.asarray(jax.jit(f.apply)(params, jnp.array([0, 3, -1, 2]), x).array)
    assert np.all(np.isnan(y[1:3])) and np.all(np.isfinite(y[[0, 3]]))


def test_error_bad_backend_and_num_indexed_weights():
    x = normal("0e", 2)
    with pytest.raises(ValueError, match=r"expected one of 'auto', 'reference', 'pallas'; got 'gpu'"):
        _init(lambda: e3kernels.haiku.Linear("0e", backend="gpu"), x)
    with pytest.raises(ValueError, match=r"num_indexed_weights must be a positive int or None; got 0"):
        _init(lambda: e3kernels.haiku.Linear("0e", num_indexed_weights=0), x)
