"""Shared test helpers: e3nn-jax is the oracle."""

from __future__ import annotations

import os

# Four virtual CPU devices for the multi-device tests (set before JAX starts its backends;
# single-device tests run on the first one, as before).
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
    _FLAGS = f"{_FLAGS} --xla_force_host_platform_device_count=4"
# The suite mostly compiles small programs once: LLVM's optimisation of the CPU code (not
# XLA's HLO passes, which the HLO assertions read) takes a fifth of the suite's time and
# buys nothing for programs run a few times. Set the flag yourself to test at -O3.
if "xla_backend_optimization_level" not in _FLAGS:
    _FLAGS = f"{_FLAGS} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _FLAGS.strip()

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core as jax_core

from e3kernels import dispatch

# tests/gpu run the kernels for real on a CUDA GPU, through `make gpu-check`; CI has no GPU
collect_ignore = [] if os.environ.get("E3KERNELS_GPU_TESTS") else ["gpu"]

# float32 round-off on O(1) values, through a few matmuls
RTOL, ATOL = 2e-5, 2e-5


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    actual = actual.array if isinstance(actual, e3nn.IrrepsArray) else actual
    expected = expected.array if isinstance(expected, e3nn.IrrepsArray) else expected
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol,
                               err_msg=what)


def assert_rounded_once(actual, expected_float32, what=""):
    """``actual`` (bfloat16/float16) is ``expected_float32`` (the op in float32 on the same
    rounded inputs) rounded once to ``actual``'s dtype: each element within half an ulp,
    ``eps / 2`` relative (bfloat16 3.9e-3, float16 4.9e-4), plus float32 round-off of the
    largest element. An op that sums in 16 bits is several roundings off and fails."""
    actual = actual.array if isinstance(actual, e3nn.IrrepsArray) else actual
    dtype = jnp.dtype(actual.dtype)
    assert dtype in (jnp.bfloat16, jnp.float16), dtype
    expected = np.asarray(expected_float32, np.float32)
    half_ulp = float(jnp.finfo(dtype).eps) / 2
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=half_ulp,
                               atol=1e-5 * float(np.max(np.abs(expected))), err_msg=what)


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Same structure (names), shapes, dtypes and values."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree_util.tree_leaves(expected)):
        name = jax.tree_util.keystr(path)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert_close(a, b, rtol, atol, what=name)


def assert_results_close(actual, expected, rtol=RTOL, atol=ATOL):
    """:func:`assert_trees_close` per key of ``{"out", "grad", "second"}`` results, 10x
    looser under ``"second"`` (second-order gradients go through several more matmuls)."""
    assert actual.keys() == expected.keys(), (actual.keys(), expected.keys())
    for key in actual:
        scale = 10 if key == "second" else 1
        assert_trees_close(actual[key], expected[key], scale * rtol, scale * atol)


def random_rotation(key):
    """A random rotation and whether to apply parity, as e3nn transform arguments."""
    angles = jax.random.uniform(key, (3,), minval=0.0, maxval=2 * np.pi)
    return angles


def transform(x: e3nn.IrrepsArray, angles, parity: bool) -> e3nn.IrrepsArray:
    return x.transform_by_angles(*angles, k=int(parity))


def compare_transforms(ours, theirs, *args, rng=None, states=False):
    """Init both transforms with one key; check params (and state) match, return both outputs."""
    key = jax.random.PRNGKey(7)
    if states:
        p_ours, s_ours = ours.init(key, *args)
        p_theirs, s_theirs = theirs.init(key, *args)
        assert_trees_close(s_ours, s_theirs)
    else:
        p_ours, p_theirs = ours.init(key, *args), theirs.init(key, *args)
    assert_trees_close(p_ours, p_theirs)
    return p_ours


@pytest.fixture(autouse=True)
def lowering_gpu_target():
    """Tests lower for CUDA on hosts without a GPU: name one, as users must on JAX >= 0.11
    (``e3kernels.gpu_target``; test_backend.py checks the error without it)."""
    import e3kernels

    with e3kernels.gpu_target("NVIDIA H100"):
        yield


def lowered_text(fn, platform, *args) -> str:
    """``fn`` lowered for ``platform`` as text. Kernels lowered directly (not through an op)
    for CUDA on a host without a GPU get an abstract one, as JAX >= 0.11 needs."""
    from e3kernels import dispatch

    lower = lambda: jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    if platform != "cuda" or jax.devices()[0].platform == "gpu":
        return lower()
    with jax.sharding.use_abstract_mesh(dispatch.abstract_gpu_mesh("NVIDIA H100")):
        return lower()


@pytest.fixture(params=["reference", "pallas"])
def backend(request):
    """The backends the parity tests of kernel-backed calls run on ("pallas": the kernels in
    interpret mode, on CPU)."""
    return request.param


def as_transform(fn):
    return hk.without_apply_rng(hk.transform(fn))


def tree_sum_squares(tree):
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def check_parity(build, args, backend, **kwargs):
    """Check a module against e3nn-jax's (see :func:`check_pair`).

    ``build(namespace, **kwargs)`` returns the module call; it is given ``e3nn_jax.haiku``
    for the oracle and ``e3kernels.haiku`` with ``backend=backend`` for ours.
    """
    import e3kernels

    return check_pair(lambda *a: build(e3kernels.haiku, backend=backend)(*a),
                      lambda *a: build(e3nn.haiku)(*a), args, **kwargs)


def check_pair(ours_fn, theirs_fn, args, x_argnum=-1, second_order=True, rtol=RTOL, atol=ATOL):
    """Params, outputs, gradients and second-order gradients of ours vs e3nn-jax's.

    ``args`` are the call arguments; ``x_argnum`` is the float input differentiated against.
    """
    ours, theirs = as_transform(ours_fn), as_transform(theirs_fn)
    params = compare_transforms(ours, theirs, *args)
    x_argnum = x_argnum % len(args)

    out_ours, out_theirs = jax.jit(ours.apply)(params, *args), jax.jit(theirs.apply)(params, *args)
    assert type(out_ours) is type(out_theirs)
    if isinstance(out_theirs, e3nn.IrrepsArray):
        assert out_ours.irreps == out_theirs.irreps
    assert out_ours.shape == out_theirs.shape and out_ours.dtype == out_theirs.dtype
    assert_close(out_ours, out_theirs, rtol, atol, "output")

    cotangent = jax.random.normal(jax.random.PRNGKey(3), out_theirs.shape, out_theirs.dtype)

    def loss(transformed):
        def f(params, x):
            a = list(args)
            a[x_argnum] = x
            out = transformed.apply(params, *a)
            out = out.array if isinstance(out, e3nn.IrrepsArray) else out
            return jnp.sum(out * cotangent) + 0.1 * jnp.sum(out**2)
        return f

    x = args[x_argnum]
    grads_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    grads_theirs = jax.jit(jax.grad(loss(theirs), argnums=(0, 1)))(params, x)
    assert_trees_close(grads_ours, grads_theirs, rtol, atol)

    if second_order:  # force training: differentiate a function of the input gradient
        def second(transformed):
            def g(params, x):
                gx = jax.grad(loss(transformed), argnums=1)(params, x)
                return tree_sum_squares(gx)
            return g

        gg_ours = jax.jit(jax.grad(second(ours), argnums=(0, 1)))(params, x)
        gg_theirs = jax.jit(jax.grad(second(theirs), argnums=(0, 1)))(params, x)
        assert_trees_close(gg_ours, gg_theirs, 10 * rtol, 10 * atol)
    return params


def shapes_outside_the_op(fn, *args):
    """The shapes of the intermediates of ``fn``'s program, nested programs included, but
    those inside the op (its ``e3kernels_call`` equations)."""
    shapes = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is dispatch.call_p:
                continue
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes
