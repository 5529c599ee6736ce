"""e3kernels.nnx: the six modules equal their Haiku and linen forms (through exact parameter
conversion), work with NNX's transforms, and train a MACE-style block on energy and forces."""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, assert_trees_close, shapes_outside_the_op
from flax import nnx

import e3kernels

KEY = jax.random.PRNGKey(0)
SPECIES, CHANNELS, ATOMS = 3, 4, 12
BLOCK_ORDERS = (1, 2)  # the block's product basis; order 3 would triple the compile time


def normal(irreps, *shape, key=KEY):
    return e3nn.normal(irreps, key, shape)


def haiku_apply(build, params, *args, state=None):
    f = hk.transform_with_state(lambda *a: build()(*a))
    out, _ = f.apply(params, state or {}, None, *args)
    return out


# ---- each module: NNX = Haiku = linen with the same parameters ---------------------------

LINEAR_FORMS = {
    "vanilla": (dict(), lambda x: (x,)),
    "indexed": (dict(num_indexed_weights=SPECIES), lambda x: (jnp.array([2, 0, 1, 2, 0]), x)),
    "mixed": (dict(weights_dim=3), lambda x: (jax.random.normal(KEY, (5, 3)), x)),
}


@pytest.mark.parametrize("form", LINEAR_FORMS)
def test_linear_equals_haiku_and_linen(form, backend):
    kwargs, make_args = LINEAR_FORMS[form]
    if form != "indexed" and backend == "pallas":
        pytest.skip("only the indexed form runs a kernel")
    args = make_args(normal("1o + 2x0e", 5))
    model = e3kernels.nnx.Linear("1o + 2x0e", "3x0e + 1o", biases=True, backend=backend, **kwargs,
                                 rngs=nnx.Rngs(3))
    e3nn_kwargs = {k: v for k, v in kwargs.items() if k != "weights_dim"}
    params, _ = e3kernels.nnx.to_haiku(model)
    assert sorted(params) == ["linear"]
    expected = haiku_apply(lambda: e3kernels.haiku.Linear("3x0e + 1o", biases=True, **e3nn_kwargs),
                           params, *args)
    y = model(*args)
    assert y.irreps == expected.irreps
    assert_close(y, expected)
    linen = e3kernels.flax.Linear("3x0e + 1o", biases=True, **e3nn_kwargs)
    assert_close(linen.apply(e3kernels.nnx.to_linen(model), *args), expected)


def test_linear_loads_haiku_init_exactly():
    x = normal("1o + 2x0e", 5)
    i = jnp.array([2, 0, 1, 2, 0])
    f = hk.without_apply_rng(hk.transform(
        lambda i, x: e3kernels.haiku.Linear("0e + 1o", num_indexed_weights=3, name="lin")(i, x)))
    params = f.init(jax.random.PRNGKey(1), i, x)
    model = e3kernels.nnx.Linear("1o + 2x0e", "0e + 1o", num_indexed_weights=3, rngs=nnx.Rngs(0))
    e3kernels.nnx.load_haiku(model, params, names={"": "lin"})
    assert_trees_close(e3kernels.nnx.to_haiku(model, names={"": "lin"})[0], params, 0, 0)
    assert_close(model(i, x), f.apply(params, i, x), 0, 0)


def test_linear_channels_and_raw_array_input():
    x = normal("0e + 1o", 5, 3)  # 5 rows, 3 channels
    model = e3kernels.nnx.Linear("0e + 1o", "2x0e + 1o", channel_out=2, channel_in=3, rngs=nnx.Rngs(0))
    params, _ = e3kernels.nnx.to_haiku(model)
    expected = haiku_apply(lambda: e3kernels.haiku.Linear("2x0e + 1o", channel_out=2), params, x)
    assert model(x).shape == (5, 2, 5)
    assert_close(model(x), expected)
    assert_close(model(x.array), expected)  # a raw array is read as irreps_in


def test_mlp_equals_haiku_and_linen():
    x = jax.random.normal(KEY, (5, 4))
    model = e3kernels.nnx.MultiLayerPerceptron(4, (8, 2), jax.nn.silu, with_bias=True, rngs=nnx.Rngs(0))
    params, _ = e3kernels.nnx.to_haiku(model)
    assert sorted(params) == ["multi_layer_perceptron/linear_0", "multi_layer_perceptron/linear_1"]
    expected = haiku_apply(lambda: e3kernels.haiku.MultiLayerPerceptron([8, 2], jax.nn.silu, with_bias=True),
                           params, x)
    assert_close(model(x), expected)
    linen = e3kernels.flax.MultiLayerPerceptron((8, 2), jax.nn.silu, with_bias=True)
    assert_close(linen.apply(e3kernels.nnx.to_linen(model), x), expected)
    y = model(e3nn.IrrepsArray("4x0e", x))
    assert y.irreps == e3nn.Irreps("2x0e")


def test_batch_norm_equals_linen_train_and_eval():
    x = normal("2x0e + 1o", 16)
    model = e3kernels.nnx.BatchNorm("2x0e + 1o")
    linen = e3kernels.flax.BatchNorm()
    variables = e3kernels.nnx.to_linen(model)
    assert sorted(variables) == ["batch_stats", "params"]
    expected, updates = linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert_close(model(x), expected)
    assert_trees_close(e3kernels.nnx.to_linen(model)["batch_stats"], updates["batch_stats"])
    model.eval()  # NNX's switch to the running statistics
    expected_eval, _ = linen.apply({**variables, **updates}, x, use_running_average=True,
                                   mutable=["batch_stats"])
    assert_close(model(x), expected_eval)
    params, state = e3kernels.nnx.to_haiku(model)
    assert sorted(state["batch_norm"]) == ["running_mean", "running_var"]
    haiku = haiku_apply(lambda: (lambda x: e3kernels.haiku.BatchNorm()(x, False)), params, x, state=state)
    assert_close(model(x), haiku)


def test_dropout_equals_haiku_with_the_same_key():
    x = normal("2x0e + 3x1o", 4, 5)
    key = jax.random.PRNGKey(5)
    expected = hk.transform(lambda r, x: e3kernels.haiku.Dropout(0.4)(r, x, True)).apply({}, None, key, x)
    assert_close(e3kernels.nnx.Dropout(0.4)(x, rngs=key), expected, 0, 0)
    dropout = e3kernels.nnx.Dropout(0.4, rngs=nnx.Rngs(dropout=0))
    masks = {tuple(np.asarray(dropout(x).array != 0).ravel().tolist()) for _ in range(8)}
    assert len(masks) > 1  # a new key per call
    dropout.eval()
    assert dropout(x) is x


@pytest.mark.parametrize("indexed", [False, True])
def test_symmetric_tensor_product_equals_haiku_and_linen(indexed, backend):
    x = normal("0e + 1o + 2e", 6, CHANNELS)
    i = jnp.array([0, 2, 1, 1, 0, 2])
    args = (i, x) if indexed else (x,)
    num = SPECIES if indexed else None
    model = e3kernels.nnx.SymmetricTensorProduct(
        (1, 2, 3), "0e + 1o", irreps_in=x.irreps, num_channels=CHANNELS, num_indexed_weights=num,
        backend=backend, rngs=nnx.Rngs(0))
    params, _ = e3kernels.nnx.to_haiku(model)
    expected = haiku_apply(lambda: e3kernels.haiku.SymmetricTensorProduct(
        (1, 2, 3), "0e + 1o", num_indexed_weights=num), params, *args)
    assert_close(model(*args), expected)
    linen = e3kernels.flax.SymmetricTensorProduct((1, 2, 3), "0e + 1o", num_indexed_weights=num)
    assert_close(linen.apply(e3kernels.nnx.to_linen(model), *args), expected)


# ---- a MACE-style block in the three frameworks ------------------------------------------

# Haiku's BatchNorm takes no name: its module is "batch_norm" where NNX's attribute is "norm".
HAIKU_NAMES = {"norm": "batch_norm"}


def _features(positions):
    sh = e3nn.spherical_harmonics("0e + 1o", positions, normalize=False)
    r = jnp.linalg.norm(positions, axis=-1, keepdims=True)
    return sh, jnp.concatenate([r, r**2, jnp.ones_like(r)], axis=-1)


def _block(embed, mix, product, norm, readout, mlp, species, positions, training):
    sh, radial = _features(positions)
    h = embed(species, sh)  # (atoms, CHANNELS x (0e + 1o))
    h = mix(radial, h)
    h = product(species, h.mul_to_axis(CHANNELS)).axis_to_mul()
    h = norm(h, training)
    return jnp.sum(mlp(readout(h)).array)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, backend=None):
        hidden = e3nn.Irreps(f"{CHANNELS}x0e + {CHANNELS}x1o")
        self.embed = e3kernels.nnx.Linear("0e + 1o", hidden, num_indexed_weights=SPECIES, backend=backend,
                                          rngs=rngs)
        self.mix = e3kernels.nnx.Linear(hidden, hidden, weights_dim=3, rngs=rngs)
        self.product = e3kernels.nnx.SymmetricTensorProduct(
            BLOCK_ORDERS, "0e + 1o", irreps_in="0e + 1o", num_channels=CHANNELS, num_indexed_weights=SPECIES,
            backend=backend, rngs=rngs)
        self.norm = e3kernels.nnx.BatchNorm(CHANNELS * e3nn.Irreps("0e + 1o"))  # 4x0e + 4x1o
        self.readout = e3kernels.nnx.Linear(CHANNELS * e3nn.Irreps("0e + 1o"), "8x0e", rngs=rngs)
        self.mlp = e3kernels.nnx.MultiLayerPerceptron(8, (8, 1), jax.nn.silu, output_activation=False,
                                                      rngs=rngs)

    def __call__(self, species, positions):
        norm = lambda h, training: self.norm(h)  # model.train() / model.eval() decide
        return _block(self.embed, self.mix, self.product, norm, self.readout, self.mlp, species, positions,
                      training=True)


def _haiku_energy(species, positions):
    hidden = f"{CHANNELS}x0e + {CHANNELS}x1o"
    return _block(
        e3kernels.haiku.Linear(hidden, num_indexed_weights=SPECIES, name="embed"),
        e3kernels.haiku.Linear(hidden, name="mix"),
        e3kernels.haiku.SymmetricTensorProduct(BLOCK_ORDERS, "0e + 1o", num_indexed_weights=SPECIES,
                                               name="product"),
        e3kernels.haiku.BatchNorm(),
        e3kernels.haiku.Linear("8x0e", name="readout"),
        e3kernels.haiku.MultiLayerPerceptron([8, 1], jax.nn.silu, output_activation=False, name="mlp"),
        species, positions, training=True)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, species, positions):
        hidden = f"{CHANNELS}x0e + {CHANNELS}x1o"
        bn = e3kernels.flax.BatchNorm(name="norm")
        return _block(
            e3kernels.flax.Linear(hidden, num_indexed_weights=SPECIES, name="embed"),
            e3kernels.flax.Linear(hidden, name="mix"),
            e3kernels.flax.SymmetricTensorProduct(BLOCK_ORDERS, "0e + 1o", num_indexed_weights=SPECIES,
                                                  name="product"),
            lambda h, training: bn(h, use_running_average=not training),
            e3kernels.flax.Linear("8x0e", name="readout"),
            e3kernels.flax.MultiLayerPerceptron((8, 1), jax.nn.silu, output_activation=False, name="mlp"),
            species, positions, training=True)


def _structure(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    species = jax.random.randint(keys[0], (ATOMS,), 0, SPECIES)  # unsorted species ids
    return species, jax.random.normal(keys[1], (ATOMS, 3)), jax.random.normal(keys[2], (ATOMS, 3))


def _energy_and_forces_loss(energy_fn):
    """Energy and forces against fixed targets: its parameter gradient is second order."""
    def loss(*model_args, species, positions, target_forces):
        energy, grad = jax.value_and_grad(energy_fn, argnums=-1)(*model_args, species, positions)
        return 0.01 * energy**2 + jnp.mean((-grad - target_forces) ** 2)
    return loss


def test_block_energy_forces_and_second_order_equal_in_the_three_frameworks():
    species, positions, target = _structure()
    model = NnxBlock(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def nnx_energy(params, species, positions):
        # copy=True: new variables at this trace level, which BatchNorm may update (as for
        # nnx.BatchNorm, updating variables made outside a jax.grad is an error)
        return nnx.merge(graphdef, params, stats, copy=True)(species, positions)

    haiku = hk.transform_with_state(_haiku_energy)
    hk_params, hk_state = e3kernels.nnx.to_haiku(model, names=HAIKU_NAMES)
    haiku_energy = lambda p, s, x: haiku.apply(p, hk_state, None, s, x)[0]
    linen_variables = e3kernels.nnx.to_linen(model)
    linen_energy = lambda p, s, x: LinenBlock().apply({**linen_variables, "params": p}, s, x,
                                                      mutable=["batch_stats"])[0]
    inputs = dict(species=species, positions=positions, target_forces=target)
    results = {}
    for name, energy, p in [("nnx", nnx_energy, params), ("haiku", haiku_energy, hk_params),
                            ("linen", linen_energy, linen_variables["params"])]:
        loss = _energy_and_forces_loss(energy)
        value, grads = jax.jit(jax.value_and_grad(lambda p, loss=loss: loss(p, **inputs)))(p)
        results[name] = (float(energy(p, species, positions)), float(value), grads)
    for name in ("haiku", "linen"):
        np.testing.assert_allclose(results[name][:2], results["nnx"][:2], rtol=2e-5)
    # the NNX gradient, carried to Haiku's names, is Haiku's gradient
    grads_as_haiku = e3kernels.nnx.to_haiku(_with(model, results["nnx"][2]), names=HAIKU_NAMES)[0]
    assert_trees_close(grads_as_haiku, results["haiku"][2], 1e-4, 1e-4)
    assert_trees_close(e3kernels.nnx.to_linen(_with(model, results["nnx"][2]))["params"],
                       results["linen"][2], 1e-4, 1e-4)


def _with(model, params_state):
    """A copy of ``model`` holding ``params_state`` (a gradient, say) as its parameters."""
    graphdef, _, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return nnx.merge(graphdef, params_state, stats)


def test_block_is_invariant_and_forces_equivariant():
    species, positions, _ = _structure()
    model = NnxBlock(nnx.Rngs(0))
    energy_and_forces = nnx.jit(lambda m, x: nnx.value_and_grad(lambda x, m: m(species, x))(x, m))
    rotation = e3nn.rand_matrix(jax.random.PRNGKey(9), ())
    e, f = energy_and_forces(model, positions)
    e_rot, f_rot = energy_and_forces(model, positions @ rotation.T)
    np.testing.assert_allclose(e_rot, e, rtol=1e-4)
    np.testing.assert_allclose(f_rot, f @ rotation.T, rtol=1e-3, atol=1e-4)


def test_training_with_optax_on_energy_and_forces():
    species, positions, target = _structure()
    model = NnxBlock(nnx.Rngs(0), backend="pallas")  # the kernels (interpret mode on CPU)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss(model):  # nnx.grad for the forces too: BatchNorm updates its statistics inside
        energy, grad = nnx.value_and_grad(lambda x, m: m(species, x))(positions, model)
        return 0.01 * energy**2 + jnp.mean((-grad - target) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    losses = [float(train_step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), nnx.state(model, nnx.Param), before)
    unchanged = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(changed) if not v]
    # every parameter trained, species embeddings included, but the product's vector paths:
    # the readout takes scalars only, so they do not reach the energy
    assert unchanged == [f"['product']['weights']['w{k}_1o'].value" for k in BLOCK_ORDERS]
    # running statistics were updated by the training-mode BatchNorm
    assert bool(jnp.any(model.norm.var[...] != 1.0))


def test_split_merge_through_plain_jit_vmap_and_scan():
    species, positions, _ = _structure()
    model = NnxBlock(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def energy(state, species, positions):
        return nnx.merge(graphdef, state)(species, positions)

    expected = float(model(species, positions))
    np.testing.assert_allclose(energy(state, species, positions), expected, rtol=1e-5)

    # nnx.vmap over a batch of structures, the model broadcast (in eval mode: a broadcast
    # BatchNorm cannot take a batch of statistic updates)
    model.eval()
    expected = float(model(species, positions))
    batch = jnp.stack([positions, positions * 1.1])
    energies = nnx.vmap(lambda m, x: m(species, x), in_axes=(None, 0))(model, batch)
    assert energies.shape == (2,)
    np.testing.assert_allclose(energies[0], expected, rtol=1e-4)

    # nnx.scan over a stack of layers created with nnx.vmap (NNX's idiom for repeated blocks)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_layers(rngs):
        return e3kernels.nnx.Linear("4x0e + 2x1o", "4x0e + 2x1o", num_indexed_weights=SPECIES, rngs=rngs)

    layers = make_layers(nnx.Rngs(1).split(3))
    x = normal("4x0e + 2x1o", ATOMS)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, h):
        return layer(species, h)

    out = run(layers, x)
    h = x
    for k in range(3):
        layer = nnx.merge(*nnx.split(layers))  # a copy, indexed below
        state = jax.tree.map(lambda a, k=k: a[k], nnx.state(layer))
        single = e3kernels.nnx.Linear("4x0e + 2x1o", "4x0e + 2x1o", num_indexed_weights=SPECIES,
                                      rngs=nnx.Rngs(0))
        nnx.update(single, state)
        h = single(species, h)
    assert_close(out, h, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_dtypes(dtype):
    with jax.enable_x64(dtype == "float64"):
        x = normal("1o + 2x0e", 5).astype(dtype)
        i = jnp.array([2, 0, 1, 2, 0])
        model = e3kernels.nnx.Linear("1o + 2x0e", "0e + 1o", num_indexed_weights=3, param_dtype=dtype,
                                     rngs=nnx.Rngs(0))
        assert model.weights["w[1,1] 1x1o,1x1o"].dtype == jnp.dtype(dtype)
        assert model(i, x).dtype == jnp.dtype(dtype)
        # float32 parameters promote a bfloat16 input, as nnx.Linear does
        promoted = e3kernels.nnx.Linear("1o + 2x0e", "0e + 1o", num_indexed_weights=3, rngs=nnx.Rngs(0))
        assert promoted(i, x).dtype == jnp.promote_types(dtype, jnp.float32)


# ---- errors ------------------------------------------------------------------------------


def test_call_form_must_match_construction():
    model = e3kernels.nnx.Linear("0e + 1o", "0e", num_indexed_weights=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Linear: this module was built for the \(i, x\) call form.*"
                                         r"called as \(x\)"):
        model(normal("0e + 1o", 3))
    with pytest.raises(ValueError, match=r"Linear: input has irreps 1x0e\+1x1e"):
        model(jnp.zeros(3, jnp.int32), normal("0e + 1e", 3))


def test_conversion_reports_missing_and_left_over_leaves():
    model = e3kernels.nnx.Linear("0e + 1o", "0e + 1o", rngs=nnx.Rngs(0))
    params, _ = e3kernels.nnx.to_haiku(model)
    with pytest.raises(ValueError, match=r"Haiku params have no 'lin'.*their modules are \['linear'\]"):
        e3kernels.nnx.load_haiku(model, params, names={"": "lin"})
    extra = {**params, "other": {"w": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"no e3kernels module of the model takes: \['params/other/w'\]"):
        e3kernels.nnx.load_haiku(model, extra)
    bad = jax.tree.map(lambda a: jnp.zeros((2,) + a.shape[1:]), params)
    with pytest.raises(ValueError, match=r"has shape \(2, 1\); the model's .*weights\['w\[0,0\] "):
        e3kernels.nnx.load_haiku(model, bad)


def test_linear_parameter_initializer():
    init = lambda: nnx.initializers.constant(0.5)
    model = e3kernels.nnx.Linear("2x0e + 1o", "0e + 1o", weights_dim=3, parameter_initializer=init,
                                 rngs=nnx.Rngs(0))
    assert {k: v.shape for k, v in model.weights.items()} == {
        "w[0,0] 2x0e,1x0e": (3, 2, 1), "w[1,1] 1x1o,1x1o": (3, 1, 1)}
    assert all(bool(jnp.all(v[...] == 0.5)) for v in model.weights.values())


def test_batch_norm_refuses_irreps_in_another_order():
    bn = e3kernels.nnx.BatchNorm("0e + 1o + 0e + 1o")  # its statistics follow this order
    assert bn(normal("0e + 1o + 0e + 1o", 8)).irreps == e3nn.Irreps("0e + 1o + 0e + 1o")
    with pytest.raises(ValueError, match=r"BatchNorm: input has irreps 2x0e\+2x1o; the module was built for"):
        bn(normal("2x0e + 2x1o", 8))


# ---- MessagePassingConvolution -----------------------------------------------------------

# irreps_in, irreps_sh, target_irreps, avg_num_neighbors; 4 radial basis functions
CONV_ARGS = ("8x0e + 8x1o", "0e + 1o + 2e", "0e + 1o + 2e", 2.5)
HAIKU_CONV = "message_passing_convolution/multi_layer_perceptron"


def conv_model(**kwargs):
    return e3kernels.nnx.MessagePassingConvolution(
        *CONV_ARGS, num_radial_basis=4, radial_neurons=(8,), backend="reference", **kwargs, rngs=nnx.Rngs(0))


def haiku_conv():
    return hk.without_apply_rng(hk.transform(lambda *a: e3kernels.haiku.MessagePassingConvolution(
        CONV_ARGS[2], CONV_ARGS[3], radial_neurons=(8,), backend="reference")(*a)))


def linen_conv():
    return e3kernels.flax.MessagePassingConvolution(CONV_ARGS[2], CONV_ARGS[3], radial_neurons=(8,),
                                                    backend="reference")


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile, not op by op
def conv_inputs(nodes=6, edges=15):
    keys = jax.random.split(jax.random.PRNGKey(11), 4)
    x = e3nn.normal(CONV_ARGS[0], KEY, (nodes,))
    sh = e3nn.spherical_harmonics(CONV_ARGS[1], jax.random.normal(keys[0], (edges, 3)), normalize=True)
    radial = jax.random.normal(keys[1], (edges, 4))
    senders = jax.random.randint(keys[2], (edges,), 0, nodes)
    receivers = jax.random.randint(keys[3], (edges,), 0, nodes)
    return x, sh, radial, senders, receivers


def test_message_passing_convolution_equals_haiku_and_linen():
    model = conv_model()
    args = conv_inputs()
    params, state = e3kernels.nnx.to_haiku(model)
    assert state == {} and sorted(params) == [f"{HAIKU_CONV}/linear_0", f"{HAIKU_CONV}/linear_1"]
    assert params[f"{HAIKU_CONV}/linear_1"]["w"].shape == (8, 7 * 8)  # 7 paths x 8 channels
    graphdef, nnx_params = nnx.split(model, nnx.Param)
    x, rest = args[0], args[1:]
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (6, model.irreps_out.dim))

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(apply, p, x):
        def loss(p, x):
            out = apply(p, x, *rest).array
            return jnp.sum(out * cotangent) + 0.1 * jnp.sum(out**2)
        return apply(p, x, *rest), jax.grad(loss, argnums=(0, 1))(p, x)

    out, (grad_p, grad_x) = value_and_grads(lambda p, *a: nnx.merge(graphdef, p)(*a), nnx_params, x)
    expected, (haiku_grad_p, haiku_grad_x) = value_and_grads(haiku_conv().apply, params, x)
    assert out.irreps == expected.irreps == model.irreps_out == e3nn.Irreps("16x0e + 24x1o + 16x2e")
    assert_close(out, expected)
    assert_trees_close(e3kernels.nnx.to_haiku(_with(model, grad_p))[0], haiku_grad_p)
    assert_close(grad_x, haiku_grad_x)
    assert_close(jax.jit(linen_conv().apply)(e3kernels.nnx.to_linen(model), *args), expected)
    assert_close(model(x.array, rest[0].array, *rest[1:]), expected)  # raw arrays of the irreps


class _Interaction(nnx.Module):
    def __init__(self):
        self.conv = conv_model()


def test_message_passing_convolution_conversion_round_trips():
    model = conv_model()  # first: it builds the convolution's plan outside any trace
    args = conv_inputs()
    params = jax.jit(haiku_conv().init)(jax.random.PRNGKey(1), *args)
    e3kernels.nnx.load_haiku(model, params)
    assert_trees_close(e3kernels.nnx.to_haiku(model)[0], params, 0, 0)
    variables = jax.jit(linen_conv().init)(jax.random.PRNGKey(2), *args)
    assert sorted(variables["params"]) == ["MultiLayerPerceptron_0"]
    e3kernels.nnx.load_linen(model, variables)
    assert_trees_close(e3kernels.nnx.to_linen(model), variables, 0, 0)
    # in a larger model: under the convolution's path, or the name `names` gives it
    nested = _Interaction()
    assert sorted(e3kernels.nnx.to_haiku(nested)[0]) == [f"conv/multi_layer_perceptron/linear_{k}"
                                                         for k in range(2)]
    assert sorted(e3kernels.nnx.to_linen(nested)["params"]["conv"]) == ["MultiLayerPerceptron_0"]
    renamed = {k.replace("message_passing_convolution", "block/~/conv"): v for k, v in params.items()}
    e3kernels.nnx.load_haiku(nested, renamed, names={"conv": "block/~/conv"})
    assert_trees_close(e3kernels.nnx.to_haiku(nested, names={"conv": "block/~/conv"})[0], renamed, 0, 0)
    assert sorted(e3kernels.nnx.to_haiku(nested, names={"conv/radial_mlp": "radial"})[0]) == [
        "radial/linear_0", "radial/linear_1"]


@pytest.mark.parametrize("change, match", [
    (dict(irreps_in="8x0e + 4x1o"), r"irreps_in must have the same nonzero multiplicity \(channels\)"),
    (dict(target_irreps="3e"), r"no irrep of target_irreps=1x3e is in irreps_in x irreps_sh"),
    (dict(avg_num_neighbors=0), r"avg_num_neighbors must be a positive finite number"),
    (dict(num_radial_basis=0), r"num_radial_basis must be a positive int"),
    (dict(radial_neurons=(8, 0)), r"radial_neurons must be positive ints"),
])
def test_message_passing_convolution_argument_errors(change, match):
    kwargs = dict(zip(("irreps_in", "irreps_sh", "target_irreps", "avg_num_neighbors"), CONV_ARGS),
                  num_radial_basis=4, radial_neurons=(8,))
    with pytest.raises(ValueError, match="MessagePassingConvolution: " + match):
        e3kernels.nnx.MessagePassingConvolution(**{**kwargs, **change}, rngs=nnx.Rngs(0))


def test_message_passing_convolution_call_errors():
    model = conv_model()
    x, sh, radial, senders, receivers = conv_inputs()
    unequal = e3nn.concatenate([x, normal("3x0e", 6)])
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: node_feats has irreps "
                                         r"8x0e\+8x1o\+3x0e; the module was built for 8x0e\+8x1o"):
        model(unequal, sh, radial, senders, receivers)
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: edge_sh has irreps 1x0e\+1x1o; "):
        model(x, sh.filter("0e + 1o"), radial, senders, receivers)
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: radial_embedding must have shape "
                                         r"\(num_edges, num_radial_basis\) = \(15, 4\); got \(15, 3\)"):
        model(x, sh, radial[:, :3], senders, receivers)
    with pytest.raises(ValueError, match=r"MessagePassingConvolution: a raw array input must have a last "
                                         r"axis of irreps_in.dim = 32"):
        model(x.array[:, :8], sh, radial, senders, receivers)


def test_message_passing_convolution_bfloat16():
    bf16 = lambda a: a.astype(jnp.bfloat16)
    model16 = conv_model(param_dtype=jnp.bfloat16)
    args = conv_inputs()
    args16 = tuple(map(bf16, args[:3])) + args[3:]
    assert model16.radial_mlp.layers[0].kernel.dtype == jnp.bfloat16
    apply = nnx.jit(lambda m, *a: m(*a))
    y16 = apply(model16, *args16)
    assert y16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y16.array)))
    # the same parameters in float32 promote bfloat16 inputs, as nnx.Linear does
    model = conv_model()
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model16, nnx.Param)))
    y = apply(model, *args16)
    assert y.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(y.array)))
    assert_close(y16.array.astype(jnp.float32), y, 0, 0.05 * scale)


def test_message_passing_convolution_fuses_the_radial_networks_last_layer():
    """The radial network's last layer runs in the op: no ``(E, P * C)`` or ``(E, P, C)``
    weights outside it, forward or backward; in float64 the numbers are the unfused
    formulation's (e3nn-jax's, with the module's own ``radial_mlp`` forming the weights)."""
    edges, paths, channels, nodes = 17, 7, 2, 6  # 4 basis functions, 8 hidden: no size twice
    with jax.enable_x64(True):
        model = e3kernels.nnx.MessagePassingConvolution(
            "2x0e + 2x1o", *CONV_ARGS[1:], num_radial_basis=4, radial_neurons=(8,), backend="reference",
            param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        assert model.radial_mlp.layers[-1].kernel.shape == (8, paths * channels)
        keys = jax.random.split(jax.random.PRNGKey(11), 4)
        x = e3nn.normal(model.irreps_in, keys[0], (nodes,), dtype=jnp.float64)
        sh = e3nn.spherical_harmonics(model.irreps_sh, jax.random.normal(keys[1], (edges, 3), jnp.float64),
                                      normalize=True)
        radial = jax.random.normal(keys[2], (edges, 4), jnp.float64)
        senders = jax.random.randint(keys[3], (edges,), 0, nodes)
        receivers = (senders + 1) % nodes
        graphdef, params = nnx.split(model, nnx.Param)

        def ours(params, x):
            return nnx.merge(graphdef, params)(x, sh, radial, senders, receivers)

        def theirs(params, x):
            module = nnx.merge(graphdef, params)
            msg = e3nn.tensor_product(x[senders], sh, filter_ir_out=module.target_irreps)
            mix = module.radial_mlp(radial)  # the MLP's own forward pass: the (E, P * C) weights
            out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=nodes) / module.avg_num_neighbors
            return out

        def value_and_grad(apply):
            return jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(apply(p, x).array)), argnums=(0, 1))

        out = jax.jit(ours)(params, x)
        assert out.dtype == jnp.float64 and out.irreps == model.irreps_out
        assert_close(out, theirs(params, x), 1e-12, 1e-12)
        assert_trees_close(jax.jit(value_and_grad(ours))(params, x), value_and_grad(theirs)(params, x),
                           1e-12, 1e-12)
        formed = {(edges, paths * channels), (edges, paths, channels), (edges, channels, paths)}
        assert not formed & shapes_outside_the_op(value_and_grad(ours), params, x)
        assert formed & shapes_outside_the_op(value_and_grad(theirs), params, x)  # the check can fail
