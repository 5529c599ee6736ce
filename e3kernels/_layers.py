"""What the modules compute, shared by the Haiku, Flax linen and NNX modules.

Each framework's module owns its parameters and hands these functions a ``get_parameter``
callback; everything else (input preparation, checks, the op call) is here once, so the
three frameworks give the same numbers from the same parameters. The bodies follow
e3nn-jax 0.21's module code step for step where e3nn-jax has the module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp

from e3kernels import irreps as irreps_plans
from e3kernels import ops
from e3kernels._e3nn_private import (
    FunctionalLinear,
    dropout_body,
    get_pytree_dtype,
    linear_mixed,
    linear_mixed_per_channel,
    linear_vanilla,
    parse_gradient_normalization,
)
from e3kernels.irreps import LinearPlan, linear_parameter_name, symmetric_plan
from e3kernels.ops._checks import check_indices_in_range

#: ``get_parameter(name, shape, std, dtype)`` for Linear (``std``: e3nn's initial scale)
LinearGetParameter = Callable[[str, tuple[int, ...], float, Any], jax.Array]


# ---- Linear ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """The attributes of e3nn's ``Linear`` that the functions below read (e3nn's Haiku and
    linen modules have them; the NNX module builds one)."""

    irreps_out: Any
    channel_out: int | None = None
    irreps_in: Any = None
    biases: bool = False
    path_normalization: str | float | None = None
    gradient_normalization: str | float | None = None
    instructions: Any = None
    num_indexed_weights: int | None = None
    weights_per_channel: bool = False
    force_irreps_out: bool = False
    simplify_irreps_internally: bool = True


def check_num_indexed_weights(module: str, num_indexed_weights) -> None:
    if num_indexed_weights is not None and (
        isinstance(num_indexed_weights, bool)
        or not isinstance(num_indexed_weights, numbers.Integral)
        or num_indexed_weights < 1
    ):
        raise ValueError(
            f"{module}: num_indexed_weights must be a positive int or None; got {num_indexed_weights!r}"
        )


def as_irreps_array(module: str, argument: str, value: Any) -> e3nn.IrrepsArray:
    try:
        return e3nn.as_irreps_array(value)
    except (ValueError, TypeError) as error:
        raise TypeError(
            f"{module}: {argument} must be an e3nn.IrrepsArray (or an array of scalars); "
            f"got {type(value).__name__}: {error}"
        ) from error


def checked_linear_weights(module: str, options, weights) -> jax.Array:
    """``weights`` of the two-argument call as an array: integers exactly when indexed."""
    if isinstance(weights, e3nn.IrrepsArray):
        if not weights.irreps.is_scalar():
            raise ValueError(f"{module}: weights must be scalars (0e); got irreps {weights.irreps}")
        weights = weights.array
    weights = jnp.asarray(weights)
    indexed = options.num_indexed_weights is not None
    if weights.dtype.kind not in ("iu" if indexed else "f"):
        raise TypeError(
            f"{module}: weights must be integers with num_indexed_weights set, or floats "
            f"without it; got weights of dtype {weights.dtype} and "
            f"num_indexed_weights={options.num_indexed_weights}"
        )
    return weights


def check_linear_options(module: str, options, weights) -> None:
    """Clear errors where e3nn-jax asserts, or names another module."""
    if options.channel_out is not None and options.weights_per_channel:
        raise ValueError(f"{module}: channel_out and weights_per_channel=True exclude each other")
    if options.weights_per_channel and weights is None:
        raise ValueError(f"{module}: weights_per_channel=True needs the (weights, input) call form")
    if options.weights_per_channel and options.num_indexed_weights is not None:
        raise NotImplementedError(
            f"{module}: weights_per_channel=True with num_indexed_weights is not supported "
            "(neither is it in e3nn-jax)"
        )


def check_linear_irreps_in(module: str, options, input: e3nn.IrrepsArray) -> None:
    irreps_in = None if options.irreps_in is None else e3nn.Irreps(options.irreps_in)
    if options.instructions is None:
        if irreps_in is not None and input.irreps.regroup() != irreps_in.regroup():
            raise ValueError(
                f"{module}: input has irreps {input.irreps}, which do not match irreps_in={irreps_in}"
            )
        return
    if options.simplify_irreps_internally:
        raise ValueError(f"{module}: instructions need simplify_irreps_internally=False")
    if options.channel_out is not None:
        raise ValueError(f"{module}: instructions and channel_out exclude each other")
    if irreps_in is None:
        raise ValueError(f"{module}: instructions need irreps_in")
    if input.irreps != irreps_in:
        raise ValueError(
            f"{module}: input has irreps {input.irreps}; with instructions they must equal "
            f"irreps_in={irreps_in} exactly"
        )


def check_linear_call(module: str, options, weights, input):
    """The checks every framework's ``Linear.__call__`` runs first; returns the input as an
    ``IrrepsArray`` and the weights (or indices) as an array or ``None``."""
    input = as_irreps_array(module, "input", input)
    if weights is not None:
        weights = checked_linear_weights(module, options, weights)
    check_linear_options(module, options, weights)
    if options.channel_out is None:  # with channel_out, the irreps to check are formed later
        check_linear_irreps_in(module, options, input)
    return weights, input


def functional_linear(module: str, options, weights, input: e3nn.IrrepsArray):
    """e3nn's preparation of the input and its ``FunctionalLinear``, as in its ``__call__``."""
    dtype = get_pytree_dtype(weights, input)
    input = input.astype(jnp.float32 if dtype.kind in "iu" else dtype)
    irreps_out = e3nn.Irreps(options.irreps_out)
    if options.simplify_irreps_internally:
        input = input.remove_zero_chunks().regroup()
        irreps_out = irreps_out.simplify()
    if not options.force_irreps_out:
        irreps_out = irreps_out.filter(keep=input.irreps)
    if options.channel_out is not None:
        input = input.axis_to_mul()
        irreps_out = options.channel_out * irreps_out
        check_linear_irreps_in(module, options, input)
    lin = FunctionalLinear(
        input.irreps,
        irreps_out,
        biases=options.biases,
        instructions=options.instructions,
        path_normalization=options.path_normalization,
        gradient_normalization=options.gradient_normalization,
    )
    return input, lin


def linear(
    module: str,
    options,
    weights: jax.Array | None,
    input: e3nn.IrrepsArray,
    get_parameter: LinearGetParameter,
    backend: str | None,
) -> e3nn.IrrepsArray:
    """``Linear(options)(input)``, ``(weights, input)`` or ``(indices, input)``, after
    :func:`check_linear_call`. ``options`` has the attributes of e3nn's ``Linear``."""
    input, lin = functional_linear(module, options, weights, input)
    if weights is None:
        output = linear_vanilla(input, lin, get_parameter)
    elif options.num_indexed_weights is not None:
        output = _linear_indexed(input, lin, get_parameter, weights, options.num_indexed_weights, backend)
    else:
        gradient_normalization = parse_gradient_normalization(options.gradient_normalization)
        mixed = linear_mixed_per_channel if options.weights_per_channel else linear_mixed
        output = mixed(input, lin, get_parameter, weights, gradient_normalization)
    if options.channel_out is not None:
        output = output.mul_to_axis(options.channel_out)
    if options.force_irreps_out:
        return output.rechunk(e3nn.Irreps(options.irreps_out))
    return output


def _linear_indexed(input, lin, get_parameter, indices, num_indexed_weights, backend):
    """e3nn's ``linear_indexed`` on :func:`e3kernels.ops.indexed_linear`: no per-row copy
    of the weights."""
    params = [
        get_parameter(
            linear_parameter_name(lin, ins), (num_indexed_weights,) + ins.path_shape, ins.weight_std,
            input.dtype,
        )
        for ins in lin.instructions
    ]
    plan = LinearPlan.from_functional_linear(lin)
    weights = [p for ins, p in zip(lin.instructions, params) if ins.i_in != -1]
    biases = [p for ins, p in zip(lin.instructions, params) if ins.i_in == -1]

    # here, so that the error names the module and its argument rather than the op's
    check_indices_in_range("Linear", "indices (the first argument)", indices, num_indexed_weights)
    shape = jnp.broadcast_shapes(input.shape[:-1], indices.shape)
    num_rows = math.prod(shape)
    rows = input.broadcast_to(shape + (-1,)).array.reshape(num_rows, lin.irreps_in.dim)
    indices = jnp.broadcast_to(indices, shape).reshape(num_rows)
    out = ops.indexed_linear(rows, weights, indices, plan, biases=biases, backend=backend)
    return e3nn.IrrepsArray(
        lin.irreps_out, out.reshape(shape + (lin.irreps_out.dim,)), zero_flags=plan.zero_flags
    )


# ---- SymmetricTensorProduct --------------------------------------------------------------

MODULE_STP = "SymmetricTensorProduct"


def checked_orders(orders) -> tuple[int, ...]:
    return irreps_plans.checked_orders(orders, MODULE_STP)


def checked_keep_irrep_out(keep_irrep_out) -> frozenset[e3nn.Irrep] | None:
    return irreps_plans.checked_keep_irrep_out(keep_irrep_out, MODULE_STP)


def symmetric_tensor_product(
    orders: tuple[int, ...],
    keep_irrep_out: frozenset[e3nn.Irrep] | None,
    num_indexed_weights: int | None,
    indices,
    x,
    get_parameter: Callable[[str, tuple[int, ...], Any], jax.Array],
    backend: str | None,
) -> e3nn.IrrepsArray:
    """``SymmetricTensorProduct(orders, keep_irrep_out)(x)``, or ``(indices, x)`` with
    ``num_indexed_weights`` weight sets; ``get_parameter(name, shape, dtype)``."""
    if (indices is None) != (num_indexed_weights is None):
        raise ValueError(
            f"{MODULE_STP}: call as (i, x) exactly when num_indexed_weights is set; "
            f"num_indexed_weights={num_indexed_weights}, "
            f"called with {'x only' if indices is None else '(i, x)'}"
        )
    if not isinstance(x, e3nn.IrrepsArray):
        raise TypeError(
            f"{MODULE_STP}: x must be an e3nn.IrrepsArray of shape (..., num_channel, irreps), "
            f"for example e3nn.IrrepsArray('0e + 1o', jnp.ones((atoms, channels, 4))); "
            f"got {type(x).__name__}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{MODULE_STP}: x must have shape (..., num_channel, irreps), at least 2 axes; "
            f"got shape {x.shape}"
        )
    plan = symmetric_plan(x.irreps, orders, keep_irrep_out)
    *leading, channels, _ = x.shape
    leading = tuple(leading)
    weight_sets = () if indices is None else (num_indexed_weights,)
    weights = [
        get_parameter(p.parameter_name, weight_sets + (p.mul, channels), x.dtype) for p in plan.paths
    ]
    array = x.array
    if indices is not None:
        indices = jnp.asarray(indices)
        if indices.dtype.kind not in "iu":
            raise TypeError(
                f"{MODULE_STP}: indices (the first argument) must be integers; got dtype {indices.dtype}"
            )
        check_indices_in_range(MODULE_STP, "indices (the first argument)", indices, num_indexed_weights)
        leading = jnp.broadcast_shapes(leading, indices.shape)
        array = jnp.broadcast_to(array, leading + x.shape[-2:])
        indices = jnp.broadcast_to(indices, leading).reshape(-1)
    rows = array.reshape((-1, channels, plan.dim_in))
    out = ops.symmetric_contraction(rows, weights, plan, indices=indices, backend=backend)
    return e3nn.IrrepsArray(plan.irreps_out, out.reshape(leading + (channels, plan.dim_out)))


# ---- MultiLayerPerceptron and BatchNorm: options only (their code is e3nn-jax's) ----------


def check_mlp_options(list_neurons, output_activation) -> None:
    module = "MultiLayerPerceptron"
    neurons = list(list_neurons)
    if not all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and h > 0 for h in neurons):
        raise ValueError(f"{module}: list_neurons must be positive ints; got {neurons!r}")
    if not (output_activation is True or output_activation is False or callable(output_activation)):
        raise TypeError(
            f"{module}: output_activation must be a bool or a callable; got {output_activation!r}"
        )


def check_batch_norm_options(reduce, normalization, eps) -> None:
    module = "BatchNorm"
    if reduce not in ("mean", "max"):
        raise ValueError(f"{module}: reduce must be 'mean' or 'max'; got {reduce!r}")
    if normalization not in (None, "norm", "component"):
        raise ValueError(
            f"{module}: normalization must be 'norm', 'component' or None; got {normalization!r}"
        )
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{module}: eps must lie in [0, 1]; got {eps!r}")


# ---- Dropout -----------------------------------------------------------------------------


def checked_probability(module: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{module}: p must be a probability in [0, 1]; got {p!r}")
    return p


def dropout(module: str, rng, x, p: float, irreps: e3nn.Irreps | None) -> e3nn.IrrepsArray:
    """e3nn's equivariant dropout in training mode: one mask per irrep, broadcast over the
    leading axes, kept irreps scaled by ``1 / (1 - p)``."""
    if not isinstance(x, e3nn.IrrepsArray):
        raise TypeError(f"{module}: x must be an e3nn.IrrepsArray; got {type(x).__name__}")
    return dropout_body(rng, x, p, irreps)


# ---- MessagePassingConvolution ---------------------------------------------------------------

MODULE_CONV = "MessagePassingConvolution"


def checked_target_irreps(target_irreps) -> tuple[e3nn.Irrep, ...]:
    """The irreps (multiplicities dropped) the convolution's messages keep."""
    try:
        irreps = e3nn.Irreps(target_irreps)
    except (ValueError, TypeError, AssertionError) as error:
        raise ValueError(
            f"{MODULE_CONV}: target_irreps must be irreps such as '0e + 1o + 2e'; got {target_irreps!r}"
        ) from error
    if not irreps:
        raise ValueError(f"{MODULE_CONV}: target_irreps must name at least one irrep; got {target_irreps!r}")
    return tuple(sorted({ir for _, ir in irreps}))


def checked_avg_num_neighbors(avg_num_neighbors) -> float:
    from e3kernels.ops.equivariant_convolution import checked_average

    return checked_average(avg_num_neighbors, MODULE_CONV)


def check_radial_options(radial_neurons) -> tuple[int, ...]:
    if isinstance(radial_neurons, (str, bytes)) or not hasattr(radial_neurons, "__iter__"):
        raise TypeError(f"{MODULE_CONV}: radial_neurons must be a sequence of ints, e.g. (64, 64, 64); "
                        f"got {radial_neurons!r}")
    neurons = tuple(radial_neurons)
    if not all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and h > 0 for h in neurons):
        raise ValueError(f"{MODULE_CONV}: radial_neurons must be positive ints; got {neurons!r}")
    return neurons


def channels_of(irreps: e3nn.Irreps, argument: str) -> int:
    """``C``, the one nonzero multiplicity of every irrep of ``irreps``: the convolution's
    channels. One check and message for the node features, wherever a module first sees
    them (NNX: ``irreps_in`` at construction; Haiku and linen: ``node_feats`` at the call)."""
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1 or 0 in muls:
        raise ValueError(
            f"{MODULE_CONV}: {argument} must have the same nonzero multiplicity (channels) for every "
            f"irrep, as '128x0e + 128x1o'; got {irreps}"
        )
    (channels,) = muls
    return channels


def convolution_inputs(node_feats, edge_sh) -> tuple[jax.Array, e3nn.Irreps, int]:
    """``node_feats`` ``(N, C x irreps)`` as ``(N, C, irreps)``, its irreps per channel, ``C``."""
    for argument, value in (("node_feats", node_feats), ("edge_sh", edge_sh)):
        if not isinstance(value, e3nn.IrrepsArray) or value.ndim != 2:
            shape = "(num_nodes, irreps)" if argument == "node_feats" else "(num_edges, irreps_sh)"
            raise TypeError(
                f"{MODULE_CONV}: {argument} must be an e3nn.IrrepsArray of shape {shape}; "
                f"got {type(value).__name__} of shape {getattr(value, 'shape', None)}"
            )
    channels = channels_of(node_feats.irreps, "node_feats")
    x = node_feats.mul_to_axis(channels)
    return x.array, x.irreps, channels


def message_passing_convolution(
    target_irreps: tuple[e3nn.Irrep, ...],
    avg_num_neighbors: float,
    node_feats: e3nn.IrrepsArray,
    edge_sh: e3nn.IrrepsArray,
    senders,
    receivers,
    edge_weights: Callable[[int], jax.Array],
    backend: str | None,
) -> e3nn.IrrepsArray:
    """The convolution on e3nn's flat layout; ``edge_weights(num_outputs)`` is the radial
    network's ``(E, num_outputs)`` output (``num_outputs``: one per message irrep), or its
    last layer as :class:`e3kernels.ops.RadialWeights` (``hidden`` ``(E, H)``, ``matrix``
    ``(H, num_outputs)``), which the op fuses."""
    x, irreps_per_channel, channels = convolution_inputs(node_feats, edge_sh)
    plan = ops.convolution_plan(irreps_per_channel, edge_sh.irreps, target_irreps)
    if plan.num_paths == 0:
        raise ValueError(
            f"{MODULE_CONV}: no irrep of target_irreps ({e3nn.Irreps(target_irreps)}) is in the tensor "
            f"product of node_feats ({irreps_per_channel} per channel) with edge_sh ({edge_sh.irreps})"
        )
    num_edges = edge_sh.shape[0]
    weights = edge_weights(plan.num_paths * channels)
    expected = (num_edges, plan.num_paths * channels)
    fused = isinstance(weights, ops.RadialWeights)
    if not fused:
        weights = weights.array if isinstance(weights, e3nn.IrrepsArray) else weights
    got = (weights.hidden.shape[0], weights.matrix.shape[-1]) if fused else weights.shape
    if got != expected:
        raise ValueError(f"{MODULE_CONV}: the radial network must give {expected} weights; got {got}")
    if not fused:
        weights = weights.reshape(num_edges, plan.num_paths, channels)
    out = ops.equivariant_convolution(
        x, edge_sh.array, weights, jnp.asarray(senders),
        jnp.asarray(receivers), plan, avg_num_neighbors=avg_num_neighbors, backend=backend,
    )
    return paths_to_mul(out, plan.irreps_out)


def paths_to_mul(out: jax.Array, irreps_out: e3nn.Irreps) -> e3nn.IrrepsArray:
    """``(N, C, irreps_out)`` -> e3nn's flat layout of the same tensor product on ``C x``
    inputs: per output irrep, its paths one after the other, each with its ``C`` channels."""
    num_nodes, channels, _ = out.shape
    chunks, irreps = [], []
    for (mul, ir), columns in zip(irreps_out, irreps_out.slices()):
        chunk = out[:, :, columns].reshape(num_nodes, channels, mul, ir.dim).transpose(0, 2, 1, 3)
        chunks.append(chunk.reshape(num_nodes, mul * channels * ir.dim))
        irreps.append((mul * channels, ir))
    return e3nn.IrrepsArray(e3nn.Irreps(irreps), jnp.concatenate(chunks, axis=-1))
