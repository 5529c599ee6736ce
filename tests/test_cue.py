"""``e3kernels.cue``: cuequivariance-jax's segmented polynomials on our engine, against
``cuex`` (``method="naive"``, the oracle) and ``e3kernels.spec.segmented_polynomial``,
values and derivatives to second order, on the reference and on the kernels (interpret
mode); the switch (``routed``); and the errors for what it does not run."""

from __future__ import annotations

import functools

import cuequivariance as cue
import cuequivariance_jax as cuex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, lowered_text
from cuequivariance.group_theory.experimental.mace import symmetric_contraction

from e3kernels import cue as e3cue
from e3kernels import spec

BACKENDS = ["reference", "pallas"]  # pallas on CPU: the Triton kernels in interpret mode


def irreps(s: str) -> cue.Irreps:
    return cue.Irreps(cue.O3, s)


def up_to(lmax: int, mul: int = 1) -> str:
    return " + ".join(f"{mul}x{degree}{'eo'[degree % 2]}" for degree in range(lmax + 1))


def channelwise(mul: int, lmax: int, simplify: bool = False):
    """MACE's interaction; ``simplify``: output irreps merged (cuex's MACE example), so each
    output irrep interleaves several paths' channels."""
    node, sh = up_to(lmax, mul), up_to(lmax)
    return cue.descriptors.channelwise_tensor_product(irreps(node), irreps(sh), irreps(sh), simplify)


def product_basis(mul: int, lmax: int, keep: str, degrees=(1, 2, 3)):
    return symmetric_contraction(irreps(up_to(lmax, mul)), irreps(keep), degrees)[0]


def conv_case(descriptor, nodes: int, edges: int, seed=0, drop=True):
    """Per-edge weights, node features gathered by sender, harmonics per edge, messages
    scattered to receivers; with ``drop``, the last edge's receiver is out of range (the
    edge is dropped)."""
    p = descriptor.polynomial
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(edges, p.inputs[0].size)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(nodes, p.inputs[1].size)), jnp.float32)
    sh = jnp.asarray(rng.normal(size=(edges, p.inputs[2].size)), jnp.float32)
    senders = jnp.asarray(rng.integers(0, nodes, edges), jnp.int32)
    receivers = jnp.asarray(rng.integers(0, nodes, edges), jnp.int32)
    if drop:
        receivers = receivers.at[-1].set(nodes)
    out = jax.ShapeDtypeStruct((nodes, p.outputs[0].size), jnp.float32)
    return p, [w, x, sh], [out], [None, senders, None, receivers]


def product_case(descriptor, nodes: int, species: int, seed=0):
    """Per-species weights gathered by each node's species, node features per row."""
    p = descriptor.polynomial
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(species, p.inputs[0].size)) / 4, jnp.float32)
    x = jnp.asarray(rng.normal(size=(nodes, p.inputs[1].size)) / 2, jnp.float32)
    kinds = jnp.asarray(rng.integers(0, species, nodes), jnp.int32)
    return p, [w, x], [jax.ShapeDtypeStruct((nodes, -1), jnp.float32)], [kinds, None, None]


def naive(p, inputs, outs, indices):
    return cuex.segmented_polynomial(p, inputs, outs, indices, method="naive")


def ours(backend):
    return lambda p, inputs, outs, indices: e3cue.segmented_polynomial(p, inputs, outs, indices,
                                                                       backend=backend)


def spec_of(p, inputs, outs, indices):
    n = len(inputs)
    rows = [o.shape[0] for o in outs]
    return spec.segmented_polynomial(p, inputs, rows, indices[:n], indices[n:])


SMALL = {
    "channelwise": lambda: conv_case(channelwise(4, 2), nodes=5, edges=11),
    "channelwise, merged output irreps": lambda: conv_case(channelwise(4, 2, simplify=True), nodes=5,
                                                           edges=11),
    "channelwise, every edge kept": lambda: conv_case(channelwise(4, 2), nodes=5, edges=11, drop=False),
    "channelwise, no indices": lambda: _no_indices(conv_case(channelwise(4, 2), nodes=5, edges=11)),
    "product basis": lambda: product_case(product_basis(4, 2, "4x0e + 4x1o"), nodes=9, species=3),
    "product basis, gathered weights": lambda: _no_indices(
        product_case(product_basis(4, 2, "4x0e + 4x1o"), nodes=9, species=3)),
    "linear": lambda: linear_case(None),
    "linear, species weights": lambda: linear_case(3),
    "linear, mul_ir": lambda: linear_case(None, mul_ir=True),
    "linear, scalars to one (a readout)": lambda: linear_case(None, irreps_in="6x0e + 2x0e", irreps_out="0e"),
    "species skip": lambda: fully_connected_case("4x0e + 4x1o", "3x0e", "4x0e + 4x1o", one_hot=True),
    "species skip to scalars, consolidated": lambda: fully_connected_case(
        "4x0e + 4x1o", "3x0e", "5x0e", one_hot=True, consolidate=True),
    "fully connected": lambda: fully_connected_case("4x0e + 3x1o", "2x0e + 2x1o", "5x0e + 2x1o + 3x2e"),
    "fully connected, mul_ir": lambda: fully_connected_case(
        "4x0e + 3x1o", "2x0e + 2x1o", "5x0e + 2x1o + 3x2e", modes="wvu,ui,vj,wk+ijk"),
    "spherical harmonics": lambda: (
        cue.descriptors.spherical_harmonics(cue.SO3(1), [0, 1, 2, 3]).polynomial,
        [jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)],
        [jax.ShapeDtypeStruct((6, -1), jnp.float32)], None),
}


def linear_case(species: int | None, mul_ir: bool = False, seed=0, irreps_in="4x0e + 4x1o + 2x1o + 3x2e",
                irreps_out="3x0e + 3x1o + 2x3o"):
    """``cue.descriptors.linear``: weights shared (``species=None``) or gathered per row by
    an index; ``mul_ir``: the same map on ``(mul, ir)`` segments (mace-jax's public layout)."""
    p = cue.descriptors.linear(irreps(irreps_in), irreps(irreps_out)).polynomial
    if mul_ir:
        p = cue.SegmentedPolynomial.eval_last_operand(p.operations[0][1].add_or_transpose_modes("uv,ui,vi"))
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(species or 1, p.inputs[0].size)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(7, p.inputs[1].size)), jnp.float32)
    index = None if species is None else [jnp.asarray(rng.integers(0, species, 7), jnp.int32), None, None]
    return p, [w, x], [jax.ShapeDtypeStruct((7, -1), jnp.float32)], index


def fully_connected_case(in1: str, in2: str, out: str, one_hot=False, modes=None, consolidate=False, rows=7,
                         seed=0):
    """``cue.descriptors.fully_connected_tensor_product`` with shared weights; ``one_hot``:
    the second input a one-hot species (mace-jax's species skip); ``modes``: the same
    product with its operands' modes reordered (as ``"wvu,ui,vj,wk+ijk"``: ``(mul, ir)``
    segments, weights stored ``(w, v, u)``); ``consolidate``: passed consolidated (unit
    modes squeezed: a scalar output's ir mode gone)."""
    p = cue.descriptors.fully_connected_tensor_product(irreps(in1), irreps(in2), irreps(out)).polynomial
    if consolidate:
        p = p.consolidate()
    if modes is not None:
        p = cue.SegmentedPolynomial.eval_last_operand(p.operations[0][1].add_or_transpose_modes(modes))
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(1, p.inputs[0].size)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(rows, p.inputs[1].size)), jnp.float32)
    if one_hot:
        x2 = jax.nn.one_hot(rng.integers(0, p.inputs[2].size, rows), p.inputs[2].size)
    else:
        x2 = jnp.asarray(rng.normal(size=(rows, p.inputs[2].size)), jnp.float32)
    return p, [w, x1, x2], [jax.ShapeDtypeStruct((rows, -1), jnp.float32)], None


def _no_indices(case):
    """The same computation with every index applied by the caller (gathers) or by a
    separate scatter: every buffer per row."""
    p, inputs, outs, indices = case
    n = len(inputs)
    gathered = [x if i is None else x[i] for x, i in zip(inputs, indices[:n])]
    rows = max(x.shape[0] for x in gathered)
    return p, gathered, [jax.ShapeDtypeStruct((rows,) + o.shape[1:], o.dtype) for o in outs], None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SMALL)
def test_values_match_cuex_and_spec(case, backend):
    p, inputs, outs, indices = SMALL[case]()
    if case.startswith("channelwise"):  # the form it runs in
        jaxpr = str(jax.make_jaxpr(lambda *xs: ours(backend)(p, list(xs), outs, indices))(*inputs))
        assert "name='equivariant_convolution'" in jaxpr
    expected = naive(p, inputs, outs, indices)
    got = ours(backend)(p, inputs, outs, indices)
    for g, e, s in zip(got, expected, spec_of(p, inputs, outs, indices or [None] * (len(inputs) + 1))):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert_close(g, s, rtol=1e-5, atol=1e-5)


def _second_order(evaluate, p, inputs, outs, indices, wrt: int):
    """``d/d inputs[wrt] of |d/d(all inputs) sum(sin(out))|^2``: a force-style second order."""

    def energy(*xs):
        return sum(jnp.sum(jnp.sin(y)) for y in evaluate(p, list(xs), outs, indices))

    def force_loss(*xs):
        return sum(jnp.sum(g ** 2) for g in jax.grad(energy, argnums=tuple(range(len(xs))))(*xs))

    return jax.grad(energy, argnums=wrt)(*inputs), jax.grad(force_loss, argnums=wrt)(*inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["channelwise, every edge kept", "product basis", "linear, species weights",
                                  "fully connected"])
def test_derivatives_to_second_order_match_cuex(case, backend):
    """(With every edge kept: cuex's naive gradient leaks through a dropped edge, see
    :func:`test_dropped_edge_never_leaks`.)"""
    p, inputs, outs, indices = SMALL[case]()
    # the gathered input (node features, species weights); the first factor of a product
    wrt = 1 if case.startswith(("channelwise", "fully")) else 0
    expected = _second_order(naive, p, inputs, outs, indices, wrt)
    got = _second_order(ours(backend), p, inputs, outs, indices, wrt)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_edge_never_leaks(backend):
    """An edge whose receiver is out of range changes nothing, to second order: node 3's
    features reach the output only through the dropped edge, so every derivative in them
    is zero. (cuex's naive method gives them a nonzero gradient while its forward pass
    does not depend on them.)"""
    p, inputs, outs, indices = SMALL["channelwise"]()
    senders = indices[1]
    assert int(senders[-1]) == 3 and int(jnp.sum(senders == 3)) == 1
    kept = [x[:-1] if i in (0, 2) else x for i, x in enumerate(inputs)]
    kept_indices = [None, senders[:-1], None, indices[3][:-1]]
    assert_close(ours(backend)(p, inputs, outs, indices)[0], ours(backend)(p, kept, outs, kept_indices)[0],
                 rtol=0, atol=1e-6)
    for derivative in _second_order(ours(backend), p, inputs, outs, indices, 1):
        assert float(jnp.abs(derivative[3]).max()) == 0.0
        assert float(jnp.abs(derivative).max()) > 0.0


@pytest.mark.parametrize("case", ["channelwise", "product basis", "species skip"])
def test_mace_m_size(case):
    """MACE-M's sizes (128 channels, l_max 3, correlation 3, 10 species): values and
    gradients, the reference against cuex; the kernels (interpret mode) on a few rows."""
    if case == "channelwise":
        p, inputs, outs, indices = conv_case(channelwise(128, 3), nodes=6, edges=40, drop=False)
        wrt = 1
    elif case == "species skip":
        p, inputs, outs, indices = fully_connected_case("128x0e + 128x1o", "10x0e", "128x0e + 128x1o",
                                                        one_hot=True, rows=6)
        wrt = 1
    else:
        p, inputs, outs, indices = product_case(product_basis(128, 3, "128x0e + 128x1o"), nodes=6, species=2)
        wrt = 0

    def energy(evaluate, *xs):
        return sum(jnp.sum(jnp.sin(y)) for y in evaluate(p, list(xs), outs, indices))

    for backend in BACKENDS:
        assert_close(ours(backend)(p, inputs, outs, indices)[0], naive(p, inputs, outs, indices)[0],
                     rtol=1e-4, atol=1e-4, what=backend)
    grad = lambda evaluate: jax.grad(functools.partial(energy, evaluate), argnums=wrt)(*inputs)
    assert_close(grad(ours("reference")), grad(naive), rtol=1e-4, atol=1e-4)


def test_equivariant_polynomial_reparray():
    d = channelwise(4, 2)
    p, (w, x, sh), _, (_, senders, _, _) = conv_case(d, nodes=5, edges=11)
    reps = [cuex.RepArray(d.inputs[0].irreps, w, cue.ir_mul),
            cuex.RepArray(d.inputs[1].irreps, x[senders], cue.ir_mul),
            cuex.RepArray(d.inputs[2].irreps, sh, cue.ir_mul)]
    expected = cuex.equivariant_polynomial(d, reps, method="naive")
    got = e3cue.equivariant_polynomial(d, reps)
    assert isinstance(got, cuex.RepArray) and got.irreps == expected.irreps and got.layout == expected.layout
    assert_close(got.array, expected.array, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"equivariant_polynomial: inputs\[1\]: expected representation"):
        e3cue.equivariant_polynomial(d, [reps[0], reps[2], reps[1]])


def test_float64_sums_in_float64():
    with jax.enable_x64():
        p, inputs, outs, indices = SMALL["product basis"]()
        inputs = [x.astype(jnp.float64) for x in inputs]
        outs = [jax.ShapeDtypeStruct(o.shape, jnp.float64) for o in outs]
        (got,) = ours("reference")(p, inputs, outs, indices)
        (expected,) = spec_of(p, inputs, outs, indices)
        assert got.dtype == jnp.float64
        assert_close(got, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(NotImplementedError, match="float64 inputs run on the reference"):
            ours("pallas")(p, inputs, outs, indices)


@pytest.mark.parametrize("case", ["channelwise", "species skip", "spherical harmonics"])
def test_bfloat16_inputs_sum_in_float32(case):
    p, inputs, outs, indices = SMALL[case]()
    rounded = [x.astype(jnp.bfloat16) for x in inputs]
    out16 = [jax.ShapeDtypeStruct(o.shape, jnp.bfloat16) for o in outs]
    for backend in BACKENDS:
        (got,) = ours(backend)(p, rounded, out16, indices)
        (exact,) = ours(backend)(p, [x.astype(jnp.float32) for x in rounded], outs, indices)
        assert got.dtype == jnp.bfloat16
        assert_close(got.astype(jnp.float32), exact.astype(jnp.bfloat16).astype(jnp.float32), rtol=0, atol=0,
                     what=f"{backend}: the float32 result rounded once")


def test_jit_and_vmap():
    p, inputs, outs, indices = SMALL["product basis"]()
    f = jax.jit(lambda w, x: ours("reference")(p, [w, x], outs, indices)[0])
    assert_close(f(*inputs), naive(p, inputs, outs, indices)[0], rtol=1e-5, atol=1e-5)
    batched = jax.vmap(f, in_axes=(None, 0))(inputs[0], jnp.stack([inputs[1], 2 * inputs[1]]))
    assert_close(batched[1], f(inputs[0], 2 * inputs[1]), rtol=1e-6, atol=1e-6)


# ---- the switch ------------------------------------------------------------------------------


def test_routed_sends_cuex_calls_here_and_restores():
    original = cuex.segmented_polynomial
    d = channelwise(4, 2)
    p, inputs, outs, indices = conv_case(d, nodes=5, edges=11)

    def program():  # a new function each time: JAX caches a function's trace
        return lambda *xs: cuex.segmented_polynomial(p, list(xs), outs, indices, method="naive")[0]

    with e3cue.routed():
        assert cuex.segmented_polynomial is not original
        routed_jaxpr = str(jax.make_jaxpr(program())(*inputs))
        routed_value = jax.jit(program())(*inputs)
    assert cuex.segmented_polynomial is original
    assert "e3kernels_call" in routed_jaxpr
    assert "e3kernels_call" not in str(jax.make_jaxpr(program())(*inputs))
    assert_close(routed_value, program()(*inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError), e3cue.routed():
        raise RuntimeError("leaving by an exception restores too")
    assert cuex.segmented_polynomial is original


def test_routed_unsupported_raises_or_uses_cuex_when_asked():
    d = cue.descriptors.full_tensor_product(irreps("4x0e + 4x1o"), irreps("3x0e"))  # out[k, u, v]: two modes
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.normal(size=(5, op.dim)), jnp.float32) for op in d.inputs]
    out = [jax.ShapeDtypeStruct((5, d.outputs[0].dim), jnp.float32)]
    expected = cuex.segmented_polynomial(d.polynomial, inputs, out, method="naive")[0]
    with e3cue.routed(), pytest.raises(NotImplementedError, match="channel modes"):
        cuex.segmented_polynomial(d.polynomial, inputs, out, method="naive")
    with e3cue.routed(unsupported="cuex"):
        got = cuex.segmented_polynomial(d.polynomial, inputs, out, method="naive")[0]
    assert_close(got, expected, rtol=0, atol=0)


# ---- errors ----------------------------------------------------------------------------------


def test_clear_errors():
    p, inputs, outs, indices = SMALL["channelwise"]()
    with pytest.raises(ValueError, match=r"polynomial: inputs\[1\]: expected shape \(\*batch, 36\)"):
        e3cue.segmented_polynomial(p, [inputs[0], inputs[1][:, :-1], inputs[2]], outs, indices)
    with pytest.raises(ValueError, match="indices: expected 4"):
        e3cue.segmented_polynomial(p, inputs, outs, indices[:3])
    with pytest.raises(NotImplementedError, match=r"indices\[1\]: cuex.Repeats is not supported"):
        e3cue.segmented_polynomial(p, inputs, outs, [None, cuex.Repeats(jnp.array([1, 1])), None, None])
    with pytest.raises(NotImplementedError, match=r"inputs\[0\]: one batch axis at most"):
        e3cue.segmented_polynomial(p, [inputs[0][None]] + inputs[1:], outs, indices)
    with pytest.raises(ValueError, match="batch extents"):
        e3cue.segmented_polynomial(p, [inputs[0][:-1]] + inputs[1:], outs, indices)
    full = cue.descriptors.full_tensor_product(irreps("2x0e"), irreps("3x0e"))
    with pytest.raises(NotImplementedError, match="channel modes.*method='naive'"):
        e3cue.segmented_polynomial(full.polynomial, [jnp.ones((4, 2)), jnp.ones((4, 3))],
                                   [jax.ShapeDtypeStruct((4, 6), jnp.float32)])
    p, (w, x1, x2), outs, _ = fully_connected_case("2x0e", "3x0e", "2x0e")
    with pytest.raises(NotImplementedError, match=r"inputs\[0\]: a fully connected product's weights shared"):
        e3cue.segmented_polynomial(p, [jnp.concatenate([w] * 7), x1, x2], outs)
    p, (w, x), outs, _ = linear_case(None)
    with pytest.raises(NotImplementedError, match=r"inputs\[0\]: a linear map's weights shared"):
        e3cue.segmented_polynomial(p, [jnp.concatenate([w] * 7), x], outs)


# ---- a MACE-style model written for cuex (bench/cue_mace.py) ------------------------------------


def test_mace_style_model_routed_equals_naive():
    """The model cuex's MACE example and mace-jax's adapters describe, traced inside
    ``routed`` (which raises for anything it does not run: every call is on e3kernels):
    energy, forces and training gradients equal the all-naive run's."""
    from bench import cue_mace
    from e3kernels.models import mace

    config = cue_mace.Config(channels=8, layers=2)
    positions, species, cell = mace.random_liquid(12, neighbors=20, r_max=config.r_max,
                                                  num_species=config.species, seed=1)
    edges = mace.neighbor_list(positions, cell, config.r_max)
    graph = tuple(jnp.asarray(a) for a in (positions, species, *edges))
    params = cue_mace.init(config, jax.random.PRNGKey(0))
    projection = jax.random.normal(jax.random.PRNGKey(1), positions.shape)

    def run(*args):
        energy, forces = cue_mace.energy_and_forces(*args, config)
        grads = jax.grad(cue_mace.training_loss)(*args, projection, config)
        return energy, forces, grads

    def routed(*args):
        with e3cue.routed():
            return run(*args)

    expected = jax.jit(run)(params, *graph)
    jaxpr = str(jax.make_jaxpr(routed)(params, *graph))
    for op in ("equivariant_convolution", "indexed_linear", "e3kernels.cue.segmented_polynomial"):
        assert f"name='{op}'" in jaxpr, op
    assert "method=naive" not in jaxpr  # no call left on cuex
    got = jax.jit(routed)(params, *graph)
    assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, what="energy")
    assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5, what="forces")
    for g, e in zip(jax.tree.leaves(got[2]), jax.tree.leaves(expected[2])):
        assert_close(g, e, rtol=1e-4, atol=1e-5, what="training gradient")


@pytest.mark.parametrize("platform, marker, linear_kernel", [
    ("cuda", "__gpu$xla.gpu.triton", "indexed_linear_gpu"), ("tpu", "tpu_custom_call", "indexed_linear_tpu")])
def test_mace_style_model_training_lowers_to_kernels(platform, marker, linear_kernel):
    """The routed model's training gradient (energy and forces, differentiated twice),
    lowered for GPU and TPU with backend 'pallas': its interaction, Linears and product
    basis (and harmonics) are our kernels."""
    from bench import cue_mace

    config = cue_mace.Config(channels=8, layers=2)
    atoms, edges = 12, 60
    params = cue_mace.init(config, jax.random.PRNGKey(0))
    graph = (jnp.zeros((atoms, 3)), jnp.zeros(atoms, jnp.int32), jnp.zeros(edges, jnp.int32),
             jnp.ones(edges, jnp.int32), jnp.ones((edges, 3)), jnp.zeros((atoms, 3)))

    def training_grad(params, *graph):
        with e3cue.routed(backend="pallas"):
            return jax.grad(cue_mace.training_loss)(params, *graph, config)

    text = lowered_text(training_grad, platform, params, *graph)
    kernels = ("convolution_node_partial", "convolution_weights_partial", linear_kernel, "sparse_polynomial")
    for kernel in kernels:
        assert kernel in text, kernel
    assert text.count(marker) >= 10


def test_exported_gradient_for_three_platforms_runs_here():
    """The product basis' gradient exported for ("cuda", "tpu", "cpu") carries the Triton
    and Mosaic kernels and, restored here, equals cuex's."""
    p, inputs, outs, indices = SMALL["product basis"]()

    def grad(evaluate):
        return jax.grad(lambda w, x: jnp.sum(jnp.sin(evaluate(p, [w, x], outs, indices)[0])))

    exported = jax.export.export(
        jax.jit(grad(ours("auto"))), platforms=("cuda", "tpu", "cpu"),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*inputs)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" in text
    assert_close(exported.call(*inputs), grad(naive)(*inputs), rtol=1e-5, atol=1e-5)
