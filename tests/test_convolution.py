"""``ops.equivariant_convolution`` and ``haiku.MessagePassingConvolution``: e3nn-jax's
formulation is the oracle of the spec, the spec that of every backend; derivatives to
second order, JAX's transformations, dtypes, several devices, errors.

The kernels' own tests (interpret mode, lowering) are in test_kernel_convolution.py.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_rounded_once, assert_trees_close, transform
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import e3kernels
from e3kernels import ops, spec

PLANS = [  # irreps per channel, irreps_sh, filter_ir_out
    ("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o"),  # MACE's second interaction
    ("0e", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o"),  # its first
    ("2x0e + 1o + 1e", "0e + 1o", None),  # multiplicities, both parities, no filter
]
#: the plan of the transformation tests: small, so interpret mode is quick
PLAN = ops.convolution_plan("0e + 1o", "0e + 1o + 2e", "0e + 1o + 2e")
BACKENDS = ["reference", "pallas"]


def e3nn_formulation(x, sh, weights, senders, receivers, plan, avg_num_neighbors=1.0):
    """The op's documented equality, in e3nn-jax."""
    msg = e3nn.tensor_product(
        e3nn.IrrepsArray(plan.irreps_in, x)[senders],
        e3nn.IrrepsArray(plan.irreps_sh, sh)[:, None, :],
        filter_ir_out=plan.filter_ir_out,
    )
    assert msg.irreps == plan.irreps_out
    msg = msg * jnp.swapaxes(weights, 1, 2)
    return e3nn.scatter_sum(msg, dst=receivers, output_size=x.shape[0]).array / avg_num_neighbors


class Graph:
    """Random nodes and edges, unsorted, with repeated pairs and a node without edges."""

    def __init__(self, plan=PLAN, nodes=7, edges=16, channels=3, dtype=jnp.float32, seed=0):
        rng = np.random.default_rng(seed)
        self.plan = plan
        self.x = jnp.asarray(rng.standard_normal((nodes, channels, plan.dim_in)), dtype)
        vectors = rng.standard_normal((edges, 3))
        sh = e3nn.spherical_harmonics(plan.irreps_sh, jnp.asarray(vectors), normalize=True)
        self.sh = sh.array.astype(dtype)
        self.vectors = vectors
        self.weights = jnp.asarray(rng.standard_normal((edges, plan.num_paths, channels)), dtype)
        self.senders = jnp.asarray(rng.integers(0, nodes - 1, edges), jnp.int32)
        self.receivers = jnp.asarray(rng.integers(0, nodes - 1, edges), jnp.int32)

    @property
    def edges(self):
        return self.senders, self.receivers


def conv(backend, plan=PLAN, avg_num_neighbors=2.5):
    def f(x, params, edges):
        sh, weights = params
        return ops.equivariant_convolution(x, sh, weights, *edges, plan,
                                           avg_num_neighbors=avg_num_neighbors, backend=backend)

    return f


def spec_conv(plan=PLAN, avg_num_neighbors=2.5):
    def f(x, params, edges):
        return spec.equivariant_convolution(x, *params, *edges, plan, avg_num_neighbors)

    return f


def force_training_loss(f, edges, projection):
    """Energy -> forces on the node features and the spherical harmonics -> a loss on both,
    differentiated in the parameters (second order)."""

    def loss(params, x):
        def energy(x, sh):
            return jnp.sum(projection * f(x, (sh, params[1]), edges).astype(jnp.float32))

        gx, gsh = jax.grad(energy, argnums=(0, 1))(x, params[0])
        return jnp.sum(jnp.sin(gx.astype(jnp.float32))) + jnp.sum(jnp.cos(gsh.astype(jnp.float32)))

    return loss


def projection_for(g: Graph):
    shape = (g.x.shape[0], g.x.shape[1], g.plan.dim_out)
    return jnp.asarray(np.random.default_rng(5).standard_normal(shape), jnp.float32)


# ---- the numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("plan_args", PLANS, ids=lambda a: a[0])
def test_plan_and_spec_equal_e3nn(plan_args):
    plan = ops.convolution_plan(*plan_args)
    g = Graph(plan)
    expected = e3nn_formulation(g.x, g.sh, g.weights, *g.edges, plan, 2.5)
    assert_close(spec.equivariant_convolution(g.x, g.sh, g.weights, *g.edges, plan, 2.5), expected)


@pytest.mark.parametrize("plan_args", PLANS, ids=lambda a: a[0])
def test_reference_equals_spec_to_second_order(plan_args):
    plan = ops.convolution_plan(*plan_args)
    g = Graph(plan)
    params = (g.sh, g.weights)
    out = jax.jit(conv("reference", plan))(g.x, params, g.edges)
    assert out.shape == (7, 3, plan.dim_out) and out.dtype == jnp.float32
    assert_close(out, spec_conv(plan)(g.x, params, g.edges))
    loss = lambda f: jax.jit(jax.grad(force_training_loss(f, g.edges, projection_for(g)), argnums=(0, 1)))
    assert_trees_close(loss(conv("reference", plan))(params, g.x), loss(spec_conv(plan))(params, g.x),
                       rtol=2e-4, atol=2e-4)


def test_reference_in_several_edge_blocks(monkeypatch):
    """Edge blocks of 8 over 21 edges: the sums run over three blocks, the last padded."""
    from e3kernels.reference import equivariant_convolution as reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 8)
    g = Graph(edges=21)
    params = (g.sh, g.weights)
    assert_close(jax.jit(conv("reference"))(g.x, params, g.edges), spec_conv()(g.x, params, g.edges))
    grads = lambda f: jax.grad(lambda x, p: jnp.sum(jnp.sin(f(x, p, g.edges))), argnums=(0, 1))(g.x, params)
    assert_trees_close(grads(conv("reference")), grads(spec_conv()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_out_of_range_contribute_nothing(backend):
    """Traced out-of-range senders or receivers drop their edge (values and gradients);
    concrete ones raise, naming the argument and the node count."""
    g = Graph()
    senders = g.senders.at[0].set(-1).at[3].set(7)
    receivers = g.receivers.at[5].set(99)
    f = conv(backend)
    keep = np.ones(16, bool)
    keep[[0, 3, 5]] = False
    expected = spec_conv()(g.x, (g.sh[keep], g.weights[keep]), (g.senders[keep], g.receivers[keep]))
    assert_close(jax.jit(f)(g.x, (g.sh, g.weights), (senders, receivers)), expected)
    grad_w = jax.jit(jax.grad(lambda p, e: jnp.sum(f(g.x, p, e))))((g.sh, g.weights), (senders, receivers))
    assert bool(jnp.all(grad_w[1][~keep] == 0)) and bool(jnp.all(grad_w[0][~keep] == 0))
    with pytest.raises(ValueError, match=r"equivariant_convolution: senders must lie in \[0, 7\) "
                                         r"\(x has 7 nodes\); got values in \[-1, 7\]"):
        f(g.x, (g.sh, g.weights), (senders, g.receivers))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_edges_and_no_channels(backend):
    g = Graph()
    f = jax.jit(conv(backend))
    none = (g.sh[:0], g.weights[:0])
    out = f(g.x, none, (g.senders[:0], g.receivers[:0]))
    assert out.shape == (7, 3, PLAN.dim_out) and bool(jnp.all(out == 0))
    out = f(g.x[:, :0], (g.sh, g.weights[:, :, :0]), g.edges)
    assert out.shape == (7, 0, PLAN.dim_out)


def test_equivariance():
    """Rotating (with parity) the node features and the edge vectors rotates the output."""
    plan = ops.convolution_plan(*PLANS[0])
    g = Graph(plan)
    angles = jax.random.uniform(jax.random.PRNGKey(3), (3,), minval=0.0, maxval=2 * np.pi)
    f = jax.jit(conv("reference", plan))
    out = e3nn.IrrepsArray(plan.irreps_out, f(g.x, (g.sh, g.weights), g.edges))
    x_rot = transform(e3nn.IrrepsArray(plan.irreps_in, g.x), angles, True).array
    vectors = transform(e3nn.IrrepsArray("1o", jnp.asarray(g.vectors, jnp.float32)), angles, True)
    sh_rot = e3nn.spherical_harmonics(plan.irreps_sh, vectors, normalize=True).array
    rotated = f(x_rot, (sh_rot, g.weights), g.edges)
    assert_close(rotated, transform(out, angles, True).array, rtol=1e-4, atol=1e-4)


# ---- JAX's transformations ------------------------------------------------------------------


def test_second_order_inside_scan_with_checkpoint(backend="reference"):
    """Two layers scanned over stacked weights, each a checkpointed convolution trained on
    forces (second order), against the spec. (The scan and the checkpoint see one primitive
    whatever the backend; the kernels' second order is in test_kernel_convolution.py.)"""
    g = Graph(channels=2)
    projection = projection_for(g)
    stacked = jnp.stack([g.weights, -0.5 * g.weights])

    def model(f):
        def loss(stacked, x):
            def layer(x, weights):
                step = force_training_loss(jax.checkpoint(f), g.edges, projection)((g.sh, weights), x)
                out = f(x, (g.sh, weights), g.edges)
                return x + 0.1 * jnp.tanh(out[:, :, : x.shape[-1]]), step

            x, steps = jax.lax.scan(layer, x, stacked)
            return jnp.sum(steps) + jnp.sum(x**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    assert_trees_close(model(conv(backend))(stacked, g.x), model(spec_conv())(stacked, g.x),
                       rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_graphs(backend):
    """Batches of graphs; second order on the reference (the kernels' derivatives are the
    same partials, tested to second order in test_kernel_convolution.py)."""
    g, h = Graph(seed=0), Graph(seed=1)
    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    args = (stack(g.x, h.x), stack((g.sh, g.weights), (h.sh, h.weights)), stack(g.edges, h.edges))
    batched = lambda f: jax.jit(jax.vmap(f))(*args)
    assert_close(batched(conv(backend)), batched(spec_conv()))
    if backend != "reference":
        return
    grads = lambda f: jax.jit(jax.vmap(jax.grad(force_training_loss(f, g.edges, projection_for(g)))))(
        args[1], args[0])
    assert_trees_close(grads(conv(backend)), grads(spec_conv()), rtol=2e-4, atol=2e-4)


def test_export_for_cuda_tpu_and_cpu():
    g = Graph()
    params = (g.sh, g.weights)
    exported = export.export(
        jax.jit(conv("auto")),
        platforms=("cuda", "tpu", "cpu"),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(g.x, params, g.edges)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" in text
    restored = export.deserialize(exported.serialize())
    assert_close(restored.call(g.x, params, g.edges), spec_conv()(g.x, params, g.edges))


def test_radial_weights_export_for_cuda_tpu_and_cpu():
    """The gradient in ``hidden`` and ``matrix``: the fused kernels (dF/dh, dF/dW) for CUDA
    and TPU in one exported program, the reference on CPU."""
    g = Graph()
    r = Radial(g)

    def grads(hidden, matrix):
        def energy(hidden, matrix):
            return jnp.sum(jnp.sin(radial_conv("auto")(g.x, g.sh, hidden, matrix, g.edges)))

        return jax.grad(energy, argnums=(0, 1))(hidden, matrix)

    exported = export.export(
        jax.jit(grads),
        platforms=("cuda", "tpu", "cpu"),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(r.hidden, r.matrix)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" in text
    assert "convolution_hidden_partial" in text and "convolution_matrix_partial" in text

    def expected(hidden, matrix):
        return jnp.sum(jnp.sin(formed_spec(g.x, g.sh, hidden, matrix, g.edges)))

    restored = export.deserialize(exported.serialize())
    want = jax.grad(expected, argnums=(0, 1))(r.hidden, r.matrix)
    assert_trees_close(restored.call(r.hidden, r.matrix), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
def test_16_bit_inputs_accumulate_in_float32(dtype, backend):
    """The float32 spec of the same rounded inputs, rounded once: output and gradients."""
    g = Graph(dtype=dtype)
    params = (g.sh, g.weights)
    out = jax.jit(conv(backend))(g.x, params, g.edges)
    assert out.dtype == dtype
    as32 = jax.tree.map(lambda a: a.astype(jnp.float32), (g.x, params))
    assert_rounded_once(out, spec_conv()(*as32, g.edges))
    projection = projection_for(g).astype(dtype).astype(jnp.float32)  # the cotangent the op gets
    grads = lambda f, x, p: jax.jit(jax.grad(
        lambda x, p: jnp.sum(projection * f(x, p, g.edges).astype(jnp.float32)), argnums=(0, 1)))(x, p)
    ours = grads(conv(backend), g.x, params)
    expected = grads(spec_conv(), *as32)
    for name, a, b in zip(("x", "sh", "weights"), jax.tree.leaves(ours), jax.tree.leaves(expected)):
        assert a.dtype == dtype, name
        assert_rounded_once(a, b, what=name)


def test_float64_accumulates_in_float64_and_has_no_kernel():
    with jax.enable_x64(True):
        g = Graph(dtype=jnp.float64)
        params = (g.sh, g.weights)
        out = jax.jit(conv("auto"))(g.x, params, g.edges)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), np.asarray(spec_conv()(g.x, params, g.edges)),
                                   rtol=1e-12, atol=1e-12)
        grads = lambda f: jax.jit(jax.grad(force_training_loss(f, g.edges, projection_for(g))))(params, g.x)
        assert_trees_close(grads(conv("reference")), grads(spec_conv()), rtol=1e-10, atol=1e-10)
        with pytest.raises(NotImplementedError, match="equivariant_convolution: backend 'pallas'.*float64"):
            conv("pallas")(g.x, params, g.edges)


def test_tracing_binds_one_primitive_and_no_kernel():
    g = Graph()
    loss = force_training_loss(conv("pallas"), g.edges, projection_for(g))
    text = str(jax.make_jaxpr(jax.grad(loss))((g.sh, g.weights), g.x))
    assert "e3kernels_call" in text and "pallas_call" not in text and "scan" not in text


# ---- several devices ------------------------------------------------------------------------


def _edge_mesh():
    assert len(jax.devices()) >= 4, f"4 devices expected, got {jax.devices()}"
    return jax.make_mesh((4,), ("edges",), axis_types=(jax.sharding.AxisType.Auto,))


def test_sharded_jit_splits_the_edges():
    """Edges sharded over 4 devices, nodes replicated: each device sums its own edges and
    the forward pass all-reduces the node sums once, gathering no edge; the force-training
    gradient has the one-device numbers."""
    from test_multi_device import collectives

    g = Graph(edges=16)
    mesh = _edge_mesh()
    edges, replicated = NamedSharding(mesh, P("edges")), NamedSharding(mesh, P())
    params = jax.device_put((g.sh, g.weights), edges)
    index = jax.device_put(g.edges, edges)
    x = jax.device_put(g.x, replicated)
    forward = jax.jit(conv("reference"))
    assert_close(forward(x, params, index), spec_conv()(g.x, (g.sh, g.weights), g.edges))
    counts = collectives(forward.lower(x, params, index).compile())
    assert counts["all-reduce"] == 1 and counts["all-gather"] == counts["all-to-all"] == 0, counts
    step = jax.jit(jax.grad(force_training_loss(conv("reference"), index, projection_for(g)), argnums=(0, 1)))
    expected = jax.grad(force_training_loss(spec_conv(), g.edges, projection_for(g)), argnums=(0, 1))(
        (g.sh, g.weights), g.x)
    grads = step(params, x)
    assert_trees_close(grads, expected, rtol=2e-4, atol=2e-4)
    assert grads[0][1].sharding.spec[0] == "edges"  # the weights' gradient stays with its edges


def test_shard_map_over_graphs_to_second_order():
    """Four graphs, one per device (local node indices), in ``shard_map`` with
    ``check_vma=True``: each device convolves its own graph."""
    graphs = [Graph(seed=s) for s in range(4)]
    cat = lambda *a: jnp.concatenate(a)
    x = cat(*(h.x for h in graphs))
    params = (cat(*(h.sh for h in graphs)), cat(*(h.weights for h in graphs)))
    edges = (cat(*(h.senders for h in graphs)), cat(*(h.receivers for h in graphs)))
    mesh = _edge_mesh()
    sharded = jax.shard_map(conv("reference"), mesh=mesh, in_specs=(P("edges"), P("edges"), P("edges")),
                            out_specs=P("edges"))
    expected = cat(*(spec_conv()(h.x, (h.sh, h.weights), h.edges) for h in graphs))
    assert_close(jax.jit(sharded)(x, params, edges), expected)
    projection = jnp.concatenate([projection_for(h) for h in graphs])

    def per_graph_loss(f):
        def loss(params, x):
            return force_training_loss(f, edges, projection)(params, x)

        return loss

    ours = jax.jit(jax.grad(per_graph_loss(sharded), argnums=(0, 1)))(params, x)
    expected = [jax.grad(force_training_loss(spec_conv(), h.edges, projection_for(h)), argnums=(0, 1))(
        (h.sh, h.weights), h.x) for h in graphs]
    assert_trees_close(ours, jax.tree.map(lambda *a: jnp.concatenate(a), *expected), rtol=2e-4, atol=2e-4)


# ---- errors -------------------------------------------------------------------------------


def test_bad_arguments_name_the_op_and_argument():
    g = Graph()
    f = lambda **kw: ops.equivariant_convolution(
        kw.get("x", g.x), kw.get("sh", g.sh), kw.get("weights", g.weights), kw.get("senders", g.senders),
        kw.get("receivers", g.receivers), kw.get("plan", PLAN), avg_num_neighbors=kw.get("avg", 1.0))
    with pytest.raises(ValueError,
                       match=r"equivariant_convolution: x must have shape \(\?, \?, 4\); got \(7, 3, 5\)"):
        f(x=jnp.ones((7, 3, 5)))
    with pytest.raises(ValueError, match=r"equivariant_convolution: weights must have shape \(16, 7, 3\)"):
        f(weights=jnp.ones((16, 4, 3)))
    with pytest.raises(TypeError, match="equivariant_convolution: senders must have an integer dtype"):
        f(senders=g.senders.astype(jnp.float32))
    with pytest.raises(ValueError, match="equivariant_convolution: avg_num_neighbors must be a positive"):
        f(avg=0.0)
    with pytest.raises(TypeError, match="equivariant_convolution: plan must be a ConvolutionPlan"):
        f(plan=ops.linear_plan("0e", "0e"))


# ---- the Haiku module -----------------------------------------------------------------------


class E3nnConvolution(hk.Module):
    """mace-jax's MessagePassingConvolution, in e3nn-jax: the module's documented equality."""

    def __init__(self, target_irreps, avg_num_neighbors, radial_neurons):
        super().__init__(name="message_passing_convolution")
        self.target_irreps, self.avg, self.neurons = target_irreps, avg_num_neighbors, radial_neurons

    def __call__(self, node_feats, edge_sh, radial, senders, receivers):
        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=self.target_irreps)
        mix = e3nn.haiku.MultiLayerPerceptron(list(self.neurons) + [msg.irreps.num_irreps], jax.nn.silu,
                                              output_activation=False)(radial)
        return e3nn.scatter_sum(msg * mix, dst=receivers, output_size=node_feats.shape[0]) / self.avg


def test_module_equals_the_e3nn_formulation_to_second_order(backend="reference"):
    """(The module runs the op, whose kernels are tested against the spec elsewhere.)"""
    g = Graph(ops.convolution_plan("0e + 1o", "0e + 1o + 2e + 3o"), channels=4)
    node_feats = e3nn.IrrepsArray("0e + 1o", g.x).axis_to_mul()  # 4x0e+4x1o
    edge_sh = e3nn.IrrepsArray(g.plan.irreps_sh, g.sh)
    radial = jnp.asarray(np.random.default_rng(1).standard_normal((16, 5)), jnp.float32)
    target = "0e + 1o + 2e"

    def build(module):
        return hk.without_apply_rng(hk.transform(lambda x, sh, r: module()(x, sh, r, *g.edges)))

    ours = build(lambda: e3kernels.haiku.MessagePassingConvolution(target, 3.0, (8,), backend=backend))
    theirs = build(lambda: E3nnConvolution(target, 3.0, (8,)))
    params = ours.init(jax.random.PRNGKey(0), node_feats, edge_sh, radial)
    assert_trees_close(params, theirs.init(jax.random.PRNGKey(0), node_feats, edge_sh, radial))
    out = ours.apply(params, node_feats, edge_sh, radial)
    expected = theirs.apply(params, node_feats, edge_sh, radial)
    assert out.irreps == expected.irreps
    assert_close(out, expected)

    def loss(transformed):
        def energy(params, array):
            x = e3nn.IrrepsArray(node_feats.irreps, array)
            return jnp.sum(jnp.sin(transformed.apply(params, x, edge_sh, radial).array))

        return jax.jit(jax.grad(lambda p: jnp.sum(jax.grad(energy, argnums=1)(p, node_feats.array) ** 2)))

    assert_trees_close(loss(ours)(params), loss(theirs)(params), rtol=2e-4, atol=2e-4)


def test_module_errors():
    sh = e3nn.IrrepsArray("0e + 1o", jnp.ones((3, 4)))
    edges = (jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32))

    def call(x, target="0e + 1o", avg=1.0):
        return hk.transform(lambda: e3kernels.haiku.MessagePassingConvolution(target, avg, (4,))(
            x, sh, jnp.ones((3, 2)), *edges)).init(jax.random.PRNGKey(0))

    with pytest.raises(ValueError,
                       match="MessagePassingConvolution: node_feats must have the same nonzero multiplicity"):
        call(e3nn.IrrepsArray("2x0e + 1x1o", jnp.ones((2, 5))))
    with pytest.raises(TypeError, match="MessagePassingConvolution: node_feats must be an e3nn.IrrepsArray"):
        call(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="MessagePassingConvolution: target_irreps must be irreps"):
        call(e3nn.IrrepsArray("2x0e", jnp.ones((2, 2))), target="banana")
    with pytest.raises(ValueError, match="MessagePassingConvolution: avg_num_neighbors must be a positive"):
        call(e3nn.IrrepsArray("2x0e", jnp.ones((2, 2))), avg=-1)


def test_module_errors_for_radial_options_and_unreachable_targets():
    sh = e3nn.IrrepsArray("0e + 1o", jnp.ones((3, 4)))
    x = e3nn.IrrepsArray("2x0e", jnp.ones((2, 2)))
    edges = (jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="MessagePassingConvolution: radial_neurons must be a sequence"):
        hk.transform(lambda: e3kernels.haiku.MessagePassingConvolution("0e", 1.0, 64)).init(None)
    init = hk.transform(lambda: e3kernels.haiku.MessagePassingConvolution("2e", 1.0, (4,))(
        x, sh, jnp.ones((3, 2)), *edges)).init
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: no irrep of target_irreps \(1x2e\)"):
        init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="same nonzero multiplicity"):
        empty = e3nn.IrrepsArray("0x0e", jnp.ones((2, 0)))
        hk.transform(lambda: e3kernels.haiku.MessagePassingConvolution("0e", 1.0, (4,))(
            empty, sh, jnp.ones((3, 2)), *edges)).init(jax.random.PRNGKey(0))


def test_module_first_used_inside_jit():
    """The plan (built from e3nn's tensor product) may first be needed inside a trace."""
    x = e3nn.normal("3x1e", jax.random.PRNGKey(0), (4,))
    sh = e3nn.spherical_harmonics("0e + 2e", jax.random.normal(jax.random.PRNGKey(1), (5, 3)), True)
    edges = (jnp.arange(5) % 4, (jnp.arange(5) + 1) % 4)
    f = hk.without_apply_rng(hk.transform(lambda x, sh, r: e3kernels.haiku.MessagePassingConvolution(
        "1e + 3e", 2.0, (4,))(x, sh, r, *edges)))
    params = jax.jit(f.init)(jax.random.PRNGKey(2), x, sh, jnp.ones((5, 3)))
    assert jax.jit(f.apply)(params, x, sh, jnp.ones((5, 3))).irreps == "6x1e+3x3e"


def test_float64_equals_e3nn_in_float64():
    """The plan's table is e3nn's in float64: float64 convolutions are exact to float64."""
    with jax.enable_x64(True):
        plan = ops.convolution_plan(*PLANS[0])
        g = Graph(plan, dtype=jnp.float64)
        expected = e3nn_formulation(g.x, g.sh, g.weights, *g.edges, plan, 2.5)
        out = ops.equivariant_convolution(g.x, g.sh, g.weights, *g.edges, plan, avg_num_neighbors=2.5)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-12, atol=1e-12)


# ---- fused radial weights -----------------------------------------------------------------


class Radial:
    """A graph's weights as a radial network's last layer: ``hidden`` ``(E, H)`` and
    ``matrix`` ``(H, P * C)``; H differs from every other size, so shapes are unambiguous."""

    def __init__(self, g: Graph, hidden=5, seed=1):
        rng = np.random.default_rng(seed)
        num_edges, _, channels = g.weights.shape
        dtype = g.weights.dtype
        self.hidden = jnp.asarray(rng.standard_normal((num_edges, hidden)), dtype)
        self.matrix = jnp.asarray(rng.standard_normal((hidden, g.plan.num_paths * channels)), dtype)


def radial_conv(backend, plan=PLAN, avg_num_neighbors=2.5):
    def f(x, sh, hidden, matrix, edges):
        return ops.equivariant_convolution(x, sh, ops.RadialWeights(hidden, matrix), *edges, plan,
                                           avg_num_neighbors=avg_num_neighbors, backend=backend)

    return f


def formed_spec(x, sh, hidden, matrix, edges, plan=PLAN, avg_num_neighbors=2.5):
    weights = jnp.einsum("ek,kq->eq", hidden, matrix).reshape(hidden.shape[0], plan.num_paths, -1)
    return spec.equivariant_convolution(x, sh, weights, *edges, plan, avg_num_neighbors)


def radial_training_loss(f, projection):
    """Forces on the node features and harmonics, then a loss on both, differentiated in
    ``x``, ``sh``, ``hidden`` and ``matrix`` (second order); called ``(x, sh, hidden,
    matrix, edges)``."""

    def loss(x, sh, hidden, matrix, edges):
        def energy(x, sh):
            return jnp.sum(projection * f(x, sh, hidden, matrix, edges).astype(jnp.float32))

        gx, gsh = jax.grad(energy, argnums=(0, 1))(x, sh)
        return jnp.sum(jnp.sin(gx.astype(jnp.float32))) + jnp.sum(jnp.cos(gsh.astype(jnp.float32)))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_radial_weights_equal_the_formed_weights_to_second_order(backend):
    """``RadialWeights(hidden, matrix)`` is the spec on ``hidden @ matrix``: output and a
    force-training loss's gradients in x, sh, hidden and matrix (d/d matrix: a sum over
    edges), with dropped edges whose hidden layer is NaN contributing nothing."""
    g = Graph()
    r = Radial(g)
    senders = g.senders.at[2].set(g.x.shape[0])  # padding edges: their data may be NaN
    receivers = g.receivers.at[6].set(-3)
    hidden = r.hidden.at[2].set(jnp.nan).at[6].set(jnp.inf)
    keep = np.ones(16, bool)
    keep[[2, 6]] = False
    edges = (senders, receivers)
    f = radial_conv(backend)
    kept = (g.senders[keep], g.receivers[keep])
    assert_close(jax.jit(f)(g.x, g.sh, hidden, r.matrix, edges),
                 formed_spec(g.x, g.sh[keep], r.hidden[keep], r.matrix, kept))
    projection = projection_for(g)
    grads = jax.jit(radial_training_loss(f, projection))(g.x, g.sh, hidden, r.matrix, edges)
    expected = radial_training_loss(formed_spec, projection)(g.x, g.sh[keep], r.hidden[keep], r.matrix, kept)
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in grads)
    assert bool(jnp.all(grads[1][~keep] == 0)) and bool(jnp.all(grads[2][~keep] == 0))
    got = (grads[0], grads[1][keep], grads[2][keep], grads[3])
    assert_trees_close(got, expected, rtol=2e-4, atol=2e-4)


def test_radial_weights_in_float64_equal_the_formed_weights():
    with jax.enable_x64(True):
        g = Graph(dtype=jnp.float64)
        r = Radial(g)
        f = jax.jit(radial_conv("reference"))
        args = (g.x, g.sh, r.hidden, r.matrix, g.edges)
        assert f(*args).dtype == jnp.float64
        assert_close(f(*args), formed_spec(*args), rtol=1e-12, atol=1e-12)
        projection = projection_for(g).astype(jnp.float64)
        assert_trees_close(jax.jit(radial_training_loss(f, projection))(*args),
                           radial_training_loss(formed_spec, projection)(*args), rtol=1e-10, atol=1e-10)


def test_radial_weights_never_form_the_weights(monkeypatch):
    """Nowhere in the reference's program, derivatives included, is there an ``(E, P, C)``
    or ``(E, P * C)`` array: the weights exist one block of edges at a time."""
    from e3kernels.reference import equivariant_convolution as reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 8)  # blocks of 8 edges
    g = Graph(edges=96, channels=3)
    r = Radial(g)
    f = radial_conv("reference")
    grads = radial_training_loss(f, projection_for(g))
    text = jax.jit(grads).lower(g.x, g.sh, r.hidden, r.matrix, g.edges).compile().as_text()
    paths, channels = g.plan.num_paths, 3
    for shape in (f"[96,{paths},{channels}]", f"[96,{paths * channels}]", f"[96,{channels},{paths}]"):
        assert shape not in text, shape
    unfused = jax.jit(jax.grad(lambda w: jnp.sum(conv("reference")(g.x, (g.sh, w), g.edges))))
    assert f"[96,{paths},{channels}]" in unfused.lower(g.weights).compile().as_text()  # the check can fail


def test_radial_weights_sharded_over_edges():
    """Edges (and hidden) sharded over 4 devices, the matrix replicated: d/d matrix is the
    one-device sum over all edges, d/d hidden stays with its edges."""
    g = Graph(edges=16)
    r = Radial(g)
    mesh = _edge_mesh()
    edges, replicated = NamedSharding(mesh, P("edges")), NamedSharding(mesh, P())
    sh, hidden, index = jax.device_put((g.sh, r.hidden, g.edges), edges)
    x, matrix = jax.device_put((g.x, r.matrix), replicated)
    projection = projection_for(g)
    grads = jax.jit(radial_training_loss(radial_conv("reference"), projection))(x, sh, hidden, matrix, index)
    expected = radial_training_loss(formed_spec, projection)(g.x, g.sh, r.hidden, r.matrix, g.edges)
    assert_trees_close(grads, expected, rtol=2e-4, atol=2e-4)
    assert grads[2].sharding.spec[0] == "edges"


def test_radial_weights_vmap_over_graphs():
    """A batch of graphs with their own hidden layers and one matrix, or a matrix each."""
    g = Graph()
    r = Radial(g)
    batch = lambda a: jnp.stack([a, 2 * a])
    edges = tuple(jnp.stack([e, e]) for e in g.edges)
    f = radial_conv("reference")
    inputs = (batch(g.x), batch(g.sh), batch(r.hidden))
    shared = jax.vmap(f, in_axes=(0, 0, 0, None, 0))(*inputs, r.matrix, edges)
    own = jax.vmap(f, in_axes=(0, 0, 0, 0, 0))(*inputs, batch(r.matrix), edges)
    for k, scale in enumerate((1, 2)):
        expected = formed_spec(scale * g.x, scale * g.sh, scale * r.hidden, r.matrix, g.edges)
        assert_close(shared[k], expected)
        assert_close(own[k], scale * expected)


def test_radial_weights_bad_arguments():
    g = Graph()
    r = Radial(g)
    f = radial_conv("reference")
    op = "equivariant_convolution: weights"
    with pytest.raises(ValueError, match=op + r".matrix must have shape \(5, 21\)"):
        f(g.x, g.sh, r.hidden, r.matrix[:, :-1], g.edges)
    with pytest.raises(ValueError, match=op + r".hidden must have shape \(16, \?\)"):
        f(g.x, g.sh, r.hidden[:-1], r.matrix, g.edges)
    with pytest.raises(ValueError, match="equivariant_convolution: precision must be None, 'default'"):
        ops.equivariant_convolution(g.x, g.sh, ops.RadialWeights(r.hidden, r.matrix), *g.edges, PLAN,
                                    precision="bogus")
