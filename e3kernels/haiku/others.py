"""MultiLayerPerceptron, BatchNorm and Dropout: e3nn-jax's modules with e3kernels' surface.

These layers hold no hot op, so they reuse e3nn-jax's implementation (same parameters,
state and numbers by construction) and add what the rest of e3kernels offers: the
keyword-only ``backend=`` argument (validated; every backend runs the same ``jax.numpy``
code here) and clear errors for bad arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import e3nn_jax as e3nn
import e3nn_jax.haiku as e3nn_haiku

from e3kernels import _layers
from e3kernels import backend as _backend


class MultiLayerPerceptron(e3nn_haiku.MultiLayerPerceptron):
    """A plain MLP on scalars, identical to ``e3nn_jax.haiku.MultiLayerPerceptron``.

    Activations are normalised with ``e3nn.normalize_function``; ``gradient_normalization``
    ``"path"`` (default) scales in the forward pass, ``"element"`` in the initialiser.

    >>> import e3kernels, haiku as hk, jax, jax.numpy as jnp
    >>> mlp = hk.without_apply_rng(hk.transform(
    ...     lambda x: e3kernels.haiku.MultiLayerPerceptron([8, 1], jax.nn.silu)(x)))
    >>> params = mlp.init(jax.random.PRNGKey(0), jnp.ones((3, 4)))
    >>> sorted(params)
    ['multi_layer_perceptron/linear_0', 'multi_layer_perceptron/linear_1']
    >>> mlp.apply(params, jnp.ones((3, 4))).shape
    (3, 1)
    """

    def __init__(
        self,
        list_neurons: Sequence[int],
        act: Callable | None,
        *,
        gradient_normalization: str | float | None = None,
        output_activation: Callable | bool = True,
        with_bias: bool = False,
        name: str | None = None,
        backend: str | None = None,
    ):
        _layers.check_mlp_options(list_neurons, output_activation)
        self.backend = _backend.validate_optional_backend(backend)
        super().__init__(
            list_neurons,
            act,
            gradient_normalization=gradient_normalization,
            output_activation=output_activation,
            with_bias=with_bias,
            name=name,
        )


class BatchNorm(e3nn_haiku.BatchNorm):
    """Equivariant batch normalisation, identical to ``e3nn_jax.haiku.BatchNorm``.

    Running statistics live in Haiku state (``running_mean``, ``running_var``); affine
    parameters are ``weight`` and ``bias``. Call as ``bn(x, is_training)``.

    >>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax
    >>> bn = hk.transform_with_state(lambda x, t: e3kernels.haiku.BatchNorm()(x, t))
    >>> x = e3nn.normal("2x0e + 1o", jax.random.PRNGKey(0), (16,))
    >>> params, state = bn.init(None, x, True)
    >>> y, state = bn.apply(params, state, None, x, True)
    >>> state["batch_norm"]["running_var"].shape
    (3,)
    """

    def __init__(
        self,
        *,
        irreps: e3nn.Irreps | None = None,
        eps: float = 1e-4,
        momentum: float = 0.1,
        affine: bool = True,
        reduce: str = "mean",
        instance: bool = False,
        normalization: str | None = None,
        backend: str | None = None,
    ):
        _layers.check_batch_norm_options(reduce, normalization, eps)
        self.backend = _backend.validate_optional_backend(backend)
        super().__init__(
            irreps=irreps,
            eps=eps,
            momentum=momentum,
            affine=affine,
            reduce=reduce,
            instance=instance,
            normalization=normalization,
        )


class Dropout(e3nn_haiku.Dropout):
    """Equivariant dropout, identical to ``e3nn_jax.haiku.Dropout``.

    Each irrep (all its components at once) is kept with probability ``1 - p`` and scaled
    by ``1 / (1 - p)``; as in e3nn one mask is drawn per irrep and broadcast over the
    leading axes. Call as ``dropout(rng, x, is_training)``.

    >>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax, jax.numpy as jnp
    >>> f = hk.transform(lambda x: e3kernels.haiku.Dropout(p=0.5)(hk.next_rng_key(), x))
    >>> x = e3nn.IrrepsArray("8x1o", jnp.ones((2, 24)))
    >>> y = f.apply({}, jax.random.PRNGKey(0), x)
    >>> sorted(set(y.array.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
    """

    def __init__(self, p: float, *, irreps: e3nn.Irreps | None = None, backend: str | None = None):
        _layers.checked_probability("Dropout", p)
        self.backend = _backend.validate_optional_backend(backend)
        super().__init__(p, irreps=irreps)
