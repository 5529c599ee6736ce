"""``SymmetricTensorProduct``: drop-in for e3nn's module, plus species-indexed weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

from e3kernels import backend as _backend
from e3kernels import ops
from e3kernels.irreps import symmetric_plan


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
        try:
            orders = tuple(orders)
        except TypeError:
            orders = None
        if not orders or not all(type(o) is int and o > 0 for o in orders):
            raise ValueError(
                "SymmetricTensorProduct: orders must be a non-empty sequence of positive "
                f"ints; got {orders!r}"
            )
        self.orders = orders

        if isinstance(keep_irrep_out, str):
            irreps = e3nn.Irreps(keep_irrep_out)
            if any(mul != 1 for mul, _ in irreps):
                raise ValueError(
                    "SymmetricTensorProduct: keep_irrep_out must list each irrep once "
                    f"without multiplicity; got {keep_irrep_out!r}"
                )
            keep_irrep_out = [ir for _, ir in irreps]
        self.keep_irrep_out = (
            None if keep_irrep_out is None else frozenset(e3nn.Irrep(ir) for ir in keep_irrep_out)
        )

        if num_indexed_weights is not None and (
            type(num_indexed_weights) is not int or num_indexed_weights < 1
        ):
            raise ValueError(
                "SymmetricTensorProduct: num_indexed_weights must be a positive int or None; "
                f"got {num_indexed_weights!r}"
            )
        self.num_indexed_weights = num_indexed_weights
        self.backend = None if backend is None else _backend.validate_backend(backend)
        if get_parameter is None:
            get_parameter = _default_get_parameter
        self.get_parameter = get_parameter

    def __call__(self, indices_or_x, x_or_none=None) -> e3nn.IrrepsArray:
        """Evaluate on ``x`` of shape ``(..., num_channel, irreps)``; ``(i, x)`` with indices.

        Returns:
          ``IrrepsArray`` of shape ``(..., num_channel, irreps_out)``.
        """
        indices, x = (None, indices_or_x) if x_or_none is None else (indices_or_x, x_or_none)
        name = "SymmetricTensorProduct"
        if (indices is None) != (self.num_indexed_weights is None):
            raise ValueError(
                f"{name}: call as (i, x) exactly when num_indexed_weights is set; "
                f"num_indexed_weights={self.num_indexed_weights}, "
                f"called with {'x only' if indices is None else '(i, x)'}"
            )
        if not isinstance(x, e3nn.IrrepsArray):
            raise TypeError(f"{name}: x must be an e3nn.IrrepsArray; got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(
                f"{name}: x must have shape (..., num_channel, irreps), at least 2 axes; "
                f"got shape {x.shape}"
            )
        plan = symmetric_plan(x.irreps, self.orders, self.keep_irrep_out)
        *leading, channels, _ = x.shape
        leading = tuple(leading)
        weight_sets = () if indices is None else (self.num_indexed_weights,)
        weights = [
            self.get_parameter(p.parameter_name, weight_sets + (p.mul, channels), x.dtype)
            for p in plan.paths
        ]
        array = x.array
        if indices is not None:
            indices = jnp.asarray(indices)
            if indices.dtype.kind not in "iu":
                raise TypeError(f"{name}: indices must be integers; got dtype {indices.dtype}")
            leading = jnp.broadcast_shapes(leading, indices.shape)
            array = jnp.broadcast_to(array, leading + x.shape[-2:])
            indices = jnp.broadcast_to(indices, leading).reshape(-1)
        rows = array.reshape((-1, channels, plan.dim_in))
        out = ops.symmetric_contraction(rows, weights, plan, indices=indices, backend=self.backend)
        return e3nn.IrrepsArray(plan.irreps_out, out.reshape(leading + (channels, plan.dim_out)))


def _default_get_parameter(name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    return hk.get_parameter(name, shape, dtype, hk.initializers.RandomNormal())
