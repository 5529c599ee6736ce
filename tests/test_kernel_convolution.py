"""The convolution's Pallas kernels, GPU (Triton) and TPU (Mosaic) styles, in interpret mode
on CPU: each of the multilinear form's four partials against the reference's, the op to
second order against the spec, and lowering for real hardware.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_rounded_once, assert_trees_close, lowered_text
from test_convolution import (
    PLAN,
    Graph,
    Radial,
    force_training_loss,
    formed_spec,
    projection_for,
    radial_training_loss,
    spec_conv,
)

from e3kernels import ops
from e3kernels.kernels import equivariant_convolution as kernels
from e3kernels.kernels.equivariant_convolution._columns import column_terms
from e3kernels.reference import equivariant_convolution as reference

STYLES = {
    "triton": kernels.TRITON_INTERPRET,
    # tiles of 8 edges: the node with 20 edges spans three
    "mosaic": dataclasses.replace(kernels.MOSAIC_INTERPRET, tile_rows=8),
}
MACE_PLAN = ops.convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")


def busy_graph(plan=PLAN, channels=3, dtype=jnp.float32, edges=40):
    """Node 2 receives half the edges (several edge blocks: 20 of 40), node 6 none, and
    three edges have an end out of range."""
    g = Graph(plan, nodes=7, edges=edges, channels=channels, dtype=dtype)
    g.receivers = g.receivers.at[: edges // 2].set(2).at[7].set(9)
    g.senders = g.senders.at[11].set(-3).at[edges - 10].set(7)
    return g


def partial_args(g: Graph, which: int):
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(
        (g.x.shape[0], g.x.shape[1], g.plan.dim_out)), g.x.dtype)
    args = [g.x, g.sh, g.weights, cotangent]
    args[which] = None
    return tuple(args)


@pytest.mark.parametrize("which", ["x", "sh", "weights", "out"])
@pytest.mark.parametrize("style", STYLES)
def test_each_partial_equals_the_reference(style, which):
    which = ("x", "sh", "weights", "out").index(which)
    g = busy_graph(channels=3 if style == "mosaic" else 40)  # Triton: two channel blocks
    args = partial_args(g, which)
    ours = kernels.KernelPartials(PLAN, STYLES[style])(which, jnp.float32, args, *g.edges, 7)
    expected = reference.ReferencePartials(PLAN)(which, jnp.float32, args, *g.edges, 7)
    assert ours.shape == expected.shape
    assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_op_to_second_order_equals_the_spec(style):
    g = busy_graph(edges=24)  # node 2's 12 edges: two Mosaic tiles, one Triton block

    def f(x, params, edges):
        return kernels.equivariant_convolution(x, *params, *edges, plan=PLAN, avg_num_neighbors=2.5,
                                               config=STYLES[style])

    params = (g.sh, g.weights)
    assert_close(jax.jit(f)(g.x, params, g.edges), spec_conv()(g.x, params, g.edges))
    loss = lambda f: jax.jit(jax.grad(force_training_loss(f, g.edges, projection_for(g)), argnums=(0, 1)))
    assert_trees_close(loss(f)(params, g.x), loss(spec_conv())(params, g.x), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("style", STYLES)
def test_16_bit_inputs_accumulate_in_float32(style, dtype):
    """The float32 spec of the same rounded inputs, rounded once: output and gradients."""
    g = busy_graph(dtype=dtype)
    projection = projection_for(g).astype(dtype)

    def value_and_grads(f, x, params):
        out, vjp = jax.vjp(lambda x, params: f(x, params, g.edges), x, params)
        return out, vjp(projection.astype(out.dtype))

    def ours(x, params, edges):
        return kernels.equivariant_convolution(x, *params, *edges, plan=PLAN, avg_num_neighbors=2.5,
                                               config=STYLES[style])

    got = jax.jit(functools.partial(value_and_grads, ours))(g.x, (g.sh, g.weights))
    as32 = jax.tree.map(lambda a: a.astype(jnp.float32), (g.x, (g.sh, g.weights)))
    expected = jax.jit(functools.partial(value_and_grads, spec_conv(avg_num_neighbors=2.5)))(*as32)
    for name, a, b in zip(("out", "x", "sh", "weights"), jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert a.dtype == dtype, name
        assert_rounded_once(a, b, what=name)


def test_the_backend_runs_the_interpret_kernel():
    g = busy_graph()
    f = jax.jit(lambda x, sh, w, s, r: ops.equivariant_convolution(x, sh, w, s, r, PLAN, backend="pallas"))
    text = f.lower(g.x, g.sh, g.weights, *g.edges).as_text()
    assert "scan" not in text.lower() and "while" in text  # the interpret kernels' grid loop
    assert_close(f(g.x, g.sh, g.weights, *g.edges), spec_conv(avg_num_neighbors=1.0)(g.x, (g.sh, g.weights),
                                                                                     g.edges))


def test_column_terms_are_the_table():
    table = np.zeros_like(MACE_PLAN.table)
    for q, p, terms in column_terms(MACE_PLAN):
        assert MACE_PLAN.path_of_column[q] == p
        for i, j, coef in terms:
            table[i, j, q] = coef
    np.testing.assert_array_equal(table, MACE_PLAN.table)
    assert sum(len(t) for _, _, t in column_terms(MACE_PLAN)) == 86


# ---- fused radial weights: (x, sh, h, g, W) -------------------------------------------------

FUSED = ("x", "sh", "hidden", "out", "matrix")


def fused_partial_args(g: Graph, which: int, hidden=6):
    """The fused form's arguments with ``which``'s slot empty; the dropped edge 11's hidden
    row is NaN (padding), so a kernel that reads it fails."""
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((g.sh.shape[0], hidden)), g.x.dtype).at[11].set(jnp.nan)
    matrix = jnp.asarray(rng.standard_normal((hidden, g.plan.num_paths, g.x.shape[1])), g.x.dtype)
    args = list(partial_args(g, 2))
    args[2] = h
    args = args + [matrix]
    args[which] = None
    return tuple(args)


def assert_fused_partial(config, which: str, channels: int, tolerance=1e-5):
    which = FUSED.index(which)
    g = busy_graph(channels=channels)
    args = fused_partial_args(g, which)
    highest = jax.lax.Precision.HIGHEST
    ours = kernels.KernelPartials(PLAN, config, highest)(which, jnp.float32, args, *g.edges, 7)
    expected = reference.ReferencePartials(PLAN, highest)(which, jnp.float32, args, *g.edges, 7)
    assert ours.shape == expected.shape
    assert_close(ours, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("which", FUSED)
@pytest.mark.parametrize("style", STYLES)
def test_each_fused_partial_equals_the_reference(style, which):
    """Each of the five partials with the weights formed in the kernel from ``h`` and ``W``
    (``dF/dh`` per edge, ``dF/dW`` summed over edges), a dropped edge's NaN ``h`` unread."""
    assert_fused_partial(STYLES[style], which, channels=40 if style == "triton" else 3)


@pytest.mark.parametrize("which", ["hidden", "matrix", "out"])
def test_fused_mosaic_partials_over_channel_blocks(which):
    """260 channels: ``W``'s three lane blocks, ``dF/dh`` summed over them, ``dF/dW`` one
    output block each (values ~100: sums of 260 channels, float32 round-off ~1e-5)."""
    assert_fused_partial(STYLES["mosaic"], which, channels=260, tolerance=1e-4)


def fused_op(config):
    def f(x, sh, hidden, matrix, edges):
        matrix = matrix.reshape(matrix.shape[0], PLAN.num_paths, x.shape[1])
        return kernels.radial_equivariant_convolution(x, sh, hidden, matrix, *edges, plan=PLAN,
                                                      avg_num_neighbors=2.5, config=config,
                                                      precision=jax.lax.Precision.HIGHEST)

    return f


@pytest.mark.parametrize("style", STYLES)
def test_fused_op_to_second_order_equals_the_spec(style):
    """Forces, then a loss on them, differentiated in x, sh, h and W: every fused partial's
    derivatives on the kernels, against the spec on ``h @ W``."""
    g = busy_graph(edges=24)
    r = Radial(g)
    args = (g.x, g.sh, r.hidden, r.matrix, g.edges)
    assert_close(jax.jit(fused_op(STYLES[style]))(*args), formed_spec(*args))
    projection = projection_for(g)
    got = jax.jit(radial_training_loss(fused_op(STYLES[style]), projection))(*args)
    assert_trees_close(got, radial_training_loss(formed_spec, projection)(*args), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("style", STYLES)
def test_fused_16_bit_inputs_accumulate_in_float32(style):
    """bfloat16 ``h`` and ``W``: the weights' matmul and every sum in float32, each output
    and gradient rounded once."""
    g = busy_graph(dtype=jnp.bfloat16)
    r = Radial(g)
    projection = projection_for(g).astype(jnp.bfloat16)

    def value_and_grads(f, x, sh, hidden, matrix):
        out, vjp = jax.vjp(lambda *a: f(*a, g.edges), x, sh, hidden, matrix)
        return out, vjp(projection.astype(out.dtype))

    def spec(x, sh, hidden, matrix, edges):
        return formed_spec(x, sh, hidden, matrix, edges).astype(x.dtype)

    inputs = (g.x, g.sh, r.hidden, r.matrix)
    got = jax.jit(functools.partial(value_and_grads, fused_op(STYLES[style])))(*inputs)
    as32 = [a.astype(jnp.float32) for a in inputs]
    highest = jax.default_matmul_precision("highest")
    with highest:
        expected = jax.jit(functools.partial(value_and_grads, formed_spec))(*as32)
    names = ("out", "x", "sh", "hidden", "matrix")
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert a.dtype == jnp.bfloat16, name
        assert_rounded_once(a, b, what=name)


# ---- lowering for real hardware ------------------------------------------------------------

PLATFORMS = [("cuda", kernels.TRITON, "__gpu$xla.gpu.triton"), ("tpu", kernels.MOSAIC, "tpu_custom_call")]


@pytest.mark.parametrize("platform, config, marker", PLATFORMS)
def test_lowers_at_mace_size_to_second_order(platform, config, marker):
    """MACE's second interaction (128 channels, l <= 3), 1000 nodes and 30000 edges: the
    force-training gradient lowers every partial to a kernel and nothing else."""
    nodes, edges, channels = 1000, 30000, 128
    x = jnp.zeros((nodes, channels, MACE_PLAN.dim_in))
    params = (jnp.zeros((edges, MACE_PLAN.dim_sh)), jnp.zeros((edges, MACE_PLAN.num_paths, channels)))
    index = (jnp.zeros(edges, jnp.int32), jnp.zeros(edges, jnp.int32))
    projection = jnp.zeros((nodes, channels, MACE_PLAN.dim_out))

    def f(x, params, edges):
        return kernels.equivariant_convolution(x, *params, *edges, plan=MACE_PLAN, avg_num_neighbors=30.0,
                                               config=config)

    loss = force_training_loss(f, index, projection)
    text = lowered_text(jax.grad(loss, argnums=(0, 1)), platform, params, x)
    names = ("convolution_node_partial", "convolution_weights_partial", "convolution_sh_partial")
    assert text.count(marker) >= 6 and all(name in text for name in names)


@pytest.mark.parametrize("platform, config, marker", PLATFORMS)
def test_fused_lowers_at_mace_size_to_second_order(platform, config, marker):
    """The same with fused radial weights (64 hidden units): the training gradient in ``h``
    and ``W`` lowers to the fused kernels, and no ``(E, P, C)`` array is formed."""
    nodes, edges, channels, hidden = 1000, 30000, 128, 64
    x = jnp.zeros((nodes, channels, MACE_PLAN.dim_in))
    sh, h = jnp.zeros((edges, MACE_PLAN.dim_sh)), jnp.zeros((edges, hidden))
    matrix = jnp.zeros((hidden, MACE_PLAN.num_paths, channels))
    index = (jnp.zeros(edges, jnp.int32), jnp.zeros(edges, jnp.int32))
    projection = jnp.zeros((nodes, channels, MACE_PLAN.dim_out))

    def loss(x, sh, h, matrix):
        def energy(x, sh):
            out = kernels.radial_equivariant_convolution(x, sh, h, matrix, *index, plan=MACE_PLAN,
                                                         config=config, avg_num_neighbors=30.0,
                                                         precision=None)
            return jnp.sum(projection * out)

        gx, gsh = jax.grad(energy, argnums=(0, 1))(x, sh)
        return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gsh))

    text = lowered_text(jax.grad(loss, argnums=(2, 3)), platform, x, sh, h, matrix)
    names = ("convolution_node_partial", "convolution_hidden_partial", "convolution_matrix_partial",
             "convolution_sh_partial")
    assert text.count(marker) >= 6 and all(name in text for name in names)
    assert "convolution_weights_partial" not in text
    assert f"{edges}x{MACE_PLAN.num_paths}x{channels}" not in text


# ---- Mosaic layouts the cases above do not reach ---------------------------------------------

MOSAIC_LAYOUTS = {
    # 260 channels: three 128-lane blocks, the last one mostly padding
    "channel blocks": (STYLES["mosaic"], 260),
    # tiles of 16 edges: node 2's 20 edges span two
    "default tile": (kernels.MOSAIC_INTERPRET, 3),
}


@pytest.mark.parametrize("which", ["x", "sh", "weights", "out"])
@pytest.mark.parametrize("layout", MOSAIC_LAYOUTS)
def test_mosaic_partials_over_channel_blocks_and_the_default_tile(layout, which):
    config, channels = MOSAIC_LAYOUTS[layout]
    which = ("x", "sh", "weights", "out").index(which)
    g = busy_graph(channels=channels)
    args = partial_args(g, which)
    ours = kernels.KernelPartials(PLAN, config)(which, jnp.float32, args, *g.edges, 7)
    expected = reference.ReferencePartials(PLAN)(which, jnp.float32, args, *g.edges, 7)
    assert ours.shape == expected.shape
    assert_close(ours, expected, rtol=1e-5, atol=1e-5)
