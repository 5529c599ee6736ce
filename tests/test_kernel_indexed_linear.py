"""indexed_linear kernels on CPU: both kernel styles in Pallas interpret mode against the
reference and e3nn-jax (forward, gradients, second-order gradients), the tile schedule,
and lowering for CUDA (Triton) and TPU (Mosaic) without running."""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_results_close, assert_rounded_once, assert_trees_close, lowered_text

from e3kernels import spec
from e3kernels._e3nn_private import FunctionalLinear
from e3kernels.grouping import group_rows, locate_tile, num_tiles, tile_schedule
from e3kernels.irreps import LinearPlan, linear_parameter_name
from e3kernels.kernels import indexed_linear as kernels
from e3kernels.reference.indexed_linear import indexed_linear as reference

HIGHEST = jax.lax.Precision.HIGHEST

STYLES = ["gpu", "tpu"]
MACE = "128x0e + 128x1o + 128x2e + 128x3o"
#: interpret-mode programs are large and run once: LLVM optimisation would cost more than it saves
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def kernel_fn(style: str, plan: LinearPlan):
    """The GPU style through the public ``implementations``; the TPU one in its interpreter."""
    if style == "gpu":
        return kernels.implementations(plan, HIGHEST, jnp.float32)["interpret"]
    return functools.partial(kernels.indexed_linear, plan=plan, platform="tpu", interpret=True)


class Case:
    """A plan from e3nn's FunctionalLinear, random inputs and parameters, and e3nn's module.

    Values come from numpy: every jax.random call would be one more XLA compilation.
    """

    def __init__(self, irreps_in, irreps_out, num_sets, num_rows, biases=False, seed=0,
                 indices=None, dtype=jnp.float32, **linear_kwargs):
        self.irreps_in = e3nn.Irreps(irreps_in)
        self.lin = FunctionalLinear(self.irreps_in, e3nn.Irreps(irreps_out), biases=biases)
        self.plan = LinearPlan.from_functional_linear(self.lin)
        rng = np.random.default_rng(seed)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
        self.x = normal(num_rows, self.plan.dim_in)
        if indices is None:
            indices = rng.integers(0, num_sets, num_rows)
        self.indices = jnp.asarray(indices, jnp.int32)
        self.weights = tuple(normal(*shape) for shape in self.plan.weight_shapes(num_sets))
        self.biases = tuple(normal(*shape) for shape in self.plan.bias_shapes(num_sets))
        self.module = hk.without_apply_rng(hk.transform(lambda i, x: e3nn.haiku.Linear(
            irreps_out, num_indexed_weights=num_sets, biases=biases, name="linear", **linear_kwargs)(i, x)))
        self.names = [(ins.i_in == -1, linear_parameter_name(self.lin, ins)) for ins in self.lin.instructions]

    @property
    def args(self):
        return self.x, self.weights, self.biases

    def e3nn_fn(self, x, weights, biases, indices):
        """e3nn-jax's module with these weights and biases as its parameters."""
        values = iter(weights), iter(biases)
        params = {"linear": {n: next(values[is_bias]) for is_bias, n in self.names}}
        return self.module.apply(params, indices, e3nn.IrrepsArray(self.irreps_in, x)).array


def evaluate(fn, case: Case, order: int, compiler_options=FAST_COMPILE):
    """Output, then (``order >= 1``) gradients of ``loss = sum(out * c) + 0.1 * sum(out**2)``,
    then (``order == 2``) gradients of ``sum(grad_x(loss) ** 2)``; one jit, kernels traced once."""
    cotangent = np.random.default_rng(3).standard_normal((case.x.shape[0], case.plan.dim_out), np.float32)

    def first(x, weights, biases):
        out, vjp = jax.vjp(lambda *args: fn(*args, case.indices), x, weights, biases)
        d_loss = cotangent + 0.2 * out.astype(jnp.float32)
        return out, vjp(d_loss.astype(out.dtype))

    def second(x, weights, biases):
        out, grads = first(x, weights, biases)
        return jnp.sum(grads[0].astype(jnp.float32) ** 2), (out, grads)

    def everything(x, weights, biases):
        if order == 0:
            return {"out": fn(x, weights, biases, case.indices)}
        if order == 1:
            out, grads = first(x, weights, biases)
            return {"out": out, "grad": grads}
        second_grads, (out, grads) = jax.grad(second, argnums=(0, 1, 2), has_aux=True)(x, weights, biases)
        return {"out": out, "grad": grads, "second": second_grads}

    compiled = jax.jit(everything).lower(*case.args).compile(compiler_options)
    return compiled(*case.args)


# Several blocks (one of them shared by two inputs: 3x0e and 2x0e both write 4x0e),
# multiplicities 1 to 5, a bias, an output irrep no path reaches (2x1e: zero columns
# between two written blocks), unsorted indices, 37 rows (no multiple of a tile).
MAIN = dict(irreps_in="3x0e + 5x1o + 2x0e + 2x2e", irreps_out="4x0e + 3x1o + 2x1e + 2e", num_sets=3,
            num_rows=37, biases=True, simplify_irreps_internally=False, force_irreps_out=True)


@functools.cache
def main_case_expected():
    case = Case(**MAIN)
    from_spec = evaluate(lambda x, w, b, i: spec.indexed_linear(x, w, b, i, case.plan), case, 2)
    from_reference = evaluate(functools.partial(reference, plan=case.plan), case, 2)
    return case, from_spec, from_reference, evaluate(case.e3nn_fn, case, 2)


@pytest.mark.parametrize("style", STYLES)
def test_matches_spec_reference_and_e3nn(style):
    case, from_spec, from_reference, from_e3nn = main_case_expected()
    assert sorted(set(case.indices.tolist())) == [0, 1, 2]
    ours = evaluate(kernel_fn(style, case.plan), case, 2)
    assert_results_close(ours, from_spec)
    assert_results_close(ours, from_reference)
    assert_results_close(ours, from_e3nn)


@pytest.mark.parametrize("style", STYLES)
def test_out_of_range_indices_give_nan_rows(style):
    indices = [0, -1, 1, 3, 2, 0, 7, 1, 2, 2, 0, -5, 1, 2, 0, 1, 1, 0]
    case = Case("2x0e + 3x1o", "4x0e + 1o", 3, len(indices), biases=True, indices=indices)
    ours = evaluate(kernel_fn(style, case.plan), case, 2)
    invalid = np.array([not 0 <= i < 3 for i in indices])
    assert np.isnan(np.asarray(ours["out"])).all(axis=1).tolist() == invalid.tolist()
    for leaf in jax.tree_util.tree_leaves((ours["grad"], ours["second"])):
        assert np.isfinite(np.asarray(leaf)).all()  # invalid rows never leak into gradients
    assert_results_close(ours, evaluate(functools.partial(reference, plan=case.plan), case, 2))


@pytest.mark.parametrize("style", STYLES)
def test_no_weight_sets_gives_nan_rows(style):
    # S = 0: no index is in range, so every row is NaN on both backends (the shared entry,
    # grouped_linear.indexed_linear, settles it before any tile size is chosen)
    case = Case("2x0e + 1o", "0e + 1o", 0, 5, biases=True, indices=[0, 1, 0, 2, -1])
    ours = evaluate(kernel_fn(style, case.plan), case, 1)
    expected = evaluate(functools.partial(reference, plan=case.plan), case, 1)
    assert ours["out"].shape == (5, 4) and np.isnan(np.asarray(ours["out"])).all()
    assert np.isnan(np.asarray(expected["out"])).all()
    assert_trees_close(ours["grad"], expected["grad"])
    assert not np.asarray(ours["grad"][0]).any()  # nothing reaches x


@pytest.mark.parametrize("style", STYLES)
def test_many_weight_sets(style):
    # most of the 128 sets get one or two rows, many none; the TPU interpreter costs ~30 ms
    # per grid step (>= 128 steps per kernel here), so it checks the forward only
    case = Case("3x0e + 2x1o", "2x0e + 3x1o", 128, 150, biases=True, seed=128)
    order = 1 if style == "gpu" else 0
    assert_results_close(evaluate(kernel_fn(style, case.plan), case, order),
                         evaluate(case.e3nn_fn, case, order))


@pytest.mark.parametrize("style", STYLES)
def test_one_weight_set_wide_and_odd_multiplicities(style):
    # 150 needs two 128-wide chunks; 100, 96 and 3 are padded to 128, 128 and 16
    case = Case("150x0e + 3x1o", "96x0e + 100x1o", 1, 24, seed=1)
    ours = evaluate(kernel_fn(style, case.plan), case, 1)
    assert_results_close(ours, evaluate(case.e3nn_fn, case, 1), atol=1e-4)


@pytest.mark.parametrize("style", STYLES)
def test_bias_only_plan(style):
    case = Case("1o", "2x0e", 3, 11, biases=True, force_irreps_out=True)
    assert not case.plan.blocks and case.plan.biases
    ours = evaluate(kernel_fn(style, case.plan), case, 1)
    assert_results_close(ours, evaluate(case.e3nn_fn, case, 1))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("style", STYLES)
def test_16_bit_inputs_accumulate_in_float32(style, dtype):
    """The float32 spec of the same rounded inputs, rounded once: output and gradients."""
    case = Case("3x0e + 5x1o", "4x0e + 3x1o", 3, 19, biases=True, dtype=dtype)
    cotangent = np.random.default_rng(3).standard_normal((case.x.shape[0], case.plan.dim_out))

    def value_and_grads(fn, args):
        out, vjp = jax.vjp(lambda *a: fn(*a, case.indices), *args)
        return out, vjp(jnp.asarray(cotangent, dtype).astype(out.dtype))

    ours = jax.jit(functools.partial(value_and_grads, kernel_fn(style, case.plan)))(case.args)
    as32 = jax.tree.map(lambda a: a.astype(jnp.float32), case.args)
    spec_fn = lambda x, w, b, i: spec.indexed_linear(x, w, b, i, case.plan)
    expected = jax.jit(functools.partial(value_and_grads, spec_fn))(as32)
    assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, (case.x, case.args))
    for k, (a, b) in enumerate(zip(jax.tree.leaves(ours), jax.tree.leaves(expected))):
        assert_rounded_once(a, b, what=f"leaf {k}")


@pytest.mark.parametrize("style", STYLES)
def test_zero_rows(style):
    case = Case("2x0e + 1o", "0e + 1o", 2, 0, biases=True)
    ours = evaluate(kernel_fn(style, case.plan), case, 2)
    assert ours["out"].shape == (0, 4) and ours["out"].dtype == jnp.float32
    assert_results_close(ours, evaluate(functools.partial(reference, plan=case.plan), case, 2))


def test_implementations_keys_and_platform_check():
    plan = Case("0e", "0e", 1, 1).plan
    assert set(kernels.implementations(plan, HIGHEST, jnp.float32)) == {"gpu", "tpu", "interpret"}
    with pytest.raises(ValueError, match="platform must be one of"):
        kernels.indexed_linear(jnp.ones((1, 1)), (jnp.ones((1, 1, 1)),), (), jnp.zeros(1, jnp.int32),
                               plan=plan, platform="cuda")


@pytest.mark.parametrize("tile_rows", [4, 16])
def test_tile_schedule_covers_every_row_once(tile_rows):
    num_sets = 5
    indices = jnp.array([4, 0, 9, 4, 4, -1, 0, 2, 4, 4, 4, 4, 0, 2, 4, 5, 4, 0, 0, 4, 4, 4])
    grouping = group_rows(indices, num_sets)
    tiles = jax.tree.map(np.asarray, tile_schedule(grouping, tile_rows))
    order, groups = np.asarray(grouping.order), np.asarray(grouping.groups)
    assert tiles.group.shape == (num_tiles(len(indices), num_sets, tile_rows),)
    covered = np.concatenate([np.arange(s, e) for s, e in zip(tiles.start, tiles.end)])
    assert sorted(covered.tolist()) == list(range(len(indices)))
    for group, start, end in zip(tiles.group, tiles.start, tiles.end):
        assert 0 <= end - start <= tile_rows
        assert (groups[order[start:end]] == group).all()  # one weight set per tile
    assert (groups[[1, 5, 2, 15]] == [0, 5, 5, 5]).all()  # out-of-range rows: group S
    # the per-group summary the TPU kernels keep in SMEM gives every tile back
    for tile, (group, start, end) in enumerate(zip(tiles.group, tiles.start, tiles.end)):
        located = locate_tile(tiles.first, tiles.bounds, jnp.int32(tile), tile_rows)
        assert (int(located[0]), int(located[1])) == (group, end - start), tile


# ---- lowering for the real hardware (no execution) --------------------------------------


LOWERING_MARKERS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def shapes(irreps, num_sets, num_rows, dtype=jnp.float32):
    lin = FunctionalLinear(e3nn.Irreps(irreps), e3nn.Irreps(irreps), biases=True)
    plan = LinearPlan.from_functional_linear(lin)
    struct = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    return plan, (struct((num_rows, plan.dim_in)), tuple(map(struct, plan.weight_shapes(num_sets))),
                  tuple(map(struct, plan.bias_shapes(num_sets))), struct((num_rows,), jnp.int32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("size", [(MACE, 10, 4000), ("3x0e + 5x1o + 100x2e", 3, 37)], ids=["mace", "odd"])
def test_lowers_forward_and_vjp(platform, size):
    plan, args = shapes(*size)
    impl = kernels.implementations(plan, HIGHEST, jnp.float32)["gpu" if platform == "cuda" else "tpu"]

    def forward_and_vjp(x, weights, biases, indices):
        out, vjp = jax.vjp(lambda *a: impl(*a, indices), x, weights, biases)
        return out, vjp(out)

    text = lowered_text(forward_and_vjp, platform, *args)
    assert LOWERING_MARKERS[platform] in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_second_order_bfloat16(platform):
    plan, args = shapes("7x0e + 96x1o", 2, 50, jnp.bfloat16)
    impl = kernels.implementations(plan, HIGHEST, jnp.float32)["gpu" if platform == "cuda" else "tpu"]

    def second(x, weights, biases, indices):
        loss = lambda x, w: jnp.sum(impl(x, w, biases, indices).astype(jnp.float32) ** 2)
        force_like = lambda x, w: jnp.sum(jax.grad(loss)(x, w).astype(jnp.float32) ** 2)
        return jax.grad(force_like, argnums=(0, 1))(x, weights)

    assert LOWERING_MARKERS[platform] in lowered_text(second, platform, *args)


def test_tpu_kernels_compute_high_precision_as_three_bfloat16_passes():
    """Mosaic has no ``HIGH`` dot: the TPU kernels split float32 operands into bfloat16
    high and low parts, as XLA does on TPU. The result is far closer to the float64 spec
    than one bfloat16 pass (operands rounded to bfloat16) is."""
    case = Case("8x0e + 8x1o", "8x0e + 8x1o", num_sets=2, num_rows=24)
    high = functools.partial(kernels.indexed_linear, plan=case.plan, platform="tpu", interpret=True,
                             precision=jax.lax.Precision.HIGH)
    out = np.asarray(high(case.x, case.weights, (), case.indices), np.float64)
    with jax.enable_x64():
        def exact(x, weights):
            as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32).astype(jnp.float64), tree)
            return np.asarray(spec.indexed_linear(as64(x), as64(weights), (), case.indices, case.plan))

        expected = exact(case.x, case.weights)
        to_bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
        one_pass = exact(to_bf16(case.x), to_bf16(case.weights))
    error, one_pass_error = np.max(np.abs(out - expected)), np.max(np.abs(one_pass - expected))
    assert error < one_pass_error / 30, (error, one_pass_error)
    plan, args = shapes("8x0e + 8x1o", 2, 24)
    impl = kernels.implementations(plan, jax.lax.Precision.HIGH, jnp.float32)["tpu"]
    grads = lambda x, w, b, i: jax.grad(lambda x, w: jnp.sum(impl(x, w, b, i)), argnums=(0, 1))(x, w)
    assert LOWERING_MARKERS["tpu"] in lowered_text(grads, "tpu", *args)
