"""``Linear``: ``e3nn_jax.haiku.Linear`` whose indexed form runs on our op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn

from e3kernels import _layers
from e3kernels import backend as _backend


class Linear(e3nn.haiku.Linear):
    r"""Equivariant linear layer: ``e3nn_jax.haiku.Linear`` with the indexed form on a kernel.

    A subclass of e3nn-jax 0.21's module: same signature, call forms, parameter names,
    shapes, initialisation and numbers. The vanilla ``(x)`` and weighted ``(w, x)`` forms
    are e3nn-jax's own. The indexed form ``(i, x)`` runs :func:`e3kernels.ops.indexed_linear`
    (a fused Pallas kernel on GPU/TPU, a sort-and-group matmul on CPU) instead of copying
    every weight matrix per row.

    Args:
      irreps_out: output irreps (those Schur's lemma allows from the input).
      channel_out: if given, the axis before the irreps is a channel axis mixed with them.
      irreps_in: expected input irreps (checked; required with ``instructions``).
      biases: add a bias to the scalar outputs.
      path_normalization: ``"element"``, ``"path"`` or a float in [0, 1]
        (default: ``e3nn.config``).
      gradient_normalization: ``"element"``, ``"path"`` or a float in [0, 1]
        (default: ``e3nn.config``).
      parameter_initializer: a callable returning a Haiku initializer.
      instructions: explicit ``(i_in, i_out)`` paths (needs ``irreps_in`` and
        ``simplify_irreps_internally=False``).
      num_indexed_weights: number of weight sets for the ``(i, x)`` call form.
      weights_per_channel: one weight set per channel in the ``(w, x)`` call form.
      force_irreps_out: output exactly ``irreps_out``, zero-filling unreachable irreps.
      simplify_irreps_internally: simplify the irreps before building the paths.
      name: Haiku module name.
      backend: keyword only; ``"auto"``, ``"reference"``, ``"pallas"`` or ``None``
        (the current setting, read when the module is called).

    Examples:
      Vanilla:

      >>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax, jax.numpy as jnp
      >>> @hk.without_apply_rng
      ... @hk.transform
      ... def linear(x):
      ...     return e3kernels.haiku.Linear("0e + 1o + 2e")(x)
      >>> x = e3nn.IrrepsArray("1o + 2x0e", jnp.ones(5))
      >>> params = linear.init(jax.random.PRNGKey(0), x)
      >>> y = linear.apply(params, x)
      >>> y.irreps  # Note that the 2e is discarded
      1x0e+1x1o
      >>> y.shape
      (4,)

      External weights:

      >>> @hk.without_apply_rng
      ... @hk.transform
      ... def linear(w, x):
      ...     return e3kernels.haiku.Linear("0e + 1o")(w, x)
      >>> x = e3nn.IrrepsArray("1o + 2x0e", jnp.ones(5))
      >>> w = jnp.array([1., 2., 3., 4.])
      >>> params = linear.init(jax.random.PRNGKey(0), w, x)
      >>> y = linear.apply(params, w, x)
      >>> y.shape
      (4,)

      External indices:

      >>> @hk.without_apply_rng
      ... @hk.transform
      ... def linear(i, x):
      ...     return e3kernels.haiku.Linear("0e + 1o", num_indexed_weights=4)(i, x)
      >>> x = e3nn.IrrepsArray("1o + 2x0e", jnp.ones((2, 5)))
      >>> i = jnp.array([2, 3])
      >>> params = linear.init(jax.random.PRNGKey(0), i, x)
      >>> y = linear.apply(params, i, x)
      >>> y.shape
      (2, 4)
    """

    def __init__(
        self,
        irreps_out: e3nn.Irreps,
        channel_out: int | None = None,
        *,
        irreps_in: e3nn.Irreps | None = None,
        biases: bool = False,
        path_normalization: str | float | None = None,
        gradient_normalization: str | float | None = None,
        parameter_initializer: Callable[[], Any] | None = None,
        instructions: list[tuple[int, int]] | None = None,
        num_indexed_weights: int | None = None,
        weights_per_channel: bool = False,
        force_irreps_out: bool = False,
        simplify_irreps_internally: bool = True,
        name: str | None = None,
        backend: str | None = None,
    ):
        _layers.check_num_indexed_weights("Linear", num_indexed_weights)
        super().__init__(
            irreps_out,
            channel_out,
            irreps_in=irreps_in,
            biases=biases,
            path_normalization=path_normalization,
            gradient_normalization=gradient_normalization,
            parameter_initializer=parameter_initializer,
            instructions=instructions,
            num_indexed_weights=num_indexed_weights,
            weights_per_channel=weights_per_channel,
            force_irreps_out=force_irreps_out,
            simplify_irreps_internally=simplify_irreps_internally,
            name=name,
        )
        self.backend = _backend.validate_optional_backend(backend)

    def __call__(self, weights_or_input, input_or_none=None) -> e3nn.IrrepsArray:
        """Apply the layer: ``(x)``, ``(w, x)`` with float ``w``, or ``(i, x)`` with int ``i``.

        Args:
          weights_or_input: the input, or the weights/indices when two arguments are given.
            Float weights have shape ``(..., d)``; indices have shape ``(...)``; both
            broadcast against the input's leading axes.
          input_or_none: the input ``(..., [channel_in,] irreps_in.dim)`` in the
            two-argument forms.

        Returns:
          ``IrrepsArray`` of shape ``(..., [channel_out,] irreps_out.dim)``.
        """
        if input_or_none is None:
            weights, input = None, weights_or_input
        else:
            weights, input = weights_or_input, input_or_none
        weights, input = _layers.check_linear_call("Linear", self, weights, input)
        if weights is not None and self.num_indexed_weights is not None:
            return _layers.linear("Linear", self, weights, input, self.get_parameter, self.backend)
        return super().__call__(input) if weights is None else super().__call__(weights, input)
