"""The Flax linen modules (see :mod:`e3kernels.flax`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import e3nn_jax.flax as e3nn_flax
import flax.linen as nn
import jax

from e3kernels import _layers
from e3kernels import backend as _backend


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
