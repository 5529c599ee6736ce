"""Both ops under JAX's transformations, on every backend, against the executable spec
(``e3kernels.spec``): second order inside ``lax.scan`` (layer-stack style), ``vmap`` over
rows and over parameters (ensembles), ``jax.checkpoint``, ``jax.export`` for several
platforms, every float dtype, and what tracing costs.

Small sizes: the Pallas backend runs its kernels in interpret mode here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rounded_once, assert_trees_close
from jax import export

from e3kernels import ops, spec

BACKENDS = ["reference", "auto", "pallas"]
#: On CPU "auto" lowers the reference: the same program, so the heavier tests skip it
#: (test_backend.py checks what "auto" lowers per platform).
CPU_PROGRAMS = ["reference", "pallas"]
NUM_SETS = 3

LINEAR_PLAN = ops.linear_plan("3x0e + 2x1o + 2x2e", "2x0e + 3x1o + 1x2e", biases=True)
# orders 1 and 2 keep interpret mode quick; third order is in the kernel and module tests
SYMMETRIC_PLAN = ops.symmetric_contraction_plan("0e + 1o", (1, 2), keep_irrep_out="0e + 1o")


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


class IndexedLinear:
    name = "indexed_linear"

    def __init__(self, rows=9, dtype=jnp.float32, seed=0):
        rng, plan = np.random.default_rng(seed), LINEAR_PLAN
        self.x = _normal(rng, (rows, plan.dim_in), dtype)
        self.params = (
            tuple(_normal(rng, s, dtype) for s in plan.weight_shapes(NUM_SETS)),
            tuple(_normal(rng, s, dtype) for s in plan.bias_shapes(NUM_SETS)),
        )
        self.indices = jnp.asarray(rng.integers(0, NUM_SETS, rows), jnp.int32)

    def op(self, backend, **kwargs):
        def f(x, params, indices):
            weights, biases = params
            return ops.indexed_linear(x, weights, indices, LINEAR_PLAN, biases=biases, backend=backend,
                                      **kwargs)

        return f

    @staticmethod
    def spec(x, params, indices):
        return spec.indexed_linear(x, *params, indices, LINEAR_PLAN)


class SymmetricContraction:
    name = "symmetric_contraction"

    def __init__(self, rows=9, dtype=jnp.float32, seed=0):
        rng, plan = np.random.default_rng(seed), SYMMETRIC_PLAN
        self.x = _normal(rng, (rows, 2, plan.dim_in), dtype)
        self.params = tuple(_normal(rng, (NUM_SETS, p.mul, 2), dtype) for p in plan.paths)
        self.indices = jnp.asarray(rng.integers(0, NUM_SETS, rows), jnp.int32)

    def op(self, backend, **kwargs):
        def f(x, params, indices):
            return ops.symmetric_contraction(x, params, SYMMETRIC_PLAN, indices=indices, backend=backend,
                                             **kwargs)

        return f

    @staticmethod
    def spec(x, params, indices):
        return spec.symmetric_contraction(x, params, SYMMETRIC_PLAN, indices)


OPS = [IndexedLinear, SymmetricContraction]
ids = lambda case: case.name


def force_training_loss(f, indices, projection):
    """A loss on the input gradient (force training): differentiating it is second order.
    The projection is fixed and random, so no cotangent depends on the output."""

    def loss(params, x):
        energy = lambda x: jnp.sum(projection * f(x, params, indices).astype(jnp.float32))
        forces = jax.grad(energy)(x)
        return jnp.sum(jnp.sin(forces.astype(jnp.float32)))

    return loss


def _projection(case):
    out = jax.eval_shape(case.spec, case.x, case.params, case.indices)
    return jnp.asarray(np.random.default_rng(5).standard_normal(out.shape), jnp.float32)


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_second_order_inside_scan(case_type, backend):
    """A two-layer stack scanned over its parameters (``hk.scan``, ``layer_stack``), the loss
    on forces: gradients of second order with respect to parameters and input."""
    case = case_type()
    projection = _projection(case)
    stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), case.params)

    def model(f):
        def loss(stacked, x):
            def layer(x, params):
                out = f(x, params, case.indices)
                step = force_training_loss(f, case.indices, projection)(params, x)
                return (x + 0.1 * jnp.tanh(out) if out.shape == x.shape else 0.9 * x), step

            x, steps = jax.lax.scan(layer, x, stacked)
            return jnp.sum(steps) + jnp.sum(x**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    ours = model(case.op(backend))(stacked, case.x)
    expected = model(case.spec)(stacked, case.x)
    assert_trees_close(ours, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_vmap_over_rows_and_over_parameters(case_type, backend):
    case = case_type()
    batch_x = jnp.stack([case.x, -case.x])
    batch_i = jnp.stack([case.indices, case.indices[::-1]])
    ensemble = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), case.params)
    rows = lambda f: jax.jit(jax.vmap(f, in_axes=(0, None, 0)))(batch_x, case.params, batch_i)
    members = lambda f: jax.jit(jax.vmap(f, in_axes=(None, 0, None)))(case.x, ensemble, case.indices)
    assert_trees_close(rows(case.op(backend)), rows(case.spec))
    assert_trees_close(members(case.op(backend)), members(case.spec))

    projection = _projection(case)

    def ensemble_grad(f):  # per-member second-order gradients (ensembles of potentials)
        loss = force_training_loss(f, case.indices, projection)
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(ensemble, case.x)

    assert_trees_close(ensemble_grad(case.op(backend)), ensemble_grad(case.spec), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_checkpoint_second_order(case_type, backend):
    case = case_type()
    projection = _projection(case)

    def grads(f):
        loss = force_training_loss(jax.checkpoint(f), case.indices, projection)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(case.params, case.x)

    assert_trees_close(grads(case.op(backend)), grads(case.spec), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_export_for_cuda_tpu_and_cpu(case_type):
    """One artifact for three platforms; serialised, deserialised and called on CPU, it
    gives the spec's numbers, and carries the Triton and Mosaic kernels."""
    case = case_type()
    f = jax.jit(case.op("auto"))
    exported = export.export(
        f,
        platforms=("cuda", "tpu", "cpu"),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(case.x, case.params, case.indices)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" in text
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == ("cuda", "tpu", "cpu")
    out = restored.call(case.x, case.params, case.indices)
    assert_trees_close(out, case.spec(case.x, case.params, case.indices))

    grad_exported = export.export(jax.jit(jax.grad(lambda x: jnp.sum(f(x, case.params, case.indices)))),
                                  platforms=("cpu",))(case.x)
    expected = jax.grad(lambda x: jnp.sum(case.spec(x, case.params, case.indices)))(case.x)
    assert_trees_close(export.deserialize(grad_exported.serialize()).call(case.x), expected)


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_16_bit_inputs_accumulate_in_float32(case_type, dtype, backend):
    """16-bit inputs and weights are accepted by the public ops, accumulate in float32 and
    come out in their dtype: the float32 spec of the same rounded values, rounded once;
    the input gradient too."""
    case = case_type(dtype=dtype, rows=24)
    kwargs = {"precision": "highest"} if case_type is IndexedLinear else {}
    out = jax.jit(case.op(backend, **kwargs))(case.x, case.params, case.indices)
    assert out.dtype == dtype
    as32 = jax.tree.map(lambda a: a.astype(jnp.float32), (case.x, case.params))
    assert_rounded_once(out, case.spec(*as32, case.indices))
    projection = _projection(case).astype(dtype).astype(jnp.float32)  # the cotangent the op gets
    grad = lambda f, x, params: jax.jit(jax.grad(lambda x: jnp.sum(projection * f(x, params, case.indices)
                                                                   .astype(jnp.float32))))(x)
    ours = grad(case.op(backend, **kwargs), case.x, case.params)
    assert ours.dtype == dtype
    assert_rounded_once(ours, grad(case.spec, *as32))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_float64_accumulates_in_float64(case_type, backend):
    with jax.enable_x64(True):
        case = case_type(dtype=jnp.float64)
        out = jax.jit(case.op(backend))(case.x, case.params, case.indices)
        expected = case.spec(case.x, case.params, case.indices)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-12, atol=1e-12)
        projection = _projection(case)
        grads = lambda f: jax.jit(jax.grad(force_training_loss(f, case.indices, projection)))(
            case.params, case.x)
        assert_trees_close(grads(case.op(backend)), grads(case.spec), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_float64_has_no_kernel(case_type):
    with jax.enable_x64(True):
        case = case_type(dtype=jnp.float64)
        with pytest.raises(NotImplementedError, match=f"{case.name}: backend 'pallas'.*float64"):
            case.op("pallas")(case.x, case.params, case.indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexed_linear_follows_jax_precision_contract(backend):
    """``precision=`` and ``jax.default_matmul_precision`` reach the matmuls of every
    backend (on CPU, the reference's dots and the interpreted kernels' dots)."""
    case = IndexedLinear()

    def lowered(**kwargs):
        f = jax.jit(case.op(backend, **kwargs))
        return f.trace(case.x, case.params, case.indices).lower().as_text()

    highest, high = "precision = [HIGHEST, HIGHEST]", "precision = [HIGH, HIGH]"
    assert highest in lowered(precision="highest")
    with jax.default_matmul_precision("tensorfloat32"):
        text = lowered()
    assert high in text and highest not in text
    text = lowered()
    assert high not in text and highest not in text  # JAX's DEFAULT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_no_weight_sets(case_type, backend):
    """``S = 0``: no index is in range. Concrete indices raise, naming the argument;
    traced ones give rows of NaN, on every backend, and finite zero gradients."""
    case = case_type()
    empty = jax.tree.map(lambda p: p[:0], case.params)
    f = case.op(backend)
    with pytest.raises(ValueError, match=rf"{case.name}: indices must lie in \[0, 0\)"):
        f(case.x, empty, case.indices)
    out = jax.jit(f)(case.x, empty, case.indices)
    assert out.shape == case.spec(case.x, case.params, case.indices).shape
    assert bool(jnp.all(jnp.isnan(out)))
    loss = lambda x, indices: jnp.sum(jnp.where(jnp.isnan(out := f(x, empty, indices)), 0, out))
    grad = jax.jit(jax.grad(loss))(case.x, case.indices)
    assert bool(jnp.all(grad == 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_tracing_binds_one_primitive_and_no_kernel(case_type, backend):
    """Tracing the force-training gradient binds the op (and its derivatives) as
    ``e3kernels_call``; no implementation is traced until lowering, so ``"auto"`` and
    ``"pallas"`` trace no Triton or Mosaic kernel on CPU."""
    case = case_type()
    loss = force_training_loss(case.op(backend), case.indices, _projection(case))
    text = str(jax.make_jaxpr(jax.grad(loss))(case.params, case.x))
    assert "e3kernels_call" in text
    assert "pallas_call" not in text and "scan" not in text and "sort" not in text


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
def test_indexed_linear_module_in_layer_stack_second_order(backend):
    """``Linear(i, x)`` in ``hk.experimental.layer_stack``, trained on forces: the same
    parameters and gradients as e3nn-jax's module in the same stack."""
    import e3nn_jax as e3nn
    import haiku as hk

    import e3kernels

    irreps = "4x0e + 3x1o"
    rng = np.random.default_rng(0)
    x = e3nn.IrrepsArray(irreps, _normal(rng, (10, e3nn.Irreps(irreps).dim)))
    species = jnp.asarray(rng.integers(0, NUM_SETS, 10), jnp.int32)

    def stack(namespace, **kwargs):
        def model(i, x):
            layer = lambda x: namespace.Linear(irreps, num_indexed_weights=NUM_SETS, **kwargs)(i, x)
            return hk.experimental.layer_stack(2)(layer)(x)

        return hk.without_apply_rng(hk.transform(model))

    ours, theirs = stack(e3kernels.haiku, backend=backend), stack(e3nn.haiku)
    params = theirs.init(jax.random.PRNGKey(0), species, x)
    assert_trees_close(ours.init(jax.random.PRNGKey(0), species, x), params)

    def grads(transformed):
        def loss(params, array):
            def energy(array):
                out = transformed.apply(params, species, e3nn.IrrepsArray(irreps, array))
                return jnp.sum(jnp.sin(out.array))

            return jnp.sum(jax.grad(energy)(array) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x.array)

    assert_trees_close(grads(ours), grads(theirs), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64],
                         ids=lambda d: d.__name__)
def test_modules_take_every_float_dtype(dtype):
    """Through the public modules (the ops' own checks once refused bfloat16): parameters
    and outputs in the input's dtype, float64 equal to e3nn-jax's at float64 round-off."""
    import e3nn_jax as e3nn
    import haiku as hk

    import e3kernels

    with jax.enable_x64(dtype == jnp.float64):
        x = e3nn.normal("4x0e + 3x1o", jax.random.PRNGKey(0), (10,)).astype(dtype)
        species = jnp.arange(10) % NUM_SETS
        outputs = []
        for namespace in (e3nn.haiku, e3kernels.haiku):
            linear = hk.without_apply_rng(hk.transform(
                lambda i, x, ns=namespace: ns.Linear("4x0e + 3x1o", num_indexed_weights=NUM_SETS)(i, x)))
            params = linear.init(jax.random.PRNGKey(1), species, x)
            outputs.append(linear.apply(params, species, x).array)
            assert all(p.dtype == dtype for p in jax.tree.leaves(params))
        assert outputs[1].dtype == dtype
        tol = {jnp.bfloat16: 3e-2, jnp.float16: 3e-3, jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]
        ours, theirs = (np.asarray(o, np.float64) for o in outputs)
        np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * np.abs(theirs).max())

        xs = e3nn.normal("0e + 1o", jax.random.PRNGKey(2), (10, 3)).astype(dtype)
        product = hk.without_apply_rng(hk.transform(lambda i, x: e3kernels.haiku.SymmetricTensorProduct(
            (1, 2), num_indexed_weights=NUM_SETS)(i, x)))
        params = product.init(jax.random.PRNGKey(1), species, xs)
        assert product.apply(params, species, xs).dtype == dtype


def test_forward_mode_raises_jax_error():
    """Every op's implementations are ``custom_vjp`` ops (their derivatives are programs of
    their own, for compile time): ``jax.jvp`` raises JAX's error on every backend, never a
    wrong answer."""
    case = SymmetricContraction()
    f = lambda backend: lambda x: case.op(backend)(x, case.params, case.indices)
    for backend in ("reference", "pallas"):
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(f(backend), (case.x,), (jnp.ones_like(case.x),))
    linear = IndexedLinear()
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: linear.op("reference")(x, linear.params, linear.indices), (linear.x,),
                (jnp.ones_like(linear.x),))
