"""The peers of e3kernels' convolution: the JAX implementations of MACE's message passing
that a user would pick instead of ours, wrapped to compute exactly what
:func:`e3kernels.ops.equivariant_convolution` computes, on its inputs and in its layout.

* **e3j** (InstaDeep, ``pip install "e3j[ops]"``; the equivariance backend of their
  ``mlip``): ``e3j.core.Convolution``, plain JAX on CPU (``UNFUSED``), its CUDA FFI
  kernels on GPU (``FUSED_CUDA``), one Pallas Mosaic kernel on TPU (``FUSED_MOSAIC_TPU``).
* **cuequivariance-jax** (NVIDIA): ``cue.descriptors.channelwise_tensor_product`` run by
  ``cuex.segmented_polynomial`` with the senders as the node features' gather index and
  the receivers as the output's scatter index, ``method="naive"`` (plain JAX) on CPU and
  ``"uniform_1d"`` (its CUDA kernel) on GPU, the way mace-jax's adapters call it.

The mapping, checked numerically (:func:`max_differences`; ``tests/test_bench_peers.py``):

* node features: ours ``(N, C, irreps_in)``; both peers take ``(N, irreps_in, C)``
  (e3j's ``TRAILING_CHANNELS``; cue's ``ir_mul`` layout of ``C x irreps_in``, which for
  one multiplicity ``C`` throughout is the same array), the output likewise.
* per-edge weights: ours ``(E, num_paths, C)``, one per output irrep (path) and channel;
  e3j's edge scalars and cue's weight operand (``C`` per path, in the order of its sorted
  output segments) are that array unchanged: both sort the paths as e3nn does.
* normalisation: both scale each path by ``sqrt(2 l_out + 1)`` (e3nn's ``"component"``
  irrep normalisation; e3j's ``SQRT_DIM_OUT``, cue's ``O3`` Clebsch-Gordan coefficients);
  ``1 / avg_num_neighbors`` is folded into e3j's coefficients and into cue's polynomial.
* edge order: e3j's fused kernels want the edges sorted; with ``SENDER`` ordering they
  also assume the graph symmetric (each edge's reverse present, with the harmonics of the
  reversed vector and the same radial weights), which MACE's neighbour lists are (the
  bench's ``neighbor_list`` sorts by sender). :func:`check_sender_ordering` checks it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from e3kernels.irreps import ConvolutionPlan
from e3kernels.ops import convolution_plan

#: what ``pip install -e ".[peers]"`` installs (pyproject.toml)
E3J_REQUIREMENT = "e3j[ops]==0.1.*"
#: the names e3j's Mosaic convolution gives its ``pallas_call``s (compile check)
E3J_TPU_KERNEL_NAMES = ("bwd_convolution_zero_unwalked_blocks", "bwd_convolution", "fwd_convolution")

#: ``op(x, sh, weights, senders, receivers) -> out``, :func:`e3kernels.ops.equivariant_convolution`'s
#: arrays and layouts, the plan and ``avg_num_neighbors`` bound
Op = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


# ---- availability ---------------------------------------------------------------------


def unavailable(peer: str, platform: str) -> str | None:
    """Why ``peer`` (``"e3j"`` or ``"cuequivariance"``) cannot run on ``platform``, or
    ``None`` if it can."""
    if peer == "e3j":
        reason = _import_error("e3j", f'pip install "{E3J_REQUIREMENT}" (or -e ".[peers]")')
        if reason is None and platform == "gpu" and importlib.util.find_spec("e3j_ops") is None:
            reason = (f"e3j is installed without its CUDA kernels (e3j_ops) and would not run its GPU path; "
                      f'pip install "{E3J_REQUIREMENT}"')
        return reason
    if peer == "cuequivariance":
        return (_import_error("cuequivariance", 'pip install -e ".[bench]"')
                or _import_error("cuequivariance_jax", 'pip install -e ".[bench]"'))
    raise ValueError(f"unknown peer {peer!r}; expected 'e3j' or 'cuequivariance'")


def _import_error(module: str, fix: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({fix})"
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure is a reason to skip
        return f"{module} does not import ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


def _filter_string(plan: ConvolutionPlan) -> str | None:
    return None if plan.filter_ir_out is None else " + ".join(str(ir) for ir in plan.filter_ir_out)


def _check_normalization(plan: ConvolutionPlan, peer: str) -> None:
    if plan.irrep_normalization != "component":
        raise NotImplementedError(
            f"{peer}: only e3nn's 'component' irrep normalisation maps onto it; the plan has "
            f"{plan.irrep_normalization!r}"
        )


# ---- the ops ------------------------------------------------------------------------------


#: e3j's implementation per JAX platform
E3J_IMPLEMENTATIONS = {"cpu": "UNFUSED", "gpu": "FUSED_CUDA", "tpu": "FUSED_MOSAIC_TPU"}


@functools.cache
def e3j_block(plan: ConvolutionPlan, avg_num_neighbors: float, implementation: str):
    """``e3j.core.Convolution`` for ``plan`` (``implementation``: one of
    :data:`E3J_IMPLEMENTATIONS`' values), in its own layout: ``TRAILING_CHANNELS``
    (``(N, irreps, C)`` node features and output, ``(E, num_paths, C)`` edge scalars),
    ``SENDER`` graph ordering."""
    import e3j
    from e3j.core import Convolution
    from e3j.spaces import O3Space

    _check_normalization(plan, "e3j")
    target = _filter_string(plan)
    # The configuration is read when the blocks are built (the tensor product inside too,
    # which the unfused path calls): e3j's default follows the installed packages, not the
    # platform (with e3j_ops installed, FUSED_CUDA even on a CPU-only machine).
    with e3j.config.use(convolution=implementation, tensor_product="UNFUSED", aggregation="SCATTER"):
        conv = Convolution(
            (O3Space(str(plan.irreps_in)), O3Space(str(plan.irreps_sh))),
            None if target is None else O3Space(target),
            graph_ordering="SENDER",
            layout="TRAILING_CHANNELS",
            avg_num_neighbors=avg_num_neighbors,
            normalization="SQRT_DIM_OUT",
        )
    if e3nn.Irreps(str(conv.target)) != plan.irreps_out:
        raise ValueError(f"e3j: output irreps {conv.target} differ from ours ({plan.irreps_out})")
    return conv


def e3j_convolution(plan: ConvolutionPlan, avg_num_neighbors: float, implementation: str) -> Op:
    """:func:`e3j_block` as our op (node features and output transposed)."""
    conv = e3j_block(plan, avg_num_neighbors, implementation)

    def op(x, sh, weights, senders, receivers):
        out = conv(jnp.swapaxes(x, 1, 2), sh, weights, senders, receivers)  # (N, irreps_out, C)
        return jnp.swapaxes(out, 1, 2)

    return op


def cue_method(platform: str) -> str:
    """cuequivariance-jax's CUDA kernel on GPU, its plain-JAX evaluation elsewhere."""
    return "uniform_1d" if platform == "gpu" else "naive"


@functools.cache
def cue_convolution(plan: ConvolutionPlan, channels: int, avg_num_neighbors: float, method: str) -> Op:
    """cuequivariance-jax's channelwise tensor product with gather (senders) and scatter
    (receivers) indices as our op."""
    import cuequivariance as cue
    import cuequivariance_jax as cuex

    _check_normalization(plan, "cuequivariance")
    target = _filter_string(plan)
    descriptor = cue.descriptors.channelwise_tensor_product(
        channels * cue.Irreps("O3", str(plan.irreps_in)),
        cue.Irreps("O3", str(plan.irreps_sh)),
        None if target is None else cue.Irreps("O3", target),
    )
    irreps_out = descriptor.outputs[0].irreps  # C x each path's irrep, sorted
    out_paths = [e3nn.Irrep(str(ir)) for mul, ir in irreps_out for _ in range(mul // channels)]
    ours = [ir for mul, ir in plan.irreps_out for _ in range(mul)]
    if out_paths != ours:
        raise ValueError(f"cuequivariance: output paths {out_paths} differ from ours ({ours})")
    # one mode per operand, uniform segments: what its uniform_1d kernel runs
    polynomial = descriptor.squeeze_modes().flatten_coefficient_modes().polynomial * (1.0 / avg_num_neighbors)

    def op(x, sh, weights, senders, receivers):
        nodes, edges = x.shape[0], sh.shape[0]
        out = jax.ShapeDtypeStruct((nodes, polynomial.outputs[0].size), x.dtype)
        [y] = cuex.segmented_polynomial(
            polynomial,
            [weights.reshape(edges, -1), jnp.swapaxes(x, 1, 2).reshape(nodes, -1), sh],
            [out],
            indices=[None, senders, None, receivers],
            method=method,
        )
        return jnp.swapaxes(y.reshape(nodes, plan.dim_out, channels), 1, 2)

    return op


def peer_ops(platform: str) -> list[tuple[str, Callable[[ConvolutionPlan, int, float], Op]]]:
    """``(candidate name, make_op(plan, channels, avg_num_neighbors))`` for each peer that
    runs here; each missing one is named on stderr with the reason."""
    found = []
    for peer in ("e3j", "cuequivariance"):
        reason = unavailable(peer, platform)
        if reason is not None:
            print(f"convolution: {peer} skipped: {reason}", file=sys.stderr, flush=True)
            continue
        if peer == "e3j":
            implementation = E3J_IMPLEMENTATIONS.get(platform, "UNFUSED")
            make = lambda plan, channels, avg, i=implementation: e3j_convolution(plan, avg, i)
            found.append((f"e3j {implementation}", make))
        else:
            method = cue_method(platform)
            make = lambda plan, channels, avg, m=method: cue_convolution(plan, channels, avg, m)
            found.append((f"cuequivariance {method}", make))
    return found


# ---- the module: e3kernels.haiku.MessagePassingConvolution with a peer's op ------------------


class PeerMessagePassingConvolution(hk.Module):
    """:class:`e3kernels.haiku.MessagePassingConvolution` (its radial network, parameter
    tree, signature and e3nn-layout output) with the convolution itself run by a peer's
    op (``make_op`` of :func:`peer_ops`)."""

    def __init__(self, make_op, target_irreps, avg_num_neighbors: float,
                 radial_neurons: Sequence[int] = (64, 64, 64), activation=jax.nn.silu,
                 name: str = "message_passing_convolution"):
        super().__init__(name=name)
        self.make_op = make_op
        self.target_irreps = e3nn.Irreps(target_irreps)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.radial_neurons = tuple(radial_neurons)
        self.activation = activation

    def __call__(self, node_feats, edge_sh, radial_embedding, senders, receivers) -> e3nn.IrrepsArray:
        muls = {mul for mul, _ in node_feats.irreps}
        if len(muls) != 1:
            raise ValueError(f"peer convolution: node_feats needs one multiplicity; got {node_feats.irreps}")
        (channels,) = muls
        x = node_feats.mul_to_axis(channels)  # (N, C, irreps)
        plan = convolution_plan(x.irreps, edge_sh.irreps, self.target_irreps)
        weights = e3nn.haiku.MultiLayerPerceptron(
            list(self.radial_neurons) + [plan.num_paths * channels], self.activation, output_activation=False
        )(radial_embedding)
        weights = weights.array if isinstance(weights, e3nn.IrrepsArray) else weights
        op = self.make_op(plan, channels, self.avg_num_neighbors)
        out = op(x.array, edge_sh.array, weights.reshape(-1, plan.num_paths, channels), senders, receivers)
        return to_e3nn_layout(out, plan.irreps_out)


def to_e3nn_layout(out: jax.Array, irreps_out: e3nn.Irreps) -> e3nn.IrrepsArray:
    """``(N, C, irreps_out)`` -> e3nn's flat layout of the tensor product on ``C x`` inputs:
    per output irrep, its paths one after the other, each with its ``C`` channels."""
    nodes, channels, _ = out.shape
    blocks, irreps = [], []
    for (mul, ir), columns in zip(irreps_out, irreps_out.slices()):
        block = out[:, :, columns].reshape(nodes, channels, mul, ir.dim).transpose(0, 2, 1, 3)
        blocks.append(block.reshape(nodes, -1))
        irreps.append((mul * channels, ir))
    return e3nn.IrrepsArray(e3nn.Irreps(irreps), jnp.concatenate(blocks, axis=-1))


# ---- checks ---------------------------------------------------------------------------------


def check_sender_ordering(senders, receivers) -> None:
    """e3j's ``SENDER`` ordering: edges sorted by sender, each edge's reverse present (as
    often). Raises ``ValueError`` otherwise."""
    senders, receivers = np.asarray(senders), np.asarray(receivers)
    if np.any(np.diff(senders) < 0):
        raise ValueError("e3j (SENDER ordering): the edges must be sorted by sender")
    forward = np.sort(senders.astype(np.int64) * (1 << 32) + receivers)
    backward = np.sort(receivers.astype(np.int64) * (1 << 32) + senders)
    if not np.array_equal(forward, backward):
        raise ValueError("e3j (SENDER ordering): the graph must be symmetric (every edge's reverse present)")


def max_differences(got, want) -> tuple[float, float]:
    """Largest absolute difference over all leaves, and that divided by the largest
    magnitude of ``want`` (a relative figure that zeros in ``want`` do not inflate)."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise ValueError(f"{len(got_leaves)} arrays against {len(want_leaves)}")
    worst, scale = 0.0, 0.0
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            raise ValueError(f"shape {g.shape} against {w.shape}")
        worst = max(worst, float(np.max(np.abs(g - w), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(w), initial=0.0)))
    return worst, worst / scale if scale else worst


#: float32 round-off of sums over ~30 edges of a few products each, relative to the output's scale
PARITY_TOLERANCE = 1e-5


def assert_parity(name: str, got, want, what: str = "output", tolerance: float = PARITY_TOLERANCE) -> float:
    """Raise ``AssertionError`` naming the peer unless ``got`` equals ``want`` within
    ``tolerance`` relative to ``want``'s scale; returns the relative difference."""
    absolute, relative = max_differences(got, want)
    if not relative <= tolerance:
        raise AssertionError(
            f"{name}: its {what} differs from e3kernels' (max abs {absolute:.3g}, {relative:.3g} of the "
            f"largest value; tolerance {tolerance:g}): the layout, weight or normalisation mapping in "
            "bench/peers.py no longer matches this version"
        )
    return relative


# ---- compile check: e3j's Mosaic kernel on TPU ----------------------------------------------


def e3j_tpu_entries(device, rows: int, channels: int, three_orders, name_filter: str = "") -> list:
    """Compile-check entries (``(name, fn, argument types)``) of e3j's Mosaic convolution at
    the compile check's MACE-M sizes (``rows`` nodes, 30 edges each, ``128x(0e+1o)``
    convolved with l <= 3), forward, gradient and second order (``three_orders``: the
    compile check's helper), in e3j's own layout (``(N, irreps, C)`` node features, no
    transposes), for the compile-only TPU ``device``; ``[]`` with a printed
    reason if e3j is missing. Pallas asks the current device for its TPU generation while
    tracing, which the compile check does outside the device's mesh; the entries trace
    e3j under that device's abstract mesh."""
    names = [f"e3j convolution (Mosaic) {order}" for order in ("fwd", "grad", "2nd order")]
    if not any(name_filter in n for n in names):
        return []
    reason = unavailable("e3j", "tpu")
    if reason is not None:
        print(f"compile check: e3j's Mosaic convolution skipped: {reason}", file=sys.stderr, flush=True)
        return []
    plan = convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")
    conv = e3j_block(plan, 30.0, "FUSED_MOSAIC_TPU")
    mesh = jax.sharding.Mesh(np.array([device]), ("d",))
    edges = 30 * rows
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((rows, plan.dim_in, channels), f32)  # e3j's layout, as it is compiled in use
    per_edge = (jax.ShapeDtypeStruct((edges, plan.dim_sh), f32),
                jax.ShapeDtypeStruct((edges, plan.num_paths, channels), f32))
    index = (jax.ShapeDtypeStruct((edges,), jnp.int32),) * 2
    projection = np.random.default_rng(2).standard_normal((rows, plan.dim_out, channels)).astype(np.float32)

    def convolve(x, per_edge, index):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return conv(x, *per_edge, *index)

    entries = three_orders("e3j convolution (Mosaic)", convolve, (x, per_edge, index), projection)
    return [e for e in entries if name_filter in e[0]]
