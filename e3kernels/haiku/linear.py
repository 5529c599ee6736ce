"""``Linear``: ``e3nn_jax.haiku.Linear`` whose indexed form runs on our op."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp

from e3kernels import backend as _backend
from e3kernels import ops
from e3kernels._e3nn_private import FunctionalLinear, get_pytree_dtype
from e3kernels.irreps import LinearPlan, linear_parameter_name


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
        if num_indexed_weights is not None and (
            not isinstance(num_indexed_weights, int) or num_indexed_weights < 1
        ):
            raise ValueError(
                "Linear: num_indexed_weights must be a positive int or None; "
                f"got {num_indexed_weights!r}"
            )
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
        self.backend = None if backend is None else _backend.validate_backend(backend)

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
        if weights is not None:
            weights = self._checked_weights(weights)
        self._check_options(weights)
        if self.channel_out is None:  # with channel_out, the irreps to check are formed later
            self._check_irreps_in(input)
        if weights is not None and self.num_indexed_weights is not None:
            return self._indexed(weights, input)
        return super().__call__(input) if weights is None else super().__call__(weights, input)

    def _checked_weights(self, weights) -> jax.Array:
        if isinstance(weights, e3nn.IrrepsArray):
            if not weights.irreps.is_scalar():
                raise ValueError(f"Linear: weights must be scalars (0e); got irreps {weights.irreps}")
            weights = weights.array
        weights = jnp.asarray(weights)
        indexed = self.num_indexed_weights is not None
        if weights.dtype.kind != ("i" if indexed else "f"):
            raise ValueError(
                "Linear: weights must be integers with num_indexed_weights set, or floats "
                f"without it; got weights of dtype {weights.dtype} and "
                f"num_indexed_weights={self.num_indexed_weights}"
            )
        return weights

    def _check_options(self, weights) -> None:
        """Clear errors where e3nn-jax asserts, or names another module."""
        if self.channel_out is not None and self.weights_per_channel:
            raise ValueError("Linear: channel_out and weights_per_channel=True exclude each other")
        if self.weights_per_channel and weights is None:
            raise ValueError("Linear: weights_per_channel=True needs the (weights, input) call form")
        if self.weights_per_channel and self.num_indexed_weights is not None:
            raise NotImplementedError(
                "Linear: weights_per_channel=True with num_indexed_weights is not supported "
                "(neither is it in e3nn-jax)"
            )

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

    def _indexed(self, indices: jax.Array, input: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        # e3nn-jax's __call__ builds its FunctionalLinear inline, with no hook to reuse:
        # these lines follow it step for step up to `lin`, and after the op.
        dtype = get_pytree_dtype(indices, input)
        input = input.astype(jnp.float32 if dtype.kind == "i" else dtype)
        irreps_out = self.irreps_out
        if self.simplify_irreps_internally:
            input = input.remove_zero_chunks().regroup()
            irreps_out = irreps_out.simplify()
        if not self.force_irreps_out:
            irreps_out = irreps_out.filter(keep=input.irreps)
        if self.channel_out is not None:
            input = input.axis_to_mul()
            irreps_out = self.channel_out * irreps_out
            self._check_irreps_in(input)
        lin = FunctionalLinear(
            input.irreps,
            irreps_out,
            biases=self.biases,
            instructions=self.instructions,
            path_normalization=self.path_normalization,
            gradient_normalization=self.gradient_normalization,
        )

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
        out = ops.indexed_linear(rows, weights, indices, plan, biases=biases, backend=self.backend)
        output = e3nn.IrrepsArray(
            lin.irreps_out, out.reshape(shape + (lin.irreps_out.dim,)), zero_flags=plan.zero_flags
        )
        if self.channel_out is not None:
            output = output.mul_to_axis(self.channel_out)
        if self.force_irreps_out:
            return output.rechunk(self.irreps_out)
        return output


def _as_irreps_array(input: Any) -> e3nn.IrrepsArray:
    try:
        return e3nn.as_irreps_array(input)
    except (ValueError, TypeError) as error:
        raise TypeError(
            "Linear: input must be an e3nn.IrrepsArray (or a scalar array); "
            f"got {type(input).__name__}: {error}"
        ) from error
