"""Irreps bookkeeping: the static plans the ops run on, derived from e3nn-jax.

Everything that depends only on irreps (column offsets, multiplicities, path weights,
symmetric bases, parameter names) is computed here once, in Python/numpy, and handed to
the ops as hashable, immutable plans. The ops themselves only see plain arrays.

Nothing here re-derives e3nn's rules: :class:`LinearPlan` reads an
e3nn-jax's ``FunctionalLinear`` (through :mod:`e3kernels._e3nn_private`) and :class:`SymmetricPlan` reads
``e3nn.reduced_symmetric_tensor_product_basis`` (the basis is not unique; using e3nn's
keeps the parameters interchangeable).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable

import e3nn_jax as e3nn
import jax
import numpy as np

from e3kernels._e3nn_private import FunctionalLinear


@dataclasses.dataclass(frozen=True)
class LinearBlock:
    """One weight path: ``out[:, v, m] += path_weight * sum_u x[:, u, m] w[u, v]``.

    The input block occupies columns ``in_start : in_start + mul_in * ir_dim`` of the flat
    e3nn layout (index ``u * ir_dim + m``), the output block likewise from ``out_start``.
    """

    in_start: int
    out_start: int
    mul_in: int
    mul_out: int
    ir_dim: int
    path_weight: float


@dataclasses.dataclass(frozen=True)
class BiasBlock:
    """A bias on the scalar output columns ``out_start : out_start + mul``."""

    out_start: int
    mul: int
    path_weight: float


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The weight and bias paths of an equivariant linear map, in e3nn's parameter order."""

    dim_in: int
    dim_out: int
    blocks: tuple[LinearBlock, ...]
    biases: tuple[BiasBlock, ...]
    #: per output chunk, True where no path writes to it (e3nn marks such chunks as None)
    zero_flags: tuple[bool, ...]

    @staticmethod
    def from_functional_linear(lin: FunctionalLinear) -> LinearPlan:
        in_slices, out_slices = lin.irreps_in.slices(), lin.irreps_out.slices()
        blocks, biases = [], []
        for ins in lin.instructions:
            out = lin.irreps_out[ins.i_out]
            if ins.i_in == -1:
                biases.append(BiasBlock(out_slices[ins.i_out].start, out.mul, ins.path_weight))
            else:
                blocks.append(
                    LinearBlock(
                        in_start=in_slices[ins.i_in].start,
                        out_start=out_slices[ins.i_out].start,
                        mul_in=lin.irreps_in[ins.i_in].mul,
                        mul_out=out.mul,
                        ir_dim=out.ir.dim,
                        path_weight=ins.path_weight,
                    )
                )
        written = {ins.i_out for ins in lin.instructions if 0 not in ins.path_shape}
        return LinearPlan(
            dim_in=lin.irreps_in.dim,
            dim_out=lin.irreps_out.dim,
            blocks=tuple(blocks),
            biases=tuple(biases),
            zero_flags=tuple(i not in written for i in range(len(lin.irreps_out))),
        )

    def weight_shapes(self, num_indexed_weights: int) -> tuple[tuple[int, int, int], ...]:
        return tuple((num_indexed_weights, b.mul_in, b.mul_out) for b in self.blocks)

    def bias_shapes(self, num_indexed_weights: int) -> tuple[tuple[int, int], ...]:
        return tuple((num_indexed_weights, b.mul) for b in self.biases)


def linear_plan(irreps_in, irreps_out, *, biases: bool = False, **options) -> LinearPlan:
    """The plan of e3nn's ``FunctionalLinear(irreps_in, irreps_out, biases, **options)``
    (irreps or strings; ``options``: ``instructions``, ``path_normalization``,
    ``gradient_normalization``), for :func:`e3kernels.ops.indexed_linear`. Output irreps no
    input reaches stay, as zero columns (``Linear`` drops them first: ``filter``).

    >>> plan = linear_plan("2x0e + 1o", "0e + 1o", biases=True)
    >>> [(b.mul_in, b.mul_out, b.ir_dim) for b in plan.blocks], [b.mul for b in plan.biases]
    ([(2, 1, 1), (1, 1, 3)], [1])
    """
    lin = FunctionalLinear(e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_out), biases=biases, **options)
    return LinearPlan.from_functional_linear(lin)


# ---- output columns of a LinearPlan, shared by the reference and the kernels ----------


@dataclasses.dataclass(frozen=True)
class Segment:
    """Output columns ``out_start + v * ir_dim + m`` for ``v < mul``, ``m < ir_dim``."""

    out_start: int
    mul: int
    ir_dim: int
    #: indices into ``plan.blocks`` of the weight blocks adding into this segment
    blocks: tuple[int, ...] = ()
    #: indices into ``plan.biases`` of the biases adding into it (scalar segments only)
    biases: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return self.mul * self.ir_dim


def output_segments(plan: LinearPlan) -> tuple[Segment, ...]:
    """The segments of ``plan``'s output row, zero segments filling the gaps."""
    by_start: dict[int, Segment] = {}
    for k, block in enumerate(plan.blocks):
        seg = by_start.get(block.out_start, Segment(block.out_start, block.mul_out, block.ir_dim))
        if block.mul_in > 0:  # an empty contraction adds nothing
            seg = dataclasses.replace(seg, blocks=seg.blocks + (k,))
        by_start[block.out_start] = seg
    for k, bias in enumerate(plan.biases):
        seg = by_start.get(bias.out_start, Segment(bias.out_start, bias.mul, 1))
        by_start[bias.out_start] = dataclasses.replace(seg, biases=seg.biases + (k,))
    segments, column = [], 0
    for seg in sorted(by_start.values(), key=lambda s: s.out_start):
        if seg.out_start > column:
            segments.append(Segment(column, seg.out_start - column, 1))
        segments.append(seg)
        column = seg.out_start + seg.width
    if plan.dim_out > column:
        segments.append(Segment(column, plan.dim_out - column, 1))
    return tuple(seg for seg in segments if seg.width > 0)


def transposed_plan(plan: LinearPlan) -> LinearPlan:
    """The plan of the input gradient: every block read backwards, no biases.

    With weights ``swapaxes(W, 1, 2)`` it maps an output cotangent to the input gradient.
    ``zero_flags`` is left empty: the plan does not record the input's irreps chunks.
    """
    blocks = tuple(
        LinearBlock(b.out_start, b.in_start, b.mul_out, b.mul_in, b.ir_dim, b.path_weight)
        for b in plan.blocks
    )
    return LinearPlan(plan.dim_out, plan.dim_in, blocks, (), ())


def without_biases(plan: LinearPlan) -> LinearPlan:
    return dataclasses.replace(plan, biases=())


def linear_parameter_name(lin: FunctionalLinear, ins) -> str:
    """e3nn's name for the parameter of instruction ``ins`` (``w[0,0] 2x0e,1x0e``, ``b[0] 1x0e``)."""
    if ins.i_in == -1:
        return f"b[{ins.i_out}] {lin.irreps_out[ins.i_out]}"
    return f"w[{ins.i_in},{ins.i_out}] {lin.irreps_in[ins.i_in]},{lin.irreps_out[ins.i_out]}"


@dataclasses.dataclass(frozen=True)
class SymmetricPath:
    """The part of the symmetric contraction of one ``order`` producing one ``ir_out``.

    ``basis`` is e3nn's reduced symmetric basis chunk divided by its multiplicity, shape
    ``(dim_in,) * order + (mul, ir_out.dim)``; the path's parameter is ``w{order}_{ir_out}``
    of shape ``(mul, num_channel)`` (``(S, mul, num_channel)`` with indexed weights).
    """

    order: int
    ir_out: e3nn.Irrep
    mul: int
    out_start: int
    basis: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def parameter_name(self) -> str:
        return f"w{self.order}_{self.ir_out}"


@dataclasses.dataclass(frozen=True)
class SymmetricPlan:
    """Static description of ``SymmetricTensorProduct(orders, keep_irrep_out)`` on ``irreps_in``.

    ``paths`` are in e3nn's parameter creation order (orders descending, then the basis's
    irreps order); ``irreps_out`` is e3nn's output irreps (sorted, one copy of each).
    Build it with :func:`symmetric_plan`, which caches it.
    """

    irreps_in: e3nn.Irreps
    orders: tuple[int, ...]
    keep: frozenset[e3nn.Irrep] | None
    irreps_out: e3nn.Irreps
    paths: tuple[SymmetricPath, ...]

    @property
    def dim_in(self) -> int:
        return self.irreps_in.dim

    @property
    def dim_out(self) -> int:
        return self.irreps_out.dim


def symmetric_contraction_plan(irreps_in, orders, keep_irrep_out=None) -> SymmetricPlan:
    """The plan of ``e3nn.haiku.SymmetricTensorProduct(orders, keep_irrep_out)`` on inputs
    of irreps ``irreps_in`` per channel (irreps or strings), for
    :func:`e3kernels.ops.symmetric_contraction`.

    >>> plan = symmetric_contraction_plan("0e + 1o", (1, 2), keep_irrep_out="0e")
    >>> [(p.parameter_name, p.mul) for p in plan.paths]
    [('w2_0e', 2), ('w1_0e', 1)]
    """
    where = "symmetric_contraction_plan"
    return symmetric_plan(e3nn.Irreps(irreps_in), checked_orders(orders, where),
                          checked_keep_irrep_out(keep_irrep_out, where))


def checked_orders(orders, where: str) -> tuple[int, ...]:
    """``orders`` as a tuple of positive ints, or an error naming ``where``."""
    try:
        orders = tuple(orders)
    except TypeError:
        orders = None
    if not orders or not all(type(o) is int and o > 0 for o in orders):
        raise ValueError(f"{where}: orders must be a non-empty sequence of positive ints; got {orders!r}")
    return orders


def checked_keep_irrep_out(keep_irrep_out, where: str) -> frozenset[e3nn.Irrep] | None:
    """``keep_irrep_out`` (irreps without multiplicities, as a string or a collection of
    irreps, or ``None``: keep all) as a frozenset, or an error naming ``where``."""
    if keep_irrep_out is None:
        return None
    if isinstance(keep_irrep_out, (str, e3nn.Irreps)):
        irreps = e3nn.Irreps(keep_irrep_out)
        if any(mul != 1 for mul, _ in irreps):
            raise ValueError(f"{where}: keep_irrep_out must list each irrep once without multiplicity; "
                             f"got {keep_irrep_out!r}")
        keep_irrep_out = [ir for _, ir in irreps]
    return frozenset(e3nn.Irrep(ir) for ir in keep_irrep_out)


@functools.cache
def symmetric_plan(
    irreps_in: e3nn.Irreps, orders: tuple[int, ...], keep: frozenset[e3nn.Irrep] | None
) -> SymmetricPlan:
    """The cached :class:`SymmetricPlan`; the e3nn basis is computed once per configuration."""
    raw = []
    for order in range(max(orders), 0, -1):
        if order not in orders:
            continue
        basis = e3nn.reduced_symmetric_tensor_product_basis(irreps_in, order, keep_ir=keep)
        for (mul, ir), u in zip(basis.irreps, basis.chunks):
            raw.append((order, ir, mul, np.asarray(u) / mul))
    irreps_out = e3nn.Irreps(sorted({ir for _, ir, _, _ in raw}))
    starts = dict(zip((ir for _, ir in irreps_out), (s.start for s in irreps_out.slices())))
    paths = tuple(
        SymmetricPath(order, ir, mul, starts[ir], basis) for order, ir, mul, basis in raw
    )
    return SymmetricPlan(irreps_in, tuple(orders), keep, irreps_out, paths)


# ---- the equivariant convolution's tensor product ------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvolutionPlan:
    """Static description of the channelwise tensor product of the convolution:
    ``e3nn.tensor_product(x, sh, filter_ir_out=..., irrep_normalization=...)`` with ``x`` of
    irreps ``irreps_in`` per channel and ``sh`` of irreps ``irreps_sh`` (one per edge).

    ``table[i, j, q]`` is that tensor product's bilinear form, read from e3nn-jax itself:
    output column ``q`` equals ``sum_ij table[i, j, q] x[i] sh[j]``. ``irreps_out`` is
    e3nn's output irreps (sorted and regrouped); each of its ``num_paths`` irreps (counted
    with multiplicity) has its own weight per edge and channel, and ``path_of_column[q]``
    is the irrep column ``q`` belongs to. Build it with :func:`convolution_plan`.

    A plan read from another library's description (``e3kernels.cue``: a cuequivariance
    polynomial) has no irreps (``None``) and says where its table comes from in
    ``origin``; plans compare by every field but the table, which those determine.
    """

    irreps_in: e3nn.Irreps | None
    irreps_sh: e3nn.Irreps | None
    filter_ir_out: tuple[e3nn.Irrep, ...] | None
    irrep_normalization: str | None
    irreps_out: e3nn.Irreps | None
    path_of_column: tuple[int, ...]
    table: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)
    origin: Hashable = None

    @property
    def dim_in(self) -> int:
        return self.table.shape[0]

    @property
    def dim_sh(self) -> int:
        return self.table.shape[1]

    @property
    def dim_out(self) -> int:
        return self.table.shape[2]

    @property
    def num_paths(self) -> int:
        return max(self.path_of_column, default=-1) + 1


def convolution_plan(irreps_in, irreps_sh, filter_ir_out=None, *,
                     irrep_normalization=None) -> ConvolutionPlan:
    """The plan of :func:`e3kernels.ops.equivariant_convolution`: node features of irreps
    ``irreps_in`` per channel, edge spherical harmonics of irreps ``irreps_sh``, their
    tensor product kept on the irreps of ``filter_ir_out`` (irreps, a string or a list of
    irreps; ``None``: all), normalised as ``e3nn.tensor_product`` does
    (``irrep_normalization``, e3nn's config by default).

    >>> plan = convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")
    >>> plan.irreps_out, plan.num_paths
    (2x0e+3x1o+3x2e+2x3o, 10)
    """
    if filter_ir_out is not None:
        if isinstance(filter_ir_out, (str, e3nn.Irreps)):
            filter_ir_out = [ir for _, ir in e3nn.Irreps(filter_ir_out)]
        filter_ir_out = tuple(sorted({e3nn.Irrep(ir) for ir in filter_ir_out}))
    if irrep_normalization is None:
        irrep_normalization = e3nn.config("irrep_normalization")
    irreps_in, irreps_sh = e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_sh)
    return _convolution_plan(irreps_in, irreps_sh, filter_ir_out, irrep_normalization)


# XLA options for a one-off program whose run time does not matter
_UNOPTIMISED = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _convolution_plan(irreps_in, irreps_sh, filter_ir_out, irrep_normalization) -> ConvolutionPlan:
    # e3nn's tensor product of the basis vectors of both inputs is the table itself, in
    # float64 so that float64 convolutions are exact to float64 round-off. It is one small
    # CPU program compiled without optimisation and run on concrete inputs, also when the
    # plan is first built inside a trace (jit, eval_shape, a Haiku init): dispatching its
    # hundreds of small ops one by one costs seconds of first-use compiles.
    def basis_product(eye_in, eye_sh):
        return e3nn.tensor_product(
            e3nn.IrrepsArray(irreps_in, eye_in)[:, None, :],
            e3nn.IrrepsArray(irreps_sh, eye_sh)[None, :, :],
            filter_ir_out=filter_ir_out, irrep_normalization=irrep_normalization,
        )

    with jax.ensure_compile_time_eval(), jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        eyes = (np.eye(irreps_in.dim, dtype=np.float64), np.eye(irreps_sh.dim, dtype=np.float64))
        irreps_out = jax.eval_shape(basis_product, *eyes).irreps
        program = jax.jit(lambda *e: basis_product(*e).array).lower(*eyes)
        table = np.asarray(program.compile(_UNOPTIMISED)(*eyes), dtype=np.float64)
    path_of_column = []
    for mul, ir in irreps_out:
        for _ in range(mul):
            path_of_column.extend([len(set(path_of_column))] * ir.dim)
    table = np.where(np.abs(table) < 1e-12, 0.0, table)  # round-off of exact zeros
    return ConvolutionPlan(
        irreps_in, irreps_sh, filter_ir_out, irrep_normalization, irreps_out,
        tuple(path_of_column), table,
    )
