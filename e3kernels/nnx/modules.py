"""The Flax NNX modules (see :mod:`e3kernels.nnx`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e3kernels import _layers, ops
from e3kernels import backend as _backend
from e3kernels._e3nn_private import batch_norm, parse_gradient_normalization
from e3kernels.irreps import symmetric_plan

_UNIT_NORMAL = nnx.initializers.normal(stddev=1.0)


def _compute_dtype(dtype, input_dtype, param_dtype):
    """NNX's rule: ``dtype`` if given, else the promotion of the input's and parameters'."""
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(input_dtype, param_dtype)


def _irreps_array(module: str, x, irreps_in: e3nn.Irreps) -> e3nn.IrrepsArray:
    """``x`` as an ``IrrepsArray``: a raw array is read as ``irreps_in``."""
    if isinstance(x, e3nn.IrrepsArray):
        return x
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != irreps_in.dim:
        raise ValueError(
            f"{module}: a raw array input must have a last axis of irreps_in.dim = {irreps_in.dim} "
            f"({irreps_in}); got shape {x.shape}"
        )
    return e3nn.IrrepsArray(irreps_in, x)


class Linear(nnx.Module):
    r"""Equivariant linear layer for NNX, with e3nn-jax's ``Linear`` in every call form.

    The numbers are those of ``e3nn_jax.flax.Linear`` with the same parameters; the indexed
    form ``(i, x)`` runs :func:`e3kernels.ops.indexed_linear` (a Pallas kernel on GPU/TPU).
    NNX creates parameters eagerly, so the input irreps and the call form are fixed here:

    * ``(x)``: the default;
    * ``(i, x)``: ``num_indexed_weights=S``, ``i`` integers in ``[0, S)`` (species ids,
      any order);
    * ``(w, x)``: ``weights_dim=d``, ``w`` floats of shape ``(..., d)``
      (``weights_per_channel=True`` also needs ``channel_in``).

    Parameters live in ``self.weights``, a dict of ``nnx.Param`` under e3nn-jax's names
    (``"w[0,0] 2x0e,1x0e"``, ``"b[0] 1x0e"``), shapes and initial scales; e3nn's options
    are in ``self.options``.

    Args:
      irreps_in: input irreps (a raw array input is read as these).
      irreps_out: output irreps (those Schur's lemma allows from the input).
      channel_out: if given, the axis before the irreps is a channel axis of size
        ``channel_in`` mixed with them into ``channel_out`` channels.
      channel_in: the input's channel axis size, for ``channel_out`` or
        ``weights_per_channel``.
      biases, path_normalization, gradient_normalization, instructions, force_irreps_out,
      simplify_irreps_internally, num_indexed_weights, weights_per_channel: as in e3nn-jax.
      weights_dim: size of the last axis of float weights, for the ``(w, x)`` form.
      parameter_initializer: ``() -> initializer(key, shape, dtype)``; default a normal of
        e3nn's scale per path.
      dtype: of the computation; ``None`` promotes the input's with ``param_dtype``.
      param_dtype: of the parameters.
      backend: ``"auto"``, ``"reference"``, ``"pallas"`` or ``None`` (current setting).
      rngs: ``nnx.Rngs`` for the parameters' initial values.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> linear = e3kernels.nnx.Linear("1o + 2x0e", "0e + 1o", num_indexed_weights=3, rngs=nnx.Rngs(0))
    >>> sorted(linear.weights)
    ['w[0,0] 2x0e,1x0e', 'w[1,1] 1x1o,1x1o']
    >>> x = e3nn.normal("1o + 2x0e", jax.random.PRNGKey(0), (4,))
    >>> linear(jnp.array([0, 2, 1, 2]), x).shape
    (4, 4)
    """

    def __init__(
        self,
        irreps_in: Any,
        irreps_out: Any,
        channel_out: int | None = None,
        *,
        channel_in: int | None = None,
        biases: bool = False,
        path_normalization: str | float | None = None,
        gradient_normalization: str | float | None = None,
        parameter_initializer: Callable[[], Any] | None = None,
        instructions: Sequence[tuple[int, int]] | None = None,
        num_indexed_weights: int | None = None,
        weights_dim: int | None = None,
        weights_per_channel: bool = False,
        force_irreps_out: bool = False,
        simplify_irreps_internally: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        backend: str | None = None,
        rngs: nnx.Rngs,
    ):
        name = "Linear"
        _layers.check_num_indexed_weights(name, num_indexed_weights)
        for argument, value in (("channel_in", channel_in), ("weights_dim", weights_dim)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: {argument} must be a positive int or None; got {value!r}")
        if num_indexed_weights is not None and weights_dim is not None:
            raise ValueError(
                f"{name}: give num_indexed_weights (the (i, x) form) or weights_dim (the (w, x) "
                f"form), not both; got {num_indexed_weights} and {weights_dim}"
            )
        if (channel_out is not None or weights_per_channel) and channel_in is None:
            raise ValueError(f"{name}: channel_out and weights_per_channel=True need channel_in")
        if weights_per_channel and weights_dim is None:
            raise ValueError(f"{name}: weights_per_channel=True needs weights_dim (the (w, x) form)")
        self.irreps_in = e3nn.Irreps(irreps_in)
        self.channel_in = channel_in
        self.weights_dim = weights_dim
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.backend = _backend.validate_optional_backend(backend)
        #: e3nn's Linear options, as the shared code reads them
        self.options = _layers.LinearOptions(
            e3nn.Irreps(irreps_out), channel_out,
            # e3nn checks irreps_in after mixing the channels into the irreps
            self.irreps_in if channel_out is None else channel_in * self.irreps_in,
            biases, path_normalization, gradient_normalization,
            None if instructions is None else tuple(tuple(i) for i in instructions),
            num_indexed_weights, weights_per_channel, force_irreps_out, simplify_irreps_internally,
        )

        # The parameters' names, shapes and scales: e3nn's own, read off one call on one row
        # (run, not traced: the mixed form's scales are computed with jax.numpy).
        specs = {}

        def record(name, shape, std, dtype):
            specs[name] = (shape, float(std))
            return jnp.zeros(shape, dtype)

        leading = (1,) if channel_in is None else (1, channel_in)
        # not e3nn.zeros: its chunks are flagged zero, and the linear map would drop them
        x = e3nn.IrrepsArray(self.irreps_in, jnp.ones(leading + (self.irreps_in.dim,), param_dtype))
        weights = self._example_weights(param_dtype)
        checked = _layers.check_linear_call(name, self.options, weights, x)
        with jax.ensure_compile_time_eval():
            _layers.linear(name, self.options, *checked, record, "reference")
        params = {}
        for key, (shape, std) in specs.items():
            if parameter_initializer is None:
                initializer = nnx.initializers.normal(stddev=std)
            else:
                initializer = parameter_initializer()
            params[key] = nnx.Param(initializer(rngs.params(), shape, param_dtype))
        self.weights = nnx.Dict(params)

    def _example_weights(self, dtype):
        if self.options.num_indexed_weights is not None:
            return jnp.zeros((1,), jnp.int32)
        if self.weights_dim is not None:
            return jnp.zeros((1, self.weights_dim), dtype)
        return None

    def __call__(self, weights_or_input, input_or_none=None) -> e3nn.IrrepsArray:
        """``(x)``, ``(w, x)`` or ``(i, x)``, as fixed at construction; ``x`` an
        ``IrrepsArray`` or a raw array of ``irreps_in``. Returns an ``IrrepsArray`` of shape
        ``(..., [channel_out,] irreps_out.dim)``."""
        name = "Linear"
        if input_or_none is None:
            weights, input = None, weights_or_input
        else:
            weights, input = weights_or_input, input_or_none
        # integer or float weights against num_indexed_weights: check_linear_call's check
        form = "(x)" if self.weights_dim is None and self.options.num_indexed_weights is None else (
            "(i, x)" if self.options.num_indexed_weights is not None else "(w, x)")
        if (weights is None) != (form == "(x)"):
            raise ValueError(
                f"{name}: this module was built for the {form} call form "
                "(num_indexed_weights for (i, x), weights_dim for (w, x)); "
                f"it was called as {'(x)' if weights is None else '(weights, x)'}"
            )
        input = _irreps_array(name, input, self.irreps_in)
        dtype = _compute_dtype(self.dtype, input.dtype, self.param_dtype)
        input = input.astype(dtype)
        weights, input = _layers.check_linear_call(name, self.options, weights, input)

        def get_parameter(key, shape, std, dtype):
            if key not in self.weights:
                raise ValueError(
                    f"{name}: the input's irreps {input.irreps} need a parameter {key!r} that a "
                    f"module built for irreps_in={self.irreps_in} does not have"
                )
            value = self.weights[key][...]
            if value.shape != tuple(shape):
                raise ValueError(
                    f"{name}: parameter {key!r} has shape {value.shape}; this call needs {tuple(shape)} "
                    f"(check weights_dim={self.weights_dim} and channel_in={self.channel_in} "
                    "against the inputs)"
                )
            return value.astype(dtype)

        return _layers.linear(name, self.options, weights, input, get_parameter, self.backend)


class MultiLayerPerceptron(nnx.Module):
    """A plain MLP on scalars, with the numbers of ``e3nn_jax.flax.MultiLayerPerceptron``.

    Layers are ``nnx.Linear`` in ``self.layers`` (``kernel``, and ``bias`` with
    ``with_bias=True``); activations are normalised with ``e3nn.normalize_function``, and
    ``gradient_normalization`` ``"path"`` scales in the forward pass, ``"element"`` in the
    initialiser, as in e3nn-jax.

    >>> import e3kernels, jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> mlp = e3kernels.nnx.MultiLayerPerceptron(4, (8, 1), jax.nn.silu, rngs=nnx.Rngs(0))
    >>> mlp(jnp.ones((3, 4))).shape
    (3, 1)
    """

    def __init__(
        self,
        irreps_in: int | Any,
        list_neurons: Sequence[int],
        act: Callable | None = None,
        *,
        gradient_normalization: str | float | None = None,
        output_activation: Callable | bool = True,
        with_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        backend: str | None = None,
        rngs: nnx.Rngs,
    ):
        name = "MultiLayerPerceptron"
        if isinstance(irreps_in, int) and not isinstance(irreps_in, bool):
            num_in = irreps_in
        else:
            irreps = e3nn.Irreps(irreps_in)
            if not irreps.is_scalar():
                raise ValueError(f"{name}: irreps_in must be scalars (0e); got {irreps}")
            num_in = irreps.dim
        list_neurons = tuple(list_neurons)
        _layers.check_mlp_options(list_neurons, output_activation)
        if num_in < 1:
            raise ValueError(f"{name}: irreps_in must be a positive size or scalar irreps; got {irreps_in!r}")
        # normalised once here: e3nn.normalize_function evaluates the activation on a
        # million points, which e3nn's linen module pays at every call
        output_activation = act if output_activation is True else output_activation
        self.act = None if act is None else e3nn.normalize_function(act)
        self.output_act = None if output_activation in (None, False) else e3nn.normalize_function(
            output_activation)
        self.gradient_normalization = parse_gradient_normalization(gradient_normalization)
        self.backend = _backend.validate_optional_backend(backend)
        layers = []
        for h in list_neurons:
            std = np.sqrt(1 / num_in) ** (1.0 - self.gradient_normalization)
            layers.append(
                nnx.Linear(
                    num_in, h, use_bias=with_bias, kernel_init=nnx.initializers.normal(std),
                    bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                )
            )
            num_in = h
        self.layers = nnx.List(layers)

    def __call__(self, x):
        """``x`` of shape ``(..., irreps_in)``, a raw array or an ``IrrepsArray`` of scalars
        (then the output is one too)."""
        is_irreps_array = isinstance(x, e3nn.IrrepsArray)
        x = self._hidden(x)
        if len(self.layers):  # no layers: the identity
            last = self.layers[-1]
            x = self._scale(last) * last(x)
            if self.output_act is not None:
                x = self.output_act(x)
        return e3nn.IrrepsArray(f"{x.shape[-1]}x0e", x) if is_irreps_array else x

    def _scale(self, layer: nnx.Linear):
        """The forward pass's normalisation of ``layer``'s output (``"path"``: ``1/sqrt(fan_in)``)."""
        return np.sqrt(1 / layer.in_features) ** self.gradient_normalization

    def _hidden(self, x) -> jax.Array:
        """The last hidden layer, after its activation: every layer but the last (``x`` the
        raw array or ``IrrepsArray`` of scalars ``__call__`` takes)."""
        if isinstance(x, e3nn.IrrepsArray):
            if not x.irreps.is_scalar():
                raise ValueError(f"MultiLayerPerceptron: x must be scalars (0e); got irreps {x.irreps}")
            x = x.array
        for layer in self.layers[:-1]:
            x = self._scale(layer) * layer(x)
            if self.act is not None:
                x = self.act(x)
        return x

    def _last_layer_factors(self, x) -> tuple[jax.Array, jax.Array]:
        """``self(x)`` (as a raw array) as ``hidden @ matrix``, unformed: ``hidden``
        ``(..., H)`` the last hidden layer, ``matrix`` ``(H, outputs)`` the last layer's
        kernel times its normalisation, both in the dtype the last layer computes in (for
        :class:`e3kernels.ops.RadialWeights`). Only a linear last layer without bias
        factors (the convolution's radial network is one)."""
        last = self.layers[-1] if len(self.layers) else None
        if last is None or self.output_act is not None or last.bias is not None:
            raise ValueError("MultiLayerPerceptron: only a last layer without output activation and "
                             "without bias factors into hidden @ matrix")
        hidden, kernel, _ = last.promote_dtype((self._hidden(x), last.kernel[...], None), dtype=last.dtype)
        return hidden, self._scale(last) * kernel


class BatchNorm(nnx.Module):
    """Equivariant batch normalisation for NNX, with the numbers of e3nn-jax's module.

    Running statistics are ``nnx.BatchStat`` ``mean`` (one per scalar irrep) and ``var``
    (one per irrep); affine parameters are ``nnx.Param`` ``weights`` and ``biases``, as in
    ``e3nn_jax.flax.BatchNorm``. ``model.eval()`` / ``model.train()`` switch
    ``use_running_average``, as for ``nnx.BatchNorm``.

    >>> import e3kernels, e3nn_jax as e3nn, jax
    >>> from flax import nnx
    >>> bn = e3kernels.nnx.BatchNorm("2x0e + 1o", rngs=nnx.Rngs(0))
    >>> y = bn(e3nn.normal("2x0e + 1o", jax.random.PRNGKey(0), (16,)))
    >>> bn.var[...].shape
    (3,)
    """

    def __init__(
        self,
        irreps: Any,
        *,
        use_running_average: bool = False,
        eps: float = 1e-4,
        momentum: float = 0.1,
        affine: bool = True,
        reduce: str = "mean",
        instance: bool = False,
        normalization: str | None = None,
        param_dtype: Any = jnp.float32,
        backend: str | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        name = "BatchNorm"
        _layers.check_batch_norm_options(reduce, normalization, eps)
        if use_running_average and instance:
            raise ValueError(
                f"{name}: instance=True has no running averages; use_running_average must be False"
            )
        self.irreps = e3nn.Irreps(irreps)
        self.use_running_average = use_running_average
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.reduce, self.instance, self.normalization = reduce, instance, normalization
        self.backend = _backend.validate_optional_backend(backend)
        num_scalars = self.irreps.filter(keep="0e").num_irreps
        num_irreps = self.irreps.num_irreps
        if not instance:
            self.mean = nnx.BatchStat(jnp.zeros((num_scalars,), param_dtype))
            self.var = nnx.BatchStat(jnp.ones((num_irreps,), param_dtype))
        if affine:
            self.weights = nnx.Param(jnp.ones((num_irreps,), param_dtype))
            self.biases = nnx.Param(jnp.zeros((num_scalars,), param_dtype))

    def __call__(self, input, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Normalise ``input`` (an ``IrrepsArray`` or a raw array of ``irreps``); in training
        mode, update the running statistics (e3nn's linen module also updates them with
        ``use_running_average=True`` when ``batch_stats`` is mutable; this one does not)."""
        name = "BatchNorm"
        input = _irreps_array(name, input, self.irreps)
        # the statistics are per irrep, in order: "4x0e + 4x1o" is not "0e + 1o + 0e + 1o + ..."
        if input.irreps.simplify() != self.irreps.simplify():
            raise ValueError(
                f"{name}: input has irreps {input.irreps}; the module was built for {self.irreps}"
            )
        if mask is not None and mask.shape != (input.shape[0],):
            raise ValueError(f"{name}: mask must have shape (batch,) = {(input.shape[0],)}; got {mask.shape}")
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if use_running_average and self.instance:
            raise ValueError(
                f"{name}: instance=True has no running averages; use_running_average must be False"
            )
        dtype = input.dtype
        stats = (None, None) if self.instance else (self.mean[...].astype(dtype), self.var[...].astype(dtype))
        affine = (None, None)
        if self.affine:
            affine = (self.weights[...].astype(dtype), self.biases[...].astype(dtype))
        output, new_mean, new_var = batch_norm(
            input, *stats, *affine, self.normalization or e3nn.config("irrep_normalization"),
            self.reduce, self.instance, use_running_average, self.affine, self.momentum, self.eps, mask,
        )
        if not self.instance and not use_running_average:  # as nnx.BatchNorm, and Haiku's
            self.mean[...] = new_mean.astype(self.mean.dtype)
            self.var[...] = new_var.astype(self.var.dtype)
        return output


class Dropout(nnx.Module):
    """Equivariant dropout for NNX: each irrep (all its components at once) is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``; one mask per irrep, broadcast over
    the leading axes, as ``e3nn_jax.haiku.Dropout``. No parameters.

    As ``nnx.Dropout``: ``deterministic`` (constructor, call, or ``model.eval()``) turns it
    off, and the mask's key comes from ``rngs`` (constructor or call).

    >>> import e3kernels, e3nn_jax as e3nn, jax.numpy as jnp
    >>> from flax import nnx
    >>> dropout = e3kernels.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> y = dropout(e3nn.IrrepsArray("8x1o", jnp.ones((2, 24))))
    >>> sorted(set(y.array.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
    """

    def __init__(
        self,
        p: float,
        *,
        irreps: Any = None,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        backend: str | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        self.p = _layers.checked_probability("Dropout", p)
        self.irreps = None if irreps is None else e3nn.Irreps(irreps)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.backend = _backend.validate_optional_backend(backend)
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(
                f"Dropout: rngs must be nnx.Rngs, an nnx.RngStream or None; got {type(rngs).__name__}"
            )

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return x
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        else:
            raise ValueError(
                "Dropout: deterministic is False but no rngs were given, to the constructor or "
                f"the call; got {rngs!r}"
            )
        return _layers.dropout("Dropout", key, x, self.p, self.irreps)


class SymmetricTensorProduct(nnx.Module):
    r"""Symmetric tensor product contraction with parameters, as in MACE, for NNX: the
    numbers of ``e3kernels.haiku.SymmetricTensorProduct`` (and of e3nn-jax's Haiku module).

    Per channel: ``Linear(irreps_out)(concatenate([x, sym(x (x) x), ...]))`` over the
    ``orders``. Parameters ``self.weights["w{order}_{irrep}"]`` of shape
    ``(mul, num_channels)``, or ``(num_indexed_weights, mul, num_channels)`` for the
    ``(i, x)`` call form (``i``: species ids, any order), initialised from a unit normal.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> stp = e3kernels.nnx.SymmetricTensorProduct(
    ...     (1, 2, 3), "0e + 1o", irreps_in="0e + 1o + 2e", num_channels=8, num_indexed_weights=3,
    ...     rngs=nnx.Rngs(0))
    >>> stp.weights["w3_0e"].shape
    (3, 5, 8)
    >>> x = e3nn.normal("0e + 1o + 2e", jax.random.PRNGKey(0), (10, 8))  # 10 atoms, 8 channels
    >>> stp(jnp.arange(10) % 3, x).irreps
    1x0e+1x1o
    """

    def __init__(
        self,
        orders: Sequence[int],
        keep_irrep_out: Any = None,
        *,
        irreps_in: Any,
        num_channels: int,
        num_indexed_weights: int | None = None,
        param_init: Callable[..., jax.Array] = _UNIT_NORMAL,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        backend: str | None = None,
        rngs: nnx.Rngs,
    ):
        name = _layers.MODULE_STP
        self.orders = _layers.checked_orders(orders)
        self.keep_irrep_out = _layers.checked_keep_irrep_out(keep_irrep_out)
        _layers.check_num_indexed_weights(name, num_indexed_weights)
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"{name}: num_channels must be a positive int; got {num_channels!r}")
        self.irreps_in = e3nn.Irreps(irreps_in)
        self.num_channels = num_channels
        self.num_indexed_weights = num_indexed_weights
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.backend = _backend.validate_optional_backend(backend)
        plan = symmetric_plan(self.irreps_in, self.orders, self.keep_irrep_out)
        sets = () if num_indexed_weights is None else (num_indexed_weights,)
        self.weights = nnx.Dict({
            p.parameter_name: nnx.Param(param_init(rngs.params(), sets + (p.mul, num_channels), param_dtype))
            for p in plan.paths
        })

    def __call__(self, indices_or_x, x_or_none=None) -> e3nn.IrrepsArray:
        """``(x)`` or ``(i, x)`` with ``x`` of shape ``(..., num_channels, irreps_in.dim)``,
        an ``IrrepsArray`` or a raw array of ``irreps_in``."""
        name = _layers.MODULE_STP
        indices, x = (None, indices_or_x) if x_or_none is None else (indices_or_x, x_or_none)
        x = _irreps_array(name, x, self.irreps_in)
        if x.irreps != self.irreps_in:
            raise ValueError(
                f"{name}: x has irreps {x.irreps}; the module was built for irreps_in={self.irreps_in}"
            )
        if x.ndim < 2 or x.shape[-2] != self.num_channels:
            raise ValueError(
                f"{name}: x must have shape (..., num_channels={self.num_channels}, {self.irreps_in.dim}); "
                f"got {x.shape}"
            )
        x = x.astype(_compute_dtype(self.dtype, x.dtype, self.param_dtype))

        def get_parameter(key, shape, dtype):
            return self.weights[key][...].astype(dtype)

        return _layers.symmetric_tensor_product(
            self.orders, self.keep_irrep_out, self.num_indexed_weights, indices, x, get_parameter,
            self.backend,
        )


class MessagePassingConvolution(nnx.Module):
    r"""Message passing with a radial network, as MACE's and NequIP's interactions do, for
    NNX: the numbers of ``e3kernels.haiku.MessagePassingConvolution``, on the fused op
    (:func:`e3kernels.ops.equivariant_convolution`, edge messages never materialised)::

        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=target_irreps)
        mix = MultiLayerPerceptron(num_radial_basis, tuple(radial_neurons) + (msg.irreps.num_irreps,),
                                   activation, output_activation=False)(radial_embedding)
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=num_nodes) / avg_num_neighbors

    The only parameters are the radial network's, a :class:`MultiLayerPerceptron` in
    ``self.radial_mlp`` (converted to and from the Haiku module's
    ``multi_layer_perceptron/linear_{k}`` and the linen module's
    ``MultiLayerPerceptron_0/Dense_{k}`` by :func:`~e3kernels.nnx.load_haiku` and the
    others). Its last layer runs in the op (:class:`~e3kernels.ops.RadialWeights`): the
    ``(E, msg.irreps.num_irreps)`` ``mix`` is never formed either. ``self.irreps_out`` is
    the output's irreps, for the modules that follow.

    Args:
      irreps_in: the node features' irreps, the same nonzero multiplicity (channels) for each
        irrep, e.g. ``"128x0e + 128x1o"``.
      irreps_sh: the edge spherical harmonics' irreps, e.g. ``"0e + 1o + 2e + 3o"``.
      target_irreps: the irreps the messages keep (multiplicities are ignored).
      avg_num_neighbors: the sum over edges is divided by it.
      num_radial_basis: the size of the radial embedding (the radial network's input).
      radial_neurons: hidden layer sizes of the radial network.
      activation: its activation (normalised, as in e3nn's MLP).
      backend: keyword only; ``"auto"``, ``"reference"``, ``"pallas"`` or ``None``.
      dtype: of the computation; ``None`` promotes the inputs' with ``param_dtype``.
      param_dtype: of the parameters.
      rngs: ``nnx.Rngs`` for the parameters' initial values.

    Called as ``(node_feats, edge_sh, radial_embedding, senders, receivers)``:
    ``node_feats`` ``(N, irreps_in)`` and ``edge_sh`` ``(E, irreps_sh)`` (``IrrepsArray``
    or raw arrays), ``radial_embedding`` ``(E, num_radial_basis)``, ``senders`` and
    ``receivers`` ``(E,)`` node indices.

    >>> import e3kernels, e3nn_jax as e3nn, jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> conv = e3kernels.nnx.MessagePassingConvolution(
    ...     "8x0e + 8x1o", "0e + 1o + 2e", "0e + 1o", 2.0, num_radial_basis=4, radial_neurons=(16,),
    ...     rngs=nnx.Rngs(0))
    >>> conv.irreps_out
    16x0e+24x1o
    >>> x = e3nn.normal("8x0e + 8x1o", jax.random.PRNGKey(0), (5,))
    >>> vectors = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    >>> sh = e3nn.spherical_harmonics("0e + 1o + 2e", vectors, normalize=True)
    >>> senders, receivers = jnp.arange(12) % 5, (jnp.arange(12) + 1) % 5
    >>> conv(x, sh, jnp.ones((12, 4)), senders, receivers).shape
    (5, 88)
    """

    def __init__(
        self,
        irreps_in: Any,
        irreps_sh: Any,
        target_irreps: Any,
        avg_num_neighbors: float,
        num_radial_basis: int,
        radial_neurons: Sequence[int] = (64, 64, 64),
        activation: Callable | None = jax.nn.silu,
        *,
        backend: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        name = _layers.MODULE_CONV
        self.irreps_in = e3nn.Irreps(irreps_in)
        self.irreps_sh = e3nn.Irreps(irreps_sh)
        self.target_irreps = _layers.checked_target_irreps(target_irreps)
        self.avg_num_neighbors = _layers.checked_avg_num_neighbors(avg_num_neighbors)
        self.radial_neurons = _layers.check_radial_options(radial_neurons)
        basis = num_radial_basis
        if not isinstance(basis, int) or isinstance(basis, bool) or basis < 1:
            raise ValueError(f"{name}: num_radial_basis must be a positive int; got {num_radial_basis!r}")
        self.num_channels = _layers.channels_of(self.irreps_in, "irreps_in")
        self.num_radial_basis = num_radial_basis
        self.activation = activation
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.backend = _backend.validate_optional_backend(backend)
        with jax.ensure_compile_time_eval():  # its table is numbers, also under nnx.vmap or a jit
            plan = ops.convolution_plan(
                e3nn.Irreps([(1, ir) for _, ir in self.irreps_in]), self.irreps_sh, self.target_irreps)
        if plan.num_paths == 0:
            raise ValueError(
                f"{name}: no irrep of target_irreps={e3nn.Irreps(self.target_irreps)} is in "
                f"irreps_in x irreps_sh = {self.irreps_in} x {self.irreps_sh}"
            )
        #: the output's irreps: per message irrep, ``C`` channels per tensor product path
        self.irreps_out = e3nn.Irreps([(mul * self.num_channels, ir) for mul, ir in plan.irreps_out])
        self.num_radial_outputs = plan.num_paths * self.num_channels
        self.radial_mlp = MultiLayerPerceptron(
            num_radial_basis, self.radial_neurons + (self.num_radial_outputs,), activation,
            output_activation=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, node_feats, edge_sh, radial_embedding, senders, receivers) -> e3nn.IrrepsArray:
        """Returns an ``IrrepsArray`` ``(N, irreps_out)`` of the computation's dtype."""
        name = _layers.MODULE_CONV
        node_feats = _irreps_array(name, node_feats, self.irreps_in)
        edge_sh = _irreps_array(name, edge_sh, self.irreps_sh)
        for argument, value, irreps in (("node_feats", node_feats, self.irreps_in),
                                        ("edge_sh", edge_sh, self.irreps_sh)):
            if value.irreps != irreps:
                raise ValueError(
                    f"{name}: {argument} has irreps {value.irreps}; the module was built for {irreps}"
                )
        if isinstance(radial_embedding, e3nn.IrrepsArray):
            if not radial_embedding.irreps.is_scalar():
                raise ValueError(
                    f"{name}: radial_embedding must be scalars (0e); got irreps {radial_embedding.irreps}")
            radial_embedding = radial_embedding.array
        radial_embedding = jnp.asarray(radial_embedding)
        expected = (edge_sh.shape[0], self.num_radial_basis) if edge_sh.ndim == 2 else None
        if expected is not None and radial_embedding.shape != expected:
            raise ValueError(
                f"{name}: radial_embedding must have shape (num_edges, num_radial_basis) = {expected}; "
                f"got {radial_embedding.shape}"
            )
        dtype = _compute_dtype(
            self.dtype, jnp.result_type(node_feats.dtype, edge_sh.dtype, radial_embedding.dtype),
            self.param_dtype)
        node_feats, edge_sh = node_feats.astype(dtype), edge_sh.astype(dtype)

        def edge_weights(num_outputs: int) -> ops.RadialWeights:
            # num_outputs is self.num_radial_outputs: the irreps were checked above. The
            # radial network's last layer is fused into the op: the (E, num_outputs)
            # weights never exist
            hidden, matrix = self.radial_mlp._last_layer_factors(radial_embedding.astype(dtype))
            return ops.RadialWeights(hidden.astype(dtype), matrix.astype(dtype))

        return _layers.message_passing_convolution(
            self.target_irreps, self.avg_num_neighbors, node_feats, edge_sh, senders, receivers,
            edge_weights, self.backend,
        )
