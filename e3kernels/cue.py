"""cuequivariance-jax's segmented polynomials on e3kernels' ops and engine.

:func:`segmented_polynomial` and :func:`equivariant_polynomial` take the arguments of
``cuequivariance_jax`` 0.13's functions of the same names and compute the same thing. Where
``cuex`` evaluates a polynomial on CPU and TPU as per-path einsums (``method="naive"``;
its fast methods are CUDA binaries), these run it on e3kernels (jax.numpy on CPU, Triton
on GPU, Mosaic on TPU), derivatives of every order included. Each output takes the first
of these forms that it has:

1. **A linear map** (``cue.descriptors.linear``: ``w[p][u, v] * x[k][i, u] -> out[q][i, v]``,
   segments ``(ir, mul)`` or ``(mul, ir)``; weights shared or gathered by an index):
   :func:`e3kernels.ops.indexed_linear`, the path coefficients as its ``path_weight``.
2. **A fully connected tensor product** (``cue.descriptors.fully_connected_tensor_product``,
   mace-jax's species skip: ``C * w[p][u, v, w] * x1[a][i, u] * x2[b][j, v] -> out[q][k, w]``,
   weights shared): each path's outer product of ``x1`` and ``x2`` and its matmul with
   the path's weights, XLA's own on every backend (a dense product with one weight set).
3. **A channelwise tensor product** (MACE's interaction,
   ``cue.descriptors.channelwise_tensor_product``: ``w[p] * x[i] * sh[j] -> out[q]`` per
   channel, one weight per output segment): :func:`e3kernels.ops.equivariant_convolution`,
   the node features gathered and the messages scattered by the call's indices inside it.
4. **Any uniform 1-d polynomial** (``cuex``'s ``uniform_1d`` condition: after flattening
   the coefficient modes and squeezing unit modes, every operand's segments are all
   ``(u,)``, one channel mode of one extent, or all scalars, broadcast over ``u``; MACE's
   product basis, ``cuequivariance.group_theory.experimental.mace.symmetric_contraction``,
   and ``cue.descriptors.spherical_harmonics`` among them): the sparse-polynomial engine
   of :func:`e3kernels.ops.symmetric_contraction`. A path ``c * a[i] * b[j] -> out[k]`` is a
   term ``out[n, u, k] += c * a[n, u, i] * b[n, u, j]`` over per-row *variables* (every
   input's segments), so the polynomial, its input gradients and theirs are
   :class:`~e3kernels.symmetric_terms.SparsePolynomial` s, one term-loop program each.

Rows: one batch axis (or none). An input is per row, shared (batch size 1) or gathered by
an index array; an output is per row, a sum over rows (batch size 1), or scattered
(summed) by an index array, as in a message-passing convolution. Gathered values outside
the input are zeros (a linear map's weight index must be in range); scattered rows
outside the output are dropped.

Anything else (other products of two or more channel modes, as
``full_tensor_product``; ``cuex.Repeats``; several batch axes) raises
``NotImplementedError`` naming what is unsupported: call ``cuex`` with ``method="naive"``
for it. :func:`routed` sends a program's ``cuex`` calls here (see its docstring).

>>> import jax, jax.numpy as jnp
>>> import cuequivariance as cue
>>> from e3kernels import cue as e3cue
>>> p = cue.descriptors.spherical_harmonics(cue.SO3(1), [0, 1, 2]).polynomial
>>> [y] = e3cue.segmented_polynomial(p, [jnp.array([0.0, 1.0, 0.0])],
...                                  [jax.ShapeDtypeStruct((-1,), jnp.float32)])
>>> [round(float(v), 4) for v in y]
[1.0, 0.0, 1.7321, 0.0, 0.0, 0.0, 2.2361, 0.0, 0.0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import cuequivariance as cue
    import cuequivariance_jax as cuex
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "e3kernels.cue needs cuequivariance and cuequivariance-jax: pip install 'e3kernels[cue]'"
    ) from error

from e3kernels import backend as _backend
from e3kernels.grouping import shared_row_tiles
from e3kernels.irreps import ConvolutionPlan, LinearBlock, LinearPlan
from e3kernels.ops.equivariant_convolution import dropping_convolution
from e3kernels.ops.indexed_linear import indexed_linear
from e3kernels.sparse_polynomial import REFERENCE, polynomial, with_tile_rows
from e3kernels.symmetric_terms import SparsePolynomial, Term, make_polynomial

OP = "e3kernels.cue.segmented_polynomial"
logger = logging.getLogger(__name__)


# ---- the plan: a canonical uniform 1-d polynomial as sparse polynomials --------------------


@dataclasses.dataclass(frozen=True)
class ConvolutionForm:
    """An output that is a channelwise tensor product, the form of
    :func:`e3kernels.ops.equivariant_convolution`: every term is
    ``weights[p] * features[i] * harmonics[j] -> out[q]``, with ``p = plan.path_of_column[q]``
    (``harmonics``' segments scalars), so that it runs as that op: features gathered by
    their index, messages scattered by the output's, no per-edge copy of either."""

    weights: int  # input numbers
    features: int
    harmonics: int
    plan: ConvolutionPlan  # its output columns sorted by path (the op's paths are contiguous)
    #: ``plan``'s column ``k`` is the polynomial's output segment ``column_order[k]``
    column_order: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class OutputTerms:
    """One output's terms, over the variables of the inputs it reads."""

    inputs: tuple[int, ...]  # the inputs it reads, in order; their segments are its variables
    polynomial: SparsePolynomial  # one coefficient row (all ones): every factor is a variable
    convolutions: tuple[ConvolutionForm, ...]  # its readings as a convolution (by weights input)


@dataclasses.dataclass(frozen=True)
class UniformPlan:
    """A cuequivariance polynomial in the engine's terms (:func:`uniform_plan`)."""

    channels: int  # u, the one channel mode's extent (1 when no operand has it)
    in_channelled: tuple[bool, ...]  # per input: segments are (u,), else scalars (broadcast)
    outputs: tuple[OutputTerms, ...]


@functools.cache
def uniform_plan(poly: cue.SegmentedPolynomial) -> UniformPlan:
    """The :class:`UniformPlan` of ``poly`` (cached), or ``NotImplementedError`` saying why
    it has none."""
    try:
        canonical = (poly.consolidate().flatten_coefficient_modes().squeeze_modes()
                     .canonicalize_subscripts())
    except ValueError as error:
        why = f"its coefficient modes do not flatten ({error})"
        raise NotImplementedError(_unsupported(poly, why)) from None
    extents = set()
    for _, stp in canonical.operations:
        modes = stp.subscripts.modes()
        if len(modes) > 1:
            raise NotImplementedError(_unsupported(
                poly, f"the tensor product {stp.subscripts} has {len(modes)} channel modes {modes}; "
                      "e3kernels.cue runs those with one (uniform 1-d)"))
        if modes:
            extents.update(stp.get_dims(modes[0]))
    if len(extents) > 1:
        raise NotImplementedError(_unsupported(
            poly, f"its channel mode has several extents {sorted(extents)}; e3kernels.cue needs one"))
    channels = extents.pop() if extents else 1

    def segments(operand: cue.SegmentedOperand, what: str) -> bool:
        shapes = set(operand.segments)
        if shapes <= {(channels,)}:
            return True
        if shapes == {()}:
            return False
        raise NotImplementedError(_unsupported(
            poly, f"{what}'s segments {sorted(shapes)} are neither all ({channels},) nor all scalars"))

    in_channelled = tuple(segments(op, f"input {i}") for i, op in enumerate(canonical.inputs))
    for o, op in enumerate(canonical.outputs):
        if not segments(op, f"output {o}") and channels > 1 and op.num_segments:
            raise NotImplementedError(_unsupported(
                poly, f"output {o} has scalar segments, a sum over the channel mode u={channels}"))
    num_inputs = canonical.num_inputs
    offsets = np.concatenate([[0], np.cumsum([op.num_segments for op in canonical.inputs])])
    per_output: list[list[Term]] = [[] for _ in canonical.outputs]
    for operation, stp in canonical.operations:
        outs = [k for k, b in enumerate(operation.buffers) if b >= num_inputs]
        if len(outs) != 1:
            raise NotImplementedError(_unsupported(poly, f"an operation writes {len(outs)} outputs"))
        (k_out,) = outs
        for path in stp.paths:
            variables = tuple(sorted(
                int(offsets[b] + s) for k, (b, s) in enumerate(zip(operation.buffers, path.indices))
                if k != k_out))
            scale = float(np.asarray(path.coefficients).item())
            out = operation.buffers[k_out] - num_inputs
            per_output[out].append(Term(variables, int(path.indices[k_out]), 0, scale))
    outputs = tuple(_output_terms(terms, canonical, offsets, o) for o, terms in enumerate(per_output))
    return UniformPlan(
        channels=channels,
        in_channelled=in_channelled,
        outputs=outputs,
    )


def _output_terms(terms: list[Term], canonical, offsets, o: int) -> OutputTerms:
    """``terms`` over the variables of only the inputs they read (renumbered)."""
    used = sorted({int(np.searchsorted(offsets, v, side="right")) - 1 for t in terms for v in t.vars})
    shift = {}
    start = 0
    for i in used:
        shift[i] = start - int(offsets[i])
        start += canonical.inputs[i].num_segments

    def renumber(v: int) -> int:
        return v + shift[int(np.searchsorted(offsets, v, side="right")) - 1]

    renumbered = (Term(tuple(renumber(v) for v in t.vars), t.out, 0, t.scale) for t in terms)
    in_sizes = tuple(canonical.inputs[i].num_segments for i in used)
    poly = make_polynomial(in_sizes, (canonical.outputs[o].num_segments,), 1, renumbered)
    return OutputTerms(tuple(used), poly, _convolution_forms(poly, tuple(used), canonical))


def _convolution_forms(poly: SparsePolynomial, used: tuple[int, ...],
                       canonical) -> tuple[ConvolutionForm, ...]:
    """``poly``'s readings as a convolution: one per choice of its weights input."""
    channelled = [k for k, i in enumerate(used) if canonical.inputs[i].segments[:1] != ((),)]
    scalar = [k for k, i in enumerate(used) if k not in channelled]
    if len(used) != 3 or len(channelled) != 2 or not poly.terms:
        return ()
    starts = np.cumsum((0,) + poly.in_sizes)
    of_input = [[poly.locate_input(v)[0] for v in t.vars] for t in poly.terms]
    if any(sorted(k) != [0, 1, 2] for k in of_input):
        return ()
    forms = []
    for weights in channelled:
        features = next(k for k in channelled if k != weights)
        path = {}
        table = np.zeros((poly.in_sizes[features], poly.in_sizes[scalar[0]], poly.num_out))
        for t, inputs in zip(poly.terms, of_input):
            segment = {k: v - starts[k] for k, v in zip(inputs, t.vars)}
            if path.setdefault(t.out, segment[weights]) != segment[weights]:
                break  # one output segment, two weights: not this reading
            table[segment[features], segment[scalar[0]], t.out] += t.scale
        else:
            columns = [path.get(q, -1) for q in range(poly.num_out)]
            for q in range(1, len(columns)):  # a column without terms joins its left neighbour's path
                columns[q] = columns[q - 1] if columns[q] < 0 else columns[q]
            if columns[0] < 0 or set(columns) != set(range(poly.in_sizes[weights])):
                continue
            order = np.argsort(columns, kind="stable")
            table = np.ascontiguousarray(table[:, :, order])
            plan = ConvolutionPlan(None, None, None, None, None, tuple(int(columns[q]) for q in order), table,
                                   origin=("cue", table.shape, table.tobytes()))
            forms.append(ConvolutionForm(used[weights], used[features], used[scalar[0]], plan,
                                         tuple(int(q) for q in order)))
    return tuple(forms)


@dataclasses.dataclass(frozen=True)
class LinearForm:
    """A polynomial that is one equivariant linear map (``cue.descriptors.linear``): a
    single tensor product ``weights[p][u, v] * features[k][i, u] -> out[q][i, v]`` per path,
    run as :func:`e3kernels.ops.indexed_linear` on e3nn's ``(mul, ir)`` layout, the path's
    coefficient its block's ``path_weight``."""

    weights: int  # input numbers
    features: int
    features_ir_first: bool  # segments (i, u): cuex's ir_mul; else (u, i): mul_ir
    output_ir_first: bool
    in_segments: tuple[tuple[int, int], ...]  # per features segment: (ir_dim, mul)
    out_segments: tuple[tuple[int, int], ...]
    block_weights: tuple[tuple[int, int, int, bool], ...]  # per block: (start, u, v, stored (v, u))
    plan: LinearPlan


def _single_products(poly: cue.SegmentedPolynomial, num_inputs: int):
    """``poly``'s ``(operation, tensor product)`` where it is one tensor product of its
    ``num_inputs`` inputs into its one output, as given and consolidated: a reading may
    need the unit modes that consolidation squeezes (a scalar linear map's ``ir``)."""
    for candidate in (poly, poly.consolidate()):
        if candidate.num_inputs != num_inputs or candidate.num_outputs != 1 or len(candidate.operations) != 1:
            continue
        ((operation, stp),) = candidate.operations
        if sorted(operation.buffers) == list(range(num_inputs + 1)) and operation.buffers[-1] == num_inputs:
            yield operation, stp


@functools.cache
def linear_form(poly: cue.SegmentedPolynomial) -> LinearForm | None:
    """``poly`` as a :class:`LinearForm`, or ``None`` when it is not one."""
    return next(filter(None, (_linear_form(*product) for product in _single_products(poly, 2))), None)


def _linear_form(operation, stp) -> LinearForm | None:
    if stp.coefficient_subscripts:
        return None
    modes = [tuple(operand) for operand in stp.subscripts.operands]
    weights_k, features_k = (0, 1) if len(modes[0]) == 2 and len(set(modes[0])) == 2 else (1, 0)
    w_modes, x_modes, out_modes = modes[weights_k], modes[features_k], modes[2]
    if len(w_modes) != 2 or len(x_modes) != 2 or len(out_modes) != 2:
        return None
    ir = set(x_modes) & set(out_modes)
    if len(ir) != 1 or ir & set(w_modes) or len(set(x_modes) | set(out_modes) | set(w_modes)) != 3:
        return None
    (ir,) = ir
    u = next(m for m in x_modes if m != ir)
    v = next(m for m in out_modes if m != ir)
    if set(w_modes) != {u, v}:
        return None
    ir_first_in, ir_first_out, transposed = x_modes[0] == ir, out_modes[0] == ir, w_modes[0] == v
    in_shapes = [seg if ir_first_in else seg[::-1] for seg in stp.operands[features_k].segments]
    out_shapes = [seg if ir_first_out else seg[::-1] for seg in stp.operands[2].segments]
    starts_in = np.cumsum([0] + [a * b for a, b in in_shapes])
    starts_out = np.cumsum([0] + [a * b for a, b in out_shapes])
    starts_w = np.cumsum([0] + [a * b for a, b in stp.operands[weights_k].segments])
    blocks, block_weights, written = [], [], set()
    for path in stp.paths:
        p, k, q = path.indices[weights_k], path.indices[features_k], path.indices[2]
        (ir_dim, mul_in), (_, mul_out) = in_shapes[k], out_shapes[q]
        blocks.append(LinearBlock(int(starts_in[k]), int(starts_out[q]), mul_in, mul_out, ir_dim,
                                  float(np.asarray(path.coefficients).item())))
        block_weights.append((int(starts_w[p]), mul_in, mul_out, transposed))
        written.add(q)
    plan = LinearPlan(int(starts_in[-1]), int(starts_out[-1]), tuple(blocks), (),
                      tuple(q not in written for q in range(len(out_shapes))))
    return LinearForm(operation.buffers[weights_k], operation.buffers[features_k], ir_first_in, ir_first_out,
                      tuple(map(tuple, in_shapes)), tuple(map(tuple, out_shapes)), tuple(block_weights), plan)


@dataclasses.dataclass(frozen=True, eq=False)
class FullyConnectedForm:
    """A polynomial that is one fully connected tensor product
    (``cue.descriptors.fully_connected_tensor_product``, mace-jax's species skip): a single
    tensor product ``C[i, j, k] * w[p][u, v, w] * x1[a][i, u] * x2[b][j, v] -> out[q][k, w]``
    per path (any order of each operand's modes). Per path, the outer product
    ``t[u, v, k] = sum_ij C x1 x2``, then one matmul with the weights over ``(u, v)``:
    XLA's own (cuBLAS, the MXU, the CPU's), the right tool for a dense product with one
    weight set. (As :func:`e3kernels.ops.indexed_linear`'s Pallas kernel it ran no faster
    and added 11 s to the H100 compile of the ``cue`` model.)"""

    weights: int  # input numbers
    x1: int
    x2: int
    paths: tuple[FullyConnectedPath, ...]
    output_ir_first: bool
    out_segments: tuple[tuple[int, int], ...]  # per output segment: (ir_dim, mul)


@dataclasses.dataclass(frozen=True, eq=False)
class FullyConnectedPath:
    coefficients: np.ndarray  # C, in the einsum's coefficient modes
    x1: tuple[slice, tuple[int, ...]]  # the input's segment: its columns and shape
    x2: tuple[slice, tuple[int, ...]]
    outer: str  # einsum: C, x1 and x2 segments (rows first) -> (rows, u, v, k)
    weights: tuple[slice, tuple[int, ...]]
    to_uvw: str  # einsum: the weight segment -> (u, v, w)
    out_segment: int


@functools.cache
def fully_connected_form(poly: cue.SegmentedPolynomial) -> FullyConnectedForm | None:
    """``poly`` as a :class:`FullyConnectedForm`, or ``None`` when it is not one."""
    forms = (_fully_connected_form(*product) for product in _single_products(poly, 3))
    return next(filter(None, forms), None)


def _fully_connected_form(operation, stp) -> FullyConnectedForm | None:
    modes, ir_modes = stp.subscripts.operands, stp.coefficient_subscripts
    candidates = [k for k in range(3) if len(modes[k]) == 3 and not set(modes[k]) & set(ir_modes)]
    if len(candidates) != 1:
        return None
    (weights_k,) = candidates
    x1_k, x2_k = (k for k in range(3) if k != weights_k)
    channel, ir = {}, {}
    for k in (x1_k, x2_k, 3):  # one channel mode, and one ir mode unless squeezed (scalars)
        ir[k] = "".join(m for m in modes[k] if m in ir_modes)
        channel[k] = "".join(m for m in modes[k] if m not in ir_modes)
        if len(channel[k]) != 1 or len(ir[k]) > 1:
            return None
    u, v, w = channel[x1_k], channel[x2_k], channel[3]
    if len({u, v, w}) != 3 or set(modes[weights_k]) != {u, v, w}:
        return None

    def segment(k: int, s: int) -> tuple[slice, tuple[int, ...]]:
        sizes = [int(np.prod(shape)) for shape in stp.operands[k].segments]
        start = sum(sizes[:s])
        return slice(start, start + sizes[s]), tuple(stp.operands[k].segments[s])

    output_ir_first = modes[3][0] == ir[3]
    out_shapes = [(1, *shape) if not ir[3] else shape if output_ir_first else shape[::-1]
                  for shape in stp.operands[3].segments]
    paths = []
    for path in stp.paths:
        p, a, b, q = (int(path.indices[k]) for k in (weights_k, x1_k, x2_k, 3))
        paths.append(FullyConnectedPath(
            np.asarray(path.coefficients), segment(x1_k, a), segment(x2_k, b),
            f"{ir_modes},z{modes[x1_k]},z{modes[x2_k]}->z{u}{v}{ir[3]}", segment(weights_k, p),
            f"{modes[weights_k]}->{u}{v}{w}", q))
    return FullyConnectedForm(operation.buffers[weights_k], operation.buffers[x1_k], operation.buffers[x2_k],
                              tuple(paths), output_ir_first, tuple(map(tuple, out_shapes)))


def why_unsupported(poly: cue.SegmentedPolynomial) -> str | None:
    """Why :func:`segmented_polynomial` cannot run ``poly``, or ``None`` when it can."""
    if linear_form(poly) is not None or fully_connected_form(poly) is not None:
        return None
    try:
        uniform_plan(poly)
    except NotImplementedError as error:
        return str(error)
    return None


def _unsupported(poly, why: str) -> str:
    return (f"{OP}: this polynomial is not supported: {why}. Call cuequivariance_jax."
            f"segmented_polynomial(..., method='naive') for it.\n{poly}")


# ---- the public functions ---------------------------------------------------------------------


def segmented_polynomial(
    polynomial: cue.SegmentedPolynomial,
    inputs: Sequence[jax.Array],
    outputs_shape_dtype: Sequence[jax.ShapeDtypeStruct],
    indices: Sequence[Any] | None = None,
    *,
    method: str = "",
    math_dtype: Any = None,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    precision: Any = "undefined",
    backend: str | None = None,
) -> list[jax.Array]:
    """``cuequivariance_jax.segmented_polynomial`` on e3kernels' engine (see the module doc).

    Args:
      polynomial, inputs, outputs_shape_dtype, indices, math_dtype, options: as ``cuex``'s.
        Each input is ``(*batch, size)``, at most one batch axis; an index is an integer
        array over the batch, a one-tuple of it, or ``None``. ``math_dtype`` (or
        ``options["math_dtype"]``) ``"float64"`` sums in float64; any other sums in
        float32 (16-bit math is not lowered: float32 is at least as accurate). Without
        one, float64 inputs sum in float64.
      method, name: accepted for ``cuex``'s signature (this is one method).
      precision: as ``cuex``'s, which refuses anything but its default.
      backend: e3kernels' backend (``"auto"``, ``"reference"``, ``"pallas"``), ``None``
        for the current setting (:func:`e3kernels.use_backend`).

    Returns:
      One array per output, of ``outputs_shape_dtype``'s shape (a last axis of ``-1``
      becomes the operand's size) and dtype.
    """
    del method, name
    if precision != "undefined":
        raise ValueError(f"{OP}: precision is not supported (as in cuex); use math_dtype")
    linear = linear_form(polynomial)
    fully_connected = fully_connected_form(polynomial) if linear is None else None
    plan = uniform_plan(polynomial) if linear is None and fully_connected is None else None
    compute = _math_dtype(math_dtype, options, inputs)
    inputs, outs, in_index, out_index = _normalized(polynomial, inputs, outputs_shape_dtype, indices)
    num_rows = _num_rows(inputs, in_index, outs, out_index)
    if linear is not None or fully_connected is not None:
        run, form = (_linear, linear) if linear is not None else (_fully_connected, fully_connected)
        result = run(form, inputs, in_index, outs[0], out_index[0], num_rows, compute, backend)
        return [result.reshape(_requested_shapes(polynomial, outputs_shape_dtype)[0].shape)]
    results = []
    for o, (out, index) in enumerate(zip(outs, out_index)):
        terms = plan.outputs[o]
        form = _convolution_form(terms, inputs, in_index, out, index, num_rows)
        if form is not None:
            results.append(_convolve(form, inputs, in_index, out, index, num_rows, plan.channels, compute,
                                     backend))
            continue
        args = (tuple(inputs[i] for i in terms.inputs), tuple(in_index[i] for i in terms.inputs), index)
        static = _Static(plan.channels, tuple(plan.in_channelled[i] for i in terms.inputs), terms.polynomial,
                         num_rows, out.shape[0], jnp.dtype(out.dtype).name)
        impl = _backend.select(
            OP, backend,
            functools.partial(_evaluate, static=static, config=REFERENCE, dtype=compute),
            lambda static=static: _kernels(static, compute),
            jax.ShapeDtypeStruct(out.shape, out.dtype),
            key=(static, jnp.dtype(compute).name),
        )
        results.append(impl(*args))
    return [r.reshape(o.shape) for r, o in zip(results, _requested_shapes(polynomial, outputs_shape_dtype))]


def equivariant_polynomial(
    poly: cue.EquivariantPolynomial,
    inputs: Sequence[Any],
    outputs_shape_dtype: Any = None,
    indices: Sequence[Any] | None = None,
    *,
    method: str = "",
    math_dtype: Any = None,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    precision: Any = "undefined",
    backend: str | None = None,
):
    """``cuequivariance_jax.equivariant_polynomial`` on e3kernels' engine: ``RepArray`` in
    and out, checked against ``poly``'s representations, evaluated by
    :func:`segmented_polynomial` (whose arguments these are).

    Returns one ``RepArray``, or a list where ``outputs_shape_dtype`` is a list or is
    inferred for several outputs (as ``cuex``).
    """
    inputs = list(inputs)
    if len(inputs) != poly.num_inputs:
        raise ValueError(f"e3kernels.cue.equivariant_polynomial: inputs: expected {poly.num_inputs}; "
                         f"got {len(inputs)}")
    for i, (x, rep) in enumerate(zip(inputs, poly.inputs)):
        if isinstance(x, cuex.RepArray):
            if x.rep(-1) != rep:
                raise ValueError(f"e3kernels.cue.equivariant_polynomial: inputs[{i}]: expected "
                                 f"representation {rep}; got {x.rep(-1)}")
        elif not rep.is_scalar():
            raise ValueError(f"e3kernels.cue.equivariant_polynomial: inputs[{i}]: expected a RepArray "
                             f"of {rep} (a plain array only for scalars); got {type(x).__name__}")
    arrays = [getattr(x, "array", x) for x in inputs]
    single = outputs_shape_dtype is not None and hasattr(outputs_shape_dtype, "shape")
    if outputs_shape_dtype is None:
        if indices is not None and any(i is not None for i in list(indices)[poly.num_inputs:]):
            raise ValueError("e3kernels.cue.equivariant_polynomial: outputs_shape_dtype is needed "
                             "with output indices")
        index_list = [None] * poly.num_inputs if indices is None else list(indices)[: poly.num_inputs]
        batch = jnp.broadcast_shapes(*[
            jnp.shape(x)[:-1] if i is None else jnp.shape(i[0] if isinstance(i, tuple) else i)
            for x, i in zip(arrays, index_list)])
        dtype = jnp.result_type(*arrays)
        outputs_shape_dtype = [jax.ShapeDtypeStruct(batch + (rep.dim,), dtype) for rep in poly.outputs]
        single = poly.num_outputs == 1
    elif single:
        outputs_shape_dtype = [outputs_shape_dtype]
    outputs = segmented_polynomial(poly.polynomial, arrays, outputs_shape_dtype, indices, method=method,
                                   math_dtype=math_dtype, options=options, name=name, precision=precision,
                                   backend=backend)
    outputs = [cuex.RepArray(rep, x) for rep, x in zip(poly.outputs, outputs)]
    return outputs[0] if single else outputs


# ---- the switch -------------------------------------------------------------------------------

_ROUTED_METHODS = ("naive", "uniform_1d")


@contextlib.contextmanager
def routed(*, methods: Sequence[str] = _ROUTED_METHODS, unsupported: str = "raise",
           backend: str | None = None) -> Iterator[None]:
    """Inside the context, ``cuequivariance_jax.segmented_polynomial`` calls made with a
    ``method`` in ``methods`` run on e3kernels (:func:`segmented_polynomial`), and so do
    ``cuex.equivariant_polynomial`` calls (it calls the former): one line routes a program
    written for cuex, e.g. mace-jax's::

        with e3kernels.cue.routed():
            energy, forces = step(params, graph)   # traced here: its cuex calls run on e3kernels

    This patches an attribute of a third-party module (``cuequivariance_jax``) for the
    duration of the context, in every thread; leaving restores it. What counts is where a
    function is *traced* (its first call under ``jax.jit``): JAX caches the trace, so a
    function traced inside keeps e3kernels when called after, and one traced before the
    context keeps cuex inside it.

    Args:
      methods: the ``method`` values to route (``"uniform_1d"`` too by default: its CUDA
        kernel is not available off NVIDIA GPUs, and this is the same computation).
      unsupported: a polynomial e3kernels does not run (as
        ``cue.descriptors.full_tensor_product``): ``"raise"``
        (``NotImplementedError``), or ``"cuex"`` to evaluate it with cuex itself, as
        the call asked, logged once per polynomial.
      backend: e3kernels' backend for the routed calls (``None``: the current setting).
    """
    if unsupported not in ("raise", "cuex"):
        raise ValueError(f"e3kernels.cue.routed: unsupported must be 'raise' or 'cuex'; got {unsupported!r}")
    previous = cuex.segmented_polynomial
    cuex.segmented_polynomial = functools.partial(
        _route, methods=tuple(methods), unsupported=unsupported, backend=backend, cuex_function=previous)
    try:
        yield
    finally:
        cuex.segmented_polynomial = previous


def _route(polynomial, inputs, outputs_shape_dtype, indices=None, *, method="", methods, unsupported,
           backend, cuex_function, **kwargs):
    if method in methods:
        why = why_unsupported(polynomial)
        if why is None:
            return segmented_polynomial(polynomial, inputs, outputs_shape_dtype, indices, method=method,
                                        backend=backend, **kwargs)
        if unsupported == "raise":
            raise NotImplementedError(why)
        _log_unrouted(polynomial)
    return cuex_function(polynomial, inputs, outputs_shape_dtype, indices, method=method, **kwargs)


@functools.cache
def _log_unrouted(polynomial) -> None:
    logger.warning("e3kernels.cue.routed: evaluating with cuex, not e3kernels: %s",
                   str(polynomial).splitlines()[0])


# ---- arguments --------------------------------------------------------------------------------


def _math_dtype(math_dtype, options, inputs):
    requested = (options or {}).get("math_dtype") if math_dtype is None else math_dtype
    if requested is None:
        if any(jnp.asarray(x).dtype == jnp.float64 for x in inputs):
            return jnp.float64
        return jnp.float32
    if requested == "tensor_float32":
        return jnp.float32
    try:
        dtype = jnp.dtype(requested)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{OP}: math_dtype must be a float dtype or 'tensor_float32'; got {requested!r}")
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _requested_shapes(polynomial, outputs_shape_dtype):
    return [jax.ShapeDtypeStruct(o.shape[:-1] + (op.size,), o.dtype)
            for o, op in zip(outputs_shape_dtype, polynomial.outputs)]


def _normalized(polynomial, inputs, outputs_shape_dtype, indices):
    """Inputs as ``(B, size)`` arrays, outputs as ``(B, size)`` types, indices as ``(R,)``
    int arrays or ``None``; errors name the argument."""
    inputs, outputs_shape_dtype = list(inputs), list(outputs_shape_dtype)
    if len(inputs) != polynomial.num_inputs:
        raise ValueError(f"{OP}: inputs: expected {polynomial.num_inputs} arrays; got {len(inputs)}")
    if len(outputs_shape_dtype) != polynomial.num_outputs:
        raise ValueError(f"{OP}: outputs_shape_dtype: expected {polynomial.num_outputs}; "
                         f"got {len(outputs_shape_dtype)}")
    num_buffers = polynomial.num_inputs + polynomial.num_outputs
    indices = [None] * num_buffers if indices is None else list(indices)
    if len(indices) != num_buffers:
        raise ValueError(f"{OP}: indices: expected {num_buffers} (one per input and output, None for "
                         f"none); got {len(indices)}")
    indices = [_index(i, k) for k, i in enumerate(indices)]
    rows = []
    for i, (x, op) in enumerate(zip(inputs, polynomial.inputs)):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != op.size:
            raise ValueError(f"{OP}: inputs[{i}]: expected shape (*batch, {op.size}); got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{OP}: inputs[{i}]: expected a float array; got {x.dtype}")
        rows.append(_one_batch_axis(x, f"inputs[{i}]"))
    outs = []
    for o, (out, op) in enumerate(zip(outputs_shape_dtype, polynomial.outputs)):
        if len(out.shape) == 0 or out.shape[-1] not in (op.size, -1):
            raise ValueError(f"{OP}: outputs_shape_dtype[{o}]: expected shape (*batch, {op.size}); "
                             f"got {out.shape}")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"{OP}: outputs_shape_dtype[{o}]: expected a float dtype; got {out.dtype}")
        shape = out.shape[:-1] + (op.size,)
        if len(shape) > 2:
            raise NotImplementedError(f"{OP}: outputs_shape_dtype[{o}]: one batch axis at most; got "
                                      f"{out.shape}")
        outs.append(jax.ShapeDtypeStruct(((shape[0] if len(shape) == 2 else 1), op.size), out.dtype))
    return rows, outs, indices[: len(inputs)], indices[len(inputs):]


def _index(index, k: int):
    if index is None:
        return None
    if isinstance(index, cuex.Repeats):
        raise NotImplementedError(f"{OP}: indices[{k}]: cuex.Repeats is not supported; pass an index array")
    if isinstance(index, tuple):
        if len(index) != 1:
            raise NotImplementedError(f"{OP}: indices[{k}]: one batch axis at most; got {len(index)} indices")
        (index,) = index
        if isinstance(index, slice):
            if index != slice(None):
                raise ValueError(f"{OP}: indices[{k}]: only ':' slices; got {index}")
            return None
    index = jnp.asarray(index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"{OP}: indices[{k}]: expected a 1-d integer array; got {index.dtype}{index.shape}")
    return index


def _one_batch_axis(x, what: str):
    if x.ndim == 1:
        return x[None]
    if x.ndim > 2:
        raise NotImplementedError(f"{OP}: {what}: one batch axis at most; got shape {x.shape}")
    return x


def _num_rows(inputs, in_index, outs, out_index) -> int:
    """The rows the polynomial runs over: the one extent (other than 1) of every indexed
    buffer's index and every other buffer's batch."""
    extents = {}
    for k, (x, i) in enumerate(zip(inputs, in_index)):
        extents[f"inputs[{k}]"] = x.shape[0] if i is None else i.shape[0]
    for k, (out, i) in enumerate(zip(outs, out_index)):
        extents[f"outputs_shape_dtype[{k}]"] = out.shape[0] if i is None else i.shape[0]
    sizes = {n for n in extents.values() if n != 1}
    if len(sizes) > 1:
        raise ValueError(f"{OP}: the batch extents (after indexing) disagree: {extents}; each must be "
                         "the number of rows or 1")
    return sizes.pop() if sizes else 1


# ---- evaluation -------------------------------------------------------------------------------


def _cast(x, compute):
    """``x`` for an op that sums in float32 (float64 for float64 inputs): cast where the
    math dtype and the input disagree on float64, else as given (16-bit stays 16-bit)."""
    return x.astype(compute) if compute == jnp.float64 or x.dtype == jnp.float64 else x


def _per_row(x, index, num_rows: int):
    """``x`` ``(B, size)`` on the call's rows: gathered by ``index`` (zeros outside ``x``),
    or broadcast from a shared row."""
    if index is not None:
        x = jnp.take(x, index, axis=0, mode="fill", fill_value=0)
    return jnp.broadcast_to(x, (num_rows, x.shape[-1]))


def _output_rows(rows, out_index, out_rows: int):
    """Per-row results as the output's rows: scattered (summed) by ``out_index``, summed
    into a shared output (one row), or as they are."""
    if out_index is not None:
        return jax.ops.segment_sum(rows, out_index, num_segments=out_rows)
    if out_rows == 1 and rows.shape[0] > 1:
        return jnp.sum(rows, axis=0, keepdims=True)
    return rows


def _convolution_form(terms: OutputTerms, inputs, in_index, out, out_index, num_rows):
    """The reading of ``terms`` as a convolution this call fits, or ``None``: per-row
    weights and harmonics, features per row or gathered, the output per row or scattered
    (the features gathered by the index when one reading has them indexed)."""
    if out_index is None and out.shape[0] != num_rows:
        return None
    for form in sorted(terms.convolutions, key=lambda f: in_index[f.features] is None):
        if in_index[form.weights] is None and in_index[form.harmonics] is None:
            return form
    return None


def _linear(form: LinearForm, inputs, in_index, out, out_index, num_rows, compute, backend):
    """The output as :func:`~e3kernels.ops.indexed_linear`: features to e3nn's ``(mul, ir)``
    layout, shared weights as one weight set, gathered ones selected per row."""
    weights = _cast(inputs[form.weights], compute)
    features = _per_row(_cast(inputs[form.features], compute), in_index[form.features], num_rows)
    index = in_index[form.weights]
    if index is None and weights.shape[0] != 1:
        raise NotImplementedError(f"{OP}: inputs[{form.weights}]: a linear map's weights shared "
                                  "(batch 1) or gathered by an index; got one set per row")
    if index is None:
        index = jnp.zeros((num_rows,), jnp.int32)
    blocks = []
    for start, mul_in, mul_out, transposed in form.block_weights:
        w = weights[:, start : start + mul_in * mul_out]
        blocks.append(jnp.swapaxes(w.reshape(-1, mul_out, mul_in), 1, 2) if transposed
                      else w.reshape(-1, mul_in, mul_out))
    x = _relayout(features, form.in_segments, to_ir_first=False, ir_first=form.features_ir_first)
    y = indexed_linear(x, blocks, index, form.plan, backend=backend)
    y = _relayout(y, form.out_segments, to_ir_first=form.output_ir_first, ir_first=False)
    return _output_rows(y, out_index, out.shape[0]).astype(out.dtype)


def _fully_connected(form: FullyConnectedForm, inputs, in_index, out, out_index, num_rows, compute, backend):
    """The output as each path's outer product and its matmul with the path's weights,
    summed in ``compute`` into e3nn's ``(mul, ir)`` layout, then relaid as the output's."""
    del backend  # XLA's own matmuls on every backend (see FullyConnectedForm)
    weights = _cast(inputs[form.weights], compute)
    if in_index[form.weights] is not None or weights.shape[0] != 1:
        raise NotImplementedError(f"{OP}: inputs[{form.weights}]: a fully connected product's weights "
                                  f"shared (batch 1, no index); got shape {weights.shape}"
                                  + (" with an index" if in_index[form.weights] is not None else ""))
    x1 = _per_row(inputs[form.x1], in_index[form.x1], num_rows).astype(compute)
    x2 = _per_row(inputs[form.x2], in_index[form.x2], num_rows).astype(compute)
    segments = [jnp.zeros((num_rows, mul, ir_dim), compute) for ir_dim, mul in form.out_segments]
    for path in form.paths:
        (cols1, shape1), (cols2, shape2), (cols, shape) = path.x1, path.x2, path.weights
        t = jnp.einsum(path.outer, jnp.asarray(path.coefficients, compute),
                       x1[:, cols1].reshape(num_rows, *shape1), x2[:, cols2].reshape(num_rows, *shape2))
        t = t.reshape(t.shape[:3] + (-1,))  # (rows, u, v, k); k = 1 where the output's ir is squeezed
        w = jnp.einsum(path.to_uvw, weights[0, cols].reshape(shape))
        segments[path.out_segment] += jnp.einsum("zuvk,uvw->zwk", t, w, preferred_element_type=compute)
    y = jnp.concatenate([s.reshape(num_rows, -1) for s in segments], axis=1)
    y = _relayout(y, form.out_segments, to_ir_first=form.output_ir_first, ir_first=False)
    return _output_rows(y, out_index, out.shape[0]).astype(out.dtype)


def _relayout(x, segments, *, to_ir_first: bool, ir_first: bool):
    """``x``'s segments ``(ir_dim, mul)`` from one layout (``ir_first``: ``(ir, mul)``) to
    the other; unchanged when they agree."""
    if to_ir_first == ir_first:
        return x
    parts, start = [], 0
    for ir_dim, mul in segments:
        block = x[:, start : start + ir_dim * mul]
        shape = (x.shape[0], ir_dim, mul) if ir_first else (x.shape[0], mul, ir_dim)
        parts.append(jnp.swapaxes(block.reshape(shape), 1, 2).reshape(x.shape[0], -1))
        start += ir_dim * mul
    return jnp.concatenate(parts, axis=1) if parts else x


def _convolve(form: ConvolutionForm, inputs, in_index, out, out_index, num_rows, channels, compute, backend):
    """One output as :func:`~e3kernels.ops.equivariant_convolution` (cuex's ``ir_mul``
    buffers: segment-major, channels inner)."""
    plan = form.plan
    weights = _per_row(_cast(inputs[form.weights], compute), None, num_rows)
    harmonics = _per_row(_cast(inputs[form.harmonics], compute), None, num_rows)
    features = _cast(inputs[form.features], compute)
    num_features = features.shape[0]
    features = jnp.swapaxes(features.reshape(num_features, plan.dim_in, channels), 1, 2)
    senders = in_index[form.features]
    if senders is None:
        senders = jnp.arange(num_rows) if num_features == num_rows else jnp.zeros(num_rows, jnp.int32)
    receivers = jnp.arange(num_rows) if out_index is None else out_index
    num_nodes = max(num_features, out.shape[0])
    features = jnp.pad(features, ((0, num_nodes - num_features), (0, 0), (0, 0)))
    messages = dropping_convolution(features, harmonics, weights.reshape(num_rows, plan.num_paths, channels),
                                    senders, receivers, plan, 1.0, backend)
    summed = jnp.swapaxes(messages[: out.shape[0]], 1, 2)  # (nodes, plan's columns, channels)
    if form.column_order != tuple(range(plan.dim_out)):
        summed = summed[:, np.argsort(form.column_order), :]
    return summed.reshape(out.shape[0], plan.dim_out * channels).astype(out.dtype)



@dataclasses.dataclass(frozen=True)
class _Static:
    channels: int
    channelled: tuple[bool, ...]
    polynomial: SparsePolynomial
    num_rows: int
    out_rows: int
    out_dtype: str


#: the engine's plane width: rows are folded into the channel axis up to this many lanes
LANES = 128


def _evaluate(inputs, in_index, out_index, *, static: _Static, config, dtype):
    """One output on ``config``'s evaluator: gather, the term loop per row, scatter.

    Every factor is a per-row variable and every coefficient 1, so rows and channels are
    interchangeable: ``fold`` rows share a plane row, ``fold * u`` lanes wide. With few
    channels (the harmonics' ``u = 1`` on every edge) the term loop then runs over full
    planes instead of one number per row (128 times fewer, 128 times wider steps)."""
    poly, num_rows, u = static.polynomial, static.num_rows, static.channels
    size_out = poly.out_sizes[0] * u
    if num_rows == 0 or not poly.terms:
        return jnp.zeros((static.out_rows, size_out), static.out_dtype)
    fold = max(1, min(LANES // u, num_rows))
    plane_rows = -(-num_rows // fold)
    zs = []
    for x, index, channelled, segments in zip(inputs, in_index, static.channelled, poly.in_sizes):
        x = _per_row(x, index, num_rows)
        x = jnp.swapaxes(x.reshape(num_rows, segments, u if channelled else 1), 1, 2)
        x = jnp.broadcast_to(x.astype(dtype), (num_rows, u, segments))
        x = jnp.pad(x, ((0, plane_rows * fold - num_rows), (0, 0), (0, 0)))
        zs.append(x.reshape(plane_rows, fold * u, segments))
    config = with_tile_rows(config)
    coefs = jnp.ones((1, 1, fold * u), dtype)
    (rows,) = polynomial(config, poly, 0.0, (jnp.dtype(dtype),), tuple(zs), coefs,
                         shared_row_tiles(plane_rows, config.tile_rows))
    rows = rows.reshape(plane_rows * fold, u, poly.out_sizes[0])[:num_rows]
    rows = jnp.swapaxes(rows, 1, 2).reshape(num_rows, size_out)
    return _output_rows(rows, out_index, static.out_rows).astype(static.out_dtype)


def _kernels(static: _Static, dtype):
    """The Pallas implementations (the symmetric contraction's kernel families)."""
    from e3kernels.kernels._common import per_config
    from e3kernels.kernels.symmetric_contraction import why_too_many_terms

    if (reason := why_too_many_terms(static.polynomial)) is not None:
        return reason
    return per_config(_evaluate, dtype, static=static, dtype=jnp.float32)
