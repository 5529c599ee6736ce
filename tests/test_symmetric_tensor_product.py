"""SymmetricTensorProduct: parity with e3nn-jax (shared and species-indexed), equivariance, errors."""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import as_transform, assert_close, check_pair, check_parity, transform

import e3kernels

KEY = jax.random.PRNGKey(0)

CASES = [  # irreps per channel, orders, keep_irrep_out
    ("0e + 1o + 2e", (1, 2, 3), "0e + 1o"),
    ("2x0e + 1o", (1, 2), None),
    ("0e + 1o", (3,), {e3nn.Irrep("0e")}),
    ("0e + 1o", (2, 4), "0e + 1o + 2e"),
    ("1o + 1e", (1, 2, 3), {"1o", "0e"}),
]


def with_backends(cases):
    """Every case on the reference; on "pallas" (interpret mode: 10-35 s per case on a 2-core
    CPU) only ``cases[1]``. test_kernel_symmetric_contraction.py checks every case's kernels
    against the reference and e3nn directly; here only the module's wiring to the backend is
    at stake."""
    return [("reference",) + c for c in cases] + [("pallas",) + cases[1]]


@pytest.mark.parametrize("backend, irreps, orders, keep", with_backends(CASES))
def test_shared_weights(irreps, orders, keep, backend):
    x = e3nn.normal(irreps, KEY, (5, 3))  # 5 rows, 3 channels
    # second order (the slowest part, mostly e3nn's) on one case per backend: the op's
    # second order is checked on every plan in test_reference_* and test_kernel_*
    second_order = backend == "pallas" or (irreps, orders, keep) == CASES[0]
    check_parity(lambda ns, **kw: ns.SymmetricTensorProduct(orders, keep, **kw), (x,), backend,
                 second_order=second_order)


@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_shared_weights_leading_axes(leading, backend="reference"):  # the module's reshapes
    x = e3nn.normal("0e + 1o", KEY, leading + (4,))
    check_parity(lambda ns, **kw: ns.SymmetricTensorProduct((1, 2, 3), "0e + 1o", **kw), (x,), backend,
                 second_order=False)


def e3nn_indexed(orders, keep, num):
    """Today's e3nn way: vmap over rows, a get_parameter gathering the row's weight set."""

    def f(i, x):
        def row(i_row, x_row):
            def get_parameter(name, shape, dtype):
                init = hk.initializers.RandomNormal()
                return hk.get_parameter(name, (num,) + shape, dtype, init)[i_row]

            return e3nn.haiku.SymmetricTensorProduct(orders, keep, get_parameter)(x_row)

        return hk.vmap(row, split_rng=False)(i, x)

    return f


@pytest.mark.parametrize("backend, irreps, orders, keep", with_backends(CASES[:3]))
def test_indexed_weights(irreps, orders, keep, backend):
    x = e3nn.normal(irreps, KEY, (6, 3))
    i = jnp.array([0, 2, 1, 2, 2, 0])
    ours = lambda i, x: e3kernels.haiku.SymmetricTensorProduct(
        orders, keep, num_indexed_weights=3, backend=backend)(i, x)
    check_pair(ours, e3nn_indexed(orders, keep, 3), (i, x),
               second_order=backend == "pallas" or (irreps, orders, keep) == CASES[1])


def test_zero_rows(backend):
    f = as_transform(lambda i, x: e3kernels.haiku.SymmetricTensorProduct(
        (1, 2), "0e", num_indexed_weights=2, backend=backend)(i, x))
    x, i = e3nn.normal("0e + 1o", KEY, (0, 3)), jnp.zeros((0,), jnp.int32)
    assert f.apply(f.init(KEY, i, x), i, x).shape == (0, 3, 1)


# On the reference only: both backends match e3nn (above), so equivariance is a property of
# the op, checked once; interpret mode would take a minute at this size.
@pytest.mark.parametrize("backend", ["reference"])
@pytest.mark.parametrize("indexed", [False, True])
def test_equivariance(indexed, backend):
    x = e3nn.normal("0e + 1o + 1e + 2e", KEY, (4, 3))
    i = jnp.array([0, 1, 1, 0])
    num = 2 if indexed else None
    f = as_transform(lambda *a: e3kernels.haiku.SymmetricTensorProduct(
        (1, 2, 3), "0e + 0o + 1o + 1e + 2e", num_indexed_weights=num, backend=backend)(*a))
    args = (lambda x: (i, x)) if indexed else (lambda x: (x,))
    params = f.init(KEY, *args(x))
    for parity in (False, True):
        angles = jax.random.uniform(jax.random.PRNGKey(parity + 5), (3,), maxval=6.28)
        after = transform(f.apply(params, *args(x)), angles, parity)
        before = f.apply(params, *args(transform(x, angles, parity)))
        assert_close(before, after, 1e-4, 1e-4)


# ---- bad input -------------------------------------------------------------------------


def _run(module, *args):
    f = as_transform(lambda *a: module()(*a))
    return f.apply(f.init(KEY, *args), *args)


@pytest.mark.parametrize("orders", [(0, 1), (-1,), (1.5,), ("2",), (), (True,), 3])
def test_error_bad_orders(orders):
    with pytest.raises(ValueError, match=r"orders must be a non-empty sequence of positive ints"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct(orders), e3nn.normal("0e", KEY, (2, 3)))


def test_error_too_few_axes():
    with pytest.raises(ValueError, match=r"at least 2 axes; got shape \(4,\)"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct((1, 2)), e3nn.normal("0e + 1o", KEY))


def test_error_call_form_and_keep():
    x = e3nn.normal("0e + 1o", KEY, (2, 3))
    with pytest.raises(ValueError, match=r"call as \(i, x\) exactly when num_indexed_weights"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct((1,), num_indexed_weights=2), x)
    with pytest.raises(ValueError, match=r"keep_irrep_out must list each irrep once"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct((1,), "2x0e"), x)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct((1,), backend="triton"), x)
    with pytest.raises(TypeError, match=r"x must be an e3nn.IrrepsArray of shape .*; got ArrayImpl"):
        _run(lambda: e3kernels.haiku.SymmetricTensorProduct((1,)), x.array)


def test_error_and_nan_for_out_of_range_indices(backend):
    module = lambda: e3kernels.haiku.SymmetricTensorProduct(
        (1, 2), num_indexed_weights=2, backend=backend)
    f = as_transform(lambda i, x: module()(i, x))
    x = e3nn.normal("0e + 1o", KEY, (3, 2))
    params = f.init(KEY, jnp.array([0, 1, 0]), x)
    with pytest.raises(ValueError, match=r"^SymmetricTensorProduct: indices \(the first argument\) "
                                         r"must lie in \[0, 2\).*got values in \[0, 2\]"):
        f.apply(params, jnp.array([0, 2, 1]), x)
    y = np.asarray(jax.jit(f.apply)(params, jnp.array([0, 2, -1]), x).array)
    assert np.all(np.isnan(y[1:])) and np.all(np.isfinite(y[0]))
