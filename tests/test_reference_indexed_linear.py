"""The reference indexed_linear (a scan over row tiles) against the literal definition,
an einsum over a per-row copy of the weights: outputs, gradients of first and second order,
tile sizes, empty groups, out-of-range indices, degenerate plans and sizes."""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_results_close

from e3kernels import spec
from e3kernels._e3nn_private import FunctionalLinear
from e3kernels.irreps import LinearPlan, linear_parameter_name
from e3kernels.reference.indexed_linear import default_tile_rows, indexed_linear


def naive(x, weights, biases, indices, *, plan: LinearPlan):
    """The definition (``e3kernels.spec``): ``W[indices]`` copied per row."""
    return spec.indexed_linear(x, weights, biases, indices, plan)


class Case:
    """A plan from e3nn's FunctionalLinear and random inputs (numpy: no jax.random compiles)."""

    def __init__(self, irreps_in, irreps_out, num_sets, indices, biases=False, seed=0, **kwargs):
        self.irreps_in, self.irreps_out = e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_out)
        self.lin = FunctionalLinear(self.irreps_in, self.irreps_out, biases=biases)
        self.plan = LinearPlan.from_functional_linear(self.lin)
        self.num_sets, self.biases_flag, self.kwargs = num_sets, biases, kwargs
        rng = np.random.default_rng(seed)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
        self.indices = jnp.asarray(indices, jnp.int32)
        self.x = normal(len(indices), self.plan.dim_in)
        self.weights = tuple(normal(*s) for s in self.plan.weight_shapes(num_sets))
        self.biases = tuple(normal(*s) for s in self.plan.bias_shapes(num_sets))

    @property
    def args(self):
        return self.x, self.weights, self.biases

    def e3nn_fn(self, x, weights, biases, indices):
        module = hk.without_apply_rng(hk.transform(lambda i, x: e3nn.haiku.Linear(
            self.irreps_out, num_indexed_weights=self.num_sets, biases=self.biases_flag, name="linear",
            **self.kwargs)(i, x)))
        names = [(ins.i_in == -1, linear_parameter_name(self.lin, ins)) for ins in self.lin.instructions]
        values = iter(weights), iter(biases)
        params = {"linear": {name: next(values[is_bias]) for is_bias, name in names}}
        return module.apply(params, indices, e3nn.IrrepsArray(self.irreps_in, x)).array


def evaluate(fn, case: Case, order: int = 2):
    """Output; gradients of ``sum(out * c) + 0.1 * sum(out ** 2)`` (``order >= 1``); and
    gradients of ``sum(grad_x ** 2)`` (``order == 2``, as in force training). One jit."""
    n, dim_out = case.x.shape[0], case.plan.dim_out
    cotangent = np.random.default_rng(3).standard_normal((n, dim_out), np.float32)

    def loss(x, weights, biases):
        out = fn(x, weights, biases, case.indices)
        finite = jnp.where(jnp.isnan(out), 0, out)  # NaN rows do not enter the loss
        return jnp.sum(finite * cotangent) + 0.1 * jnp.sum(finite**2), out

    def force_loss(x, weights, biases):
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weights, biases)
        return jnp.sum(grads[0] ** 2), (out, grads)

    def everything(x, weights, biases):
        if order == 0:
            return {"out": fn(x, weights, biases, case.indices)}
        if order == 1:
            grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weights, biases)
            return {"out": out, "grad": grads}
        second, (out, grads) = jax.grad(force_loss, argnums=(0, 1, 2), has_aux=True)(x, weights, biases)
        return {"out": out, "grad": grads, "second": second}

    return jax.jit(everything)(*case.args)


def ours(plan, **kwargs):
    return functools.partial(indexed_linear, plan=plan, **kwargs)


# Two inputs writing one output chunk (3x0e and 2x0e -> 4x0e), an output irrep no path
# reaches (2x1e: zero columns between written ones), biases, 5 weight sets of which 1 and 3
# are never used, group 4 with 24 rows (several tiles of 4 or 16 rows), and out-of-range
# indices (-1, 5, 9: NaN rows), unsorted; 43 rows.
INDICES = ([4, 0, 2, 4, -1, 4, 2, 0, 4, 4, 5, 4, 2, 4, 0, 4, 4, 9, 2, 4, 4, 0]
           + [4, 2, 4, 4, 0, 4, 4, 2, 4, -1, 4, 4, 0, 2, 4, 4, 2, 4, 0, 4, 4])
MAIN = dict(irreps_in="3x0e + 5x1o + 2x0e + 2x2e", irreps_out="4x0e + 3x1o + 2x1e + 2e", num_sets=5,
            indices=INDICES, biases=True, simplify_irreps_internally=False, force_irreps_out=True)


@functools.cache
def main_case():
    """The case, the definition's results and ours with the default tile size (16 here)."""
    case = Case(**MAIN)
    return case, evaluate(functools.partial(naive, plan=case.plan), case), evaluate(ours(case.plan), case)


@pytest.mark.parametrize("tile_rows", [None, 4, 32])
def test_matches_naive_for_any_tile_size(tile_rows):
    case, expected, result = main_case()
    if tile_rows is not None:
        result = evaluate(ours(case.plan, tile_rows=tile_rows), case)
    assert_results_close(result, expected)


def test_one_weight_set_runs_untiled_and_matches():
    """Shared weights (one set) and a few hundred rows take the untiled engine (no sort, no
    scan); an out-of-range row is still NaN with zero gradients, to second order."""
    indices = [0, 0, -1, 0, 1, 0, 0]
    case = Case(**dict(MAIN, num_sets=1, indices=indices))
    jaxpr = str(jax.make_jaxpr(ours(case.plan))(*case.args, case.indices))
    assert "scan[" not in jaxpr and "scan[" in str(jax.make_jaxpr(ours(case.plan, tile_rows=4))(
        *case.args, case.indices))
    result = evaluate(ours(case.plan), case)
    assert_results_close(result, evaluate(functools.partial(naive, plan=case.plan), case))
    assert_results_close(result, evaluate(ours(case.plan, tile_rows=4), case))
    invalid = np.array([i != 0 for i in indices])
    assert np.isnan(np.asarray(result["out"])).all(axis=1).tolist() == invalid.tolist()
    assert not np.asarray(result["grad"][0])[invalid].any()
    assert not np.asarray(result["second"][0])[invalid].any()


def test_invalid_rows_are_nan_and_get_zero_gradients():
    case, _, result = main_case()
    invalid = np.array([not 0 <= i < 5 for i in INDICES])
    assert np.isnan(np.asarray(result["out"])).all(axis=1).tolist() == invalid.tolist()
    assert not np.isnan(np.asarray(result["out"])[~invalid]).any()
    for leaf in jax.tree_util.tree_leaves((result["grad"], result["second"])):
        assert np.isfinite(np.asarray(leaf)).all()
    assert not np.asarray(result["grad"][0])[invalid].any()
    assert not np.asarray(result["second"][0])[invalid].any()
    # sets 1 and 3 have no rows: zero gradients
    for grad in result["grad"][1] + result["grad"][2]:
        assert not np.asarray(grad)[[1, 3]].any()


def test_unwritten_columns_are_zero():
    case, _, result = main_case()
    start = e3nn.Irreps("4x0e + 3x1o").dim
    columns = np.asarray(result["out"])[:, start : start + 6]  # 2x1e
    valid = np.array([0 <= i < 5 for i in INDICES])
    assert (columns[valid] == 0).all()


def test_matches_e3nn():
    case, _, result = main_case()
    valid = np.array([0 <= i < 5 for i in INDICES])
    theirs = evaluate(case.e3nn_fn, case, order=0)["out"]
    assert_close(np.asarray(result["out"])[valid], np.asarray(theirs)[valid])


def test_forward_mode_is_refused_clearly():
    """Reverse mode only (a custom_vjp, as on the Pallas backend): jvp raises, never a wrong answer."""
    case, _, _ = main_case()
    tangents = jax.tree.map(jnp.ones_like, case.args)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda *a: ours(case.plan)(*a, case.indices), case.args, tangents)


@pytest.mark.parametrize(
    "irreps_in, irreps_out, num_sets, indices, biases",
    [
        ("2x0e + 1o", "0e + 1o", 2, [], True),  # no rows
        ("3x0e + 2x1o", "2x0e + 3x1o", 1, [0, 0, 1, 0, 0, -1, 0], True),  # one weight set
        ("1o", "2x0e", 3, [2, 0, 3, 1, 1], True),  # biases only
        ("1o", "2x0e", 3, [2, 0, 3], False),  # no parameters: zeros, no row is invalid
    ],
    ids=["no-rows", "one-set", "bias-only", "no-parameters"],
)
def test_degenerate(irreps_in, irreps_out, num_sets, indices, biases):
    case = Case(irreps_in, irreps_out, num_sets, indices, biases=biases, force_irreps_out=True)
    result = evaluate(ours(case.plan), case, order=2 if case.plan.blocks else 1)
    assert result["out"].shape == (len(indices), case.plan.dim_out)
    assert_results_close(result, evaluate(functools.partial(naive, plan=case.plan), case,
                                          order=2 if case.plan.blocks else 1))
    if not case.plan.blocks and not case.plan.biases:
        assert not np.asarray(result["out"]).any()


def test_bfloat16_input():
    case = Case("3x0e + 2x1o", "2x0e + 3x1o", 3, [0, 2, 1, 1, 0, 2, 2, 0, 1], biases=True)
    x = case.x.astype(jnp.bfloat16)
    out = jax.jit(ours(case.plan))(x, case.weights, case.biases, case.indices)
    assert out.dtype == jnp.bfloat16
    expected = naive(x.astype(jnp.float32), case.weights, case.biases, case.indices, plan=case.plan)
    assert_close(out.astype(jnp.float32), expected, rtol=2e-2, atol=2e-2)


def test_default_tile_rows():
    assert default_tile_rows(4000, 10) == 128  # the MACE benchmark size
    assert default_tile_rows(800, 10) == 64
    assert default_tile_rows(10, 10) == 8
    assert default_tile_rows(10**7, 1) == 256
