"""The Flax linen modules (see :mod:`e3kernels.flax`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import e3nn_jax as e3nn
import e3nn_jax.flax as e3nn_flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from e3kernels import _layers, ops
from e3kernels import backend as _backend
from e3kernels._e3nn_private import parse_gradient_normalization


class Linear(e3nn_flax.Linear):
    r"""Equivariant linear layer: ``e3nn_jax.flax.Linear`` with the indexed form on a kernel.

    Same fields, call forms, parameters and numbers as e3nn-jax's (``(x)`` and ``(w, x)``
    are e3nn-jax's own code); ``(i, x)`` with ``num_indexed_weights`` runs
    :func:`e3kernels.ops.indexed_linear` without a per-row copy of the weights.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> linear = e3kernels.flax.Linear("0e + 1o", num_indexed_weights=3)
    >>> x = e3nn.normal("1o + 2x0e", jax.random.PRNGKey(0), (4,))
    >>> i = jnp.array([0, 2, 1, 2])
    >>> variables = linear.init(jax.random.PRNGKey(1), i, x)
    >>> sorted(variables["params"])
    ['w[0,0] 2x0e,1x0e', 'w[1,1] 1x1o,1x1o']
    >>> linear.apply(variables, i, x).shape
    (4, 4)
    """

    backend: str | None = None

    def __post_init__(self):
        _layers.check_num_indexed_weights("Linear", self.num_indexed_weights)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()

    @nn.compact
    def __call__(self, weights_or_input, input_or_none=None) -> e3nn.IrrepsArray:
        """``(x)``, ``(w, x)`` with float ``w`` of shape ``(..., d)``, or ``(i, x)`` with
        integer ``i`` of shape ``(...)``; returns ``(..., [channel_out,] irreps_out.dim)``."""
        if input_or_none is None:
            weights, input = None, weights_or_input
        else:
            weights, input = weights_or_input, input_or_none
        weights, input = _layers.check_linear_call("Linear", self, weights, input)
        if weights is None or self.num_indexed_weights is None:
            return super().__call__(input) if weights is None else super().__call__(weights, input)

        def get_parameter(name, shape, std, dtype):  # as e3nn_jax.flax.Linear's
            if self.parameter_initializer is None:
                initializer = nn.initializers.normal(stddev=std)
            else:
                initializer = self.parameter_initializer()
            return self.param(name, initializer, shape, dtype)

        return _layers.linear("Linear", self, weights, input, get_parameter, self.backend)


class MultiLayerPerceptron(e3nn_flax.MultiLayerPerceptron):
    """A plain MLP on scalars, identical to ``e3nn_jax.flax.MultiLayerPerceptron``
    (parameters ``Dense_{k}/kernel``, and ``bias`` with ``with_bias=True``).

    >>> import e3kernels, jax, jax.numpy as jnp
    >>> mlp = e3kernels.flax.MultiLayerPerceptron((8, 1), jax.nn.silu)
    >>> variables = mlp.init(jax.random.PRNGKey(0), jnp.ones((3, 4)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'Dense_0': {'kernel': (4, 8)}, 'Dense_1': {'kernel': (8, 1)}}
    """

    backend: str | None = None

    def __post_init__(self):
        _layers.check_mlp_options(self.list_neurons, self.output_activation)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()


class BatchNorm(e3nn_flax.BatchNorm):
    """Equivariant batch normalisation, identical to ``e3nn_jax.flax.BatchNorm``: parameters
    ``weights`` and ``biases``, running statistics ``mean`` and ``var`` in ``batch_stats``.

    >>> import e3kernels, e3nn_jax as e3nn, jax
    >>> bn = e3kernels.flax.BatchNorm()
    >>> x = e3nn.normal("2x0e + 1o", jax.random.PRNGKey(0), (16,))
    >>> variables = bn.init(jax.random.PRNGKey(1), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["var"].shape
    (3,)
    """

    backend: str | None = None

    def __post_init__(self):
        _layers.check_batch_norm_options(self.reduce, self.normalization, self.eps)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()


class Dropout(nn.Module):
    """Equivariant dropout, the linen form of ``e3nn_jax.haiku.Dropout``: each irrep (all
    its components at once) is kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``; one mask per irrep, broadcast over the leading axes. No parameters.

    As ``flax.linen.Dropout``: ``deterministic`` (field or call argument) turns it off,
    and the mask's key comes from the ``"dropout"`` rng collection unless ``rng`` is given.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> dropout = e3kernels.flax.Dropout(p=0.5)
    >>> x = e3nn.IrrepsArray("8x1o", jnp.ones((2, 24)))
    >>> y = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    >>> sorted(set(y.array.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
    """

    p: float
    irreps: Any = None
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    backend: str | None = None

    def __post_init__(self):
        _layers.checked_probability("Dropout", self.p)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None, rng: jax.Array | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic:
            return x
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        irreps = None if self.irreps is None else e3nn.Irreps(self.irreps)
        return _layers.dropout("Dropout", rng, x, self.p, irreps)


class SymmetricTensorProduct(nn.Module):
    r"""Symmetric tensor product contraction with parameters, as in MACE: the linen form of
    ``e3kernels.haiku.SymmetricTensorProduct`` (and so of e3nn-jax's Haiku module).

    Per channel: ``Linear(irreps_out)(concatenate([x, sym(x (x) x), ...]))`` over the
    ``orders``; parameters ``w{order}_{irrep}`` of shape ``(mul, num_channel)``, or
    ``(num_indexed_weights, mul, num_channel)`` for the ``(i, x)`` call form, initialised
    from ``param_init`` (unit normal).

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> stp = e3kernels.flax.SymmetricTensorProduct((1, 2, 3), "0e + 1o", num_indexed_weights=3)
    >>> x = e3nn.normal("0e + 1o + 2e", jax.random.PRNGKey(0), (10, 8))  # 10 atoms, 8 channels
    >>> i = jnp.arange(10) % 3
    >>> variables = stp.init(jax.random.PRNGKey(1), i, x)
    >>> variables["params"]["w3_0e"].shape
    (3, 5, 8)
    >>> stp.apply(variables, i, x).irreps
    1x0e+1x1o
    """

    orders: tuple[int, ...]
    keep_irrep_out: Any = None
    num_indexed_weights: int | None = None
    param_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=1.0)
    backend: str | None = None

    def __post_init__(self):
        _layers.checked_orders(self.orders)
        _layers.checked_keep_irrep_out(self.keep_irrep_out)
        _layers.check_num_indexed_weights(_layers.MODULE_STP, self.num_indexed_weights)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()

    @nn.compact
    def __call__(self, indices_or_x, x_or_none=None) -> e3nn.IrrepsArray:
        """``(x)`` with ``x`` of shape ``(..., num_channel, irreps)``, or ``(i, x)``."""
        indices, x = (None, indices_or_x) if x_or_none is None else (indices_or_x, x_or_none)
        return _layers.symmetric_tensor_product(
            _layers.checked_orders(self.orders),
            _layers.checked_keep_irrep_out(self.keep_irrep_out),
            self.num_indexed_weights,
            indices,
            x,
            lambda name, shape, dtype: self.param(name, self.param_init, shape, dtype),
            self.backend,
        )


class MessagePassingConvolution(nn.Module):
    r"""Message passing with a radial network, as MACE's and NequIP's interactions do: the
    linen form of ``e3kernels.haiku.MessagePassingConvolution``, on the fused op
    (:func:`e3kernels.ops.equivariant_convolution`, edge messages never materialised).

    For node features ``node_feats`` (``C`` channels of each irrep, e.g.
    ``128x0e + 128x1o``), edge spherical harmonics ``edge_sh`` and a radial embedding of
    the edge lengths, it computes::

        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=target_irreps)
        mix = e3nn.flax.MultiLayerPerceptron(
            tuple(radial_neurons) + (msg.irreps.num_irreps,), activation, output_activation=False
        )(radial_embedding)
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=num_nodes) / avg_num_neighbors

    The only parameters are the radial network's, a :class:`MultiLayerPerceptron`
    submodule ``MultiLayerPerceptron_0`` (``Dense_{k}/kernel``, as e3nn's linen MLP, with
    its initial values); its layer ``k`` is the Haiku module's
    ``multi_layer_perceptron/linear_{k}`` ``w``, and the numbers are the Haiku module's for
    the same values. Its last layer runs in the op (:class:`~e3kernels.ops.RadialWeights`):
    the ``(E, msg.irreps.num_irreps)`` ``mix`` is never formed either.

    Fields: ``target_irreps`` (the irreps the messages keep, multiplicities ignored),
    ``avg_num_neighbors`` (the sum over edges is divided by it), ``radial_neurons`` (the
    radial network's hidden sizes), ``activation`` (its activation, normalised as in
    e3nn's MLP) and ``backend`` (``"auto"``, ``"reference"``, ``"pallas"`` or ``None``).

    Called as ``(node_feats, edge_sh, radial_embedding, senders, receivers)``:
    ``node_feats`` an ``IrrepsArray`` ``(N, C x irreps)``, ``edge_sh`` an ``IrrepsArray``
    ``(E, irreps_sh)``, ``radial_embedding`` ``(E, num_basis)`` scalars (an array or an
    ``IrrepsArray``), ``senders`` and ``receivers`` ``(E,)`` node indices.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> conv = e3kernels.flax.MessagePassingConvolution("0e + 1o", 2.0, radial_neurons=(16,))
    >>> x = e3nn.normal("8x0e + 8x1o", jax.random.PRNGKey(0), (5,))
    >>> vectors = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    >>> sh = e3nn.spherical_harmonics("0e + 1o + 2e", vectors, normalize=True)
    >>> radial = jnp.ones((12, 4))
    >>> senders, receivers = jnp.arange(12) % 5, (jnp.arange(12) + 1) % 5
    >>> variables = jax.jit(conv.init)(jax.random.PRNGKey(2), x, sh, radial, senders, receivers)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'MultiLayerPerceptron_0': {'Dense_0': {'kernel': (4, 16)}, 'Dense_1': {'kernel': (16, 40)}}}
    >>> conv.apply(variables, x, sh, radial, senders, receivers).irreps
    16x0e+24x1o
    """

    target_irreps: Any
    avg_num_neighbors: float
    radial_neurons: Sequence[int] = (64, 64, 64)
    activation: Callable | None = jax.nn.silu
    backend: str | None = None

    def __post_init__(self):
        _layers.checked_target_irreps(self.target_irreps)
        _layers.checked_avg_num_neighbors(self.avg_num_neighbors)
        _layers.check_radial_options(self.radial_neurons)
        _backend.validate_optional_backend(self.backend)
        super().__post_init__()

    @nn.compact
    def __call__(self, node_feats, edge_sh, radial_embedding, senders, receivers) -> e3nn.IrrepsArray:
        """Returns an ``IrrepsArray`` ``(N, irreps_out)``: per message irrep, ``C`` channels
        per tensor product path (e3nn's layout)."""

        def edge_weights(num_outputs: int) -> ops.RadialWeights:
            # the last layer is fused into the op: the (E, num_outputs) weights never exist.
            # Named as the MultiLayerPerceptron it replaces (same parameters)
            neurons = _layers.check_radial_options(self.radial_neurons) + (num_outputs,)
            mlp = _RadialNetwork(neurons, self.activation, output_activation=False,
                                 name="MultiLayerPerceptron_0")
            return mlp(radial_embedding)

        return _layers.message_passing_convolution(
            _layers.checked_target_irreps(self.target_irreps),
            _layers.checked_avg_num_neighbors(self.avg_num_neighbors),
            node_feats, edge_sh, senders, receivers, edge_weights, self.backend,
        )


class _RadialNetwork(MultiLayerPerceptron):
    """The radial network's output ``hidden @ matrix`` as its two factors, for the op to
    fuse (:class:`~e3kernels.ops.RadialWeights`): ``hidden`` ``(E, H)``, the last hidden
    layer by e3nn-jax's own ``MultiLayerPerceptron`` on the hidden layers (sharing this
    module's scope), and ``matrix`` ``(H, outputs)``, the last layer's kernel times its
    normalisation. Its parameters are the MLP's (``Dense_{k}/kernel``, the same names,
    shapes, dtypes and initialisers, so the same initial values)."""

    @nn.compact
    def __call__(self, x) -> ops.RadialWeights:
        assert self.output_activation is False and not self.with_bias, "a linear last layer"
        *hidden_neurons, num_outputs = self.list_neurons
        # every layer activated (output_activation=True: self.act), parameters Dense_0...
        hidden_layers = e3nn_flax.MultiLayerPerceptron(
            tuple(hidden_neurons), self.act, self.gradient_normalization, output_activation=True)
        nn.share_scope(self, hidden_layers)
        hidden = hidden_layers(x)
        hidden = hidden.array if isinstance(hidden, e3nn.IrrepsArray) else hidden
        alpha = 1 / hidden.shape[-1]
        gradient_normalization = parse_gradient_normalization(self.gradient_normalization)
        kernel = _DenseKernel(name=f"Dense_{len(hidden_neurons)}")(
            (hidden.shape[-1], num_outputs), hidden.dtype,
            nn.initializers.normal(stddev=jnp.sqrt(alpha) ** (1.0 - gradient_normalization)))
        return ops.RadialWeights(hidden, jnp.sqrt(alpha) ** gradient_normalization * kernel)


class _DenseKernel(nn.Module):
    """The ``kernel`` of an ``nn.Dense`` (same name, shape, dtype and initialiser), unapplied."""

    @nn.compact
    def __call__(self, shape, dtype, init):
        return self.param("kernel", init, shape, dtype)
