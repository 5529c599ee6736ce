"""``MessagePassingConvolution``: MACE's interaction convolution on the fused op."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

from e3kernels import _layers
from e3kernels import backend as _backend
from e3kernels.haiku.others import MultiLayerPerceptron
from e3kernels.ops import RadialWeights


class MessagePassingConvolution(hk.Module):
    r"""Message passing with a radial network, as MACE's and NequIP's interactions do.

    For node features ``node_feats`` (``C`` channels of each irrep, e.g.
    ``128x0e + 128x1o``), edge spherical harmonics ``edge_sh`` and a radial embedding of
    the edge lengths, it computes, without materialising the edge messages
    (:func:`e3kernels.ops.equivariant_convolution`)::

        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=target_irreps)
        mix = e3nn.haiku.MultiLayerPerceptron(
            list(radial_neurons) + [msg.irreps.num_irreps], activation, output_activation=False
        )(radial_embedding)
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=num_nodes) / avg_num_neighbors

    with the same parameters (``multi_layer_perceptron/linear_*``), the same output irreps
    and layout, and the same numbers (float32 round-off) as that e3nn-jax code (tested).
    mace-jax's ``MessagePassingConvolution`` computes the same messages with the paths of
    an irrep in another order (``x (x) Y_0`` first, through ``messages.filter``), so its
    radial network's last-layer columns and its output blocks are a permutation of ours.

    Args:
      target_irreps: the irreps the messages keep (multiplicities are ignored), e.g.
        ``"0e + 1o + 2e + 3o"``.
      avg_num_neighbors: the sum over edges is divided by it.
      radial_neurons: hidden layer sizes of the radial network.
      activation: its activation (normalised, as in e3nn's MLP).
      backend: keyword only; ``"auto"``, ``"reference"``, ``"pallas"`` or ``None``.
      name: keyword only; Haiku module name.

    Called as ``(node_feats, edge_sh, radial_embedding, senders, receivers)``:
    ``node_feats`` an ``IrrepsArray`` ``(N, C x irreps)``, ``edge_sh`` an ``IrrepsArray``
    ``(E, irreps_sh)``, ``radial_embedding`` ``(E, num_basis)`` scalars (an array or an
    ``IrrepsArray``), ``senders`` and ``receivers`` ``(E,)`` node indices.

    >>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax, jax.numpy as jnp
    >>> @hk.without_apply_rng
    ... @hk.transform
    ... def conv(x, sh, radial, senders, receivers):
    ...     layer = e3kernels.haiku.MessagePassingConvolution("0e + 1o", 2.0, radial_neurons=[16])
    ...     return layer(x, sh, radial, senders, receivers)
    >>> x = e3nn.normal("8x0e + 8x1o", jax.random.PRNGKey(0), (5,))
    >>> vectors = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    >>> sh = e3nn.spherical_harmonics("0e + 1o + 2e", vectors, normalize=True)
    >>> radial = jnp.ones((12, 4))
    >>> senders, receivers = jnp.arange(12) % 5, (jnp.arange(12) + 1) % 5
    >>> params = jax.jit(conv.init)(jax.random.PRNGKey(2), x, sh, radial, senders, receivers)
    >>> conv.apply(params, x, sh, radial, senders, receivers).irreps
    16x0e+24x1o
    """

    def __init__(
        self,
        target_irreps,
        avg_num_neighbors: float,
        radial_neurons: Sequence[int] = (64, 64, 64),
        activation: Callable | None = jax.nn.silu,
        *,
        backend: str | None = None,
        name: str | None = None,
    ):
        super().__init__(name)
        self.target_irreps = _layers.checked_target_irreps(target_irreps)
        self.avg_num_neighbors = _layers.checked_avg_num_neighbors(avg_num_neighbors)
        self.radial_neurons = _layers.check_radial_options(radial_neurons)
        self.activation = activation
        self.backend = _backend.validate_optional_backend(backend)

    def __call__(self, node_feats, edge_sh, radial_embedding, senders, receivers) -> e3nn.IrrepsArray:
        def edge_weights(num_outputs: int) -> RadialWeights:
            # the last layer is fused into the op: the (E, num_outputs) weights never exist
            return _RadialNetwork(list(self.radial_neurons) + [num_outputs], self.activation,
                                  output_activation=False, name="multi_layer_perceptron")(radial_embedding)

        return _layers.message_passing_convolution(
            self.target_irreps, self.avg_num_neighbors, node_feats, edge_sh, senders, receivers,
            edge_weights, self.backend,
        )


class _RadialNetwork(MultiLayerPerceptron):
    """The radial network's output ``hidden @ matrix`` as its two factors, for the op to
    fuse (:class:`~e3kernels.ops.RadialWeights`): ``hidden`` ``(E, H)``, the last hidden
    layer by e3nn-jax's own forward pass, and ``matrix`` ``(H, outputs)``, the last
    layer's weights times their normalisation. Its parameters are the MLP's (``linear_*``,
    created in the same order, so with the same initial values)."""

    def __call__(self, x) -> RadialWeights:
        assert self.output_activation is None and not self.with_bias, "a linear last layer"
        *hidden_neurons, num_outputs = self.list_neurons
        whole = self.list_neurons, self.output_activation
        self.list_neurons, self.output_activation = hidden_neurons, self.act  # the hidden layers
        try:
            hidden = super().__call__(x)
        finally:
            self.list_neurons, self.output_activation = whole
        hidden = hidden.array if isinstance(hidden, e3nn.IrrepsArray) else hidden
        alpha = 1 / hidden.shape[-1]
        weights = _LayerWeights(name=f"linear_{len(hidden_neurons)}")(
            (hidden.shape[-1], num_outputs), hidden.dtype,
            hk.initializers.RandomNormal(stddev=jnp.sqrt(alpha) ** (1.0 - self.gradient_normalization)))
        return RadialWeights(hidden, jnp.sqrt(alpha) ** self.gradient_normalization * weights)


class _LayerWeights(hk.Module):
    """The ``w`` of an ``hk.Linear`` (same name, shape, dtype and initialiser), unapplied."""

    def __call__(self, shape, dtype, init):
        return hk.get_parameter("w", shape, dtype, init=init)
