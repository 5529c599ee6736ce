"""e3kernels.flax (linen): parity with e3nn_jax.flax, e3nn-jax's own Flax test properties,
and the Haiku-only modules (Dropout, SymmetricTensorProduct) against their Haiku forms."""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import e3nn_jax.flax as e3nn_flax
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, assert_trees_close, shapes_outside_the_op, tree_sum_squares

import e3kernels

KEY = jax.random.PRNGKey(0)


def normal(irreps, *shape, key=KEY):
    return e3nn.normal(irreps, key, shape)


def check_linen_parity(ours: nn.Module, theirs: nn.Module, args, x_argnum=-1, second_order=True):
    """Same variables from one key; same outputs, gradients and (force-training) second-order
    gradients as e3nn-jax's linen module."""
    variables = ours.init(jax.random.PRNGKey(7), *args)
    assert_trees_close(variables, theirs.init(jax.random.PRNGKey(7), *args))
    out_ours = jax.jit(ours.apply)(variables, *args)
    out_theirs = jax.jit(theirs.apply)(variables, *args)
    assert out_ours.irreps == out_theirs.irreps and out_ours.dtype == out_theirs.dtype
    assert_close(out_ours, out_theirs, what="output")
    cotangent = jax.random.normal(jax.random.PRNGKey(3), out_theirs.shape)
    x_argnum %= len(args)

    def loss(module):
        def f(variables, x):
            a = list(args)
            a[x_argnum] = x
            out = module.apply(variables, *a).array
            return jnp.sum(out * cotangent) + 0.1 * jnp.sum(out**2)
        return f

    x = args[x_argnum]
    grad = lambda module: jax.jit(jax.grad(loss(module), argnums=(0, 1)))(variables, x)
    assert_trees_close(grad(ours), grad(theirs))
    if second_order:
        def second(module):
            g = lambda v, x: tree_sum_squares(jax.grad(loss(module), argnums=1)(v, x))
            return jax.jit(jax.grad(g, argnums=(0, 1)))(variables, x)
        assert_trees_close(second(ours), second(theirs), 2e-4, 2e-4)


LINEAR_CASES = [
    dict(irreps_out="0e + 1o + 2e"),
    dict(irreps_out="3x0e + 2x1o", biases=True, path_normalization="path", gradient_normalization=0.3),
    dict(irreps_out="0e + 1o + 3o", force_irreps_out=True, biases=True),
]


@pytest.mark.parametrize("kwargs", LINEAR_CASES)
@pytest.mark.parametrize("form", ["vanilla", "mixed", "indexed"])
def test_linear_parity(kwargs, form):
    x = normal("1o + 2x0e + 1o", 6)
    args = {
        "vanilla": (x,),
        "mixed": (jax.random.normal(KEY, (6, 4)), x),
        "indexed": (jnp.array([2, 0, 1, 2, 2, 0]), x),
    }[form]
    extra = dict(num_indexed_weights=3) if form == "indexed" else {}
    # (x) and (w, x) run e3nn-jax's own code: second order only where our op runs
    check_linen_parity(e3kernels.flax.Linear(**kwargs, **extra, backend="reference"),
                       e3nn_flax.Linear(**kwargs, **extra), args, second_order=form == "indexed")


def test_linear_indexed_parity_on_kernels_with_channels():
    x = normal("0e + 1o", 5, 3)  # 5 rows, 3 channels
    i = jnp.array([1, 0, 1, 1, 0])
    kwargs = dict(irreps_out="2x0e + 1o", channel_out=4, num_indexed_weights=2, biases=True)
    check_linen_parity(e3kernels.flax.Linear(**kwargs, backend="pallas"), e3nn_flax.Linear(**kwargs),
                       (i, x), second_order=False)  # the kernels' second order: test_kernel_*


def test_linear_weights_per_channel_and_initializer():
    x, w = normal("0e + 1o", 6, 3), jax.random.normal(KEY, (6, 4))
    init = lambda: nn.initializers.uniform(0.1)
    kwargs = dict(irreps_out="2x0e + 1o", weights_per_channel=True, parameter_initializer=init)
    check_linen_parity(e3kernels.flax.Linear(**kwargs), e3nn_flax.Linear(**kwargs), (w, x),
                       second_order=False)


# e3nn-jax's own Flax Linear tests (tests/_src/linear_flax_test.py), their properties
# asserted on our module, on their irreps grid, plus parity with theirs.
GRID_IN = ["5x0e", "1e + 2e + 4x1e + 3x3o", "2x1o + 0x3e", "0x0e"]
GRID_OUT = ["5x0e", "1e + 2e + 3x3o + 3x1e", "2x1o + 0x3e", "0x0e"]


@pytest.mark.parametrize("irreps_in", GRID_IN)
@pytest.mark.parametrize("irreps_out", GRID_OUT)
def test_e3nn_linear_grid(irreps_in, irreps_out):
    x = normal(irreps_in, 32)
    i = jnp.arange(32) % 10
    for form, args, kwargs in [
        ("vanilla", (x,), {}),
        ("indexed", (i, x), dict(num_indexed_weights=10)),
        ("forced", (x,), dict(force_irreps_out=True)),
    ]:
        ours = e3kernels.flax.Linear(irreps_in=irreps_in, irreps_out=irreps_out, **kwargs)
        theirs = e3nn_flax.Linear(irreps_in=irreps_in, irreps_out=irreps_out, **kwargs)
        variables = ours.init(jax.random.PRNGKey(1), *args)
        y = ours.apply(variables, *args)
        if form == "forced":
            assert y.irreps == e3nn.Irreps(irreps_out)
        else:
            assert jnp.all(y.array != 0.0), form  # unreachable irreps are discarded
        assert y.shape == (32, y.irreps.dim)
        assert_close(y, theirs.apply(variables, *args), what=form)


def test_e3nn_linear_custom_instructions():
    irreps_in, irreps_out = e3nn.Irreps("1e + 2e + 4x1e + 3x3o"), e3nn.Irreps("1e + 2e + 3x3o + 3x1e")
    instructions = [(0, 0), (2, 3), (3, 2)]
    kwargs = dict(irreps_in=irreps_in, irreps_out=irreps_out, instructions=instructions,
                  simplify_irreps_internally=False)
    x, i = normal(irreps_in, 16), jnp.arange(16) % 3
    linear = e3kernels.flax.Linear(**kwargs, num_indexed_weights=3)
    variables = linear.init(jax.random.PRNGKey(1), i, x)
    y = linear.apply(variables, i, x)
    for i_out, irreps_slice in enumerate(y.irreps.slices()):
        reached = i_out in {o for _, o in instructions}
        assert bool(jnp.all(y.array[..., irreps_slice] != 0.0)) == reached
        assert bool(jnp.all(y.array[..., irreps_slice] == 0.0)) != reached
    assert_close(y, e3nn_flax.Linear(**kwargs, num_indexed_weights=3).apply(variables, i, x))


@pytest.mark.parametrize("form", ["vanilla", "indexed"])
def test_e3nn_linear_dtype(form):
    with jax.enable_x64(True):
        x = normal("1e + 2e + 4x1e + 3x3o", 16).astype(jnp.float64)
        args = (x,) if form == "vanilla" else (jnp.arange(16) % 3, x)
        linear = e3kernels.flax.Linear("2x1e + 3o", num_indexed_weights=3 if form == "indexed" else None)
        variables = linear.init(jax.random.PRNGKey(1), *args)
        e3nn.utils.assert_output_dtype_matches_input_dtype(linear.apply, variables, *args)


@pytest.mark.parametrize("kwargs", [dict(), dict(with_bias=True, gradient_normalization="element"),
                                    dict(output_activation=False)])
def test_mlp_parity(kwargs):
    x = jax.random.normal(KEY, (5, 4))
    ours = e3kernels.flax.MultiLayerPerceptron((8, 3), jax.nn.silu, **kwargs)
    theirs = e3nn_flax.MultiLayerPerceptron((8, 3), jax.nn.silu, **kwargs)
    variables = ours.init(jax.random.PRNGKey(1), x)
    assert_trees_close(variables, theirs.init(jax.random.PRNGKey(1), x))
    assert_close(ours.apply(variables, x), theirs.apply(variables, x))


@pytest.mark.parametrize("instance", [False, True])
@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False, reduce="max", normalization="component")])
def test_batch_norm_parity(instance, kwargs):
    x = normal("3x0e + 3x0o + 4x1e", 16)
    ours, theirs = e3kernels.flax.BatchNorm(instance=instance, **kwargs), e3nn_flax.BatchNorm(
        instance=instance, **kwargs)
    variables = ours.init(jax.random.PRNGKey(1), x)
    assert_trees_close(variables, theirs.init(jax.random.PRNGKey(1), x))
    for use_running_average in (False,) if instance else (False, True):
        apply = lambda m, ura=use_running_average: m.apply(variables, x, use_running_average=ura,
                                                           mutable=["batch_stats"])
        (y_ours, up_ours), (y_theirs, up_theirs) = apply(ours), apply(theirs)
        assert_close(y_ours, y_theirs)
        assert_trees_close(up_ours, up_theirs)


def test_batch_norm_is_equivariant():  # e3nn-jax's bn_flax_test.test_equivariant, on ours
    irreps = e3nn.Irreps("3x0e + 3x0o + 4x1e")
    bn = e3kernels.flax.BatchNorm()
    variables = bn.init(KEY, normal(irreps, 16))
    for use_running_average in (False, True):
        e3nn.utils.assert_equivariant(
            lambda x, ura=use_running_average: bn.apply(variables, x, use_running_average=ura,
                                                        mutable=["batch_stats"])[0],
            jax.random.PRNGKey(2), normal(irreps, 16, key=jax.random.PRNGKey(3)))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_matches_haiku(p):
    x = normal("2x0e + 3x1o", 4, 5)
    rng = jax.random.PRNGKey(5)
    ours = e3kernels.flax.Dropout(p=p).apply({}, x, deterministic=False, rng=rng)
    haiku = hk.transform(lambda r, x: e3kernels.haiku.Dropout(p)(r, x, True)).apply({}, None, rng, x)
    assert ours.irreps == haiku.irreps and ours.zero_flags == haiku.zero_flags
    assert_close(ours, haiku, rtol=0, atol=0)
    # from the "dropout" collection, linen derives the key: a mask of its own, still per irrep
    y = e3kernels.flax.Dropout(p=p).apply({}, x, deterministic=False, rngs={"dropout": rng})
    scale = 0.0 if p == 1.0 else 1 / (1 - p)
    for chunk_y, chunk_x in zip(y.chunks, x.chunks):
        if chunk_y is None:  # dropped, and flagged so
            assert p == 1.0
            continue
        kept = jnp.all(chunk_y == chunk_x * scale, axis=-1)  # (4, 5, mul): all components at once
        dropped = jnp.all(chunk_y == 0, axis=-1)
        assert bool(jnp.all(kept | dropped))
        assert bool(jnp.all(kept == kept[:1, :1]))  # one mask, broadcast over the leading axes
    assert e3kernels.flax.Dropout(p=p, deterministic=True).apply({}, x) is x


@pytest.mark.parametrize("indexed", [False, True])
def test_symmetric_tensor_product_matches_haiku(indexed, backend):
    x = normal("0e + 1o + 2e", 6, 4)
    i = jnp.array([0, 2, 1, 1, 0, 2])
    args = (i, x) if indexed else (x,)
    kwargs = dict(num_indexed_weights=3 if indexed else None, backend=backend)
    linen = e3kernels.flax.SymmetricTensorProduct((1, 2, 3), "0e + 1o", **kwargs)
    variables = linen.init(jax.random.PRNGKey(1), *args)
    haiku = hk.without_apply_rng(hk.transform(
        lambda *a: e3kernels.haiku.SymmetricTensorProduct((1, 2, 3), "0e + 1o", **kwargs)(*a)))
    params = haiku.init(jax.random.PRNGKey(1), *args)
    assert jax.tree.map(jnp.shape, params["symmetric_tensor_product"]) == jax.tree.map(
        jnp.shape, variables["params"])
    y = linen.apply(variables, *args)
    assert_close(y, haiku.apply({"symmetric_tensor_product": variables["params"]}, *args))
    assert y.irreps == e3nn.Irreps("0e + 1o")


@pytest.mark.parametrize("build, match", [
    (lambda: e3kernels.flax.Linear("0e", num_indexed_weights=0), r"Linear: num_indexed_weights must be"),
    (lambda: e3kernels.flax.Linear("0e", backend="gpu"), r"backend"),
    (lambda: e3kernels.flax.MultiLayerPerceptron((4, -1)), r"MultiLayerPerceptron: list_neurons"),
    (lambda: e3kernels.flax.BatchNorm(reduce="sum"), r"BatchNorm: reduce must be"),
    (lambda: e3kernels.flax.Dropout(p=1.5), r"Dropout: p must be a probability"),
    (lambda: e3kernels.flax.SymmetricTensorProduct((0, 2)), r"SymmetricTensorProduct: orders must be"),
])
def test_errors_name_module_and_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_symmetric_tensor_product_plain_array_error_says_what_x_must_be():
    stp = e3kernels.flax.SymmetricTensorProduct((1, 2))
    with pytest.raises(TypeError, match=r"SymmetricTensorProduct: x must be an e3nn.IrrepsArray of "
                                        r"shape \(\.\.\., num_channel, irreps\)"):
        stp.init(KEY, jnp.ones((3, 4, 4)))


# ---- MessagePassingConvolution: the linen form of the Haiku module ------------------------

CONV = dict(target_irreps="0e + 1o + 2e", avg_num_neighbors=2.5, radial_neurons=(8,), backend="reference")
HAIKU_CONV = "message_passing_convolution/multi_layer_perceptron"


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one compile, not op by op
def conv_inputs(channels=8, nodes=6, edges=15):
    keys = jax.random.split(jax.random.PRNGKey(11), 4)
    x = normal(f"{channels}x0e + {channels}x1o", nodes)
    sh = e3nn.spherical_harmonics("0e + 1o + 2e", jax.random.normal(keys[0], (edges, 3)), normalize=True)
    radial = jax.random.normal(keys[1], (edges, 4))
    senders = jax.random.randint(keys[2], (edges,), 0, nodes)
    receivers = jax.random.randint(keys[3], (edges,), 0, nodes)
    return x, sh, radial, senders, receivers


def linen_conv_to_haiku(params):
    """The linen module's parameters (or their gradients) under the Haiku module's names."""
    mlp = params["MultiLayerPerceptron_0"]
    return {f"{HAIKU_CONV}/linear_{k}": {"w": mlp[f"Dense_{k}"]["kernel"]} for k in range(len(mlp))}


def output_and_gradients(apply, params, args):
    """Output, gradients (params, node_feats) and second-order gradients (of the node_feats
    gradient's squared norm), in one compiled program."""
    x, rest = args[0], args[1:]
    out_shape = jax.eval_shape(lambda p, x: apply(p, x, *rest).array, params, x).shape
    cotangent = jax.random.normal(jax.random.PRNGKey(3), out_shape)

    def loss(params, x):
        out = apply(params, x, *rest).array
        return jnp.sum(out * cotangent) + 0.1 * jnp.sum(out**2)

    def all_of(params, x):
        second = lambda p, x: tree_sum_squares(jax.grad(loss, argnums=1)(p, x))
        return (apply(params, x, *rest), jax.grad(loss, argnums=(0, 1))(params, x),
                jax.grad(second, argnums=(0, 1))(params, x))

    return jax.jit(all_of)(params, x)


def test_message_passing_convolution_matches_haiku():
    args = conv_inputs()
    linen = e3kernels.flax.MessagePassingConvolution(**CONV)
    # jitted: op by op, init takes seconds at -O0. The plan is built outside the trace first
    # (ops.convolution_plan cannot yet be built under one).
    e3kernels.ops.convolution_plan("0e + 1o", "0e + 1o + 2e", CONV["target_irreps"])
    variables = jax.jit(linen.init)(jax.random.PRNGKey(1), *args)
    haiku = hk.without_apply_rng(hk.transform(
        lambda *a: e3kernels.haiku.MessagePassingConvolution(**CONV)(*a)))
    params = linen_conv_to_haiku(variables["params"])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, jax.eval_shape(haiku.init, jax.random.PRNGKey(1), *args))
    ours = output_and_gradients(lambda v, *a: linen.apply({"params": v}, *a), variables["params"], args)
    theirs = output_and_gradients(haiku.apply, params, args)
    (out, (grad_p, grad_x), (second_p, second_x)) = ours
    assert out.irreps == theirs[0].irreps == e3nn.Irreps("16x0e + 24x1o + 16x2e")
    assert_close(out, theirs[0], what="output")
    assert_trees_close(linen_conv_to_haiku(grad_p), theirs[1][0])
    assert_close(grad_x, theirs[1][1], what="node_feats gradient")
    assert_trees_close(linen_conv_to_haiku(second_p), theirs[2][0], 2e-4, 2e-4)
    assert_close(second_x, theirs[2][1], 2e-4, 2e-4, what="second-order node_feats gradient")


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_irreps=""), r"MessagePassingConvolution: target_irreps must name at least one irrep"),
    (dict(avg_num_neighbors=0.0), r"MessagePassingConvolution: avg_num_neighbors must be"),
    (dict(radial_neurons=(8, 0)), r"MessagePassingConvolution: radial_neurons must be positive ints"),
    (dict(backend="gpu"), r"backend"),
])
def test_message_passing_convolution_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        e3kernels.flax.MessagePassingConvolution(**{**CONV, **kwargs})


def test_message_passing_convolution_needs_equal_multiplicities():
    x, *rest = conv_inputs()
    x = e3nn.concatenate([x, normal("3x0e", 6)])  # 8x0e + 8x1o + 3x0e
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: node_feats must have the same nonzero "
                                         r"multiplicity \(channels\) for every irrep"):
        e3kernels.flax.MessagePassingConvolution(**CONV).init(KEY, x, *rest)


class E3nnConvolution(nn.Module):
    """The module's documented equality in e3nn-jax: the radial network's ``(E, P * C)``
    output formed, the messages materialised."""

    target_irreps: str
    avg_num_neighbors: float
    radial_neurons: tuple

    @nn.compact
    def __call__(self, node_feats, edge_sh, radial, senders, receivers):
        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=self.target_irreps)
        mix = e3nn_flax.MultiLayerPerceptron(self.radial_neurons + (msg.irreps.num_irreps,), jax.nn.silu,
                                             output_activation=False)(radial)
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=node_feats.shape[0])
        return out / self.avg_num_neighbors


def test_message_passing_convolution_fuses_the_radial_networks_last_layer():
    """The radial network's last layer runs in the op: no ``(E, P * C)`` or ``(E, P, C)``
    weights outside it, forward or backward; the parameters (names, initial values) and
    the float64 numbers are e3nn-jax's unfused formulation's."""
    edges, paths, channels = 17, 7, 2  # and 6 nodes, 4 basis functions, 8 hidden: no size twice
    with jax.enable_x64(True):
        x, sh, radial, senders, receivers = conv_inputs(channels=channels, edges=edges)
        x, sh, radial = x.astype(jnp.float64), sh.astype(jnp.float64), radial.astype(jnp.float64)
        args = (x, sh, radial, senders, receivers)
        ours = e3kernels.flax.MessagePassingConvolution(**CONV)
        theirs = E3nnConvolution(CONV["target_irreps"], CONV["avg_num_neighbors"], CONV["radial_neurons"])
        variables = ours.init(jax.random.PRNGKey(5), *args)
        assert_trees_close(variables, theirs.init(jax.random.PRNGKey(5), *args), 0, 0)
        last = variables["params"]["MultiLayerPerceptron_0"]["Dense_1"]["kernel"]
        assert last.shape == (8, paths * channels) and last.dtype == jnp.float64

        def value_and_grad(module):
            def loss(variables, x):
                return jnp.sum(jnp.sin(module.apply(variables, x, *args[1:]).array))

            return jax.value_and_grad(loss, argnums=(0, 1))

        out = jax.jit(ours.apply)(variables, *args)
        assert out.dtype == jnp.float64
        assert_close(out, theirs.apply(variables, *args), 1e-12, 1e-12)
        assert_trees_close(jax.jit(value_and_grad(ours))(variables, x), value_and_grad(theirs)(variables, x),
                           1e-12, 1e-12)
        formed = {(edges, paths * channels), (edges, paths, channels), (edges, channels, paths)}
        assert not formed & shapes_outside_the_op(value_and_grad(ours), variables, x)
        assert formed & shapes_outside_the_op(value_and_grad(theirs), variables, x)  # the check can fail
