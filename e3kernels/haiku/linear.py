"""``Linear``: drop-in for ``e3nn_jax.haiku.Linear`` whose indexed form runs on our op."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

from e3kernels import backend as _backend
from e3kernels import ops
from e3kernels._e3nn_private import (
    FunctionalLinear,
    get_pytree_dtype,
    linear_mixed,
    linear_mixed_per_channel,
    linear_vanilla,
    parse_gradient_normalization,
)
from e3kernels.irreps import LinearPlan, linear_parameter_name


class Linear(hk.Module):
    r"""Equivariant linear layer, a drop-in replacement for ``e3nn_jax.haiku.Linear``.

    Same signature, call forms, parameter names, shapes, initialisation and numbers as
    e3nn-jax 0.21. The indexed form ``(i, x)`` runs :func:`e3kernels.ops.indexed_linear`
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
        parameter_initializer: Callable[[], hk.initializers.Initializer] | None = None,
        instructions: list[tuple[int, int]] | None = None,
        num_indexed_weights: int | None = None,
        weights_per_channel: bool = False,
        force_irreps_out: bool = False,
        simplify_irreps_internally: bool = True,
        name: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(name)
        if num_indexed_weights is not None and (
            not isinstance(num_indexed_weights, int) or num_indexed_weights < 1
        ):
            raise ValueError(
                "Linear: num_indexed_weights must be a positive int or None; "
                f"got {num_indexed_weights!r}"
            )
        self.irreps_in = None if irreps_in is None else e3nn.Irreps(irreps_in)
        self.irreps_out = e3nn.Irreps(irreps_out)
        self.channel_out = channel_out
        self.biases = biases
        self.path_normalization = path_normalization
        self.gradient_normalization = parse_gradient_normalization(gradient_normalization)
        self.instructions = instructions
        self.num_indexed_weights = num_indexed_weights
        self.weights_per_channel = weights_per_channel
        self.force_irreps_out = force_irreps_out
        self.simplify_irreps_internally = simplify_irreps_internally
        self.backend = None if backend is None else _backend.validate_backend(backend)
        self.get_parameter = functools.partial(
            _get_parameter, parameter_initializer=parameter_initializer
        )

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
        input = _as_irreps_array(input)

        dtype = get_pytree_dtype(weights, input)
        if dtype.kind == "i":
            dtype = jnp.dtype(jnp.float32)
        input = input.astype(dtype)

        irreps_out = self.irreps_out
        if self.simplify_irreps_internally:
            input = input.remove_zero_chunks().regroup()
            irreps_out = irreps_out.simplify()
        if not self.force_irreps_out:
            irreps_out = irreps_out.filter(keep=input.irreps)
        if self.channel_out is not None:
            if self.weights_per_channel:
                raise ValueError("Linear: channel_out and weights_per_channel=True exclude each other")
            input = input.axis_to_mul()
            irreps_out = self.channel_out * irreps_out
        self._check_irreps_in(input)  # where e3nn checks: after simplification

        lin = FunctionalLinear(
            input.irreps,
            irreps_out,
            biases=self.biases,
            instructions=self.instructions,
            path_normalization=self.path_normalization,
            gradient_normalization=self.gradient_normalization,
        )

        if weights is None:
            if self.weights_per_channel:
                raise ValueError(
                    "Linear: weights_per_channel=True needs the (weights, input) call form"
                )
            output = linear_vanilla(input, lin, self.get_parameter)
        else:
            if isinstance(weights, e3nn.IrrepsArray):
                if not weights.irreps.is_scalar():
                    raise ValueError(
                        f"Linear: weights must be scalars (0e); got irreps {weights.irreps}"
                    )
                weights = weights.array
            weights = jnp.asarray(weights)
            if weights.dtype.kind in "iu" and self.num_indexed_weights is not None:
                if self.weights_per_channel:
                    raise NotImplementedError(
                        "Linear: weights_per_channel=True with num_indexed_weights is not "
                        "supported (neither is it in e3nn-jax)"
                    )
                output = self._indexed(input, lin, weights)
            elif weights.dtype.kind in "fc" and self.num_indexed_weights is None:
                mixed = linear_mixed_per_channel if self.weights_per_channel else linear_mixed
                output = mixed(input, lin, self.get_parameter, weights, self.gradient_normalization)
            else:
                raise ValueError(
                    "Linear: weights must be integers with num_indexed_weights set, or floats "
                    f"without it; got weights of dtype {weights.dtype} and "
                    f"num_indexed_weights={self.num_indexed_weights}"
                )

        if self.channel_out is not None:
            output = output.mul_to_axis(self.channel_out)
        if self.force_irreps_out:
            return output.rechunk(self.irreps_out)
        return output

    def _check_irreps_in(self, input: e3nn.IrrepsArray) -> None:
        if self.instructions is None:
            if self.irreps_in is not None and input.irreps.regroup() != self.irreps_in.regroup():
                raise ValueError(
                    f"Linear: input has irreps {input.irreps}, which do not match "
                    f"irreps_in={self.irreps_in}"
                )
            return
        if self.simplify_irreps_internally:
            raise ValueError("Linear: instructions need simplify_irreps_internally=False")
        if self.channel_out is not None:
            raise ValueError("Linear: instructions and channel_out exclude each other")
        if self.irreps_in is None:
            raise ValueError("Linear: instructions need irreps_in")
        if input.irreps != self.irreps_in:
            raise ValueError(
                f"Linear: input has irreps {input.irreps}; with instructions they must equal "
                f"irreps_in={self.irreps_in} exactly"
            )

    def _indexed(self, input: e3nn.IrrepsArray, lin: FunctionalLinear, indices: jax.Array):
        num = self.num_indexed_weights
        params = [
            self.get_parameter(
                linear_parameter_name(lin, ins), (num,) + ins.path_shape, ins.weight_std, input.dtype
            )
            for ins in lin.instructions
        ]
        plan = LinearPlan.from_functional_linear(lin)
        weights = [p for ins, p in zip(lin.instructions, params) if ins.i_in != -1]
        biases = [p for ins, p in zip(lin.instructions, params) if ins.i_in == -1]

        shape = jnp.broadcast_shapes(input.shape[:-1], indices.shape)
        num_rows = math.prod(shape)
        rows = input.broadcast_to(shape + (-1,)).array.reshape(num_rows, lin.irreps_in.dim)
        indices = jnp.broadcast_to(indices, shape).reshape(num_rows)
        out = ops.indexed_linear(
            rows, weights, indices, plan, biases=biases, backend=self.backend
        )
        return e3nn.IrrepsArray(
            lin.irreps_out, out.reshape(shape + (lin.irreps_out.dim,)), zero_flags=plan.zero_flags
        )


def _get_parameter(name, shape, weight_std, dtype=jnp.float32, parameter_initializer=None):
    """e3nn's parameter getter: ``hk.get_parameter`` with a normal(weight_std) default init."""
    if parameter_initializer is None:
        init = hk.initializers.RandomNormal(stddev=weight_std)
    else:
        init = parameter_initializer()
    return hk.get_parameter(name, shape=shape, dtype=dtype, init=init)


def _as_irreps_array(input: Any) -> e3nn.IrrepsArray:
    try:
        return e3nn.as_irreps_array(input)
    except (ValueError, TypeError) as error:
        raise TypeError(
            "Linear: input must be an e3nn.IrrepsArray (or a scalar array); "
            f"got {type(input).__name__}: {error}"
        ) from error
