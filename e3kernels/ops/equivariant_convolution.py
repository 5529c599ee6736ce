"""``equivariant_convolution``: the message passing of MACE and NequIP, fused."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from e3kernels import backend as _backend
from e3kernels.irreps import ConvolutionPlan
from e3kernels.ops._checks import check_array, check_indices_in_range, matmul_precision
from e3kernels.reference import equivariant_convolution as _reference

OP = "equivariant_convolution"


class RadialWeights(NamedTuple):
    """Per-edge weights given as the radial network's last layer, fused into the op:
    ``weights[e] = (hidden[e] @ matrix).reshape(P, C)``, never formed in memory whole.

    Attributes:
      hidden: ``(E, H)`` the radial network's last hidden layer (after its activation).
      matrix: ``(H, P * C)`` its last weight matrix, normalisation included; column
        ``p * C + c`` is path ``p``, channel ``c``.

    >>> import jax.numpy as jnp
    >>> from e3kernels.ops import convolution_plan, equivariant_convolution
    >>> plan = convolution_plan("0e + 1o", "0e + 1o", "0e + 1o")
    >>> x, sh = jnp.ones((3, 4, plan.dim_in)), jnp.ones((2, plan.dim_sh))  # 3 nodes, 4 channels
    >>> hidden, matrix = jnp.ones((2, 8)), jnp.full((8, plan.num_paths * 4), 0.125)
    >>> senders, receivers = jnp.array([0, 1]), jnp.array([2, 2])
    >>> fused = equivariant_convolution(x, sh, RadialWeights(hidden, matrix), senders, receivers, plan)
    >>> weights = (hidden @ matrix).reshape(2, plan.num_paths, 4)  # what is never formed whole
    >>> bool(jnp.allclose(fused, equivariant_convolution(x, sh, weights, senders, receivers, plan)))
    True
    """

    hidden: jax.Array
    matrix: jax.Array


def equivariant_convolution(
    x: jax.Array,
    sh: jax.Array,
    weights: jax.Array,
    senders: jax.Array,
    receivers: jax.Array,
    plan: ConvolutionPlan,
    *,
    avg_num_neighbors: float = 1.0,
    backend: str | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    r"""Gather, channelwise tensor product with the edges' spherical harmonics, per-edge
    weights, scatter-sum: for every node ``r``, channel ``c`` and output column ``q``

    .. math::

        \mathrm{out}[r, c, q] = \frac{1}{\mathrm{avg\_num\_neighbors}} \sum_{e:\, r_e = r}
        w[e, p(q), c] \sum_{ij} T[i, j, q]\, x[s_e, c, i]\, sh[e, j]

    with ``T`` e3nn's tensor product (``plan.table``) and ``p(q)`` the output irrep
    (path) of column ``q``. Exactly, at float32 round-off, the e3nn-jax formulation::

        msg = e3nn.tensor_product(
            e3nn.IrrepsArray(plan.irreps_in, x)[senders],
            e3nn.IrrepsArray(plan.irreps_sh, sh)[:, None, :],
            filter_ir_out=plan.filter_ir_out,
        )                                        # (E, C, plan.irreps_out)
        msg = msg * jnp.swapaxes(weights, 1, 2)  # one weight per output irrep and channel
        out = e3nn.scatter_sum(msg, dst=receivers, output_size=x.shape[0]) / avg_num_neighbors

    The edge messages are never materialised as one ``(E, C, dim_out)`` array, on any
    backend. The kernels sum over edges in a fixed order (deterministic, no float
    atomics), as the reference does on CPU; the reference's scatter-add runs with float
    atomics on GPU (README, "Determinism"). Edges may come in any order.

    Args:
      x: ``(N, C, plan.dim_in)`` node features, ``C`` channels of ``plan.irreps_in``.
      sh: ``(E, plan.dim_sh)`` per-edge spherical harmonics (``e3nn.spherical_harmonics``).
      weights: ``(E, plan.num_paths, C)`` per edge, output irrep and channel (typically a
        radial MLP of the edge lengths); or :class:`RadialWeights`, the radial network's
        last layer, so that the reference forms the weights one block of edges at a time
        (the ``(E, P, C)`` array never exists) and differentiates in ``hidden`` and
        ``matrix`` directly: ``d/d matrix`` sums over edges, deterministically like the
        node sums. The Pallas kernels form a tile's weights in registers or VMEM (a
        tensor-core or MXU matmul per path): no ``(E, P, C)`` array on any backend.
      senders, receivers: ``(E,)`` integer node indices of each edge. Concrete
        out-of-range indices raise; traced ones drop the edge: it contributes exactly
        nothing, to the output and to every derivative, even where its ``sh`` or
        ``weights`` are NaN or inf (pad with index ``N``:
        :func:`e3kernels.models.mace.pad_edges`).
      plan: the static :class:`~e3kernels.irreps.ConvolutionPlan`
        (:func:`e3kernels.ops.convolution_plan`).
      avg_num_neighbors: the sum's normalisation.
      backend: ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (current setting).
      precision: of the fused radial weights' matmul ``hidden @ matrix`` and its
        derivatives, as in :func:`jax.numpy.dot` (``None``: the
        ``jax.default_matmul_precision`` in force, else ``DEFAULT``); the tensor product
        itself has no matmul.

    Returns:
      ``(N, C, plan.dim_out)`` array of ``x``'s dtype. Products and sums run in float32
      (float64 when an input is float64) on every backend.

    Under a sharded ``jax.jit`` with the edges split over devices, each device sums its
    own edges and the node sums are all-reduced once; the node features are replicated.

    >>> import jax.numpy as jnp
    >>> from e3kernels.ops import convolution_plan
    >>> plan = convolution_plan("0e + 1o", "0e + 1o + 2e", "0e + 1o")
    >>> plan.irreps_out, plan.num_paths
    (2x0e+3x1o, 5)
    >>> x, sh = jnp.ones((3, 8, 4)), jnp.ones((2, 9))
    >>> senders, receivers = jnp.array([0, 1]), jnp.array([2, 2])
    >>> out = equivariant_convolution(x, sh, jnp.ones((2, 5, 8)), senders, receivers, plan)
    >>> out.shape, float(out[0].sum()), float(out[2, 0, 0])
    ((3, 8, 11), 0.0, 2.0)
    """
    radial = weights if isinstance(weights, RadialWeights) else None
    if radial is not None:
        _validate_radial(x, sh, radial, plan)
        hidden, matrix = radial.hidden, radial.matrix
        weights = jax.ShapeDtypeStruct((sh.shape[0], plan.num_paths, x.shape[1]),
                                       jnp.result_type(hidden, matrix))
    _validate(x, sh, weights, senders, receivers, plan)
    for argument, index in (("senders", senders), ("receivers", receivers)):
        check_indices_in_range(OP, argument, index, x.shape[0], bound=f"x has {x.shape[0]} nodes")
    avg_num_neighbors = checked_average(avg_num_neighbors)
    if radial is not None:
        dtype = jnp.result_type(x, sh, weights.dtype)
        return _radial_convolution(x, sh, hidden, matrix, senders, receivers, plan, avg_num_neighbors,
                                   backend, dtype, matmul_precision(OP, precision))
    return dropping_convolution(x, sh, weights, senders, receivers, plan, avg_num_neighbors, backend)


def dropping_convolution(x, sh, weights, senders, receivers, plan: ConvolutionPlan, avg_num_neighbors: float,
                         backend):
    """:func:`equivariant_convolution` on checked arguments and formed weights, where
    out-of-range indices, concrete or traced, drop their edge (``e3kernels.cue``'s rule)."""
    dtype = jnp.result_type(x, sh, weights)
    impl = _backend.select(
        OP,
        backend,
        functools.partial(_reference.equivariant_convolution, plan=plan, avg_num_neighbors=avg_num_neighbors),
        lambda: _kernels().implementations(plan, avg_num_neighbors, dtype),
        jax.ShapeDtypeStruct(x.shape[:2] + (plan.dim_out,), x.dtype),
        key=(plan, avg_num_neighbors),
        row_axes=(None, 0, 0, 0, 0),  # split over edges; the nodes' sums are all-reduced
        out_row_axis=None,
        # a batch of graphs is one graph: nodes and edges folded, senders/receivers offset
        spaces=("node", "edge", "edge", "edge -> node", "edge -> node"),
        out_spaces="node",
    )
    return impl(x, sh, weights, senders, receivers)


def _radial_convolution(x, sh, hidden, matrix, senders, receivers, plan, avg_num_neighbors, backend, dtype,
                        precision):
    matrix = matrix.reshape(matrix.shape[0], plan.num_paths, x.shape[1])
    impl = _backend.select(
        OP,
        backend,
        functools.partial(_reference.radial_equivariant_convolution, plan=plan,
                          avg_num_neighbors=avg_num_neighbors, precision=precision),
        lambda: _kernels().radial_implementations(plan, avg_num_neighbors, dtype, precision),
        jax.ShapeDtypeStruct(x.shape[:2] + (plan.dim_out,), x.dtype),
        key=(plan, avg_num_neighbors, "radial", precision),
        row_axes=(None, 0, 0, None, 0, 0),  # split over edges; node sums and d/d matrix all-reduced
        out_row_axis=None,
        spaces=("node", "edge", "edge", "", "edge -> node", "edge -> node"),
        out_spaces="node",
    )
    return impl(x, sh, hidden, matrix, senders, receivers)


def _validate_radial(x, sh, radial: RadialWeights, plan: ConvolutionPlan) -> None:
    check_array(OP, "weights.hidden", radial.hidden, (sh.shape[0], None), "f")
    num_hidden, num_channels = radial.hidden.shape[1], x.shape[1]
    check_array(OP, "weights.matrix", radial.matrix, (num_hidden, plan.num_paths * num_channels), "f")


def _kernels():
    """The Pallas module, imported when a kernel may run (the reference needs no Pallas)."""
    from e3kernels.kernels import equivariant_convolution

    return equivariant_convolution


def _validate(x, sh, weights, senders, receivers, plan: ConvolutionPlan) -> None:
    if not isinstance(plan, ConvolutionPlan):
        raise TypeError(
            f"{OP}: plan must be a ConvolutionPlan (ops.convolution_plan); got {type(plan).__name__}"
        )
    check_array(OP, "x", x, (None, None, plan.dim_in), "f")
    check_array(OP, "sh", sh, (None, plan.dim_sh), "f")
    num_edges, num_channels = sh.shape[0], x.shape[1]
    check_array(OP, "weights", weights, (num_edges, plan.num_paths, num_channels), "f")
    check_array(OP, "senders", senders, (num_edges,), "i")
    check_array(OP, "receivers", receivers, (num_edges,), "i")


def checked_average(avg_num_neighbors, where: str = OP) -> float:
    """``avg_num_neighbors`` as a positive finite float, or an error naming ``where``."""
    try:
        value = float(avg_num_neighbors)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ValueError(
            f"{where}: avg_num_neighbors must be a positive finite number; got {avg_num_neighbors!r}"
        )
    return value
