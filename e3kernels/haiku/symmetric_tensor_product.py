"""``SymmetricTensorProduct``: drop-in for e3nn's module, plus species-indexed weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import haiku as hk
import jax

from e3kernels import _layers
from e3kernels import backend as _backend


class SymmetricTensorProduct(hk.Module):
    r"""Symmetric tensor product contraction with parameters, as in MACE.

    A drop-in replacement for ``e3nn_jax.haiku.SymmetricTensorProduct`` (same parameters
    ``w{order}_{irrep}`` of shape ``(mul, num_channel)``, same initialisation, same
    numbers), running :func:`e3kernels.ops.symmetric_contraction`. Per channel it computes

    .. code-block:: text

        Linear(irreps_out)(concatenate([x, sym(x (x) x), sym(x (x) x (x) x), ...]))

    keeping only the symmetric terms of the orders asked for; each channel has its own
    parameters.

    Beyond e3nn: with ``num_indexed_weights=S`` the module is called as ``(i, x)`` and row
    ``n`` uses weight set ``i[n]`` (per atom species, as MACE does); the parameters then
    have shape ``(S, mul, num_channel)``. This equals e3nn's module under ``hk.vmap`` over
    rows with a ``get_parameter`` returning ``hk.get_parameter(name, (S,) + shape, ...)[i]``,
    without copying the weights per row.

    Args:
      orders: the orders of the tensor product, e.g. ``(1, 2, 3)``.
      keep_irrep_out: irreps to keep in the output (a set of irreps or an irreps string
        such as ``"0e + 1o"``); ``None`` keeps all.
      get_parameter: ``get_parameter(name, shape, dtype) -> Array``; by default
        ``hk.get_parameter`` with a unit normal initialiser.
      num_indexed_weights: keyword only; number of weight sets for the ``(i, x)`` form.
      backend: keyword only; ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (the
        current setting, read when the module is called).
      name: keyword only; Haiku module name.

    >>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax, jax.numpy as jnp
    >>> @hk.without_apply_rng
    ... @hk.transform
    ... def f(i, x):
    ...     stp = e3kernels.haiku.SymmetricTensorProduct((1, 2, 3), "0e + 1o", num_indexed_weights=3)
    ...     return stp(i, x)
    >>> x = e3nn.normal("0e + 1o + 2e", jax.random.PRNGKey(0), (10, 8))  # 10 rows, 8 channels
    >>> i = jnp.arange(10) % 3
    >>> params = f.init(jax.random.PRNGKey(1), i, x)
    >>> params["symmetric_tensor_product"]["w3_0e"].shape
    (3, 5, 8)
    >>> f.apply(params, i, x).irreps
    1x0e+1x1o
    """

    def __init__(
        self,
        orders: tuple[int, ...],
        keep_irrep_out: set[e3nn.Irrep] | str | None = None,
        get_parameter: Callable[[str, tuple[int, ...], Any], jax.Array] | None = None,
        *,
        num_indexed_weights: int | None = None,
        backend: str | None = None,
        name: str | None = None,
    ):
        super().__init__(name)
        self.orders = _layers.checked_orders(orders)
        self.keep_irrep_out = _layers.checked_keep_irrep_out(keep_irrep_out)
        _layers.check_num_indexed_weights(_layers.MODULE_STP, num_indexed_weights)
        self.num_indexed_weights = num_indexed_weights
        self.backend = _backend.validate_optional_backend(backend)
        self.get_parameter = _default_get_parameter if get_parameter is None else get_parameter

    def __call__(self, indices_or_x, x_or_none=None) -> e3nn.IrrepsArray:
        """Evaluate on ``x`` of shape ``(..., num_channel, irreps)``; ``(i, x)`` with indices.

        Returns:
          ``IrrepsArray`` of shape ``(..., num_channel, irreps_out)``.
        """
        indices, x = (None, indices_or_x) if x_or_none is None else (indices_or_x, x_or_none)
        return _layers.symmetric_tensor_product(
            self.orders, self.keep_irrep_out, self.num_indexed_weights, indices, x,
            self.get_parameter, self.backend,
        )


def _default_get_parameter(name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    return hk.get_parameter(name, shape, dtype, hk.initializers.RandomNormal())
