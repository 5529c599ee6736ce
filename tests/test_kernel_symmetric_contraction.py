"""symmetric_contraction kernels on CPU: both interpret styles against the reference and e3nn-jax,
and lowering for CUDA (Triton) and TPU (Mosaic).

Interpret mode compiles the unrolled kernels as XLA CPU code, so shapes stay small and the
functions compile with XLA's cheap CPU pipeline (the numbers do not depend on it). Row
tiles of 8 rows make a few rows span several tiles; one test uses the default tiles. Oracle values are
computed once per case for both styles.
"""

from __future__ import annotations

import dataclasses
import functools

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rounded_once, lowered_text
from test_symmetric_tensor_product import e3nn_indexed

from e3kernels import backend, ops, spec
from e3kernels.irreps import symmetric_plan
from e3kernels.kernels import symmetric_contraction as kernels
from e3kernels.reference.symmetric_contraction import symmetric_contraction as reference
from e3kernels.symmetric_terms import symmetric_terms

STYLES = {
    "triton": dataclasses.replace(kernels.TRITON_INTERPRET, tile_rows=8),
    "mosaic": dataclasses.replace(kernels.MOSAIC_INTERPRET, tile_rows=8),
}
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Case:
    irreps: str
    orders: tuple[int, ...]
    keep: str | None
    rows: int
    channels: int
    num_indexed: int | None  # None: shared weights

    @property
    def plan(self):
        keep = None if self.keep is None else frozenset(ir for _, ir in e3nn.Irreps(self.keep))
        return symmetric_plan(e3nn.Irreps(self.irreps), self.orders, keep)


CASES = [
    Case("0e + 1o + 2e", (1, 2, 3), "0e + 1o", 19, 3, 3),
    Case("2x0e + 1o", (1, 2), None, 9, 100, None),
    Case("0e + 1o", (2, 4), "0e + 1o + 2e", 11, 5, 2),
    Case("1o + 1e", (1, 2, 3), "0e + 1o", 10, 2, None),
]
SMALL = Case("0e + 1o", (1, 2, 3), "0e + 1o", 30, 3, 3)  # groups span several 8-row tiles
MACE_M = Case("0e + 1o + 2e + 3o", (1, 2, 3), "0e + 1o", 4000, 128, 10)


def inputs(case: Case, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 + len(case.plan.paths))
    x = jax.random.normal(keys[0], (case.rows, case.channels, case.plan.dim_in), dtype)
    sets = () if case.num_indexed is None else (case.num_indexed,)
    weights = [jax.random.normal(k, sets + (p.mul, case.channels), dtype)
               for k, p in zip(keys[3:], case.plan.paths)]
    indices = None
    if case.num_indexed is not None:
        indices = jax.random.randint(keys[1], (case.rows,), 0, case.num_indexed)
    return x, weights, indices


def kernel_fn(case: Case, style):
    return lambda x, w, i: kernels.symmetric_contraction(x, w, i, plan=case.plan, config=style)


def reference_fn(case: Case):
    return lambda x, w, i: reference(x, w, i, plan=case.plan)


def e3nn_fn(case: Case):
    """e3nn-jax's module as a function of (x, weights, indices); indexed through hk.vmap."""
    plan = case.plan
    keep = None if plan.keep is None else set(plan.keep)
    if case.num_indexed is None:
        module = lambda i, x: e3nn.haiku.SymmetricTensorProduct(case.orders, keep)(x)
    else:
        module = e3nn_indexed(case.orders, keep, case.num_indexed)
    apply = hk.without_apply_rng(hk.transform(module)).apply

    def f(x, weights, indices):
        params = {"symmetric_tensor_product": {p.parameter_name: w for p, w in zip(plan.paths, weights)}}
        return apply(params, indices, e3nn.IrrepsArray(plan.irreps_in, x)).array

    return f


def spec_fn(case: Case):
    """The executable spec: the dense basis contracted ``order`` times."""
    return lambda x, w, i: spec.symmetric_contraction(x, w, case.plan, i)


ORACLES = {"spec": spec_fn, "reference": reference_fn, "e3nn": e3nn_fn}


def run(f, *args):
    """``jax.jit(f)(*args)`` compiled with the fast CPU pipeline."""
    return jax.jit(f).trace(*args).lower().compile(FAST_CPU_COMPILE)(*args)


def assert_matches(actual, expected, rtol=1e-5, what=""):
    """Leaf by leaf, to ``rtol`` of the leaf's largest magnitude (float32 round-off)."""
    for k, (a, b) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape, (what, k, a.shape, b.shape)
        scale = float(np.nanmax(np.abs(b), initial=0.0)) or 1.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=f"{what} leaf {k}")


def first_order(f, indices, cotangent):
    """``(x, w) -> (out, (grad_x, grad_w))`` of ``sum(out * cotangent) + 0.1 sum(out**2)``."""

    def value_and_grads(x, w):
        out, vjp = jax.vjp(lambda x, w: f(x, w, indices), x, w)
        return out, vjp((cotangent + 0.2 * out).astype(out.dtype))

    return value_and_grads


def all_orders(f, indices, cotangent):
    """``(x, w) -> (out, first-order grads, second-order grads)``, each kernel traced once;
    second order is the gradient w.r.t. ``(x, w)`` of ``sum(grad_x**2)`` (force training)."""

    def squared_grad_x(x, w):
        out, grads = first_order(f, indices, cotangent)(x, w)
        return jnp.sum(grads[0] ** 2), (out, grads)

    def value_and_grads(x, w):
        (_, (out, grads)), second = jax.value_and_grad(squared_grad_x, (0, 1), has_aux=True)(x, w)
        return out, grads, second

    return value_and_grads


def cotangent_for(case: Case):
    return jax.random.normal(jax.random.PRNGKey(5), (case.rows, case.channels, case.plan.dim_out))


@functools.cache
def oracle(case: Case, name: str, derivatives=None):
    """An oracle's output (or ``derivatives(f, indices, cotangent)`` values) on ``inputs(case)``,
    computed once for both kernel styles."""
    x, w, i = inputs(case)
    f = ORACLES[name](case)
    if derivatives is None:
        return run(f, x, w, i)
    return run(derivatives(f, i, cotangent_for(case)), x, w)


# ---- numerics in interpret mode ---------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.irreps}-{c.orders}-{c.keep}-S{c.num_indexed}")
def test_forward_matches_reference_and_e3nn(case, style):
    x, w, i = inputs(case)
    out = run(kernel_fn(case, STYLES[style]), x, w, i)
    assert out.shape == (case.rows, case.channels, case.plan.dim_out) and out.dtype == x.dtype
    for name in ORACLES:
        assert_matches(out, oracle(case, name), what=name)


@pytest.mark.parametrize("style, num_indexed", [("triton", 3), ("mosaic", None)])
def test_gradients_to_second_order(style, num_indexed):
    """Each style at second order, one with indexed and one with shared weights (the
    kernels are the same; only the row schedule differs). e3nn-jax's module is the oracle
    of the indexed case, the reference (itself checked against e3nn) of both."""
    case = dataclasses.replace(SMALL, num_indexed=num_indexed)
    x, w, i = inputs(case)
    got = run(all_orders(kernel_fn(case, STYLES[style]), i, cotangent_for(case)), x, w)
    for name in ORACLES if num_indexed else ["reference"]:
        expected = oracle(case, name, all_orders)
        for what, a, b in zip(("output", "gradient", "second-order gradient"), got, expected):
            assert_matches(a, b, rtol=1e-4 if what.startswith("second") else 1e-5, what=f"{what} vs {name}")


@pytest.mark.parametrize("style", STYLES)
def test_default_row_tiles(style):
    """The styles' own tile sizes (Mosaic: several 8-row slabs per tile)."""
    case = dataclasses.replace(SMALL, rows=70, channels=4)
    x, w, i = inputs(case)
    out = run(kernel_fn(case, getattr(kernels, f"{style.upper()}_INTERPRET")), x, w, i)
    assert_matches(out, oracle(case, "reference"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("style", STYLES)
def test_16_bit_inputs_accumulate_in_float32(style, dtype):
    """The float32 spec of the same rounded inputs, rounded once: output and gradients."""
    case = CASES[1]  # shared weights, 100 channels
    x, w, i = inputs(case)
    low = jax.tree.map(lambda a: a.astype(dtype), (x, w))
    cotangent = cotangent_for(case).astype(dtype)

    def value_and_grads(f):
        def g(x, w):
            out, vjp = jax.vjp(lambda x, w: f(x, w, i), x, w)
            return out, vjp(cotangent.astype(out.dtype))

        return g

    out, grads = run(value_and_grads(kernel_fn(case, STYLES[style])), *low)
    expected_out, expected_grads = run(value_and_grads(spec_fn(case)),
                                       *jax.tree.map(lambda a: a.astype(jnp.float32), low))
    assert out.dtype == dtype
    assert jax.tree.map(lambda a: a.dtype, grads) == jax.tree.map(lambda a: a.dtype, low)
    assert_rounded_once(out, expected_out, what="out")
    for k, (a, b) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads))):
        assert_rounded_once(a, b, what=f"gradient {k}")


@pytest.mark.parametrize("style", STYLES)
def test_out_of_range_traced_indices_give_nan_rows(style):
    case = dataclasses.replace(SMALL, rows=11)
    x, w, _ = inputs(case)
    i = jnp.array([0, 3, 1, -1, 2, 0, 7, 1, 1, 2, 0])  # S = 3
    invalid = np.array([False, True, False, True, False, False, True, False, False, False, False])
    # invalid rows get zero gradients and leave the weights' gradients alone, as in the reference
    cotangent = jnp.where(invalid[:, None, None], 0.0, cotangent_for(case))
    out, grads = run(first_order(kernel_fn(case, STYLES[style]), i, cotangent), x, w)
    out = np.asarray(out)
    assert np.all(np.isnan(out[invalid])) and np.all(np.isfinite(out[~invalid]))
    expected_out, expected_grads = run(first_order(reference_fn(case), i, cotangent), x, w)
    assert_matches(out[~invalid], expected_out[~invalid])
    assert_matches(grads, expected_grads)


@pytest.mark.parametrize("num_indexed", [None, 2])
def test_zero_rows_launch_nothing(num_indexed):
    case = dataclasses.replace(SMALL, rows=0, num_indexed=num_indexed)
    x, w, i = inputs(case)
    for style in (kernels.TRITON, kernels.MOSAIC):  # no launch, so even real-hardware styles run
        f = kernel_fn(case, style)
        assert f(x, w, i).shape == (0, case.channels, case.plan.dim_out)
        grad_x, grad_w = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, i)), argnums=(0, 1))(x, w)
        assert grad_x.shape == x.shape
        assert all(g.shape == v.shape and g.size and np.all(np.asarray(g) == 0) for g, v in zip(grad_w, w))


def test_backend_dispatch_runs_the_interpret_kernel():
    case = CASES[0]
    x, w, i = inputs(case)
    impls = kernels.implementations(case.plan, jnp.float32)
    assert set(impls) == {"gpu", "tpu", "interpret"}
    out = jax.ShapeDtypeStruct(x.shape[:2] + (case.plan.dim_out,), x.dtype)
    f = backend.select("symmetric_contraction", "pallas", reference_fn(case), lambda: impls, out)
    assert_matches(run(f, x, w, i), oracle(case, "reference"))


def test_unsupported_orders():
    plan = symmetric_plan(e3nn.Irreps("0e + 1o"), (1, 5), None)
    assert "orders above 4" in kernels.implementations(plan, jnp.float32)
    x, w = jnp.ones((2, 3, plan.dim_in)), [jnp.ones((p.mul, 3)) for p in plan.paths]
    with pytest.raises(NotImplementedError, match=r"symmetric_contraction: .* orders above 4"):
        ops.symmetric_contraction(x, w, plan, backend="pallas")
    assert ops.symmetric_contraction(x, w, plan, backend="auto").shape == (2, 3, plan.dim_out)


def test_terms_are_the_symmetrised_basis():
    """The term list, evaluated in numpy, is the reference contraction (no kernels involved)."""
    assert len(symmetric_terms(MACE_M.plan).polynomial.terms) == 410  # as the cost model says
    case = CASES[1]
    x, w, _ = inputs(case)
    terms = symmetric_terms(case.plan)
    coefs = terms.coefficients @ np.concatenate([np.asarray(a) for a in w], axis=0)  # (terms, C)
    out = np.zeros((case.rows, case.channels, case.plan.dim_out))
    xs = np.asarray(x, np.float64)
    for t in terms.polynomial.terms:
        out[:, :, t.out] += t.scale * coefs[t.coef] * np.prod(xs[:, :, list(t.vars)], axis=-1)
    assert_matches(out, oracle(case, "reference"))


# ---- lowering for real hardware ------------------------------------------------------------

PLATFORMS = [("cuda", kernels.TRITON, "__gpu$xla.gpu.triton"), ("tpu", kernels.MOSAIC, "tpu_custom_call")]


@pytest.mark.parametrize("platform, style, marker", PLATFORMS)
def test_lowers_at_mace_m_forward_and_backward(platform, style, marker):
    x, w, i = jax.tree.map(jnp.zeros_like, inputs(dataclasses.replace(MACE_M, rows=1)))
    x = jnp.zeros((MACE_M.rows,) + x.shape[1:])
    i = jnp.zeros(MACE_M.rows, jnp.int32)
    f = kernel_fn(MACE_M, style)
    loss = lambda x, w: jnp.sum(f(x, w, i) ** 2)
    # forward kernel, input-gradient kernel and weight-gradient reduction
    assert lowered_text(jax.grad(loss, argnums=(0, 1)), platform, x, w).count(marker) == 3


@pytest.mark.parametrize("platform, style, marker", PLATFORMS)
def test_lowers_at_odd_small_size_to_second_order_in_bfloat16(platform, style, marker):
    case = Case("0e + 1o", (1, 2, 3), "0e + 1o", 5, 3, 3)
    x, w, i = inputs(case)
    x, w = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (x, w))
    f = all_orders(kernel_fn(case, style), i, cotangent_for(case).astype(jnp.bfloat16))
    # forward, input gradient, weight reduction, and the derivatives of all three
    assert lowered_text(f, platform, x, w).count(marker) >= 6
