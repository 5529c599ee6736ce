"""The benchmarked workloads and their candidates (design.md, "Workloads").

Every candidate is a set of pure functions of the same arguments: ``fwd`` (the output),
``fwd_bwd`` (gradients of a scalar loss with respect to the parameters and the float
inputs) and, for single ops, ``second`` (the gradients of a force-style loss, a function of
the first loss's gradient with respect to the input: what training on forces
differentiates). Candidates of one workload share inputs and, where the parameter trees
agree (e3nn-jax and e3kernels), parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

import e3kernels
from bench import peers
from e3kernels.models import mace

SPECIES = 10
CHANNELS = 128
NODE_IRREPS = "0e + 1o + 2e + 3o"
KEEP = "0e + 1o"
ORDERS = (1, 2, 3)


@dataclasses.dataclass
class Candidate:
    name: str
    fwd: Callable
    fwd_bwd: Callable
    args: tuple
    second: Callable | None = None  # "2nd order"; the model workloads' fwd_bwd is already one
    breakdown: bool = False  # profile where its time goes (bench.breakdown: MACE's parts)

    def modes(self) -> list[tuple[str, Callable]]:
        modes = [("fwd", self.fwd), ("fwd+bwd", self.fwd_bwd)]
        return modes + ([("2nd order", self.second)] if self.second is not None else [])


@dataclasses.dataclass
class Workload:
    key: str
    title: str
    rows: int
    build: Callable[[int, str], list[Candidate]]  # (rows, platform) -> candidates


def has_cuequivariance() -> bool:
    return importlib.util.find_spec("cuequivariance_jax") is not None


def e3kernels_backends(platform: str) -> list[str]:
    """Our candidates here: the reference everywhere, the kernels where they compile."""
    return ["reference"] if platform == "cpu" else ["reference", "pallas"]


def _loss(apply: Callable, args: tuple) -> Callable:
    """A fixed random projection of the output: its cotangent does not depend on the
    output (``0.5 * sum(out**2)`` flatters, its cotangent being the output itself)."""
    out = jax.eval_shape(apply, *args)
    projection = jax.random.normal(jax.random.PRNGKey(11), out.shape, jnp.float32)
    return lambda *args: jnp.sum(projection * apply(*args).astype(jnp.float32))


def _loss_grads(apply: Callable, argnums: tuple[int, ...], args: tuple) -> Callable:
    """Gradients of :func:`_loss`."""
    return jax.grad(_loss(apply, args), argnums=argnums)


def _force_style_grads(apply: Callable, argnums: tuple[int, ...], args: tuple) -> Callable:
    """Gradients of ``sum(sin(d loss / d x))``, ``x = args[argnums[-1]]``: the second order
    a force-trained model runs, for one op. (A fixed projection of ``d loss / d x`` would
    make the result of a linear op a constant, which XLA folds at compile time.)"""
    first = jax.grad(_loss(apply, args), argnums=argnums[-1])

    def force_loss(*args):
        return sum(jnp.sum(jnp.sin(g)) for g in jax.tree.leaves(first(*args)))  # an IrrepsArray's array

    return jax.grad(force_loss, argnums=argnums)


def _op_candidate(name: str, apply: Callable, argnums: tuple[int, ...], args: tuple) -> Candidate:
    """A single op: its output, its loss gradients and its force-style second order."""
    return Candidate(name, apply, _loss_grads(apply, argnums, args), args,
                     _force_style_grads(apply, argnums, args))


def _haiku_candidate(name: str, module_fn: Callable, params_like, args: tuple) -> Candidate:
    """A candidate from a Haiku function; ``params_like`` supplies the shared parameters."""
    transformed = hk.without_apply_rng(hk.transform(module_fn))
    params = params_like if params_like is not None else transformed.init(jax.random.PRNGKey(0), *args)
    apply = lambda params, *a: transformed.apply(params, *a).array
    grad_argnums = (0, len(args))  # the parameters and the last (float) input
    return _op_candidate(name, apply, grad_argnums, (params,) + args)


# ---- symmetric contraction, MACE-M, species-indexed weights ----------------------------


def e3nn_indexed_stp(orders, keep, num):
    """Today's e3nn-jax way: hk.vmap over rows, get_parameter gathering the row's weights."""

    def f(species, x):
        def row(s, x_row):
            def get_parameter(name, shape, dtype):
                full = hk.get_parameter(name, (num,) + shape, dtype, hk.initializers.RandomNormal())
                return full[s]

            return e3nn.haiku.SymmetricTensorProduct(orders, keep, get_parameter)(x_row)

        return hk.vmap(row, split_rng=False)(species, x)

    return f


def symmetric_contraction(rows: int, platform: str) -> list[Candidate]:
    key_x, key_s = jax.random.split(jax.random.PRNGKey(1))
    x = e3nn.normal(NODE_IRREPS, key_x, (rows, CHANNELS))
    species = jax.random.randint(key_s, (rows,), 0, SPECIES)
    theirs = _haiku_candidate("e3nn-jax", e3nn_indexed_stp(ORDERS, KEEP, SPECIES), None, (species, x))
    candidates = [theirs]
    for backend in e3kernels_backends(platform):
        stp = lambda s, x, backend=backend: e3kernels.haiku.SymmetricTensorProduct(
            ORDERS, KEEP, num_indexed_weights=SPECIES, backend=backend
        )(s, x)
        candidates.append(_haiku_candidate(f"e3kernels {backend}", stp, theirs.args[0], (species, x)))
    if has_cuequivariance():
        candidates.append(_cue_symmetric_contraction(rows, platform, species))
    return candidates


def _cue_symmetric_contraction(rows, platform, species) -> Candidate:
    import cuequivariance as cue
    import cuequivariance_jax as cuex

    irreps = cue.Irreps("O3", NODE_IRREPS.replace(" ", ""))
    poly = cue.descriptors.symmetric_contraction(
        CHANNELS * irreps, CHANNELS * cue.Irreps("O3", KEEP.replace(" ", "")), ORDERS
    ).polynomial
    method = "naive" if platform == "cpu" else "uniform_1d"
    w = jax.random.normal(jax.random.PRNGKey(2), (SPECIES, poly.inputs[0].size))
    x = jax.random.normal(jax.random.PRNGKey(3), (rows, poly.inputs[1].size))
    out = jax.ShapeDtypeStruct((rows, poly.outputs[0].size), jnp.float32)

    def apply(w, species, x):
        [y] = cuex.segmented_polynomial(poly, [w, x], [out], indices=[species, None, None], method=method)
        return y

    return _op_candidate(f"cuequivariance {method}", apply, (0, 2), (w, species, x))


# ---- indexed Linear ---------------------------------------------------------------------

LINEAR_IRREPS = "128x0e + 128x1o + 128x2e + 128x3o"


def indexed_linear(rows: int, platform: str) -> list[Candidate]:
    key_x, key_s = jax.random.split(jax.random.PRNGKey(4))
    x = e3nn.normal(LINEAR_IRREPS, key_x, (rows,))
    species = jax.random.randint(key_s, (rows,), 0, SPECIES)

    def module(ns, **kw):
        return lambda s, x: ns.Linear(LINEAR_IRREPS, num_indexed_weights=SPECIES, **kw)(s, x)

    theirs = _haiku_candidate("e3nn-jax", module(e3nn.haiku), None, (species, x))
    candidates = [theirs]
    for backend in e3kernels_backends(platform):
        ours = module(e3kernels.haiku, backend=backend)
        candidates.append(_haiku_candidate(f"e3kernels {backend}", ours, theirs.args[0], (species, x)))
    candidates.append(_dense_matmul(rows))
    if has_cuequivariance():
        candidates.append(_cue_indexed_linear(rows, platform, species))
    return candidates


def _dense_matmul(rows: int) -> Candidate:
    """A plain matmul with the indexed Linear's FLOPs and bytes: (rows*16, 128) @ (128, 128)."""
    dim = e3nn.Irreps(LINEAR_IRREPS).dim
    x = jax.random.normal(jax.random.PRNGKey(5), (rows, dim))
    w = jax.random.normal(jax.random.PRNGKey(6), (CHANNELS, CHANNELS))
    apply = lambda w, x: jnp.dot(x.reshape(-1, CHANNELS), w).reshape(x.shape)
    return _op_candidate("dense matmul (same FLOPs)", apply, (0, 1), (w, x))


def _cue_indexed_linear(rows, platform, species) -> Candidate:
    import cuequivariance as cue
    import cuequivariance_jax as cuex

    irreps = cue.Irreps("O3", LINEAR_IRREPS.replace(" ", ""))
    poly = cue.descriptors.linear(irreps, irreps).polynomial
    w = jax.random.normal(jax.random.PRNGKey(7), (SPECIES, poly.inputs[0].size))
    x = jax.random.normal(jax.random.PRNGKey(8), (rows, poly.inputs[1].size))
    out = jax.ShapeDtypeStruct((rows, poly.outputs[0].size), jnp.float32)
    if platform == "cpu":
        method = "naive"
        index = species
    else:  # its CUDA kernel wants rows sorted by species and the counts
        method = "indexed_linear"
        index = jnp.bincount(species, length=SPECIES)
        x = x[jnp.argsort(species)]

    def apply(w, index, x):
        gather = index if method == "naive" else cuex.Repeats(index)
        [y] = cuex.segmented_polynomial(poly, [w, x], [out], indices=[gather, None, None], method=method)
        return y

    return _op_candidate(f"cuequivariance {method}", apply, (0, 2), (w, index, x))


# ---- MACE's message-passing convolution ---------------------------------------------------

CONV_NODE_IRREPS = "128x0e + 128x1o"  # MACE-M's second interaction
SH_IRREPS = "0e + 1o + 2e + 3o"


def convolution(rows: int, platform: str) -> list[Candidate]:
    """The convolution module (radial MLP included) on a random liquid of ``rows`` atoms,
    ~30 neighbours each: e3nn-jax's formulation (it materialises every edge's message)
    against ours per backend, one parameter tree."""
    positions, _, cell = mace.random_liquid(rows, neighbors=30, r_max=MACE_CONFIG["r_max"],
                                            num_species=SPECIES, seed=0)
    senders, receivers, shifts = mace.neighbor_list(positions, cell, MACE_CONFIG["r_max"])
    vectors = jnp.asarray(positions[receivers] - positions[senders] + shifts @ cell, jnp.float32)
    sh = e3nn.spherical_harmonics(SH_IRREPS, vectors, normalize=True, normalization="component")
    lengths = jnp.linalg.norm(vectors, axis=-1)
    radial = e3nn.bessel(lengths, 8, MACE_CONFIG["r_max"])  # (E, 8)
    x = e3nn.normal(CONV_NODE_IRREPS, jax.random.PRNGKey(14), (rows,))
    avg_num_neighbors = len(senders) / rows
    edges = (jnp.asarray(senders), jnp.asarray(receivers))

    def module(cls, **kw):
        def f(sh_array, radial, senders, receivers, x):
            edge_sh = e3nn.IrrepsArray(SH_IRREPS, sh_array)
            return cls(SH_IRREPS, avg_num_neighbors, **kw)(x, edge_sh, radial, senders, receivers)

        return f

    args = (sh.array, radial, *edges, x)
    theirs = _haiku_candidate("e3nn-jax", module(mace.E3nnMessagePassingConvolution), None, args)
    candidates = [theirs]
    for backend in e3kernels_backends(platform):
        ours = module(e3kernels.haiku.MessagePassingConvolution, backend=backend)
        candidates.append(_haiku_candidate(f"e3kernels {backend}", ours, theirs.args[0], args))
    return candidates + _peer_convolutions(platform, module, avg_num_neighbors, candidates[1], edges)


def _peer_convolutions(platform, module, avg_num_neighbors, reference: Candidate, edges) -> list[Candidate]:
    """e3j's and cuequivariance-jax's convolutions (bench/peers.py) with our radial network
    and parameters, each checked against ``reference`` (e3kernels' reference backend) on
    the workload's inputs before it is timed: a peer that disagrees raises.

    JAX's caches are cleared after the check, so that the bench's trace+compile seconds
    start cold; Python-level one-off setup (our plan, e3j's blocks, cue's descriptors, and
    e3nn's Clebsch-Gordan coefficients that our plan computes) stays cached for every
    candidate alike."""
    candidates, want = [], None
    for name, make_op in peers.peer_ops(platform):
        if name.startswith("e3j"):
            peers.check_sender_ordering(*edges)
        peer = module(functools.partial(peers.PeerMessagePassingConvolution, make_op))
        candidate = _haiku_candidate(name, peer, reference.args[0], reference.args[1:])
        if want is None:
            want = jax.jit(lambda *args: reference.fwd(*args))(*reference.args)
        peers.assert_parity(name, jax.jit(lambda *args, c=candidate: c.fwd(*args))(*candidate.args), want)
        candidates.append(candidate)
    if candidates:
        jax.clear_caches()
    return candidates


# ---- a MACE-style interaction block, trained on energies and forces ---------------------


def interaction_block(ns, species, positions, **kw):
    """Species embedding x spherical harmonics -> indexed Linear -> indexed symmetric
    contraction -> Linear to one energy per atom. Returns the total energy."""
    rows = positions.shape[0]
    sh = e3nn.spherical_harmonics(NODE_IRREPS, positions, normalize=False)  # (rows, 16)
    embed = hk.get_parameter("embed", (SPECIES, CHANNELS), init=hk.initializers.RandomNormal())
    h = e3nn.IrrepsArray(sh.irreps, embed[species][:, :, None] * sh.array[:, None, :])
    h = h.axis_to_mul()  # (rows, 128x0e+128x1o+128x2e+128x3o)
    h = ns.Linear(h.irreps, num_indexed_weights=SPECIES, **kw)(species, h).mul_to_axis(CHANNELS)
    if ns is e3nn.haiku:
        h = e3nn_indexed_stp(ORDERS, KEEP, SPECIES)(species, h)
    else:
        h = ns.SymmetricTensorProduct(ORDERS, KEEP, num_indexed_weights=SPECIES, **kw)(species, h)
    energy = ns.Linear("0e", **kw)(h.axis_to_mul())
    assert energy.shape == (rows, 1)
    return jnp.sum(energy.array)


def _block_training(name: str, ns, rows: int, params=None, **kw) -> Candidate:
    """The MACE-style block on ``rows`` atoms: energy and forces (fwd), and the gradient of
    a loss on both (fwd+bwd), which differentiates twice."""
    key_p, key_s = jax.random.split(jax.random.PRNGKey(9))
    positions = jax.random.normal(key_p, (rows, 3))
    species = jax.random.randint(key_s, (rows,), 0, SPECIES)
    force_projection = jax.random.normal(jax.random.PRNGKey(12), (rows, 3))
    energy = hk.without_apply_rng(hk.transform(lambda s, p: interaction_block(ns, s, p, **kw)))
    if params is None:
        params = energy.init(jax.random.PRNGKey(0), species, positions)

    def energy_forces(params, s, p, projection):
        e, grad = jax.value_and_grad(energy.apply, argnums=2)(params, s, p)
        return e, -grad

    def loss(params, s, p, projection):  # fixed random weights on energy and forces (see _loss_grads)
        e, forces = energy_forces(params, s, p, projection)
        return 0.3 * e / rows + jnp.sum(projection * forces) / rows

    return Candidate(name, energy_forces, jax.grad(loss), (params, species, positions, force_projection))


def training_step(rows: int, platform: str) -> list[Candidate]:
    theirs = _block_training("e3nn-jax", e3nn.haiku, rows)
    ours = [
        _block_training(f"e3kernels {b}", e3kernels.haiku, rows, theirs.args[0], backend=b)
        for b in e3kernels_backends(platform)
    ]
    return [theirs] + ours


# ---- the complete MACE model, trained on energies and forces ------------------------------

#: MACE-M: hidden 128x0e+128x1o, l_max 3, correlation 3, 2 interactions, 10 species
MACE_CONFIG = dict(num_species=SPECIES, channels=CHANNELS, hidden_irreps=KEEP, l_max=3, num_interactions=2,
                   correlation=3, r_max=5.0)


def _mace_training(name: str, modules: mace.Modules, graph: tuple, avg_num_neighbors: float,
                   params=None, breakdown: bool = True) -> Candidate:
    """The complete model on a structure: energy and forces (fwd), and the gradient of a
    loss on both (fwd+bwd), which differentiates twice, as ``_block_training`` does."""
    model = mace.make_mace(avg_num_neighbors, modules=modules, **MACE_CONFIG)
    if params is None:
        params = jax.jit(model.init)(jax.random.PRNGKey(0), *graph)
    rows = graph[0].shape[0]
    force_projection = jax.random.normal(jax.random.PRNGKey(12), (rows, 3))

    def energy_forces(params, positions, species, senders, receivers, shifts, projection):
        return mace.energy_and_forces(model.apply, params, positions, species, senders, receivers, shifts)

    def loss(params, *args):  # fixed random weights on energy and forces (see _loss_grads)
        energy, forces = energy_forces(params, *args)
        return 0.3 * energy / rows + jnp.sum(args[-1] * forces) / rows

    return Candidate(name, energy_forces, jax.grad(loss), (params, *graph, force_projection),
                     breakdown=breakdown)


def mace_model(rows: int, platform: str) -> list[Candidate]:
    """MACE on a random liquid of ``rows`` atoms, ~30 neighbours each within 5 Å: e3nn-jax's
    modules; e3kernels' with e3nn-jax's convolution (on the fastest backend here); e3kernels
    throughout, per backend. One parameter tree for all."""
    positions, species, cell = mace.random_liquid(rows, neighbors=30, r_max=MACE_CONFIG["r_max"],
                                                  num_species=SPECIES, seed=0)
    edges = mace.neighbor_list(positions, cell, MACE_CONFIG["r_max"])
    graph = tuple(jnp.asarray(a) for a in (positions, species, *edges))
    avg_num_neighbors = len(edges[0]) / rows
    theirs = _mace_training("e3nn-jax", mace.E3NN_MODULES, graph, avg_num_neighbors)
    params = theirs.args[0]
    backends = e3kernels_backends(platform)
    fastest = backends[-1]
    mixed = mace.e3kernels_modules(fastest, e3nn_convolution=True)
    # no breakdown of the mixed model: one program of e3nn's few long instructions and our
    # loops' many short ones is where bench.breakdown cannot tell the profiler's cost apart
    candidates = [theirs, _mace_training(f"e3kernels {fastest} + e3nn conv", mixed, graph, avg_num_neighbors,
                                         params, breakdown=False)]
    for backend in backends:
        candidates.append(_mace_training(f"e3kernels {backend}", mace.e3kernels_modules(backend), graph,
                                         avg_num_neighbors, params))
    return candidates


def data_parallel(rows: int, platform: str, devices: int) -> list[Candidate]:
    """The block's training step with e3kernels ("auto"): on one device, then with the
    atoms sharded over ``devices`` devices, the same atoms (strong scaling) and
    ``devices`` times as many (weak scaling). Parameters are replicated."""
    available = jax.devices()
    if len(available) < devices:
        raise ValueError(f"data_parallel: {devices} devices asked for, {len(available)} available")
    # Auto axes: the model's own gathers (embed[species]) need no sharding annotations
    mesh = jax.make_mesh((devices,), ("atoms",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=available[:devices])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    atoms = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("atoms"))

    def sharded(candidate: Candidate) -> Candidate:
        params, *per_atom = candidate.args
        args = (jax.device_put(params, replicated), *(jax.device_put(a, atoms) for a in per_atom))
        return dataclasses.replace(candidate, args=args)

    one = _block_training("1 device", e3kernels.haiku, rows)
    params = one.args[0]
    strong = sharded(_block_training(f"{devices} devices", e3kernels.haiku, rows, params))
    weak = sharded(_block_training(f"{devices} devices, {devices}x atoms", e3kernels.haiku,
                                   devices * rows, params))
    return [one, strong, weak]


def cue_model(rows: int, platform: str) -> list[Candidate]:
    """A MACE-style model written for cuequivariance-jax (``bench.cue_mace``) on a random
    liquid of ``rows`` atoms: every op ``cuex`` ``method="naive"`` (what mace-jax runs off
    NVIDIA GPUs), against the same function traced inside ``e3kernels.cue.routed`` (every
    call on e3kernels: the switch raises for any it does not run). One parameter tree."""
    from bench import cue_mace
    from e3kernels import cue as e3cue

    config = cue_mace.Config()
    positions, species, cell = mace.random_liquid(rows, neighbors=30, r_max=config.r_max,
                                                  num_species=config.species, seed=0)
    edges = mace.neighbor_list(positions, cell, config.r_max)
    config = dataclasses.replace(config, avg_num_neighbors=len(edges[0]) / rows)
    graph = tuple(jnp.asarray(a) for a in (positions, species, *edges))
    params = cue_mace.init(config, jax.random.PRNGKey(0))
    projection = jax.random.normal(jax.random.PRNGKey(12), (rows, 3))

    def energy_forces(params, *graph_and_projection):
        return cue_mace.energy_and_forces(params, *graph_and_projection[:-1], config)

    def loss(params, *graph_and_projection):
        return cue_mace.training_loss(params, *graph_and_projection, config)

    def routed(function, backend):
        def traced_routed(*args):
            with e3cue.routed(backend=backend):
                return function(*args)
        return traced_routed

    args = (params, *graph, projection)
    candidates = [Candidate("cuex naive", energy_forces, jax.grad(loss), args)]
    for backend in e3kernels_backends(platform):
        candidates.append(Candidate(f"e3kernels.cue {backend}", routed(energy_forces, backend),
                                    routed(jax.grad(loss), backend), args))
    return candidates


WORKLOADS = {
    "symmetric_contraction": (
        "Symmetric contraction, MACE-M (128x(0e+1o+2e+3o), orders 1-3, keep 0e+1o, 10 species)",
        symmetric_contraction,
    ),
    "indexed_linear": ("Indexed Linear (128x0e+128x1o+128x2e+128x3o, 10 species)", indexed_linear),
    "convolution": (
        f"MACE's convolution (nodes {CONV_NODE_IRREPS}, edge harmonics {SH_IRREPS}, radial MLP; "
        "random liquid, ~30 neighbours)",
        convolution,
    ),
    "training_step": (
        "One MACE-style block, no convolution (indexed Linear, species-indexed symmetric contraction, "
        "Linear): energy+forces (fwd) and training step (fwd+bwd: differentiates twice)",
        training_step,
    ),
    "mace": (
        "Complete MACE model (2 interactions, 128x0e+128x1o, l_max 3, correlation 3, 10 species; random "
        "liquid, ~30 neighbours): energy+forces (fwd) and training step (fwd+bwd: differentiates twice)",
        mace_model,
    ),
    "cue": (
        "MACE-style model written for cuequivariance-jax (cuex naive; e3kernels.cue.routed): "
        "energy+forces (fwd) and training step (fwd+bwd: differentiates twice)",
        cue_model,
    ),
}

#: ``python -m bench --devices N``: the block's training step on N devices against one
DATA_PARALLEL = (
    "MACE-style block, data-parallel over devices (speed-up: against 1 device; "
    "ideal N with the same atoms, 1 with N times as many)",
    data_parallel,
)

# rows per workload: default CPU sizes finish in minutes on 2 cores; GPU sizes are MACE-typical
# (mace: atoms, with ~30 edges each)
ROWS = {
    ("cpu", False): {"symmetric_contraction": 1000, "indexed_linear": 4000, "convolution": 128,
                     "training_step": 200,
                     "mace": 128, "cue": 128, "data_parallel": 200},
    ("cpu", True): {"symmetric_contraction": 200, "indexed_linear": 800, "convolution": 32,
                    "training_step": 50,
                    "mace": 32, "cue": 32, "data_parallel": 48},
    ("gpu", False): {"symmetric_contraction": 4000, "indexed_linear": 4000, "convolution": 1000,
                     "training_step": 4000,
                     "mace": 1000, "cue": 1000, "data_parallel": 4000},
    ("gpu", True): {"symmetric_contraction": 1000, "indexed_linear": 1000, "convolution": 256,
                    "training_step": 500,
                    "mace": 256, "cue": 256, "data_parallel": 496},
}
