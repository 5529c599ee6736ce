"""Per-platform dispatch: a program traces only the implementation of the platform it is
lowered for.

Every op call, whatever its backend, is bound as one primitive, ``e3kernels_call``. Its
parameter ``target`` (a :class:`Target`) knows the op's input and output types and, per
lowering platform (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``), the function that
computes it. Tracing a program only binds the primitive, which costs nothing whatever the
implementations; lowering traces the implementation of the platform being lowered
(``mlir.lower_fun``), and only that one. A program lowered or exported for several
platforms (``jax.export(..., platforms=("cuda", "tpu", "cpu"))``) carries one
implementation per platform, under JAX's platform switch (``mlir.lower_per_platform``).

Why a primitive rather than :func:`jax.lax.platform_dependent`: the latter traces every
branch, so a CPU program also traced, differentiated and lowered the Triton and Mosaic
kernels (15-30 times the reference's trace time), and a tracing-time check in one kernel
family broke users of the other.

Transformations are rules on the primitive that build *derived targets*, each again with
one implementation per platform, derived from the platform's own:

* JVP: the outputs, plus a :class:`Linearized` call that is linear in the tangents and
  whose implementation is ``jax.jvp`` of the platform's;
* transpose (reverse mode): a :class:`Linearized` call transposes to a :class:`Vjp` call
  whose implementation is ``jax.vjp`` of the platform's. Its own JVP is again a
  :class:`Linearized` call, so gradients of any order work, each platform differentiating
  its own implementation (plain autodiff for the reference, the kernels' ``custom_vjp``
  rules for Pallas). Reverse mode never lowers a :class:`Linearized` call, only its
  transpose, so kernels without forward mode still train;
* batching (``jax.vmap``): one call of the same target at bigger sizes, the batch folded
  into the op's *spaces* (rows, nodes, edges, species; :class:`Layout`) with offset
  indices, so that a batch of graphs is one kernel launch on every backend (``jax.vmap``
  of a Pallas kernel is a serial loop over the batch on TPU, one grid per element on
  GPU). Where the op declares no spaces or the batch cannot fold (shared weights without
  a space, mapped), a :class:`Batched` call: ``jax.vmap`` of each implementation.

Several devices:

* under a sharded ``jax.jit``, an op that says where its rows are (``row_axes``) lowers to
  a ``custom_partitioning`` call: each device runs the implementation on its own rows,
  and outputs without rows (weight gradients, sums over rows) are all-reduced once;
* with ``Explicit`` mesh axes, output types are sharded like the rows;
* under ``shard_map`` (``check_vma=True``) the outputs vary over the mesh axes the inputs
  vary over, replicated inputs being cast first, as for JAX's own primitives; the
  implementations are per-device code and are traced on plain types.

Everything else (``lax.scan``, ``jax.checkpoint``, ``jax.export``) needs no rule.

The cost of this design is that a derivative recomputes what it needs of its platform's
forward pass from the op's inputs (JAX's residuals do not cross a primitive). XLA merges
most of the repeated work: in the MACE block's training step (energy and forces,
differentiated twice) the run time is no worse than plain autodiff of the reference,
and the compile time about a quarter longer.

This module is the one place that uses JAX's primitive-level (private) API.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config, core, sharding_impls
from jax._src import dispatch as jax_dispatch
from jax._src.interpreters import ad, batching, mlir
from jax.experimental.custom_partitioning import custom_partitioning

from e3kernels.grouping import in_range  # the one in-range rule of the ops and kernels

#: The platform names JAX lowers for that this module registers implementations for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which *space* each leading axis of an op's array belongs to, and which space the
    values of an integer index array index.

    A space is a set of things of the op's problem: ``"row"``, ``"species"`` (weight
    sets), ``"node"``, ``"edge"``. Arrays sharing a space have that axis of the same size,
    and the op is a union of independent problems when cut along its spaces consistently:
    B calls on arrays of ``n`` rows equal one call on ``B * n`` rows, with index arrays
    into a space of size ``n`` offset by ``b * n`` for call ``b``. That is how a batch
    (``jax.vmap``) becomes one call, hence one kernel launch (see :func:`_batch`).

    Written as a string (:meth:`parse`): ``"row"``, ``"species"``, ``"edge -> node"``
    (an edge array of node indices), ``"_ row"`` (``_``: an axis of no space), ``""``
    (no axis in a space: weights shared by every row). Axes past the listed ones belong
    to no space.
    """

    axes: tuple[str | None, ...] = ()
    #: for an integer index array, the space its values index (out-of-range values drop
    #: their row or edge, and stay out of range when folded)
    indexes: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Layout:
        axes, _, indexes = spec.partition("->")
        return cls(tuple(None if a == "_" else a for a in axes.split()), indexes.strip() or None)

    @property
    def spaces(self) -> frozenset[str]:
        return frozenset(a for a in self.axes if a is not None)

    def values(self) -> Layout:
        """The layout of a tangent or cotangent: the same axes, values that index nothing."""
        return Layout(self.axes)

    def batched(self) -> Layout:
        """With a leading batch axis, which belongs to no space."""
        return Layout((None,) + self.axes, self.indexes)


def _resized_aval(aval: core.ShapedArray, layout: Layout, sizes: Mapping[str, int]) -> core.ShapedArray:
    shape = tuple(sizes.get(s, d) if s is not None else d for s, d in zip(layout.axes, aval.shape))
    dtype = jnp.dtype(jnp.int32) if layout.indexes in sizes else aval.dtype
    return aval.update(shape=shape + aval.shape[len(layout.axes):], dtype=dtype)


class Target:
    """What one ``e3kernels_call`` computes: fixed input and output types and, for each
    lowering platform, a function from the flat inputs to the tuple of flat outputs.

    Targets are primitive parameters, compared by value (an :class:`Op` by its ``key``),
    so that equal calls share JAX's caches.
    """

    name: str
    in_avals: tuple[core.ShapedArray, ...]
    out_avals: tuple[core.ShapedArray, ...]
    #: per input, the axis of its rows, or ``None`` for an input shared by every row
    #: (weights); ``None`` instead of a tuple: the op is not row-wise
    in_row_axes: tuple[int | None, ...] | None
    #: per output, the axis of its rows, or ``None`` for a sum over the rows (a weight
    #: gradient)
    out_row_axes: tuple[int | None, ...] | None
    #: per input, the spaces of its axes (see :class:`Layout`); ``None``: undeclared, a
    #: batch of calls runs as ``jax.vmap`` of the implementations
    in_layouts: tuple[Layout, ...] | None
    #: per output, the spaces of its axes
    out_layouts: tuple[Layout, ...] | None

    def implementation(self, platform: str) -> Callable[..., tuple[jax.Array, ...]]:
        raise NotImplementedError

    def resized(self, sizes: Mapping[str, int]) -> Target:
        """The same computation at other sizes of some spaces (every axis in space ``s``
        of size ``sizes[s]``; index arrays into a resized space as int32): what a batch
        folded into those spaces calls. The implementations are shape-generic."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Op(Target):
    """An op with its implementation per platform; see :func:`call`."""

    name: str
    key: Hashable
    in_avals: tuple[core.ShapedArray, ...]
    out_avals: tuple[core.ShapedArray, ...]
    in_row_axes: tuple[int | None, ...] | None
    out_row_axes: tuple[int | None, ...] | None
    implementations: Mapping[str, Callable[..., tuple[jax.Array, ...]]] = dataclasses.field(
        compare=False, hash=False
    )
    in_layouts: tuple[Layout, ...] | None = None
    out_layouts: tuple[Layout, ...] | None = None

    def implementation(self, platform):
        return self.implementations[platform]

    def resized(self, sizes):
        return dataclasses.replace(
            self,
            in_avals=tuple(_resized_aval(a, lay, sizes) for a, lay in zip(self.in_avals, self.in_layouts)),
            out_avals=tuple(_resized_aval(a, lay, sizes) for a, lay in zip(self.out_avals, self.out_layouts)),
        )


@dataclasses.dataclass(frozen=True)
class Linearized(Target):
    """The JVP of ``inner`` in the inputs ``wrt``: inputs ``(*primals, *tangents)``,
    outputs the output tangents; linear in the tangents."""

    inner: Target
    wrt: tuple[int, ...]

    @property
    def name(self):
        return f"jvp({self.inner.name})"

    @property
    def in_avals(self):
        return self.inner.in_avals + tuple(_tangent_aval(self.inner.in_avals[i]) for i in self.wrt)

    @property
    def out_avals(self):
        return tuple(_tangent_aval(a) for a in self.inner.out_avals)

    @property
    def in_row_axes(self):
        rows = self.inner.in_row_axes
        return None if rows is None else rows + tuple(rows[i] for i in self.wrt)

    @property
    def out_row_axes(self):
        return self.inner.out_row_axes

    @property
    def in_layouts(self):  # a tangent folds like its primal
        layouts = self.inner.in_layouts
        return None if layouts is None else layouts + tuple(layouts[i].values() for i in self.wrt)

    @property
    def out_layouts(self):
        layouts = self.inner.out_layouts
        return None if layouts is None else tuple(lay.values() for lay in layouts)

    def resized(self, sizes):
        return Linearized(self.inner.resized(sizes), self.wrt)

    def implementation(self, platform):
        f = traced_implementation(self.inner, platform)

        def jvp(*args):
            g, values, tangents = _in_wrt(f, len(self.inner.in_avals), self.wrt, args)
            return jax.jvp(g, values, tangents)[1]

        return jvp


@dataclasses.dataclass(frozen=True)
class Vjp(Target):
    """The VJP of ``inner`` in the inputs ``wrt``: inputs ``(*primals, *cotangents)``,
    outputs the cotangents of ``primals[i]`` for ``i`` in ``wrt``."""

    inner: Target
    wrt: tuple[int, ...]

    @property
    def name(self):
        return f"vjp({self.inner.name})"

    @property
    def in_avals(self):
        return self.inner.in_avals + tuple(_tangent_aval(a) for a in self.inner.out_avals)

    @property
    def out_avals(self):
        return tuple(_tangent_aval(self.inner.in_avals[i]) for i in self.wrt)

    @property
    def in_row_axes(self):
        rows, out_rows = self.inner.in_row_axes, self.inner.out_row_axes
        return None if rows is None else rows + out_rows

    @property
    def out_row_axes(self):
        rows = self.inner.in_row_axes
        return None if rows is None else tuple(rows[i] for i in self.wrt)

    @property
    def in_layouts(self):  # a cotangent folds like its output
        ins, outs = self.inner.in_layouts, self.inner.out_layouts
        return None if ins is None or outs is None else ins + tuple(lay.values() for lay in outs)

    @property
    def out_layouts(self):  # the cotangent of an input folds like the input
        layouts = self.inner.in_layouts
        return None if layouts is None else tuple(layouts[i].values() for i in self.wrt)

    def resized(self, sizes):
        return Vjp(self.inner.resized(sizes), self.wrt)

    def implementation(self, platform):
        f = traced_implementation(self.inner, platform)

        def vjp(*args):
            g, values, cotangents = _in_wrt(f, len(self.inner.in_avals), self.wrt, args)
            return tuple(jax.vjp(g, *values)[1](cotangents))

        return vjp


@dataclasses.dataclass(frozen=True)
class Batched(Target):
    """``inner`` mapped over a leading axis of ``size`` on the inputs where ``mapped``:
    ``jax.vmap`` of its implementations, the batching rule's fallback where the batch
    cannot fold into the op's spaces (on TPU a loop of kernel launches)."""

    inner: Target
    mapped: tuple[bool, ...]
    size: int

    @property
    def name(self):
        return f"vmap({self.inner.name})"

    @property
    def in_avals(self):
        return tuple(_batched(a, self.size) if m else a for a, m in zip(self.inner.in_avals, self.mapped))

    @property
    def out_avals(self):
        return tuple(_batched(a, self.size) for a in self.inner.out_avals)

    @property
    def in_row_axes(self):
        rows = self.inner.in_row_axes
        return None if rows is None else tuple(
            r + 1 if m and r is not None else r for r, m in zip(rows, self.mapped)
        )

    @property
    def out_row_axes(self):
        rows = self.inner.out_row_axes
        return None if rows is None else tuple(None if r is None else r + 1 for r in rows)

    @property
    def in_layouts(self):
        layouts = self.inner.in_layouts
        return None if layouts is None else tuple(
            lay.batched() if m else lay for lay, m in zip(layouts, self.mapped)
        )

    @property
    def out_layouts(self):
        layouts = self.inner.out_layouts
        return None if layouts is None else tuple(lay.batched() for lay in layouts)

    def resized(self, sizes):
        return Batched(self.inner.resized(sizes), self.mapped, self.size)

    def implementation(self, platform):
        in_axes = tuple(0 if m else None for m in self.mapped)
        return jax.vmap(traced_implementation(self.inner, platform), in_axes=in_axes)


def _in_wrt(f, num_primals: int, wrt: tuple[int, ...], args):
    """Split a derived target's ``args`` into the primals and the rest; return ``f`` as a
    function of the primals in ``wrt`` (the others fixed), their values, and the rest."""
    primals, rest = args[:num_primals], tuple(args[num_primals:])

    def g(*values):
        full = list(primals)
        for i, v in zip(wrt, values):
            full[i] = v
        return tuple(f(*full))

    return g, tuple(primals[i] for i in wrt), rest


# Under shard_map (check_vma=True) every value's type records the mesh axes it varies
# over. JAX 0.10 stores them as ``aval.manual_axis_type.varying``, other releases as
# ``aval.vma``; these helpers are the only code that reads or writes them.
_VARYING_FIELD = "manual_axis_type" if "manual_axis_type" in core.ShapedArray.__slots__ else "vma"


def _varying_axes(aval) -> frozenset:
    value = getattr(aval, _VARYING_FIELD, None)
    return frozenset(getattr(value, "varying", value) or ())


def _varying_like(aval: core.ShapedArray, inputs) -> core.ShapedArray:
    """``aval`` varying over the axes of the inputs (made equal by :func:`bind`)."""
    varying = [a for a in inputs if _varying_axes(a)]
    if not varying:
        return aval
    like = varying[0]  # its mesh, no partitioning of the output's dimensions
    sharding = like.sharding.update(spec=jax.sharding.PartitionSpec())
    return aval.update(sharding=sharding, **{_VARYING_FIELD: getattr(like, _VARYING_FIELD)})


def _plain(aval: core.ShapedArray) -> core.ShapedArray:
    return core.ShapedArray(aval.shape, aval.dtype)


def _vary_alike(args):
    """Cast replicated inputs to vary over the axes any input varies over, as JAX's own
    primitives do under ``shard_map``: the op's output is per-device."""
    axes = [_varying_axes(jax.typeof(a)) for a in args]
    union = frozenset().union(*axes)
    if not union:
        return args
    return [a if ax == union else jax.lax.pcast(a, tuple(sorted(union - ax)), to="varying")
            for a, ax in zip(args, axes)]


def _tangent_aval(aval: core.ShapedArray) -> core.ShapedArray:
    return aval.to_tangent_aval()


def _batched(aval: core.ShapedArray, size: int) -> core.ShapedArray:
    return aval.update(shape=(size,) + aval.shape)


def _differentiable(aval: core.ShapedArray) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


# ---- the primitive and its rules ----------------------------------------------------------

call_p = core.Primitive("e3kernels_call")
call_p.multiple_results = True


def bind(target: Target, *args) -> tuple[jax.Array, ...]:
    """Bind ``target`` to ``args`` (its flat inputs)."""
    return tuple(call_p.bind(*_vary_alike(args), target=target))


@call_p.def_abstract_eval
def _abstract_eval(*avals, target: Target):
    expected = target.in_avals
    if len(avals) != len(expected) or any(
        a.shape != e.shape or a.dtype != e.dtype for a, e in zip(avals, expected)
    ):
        got = ", ".join(a.str_short() for a in avals)
        want = ", ".join(e.str_short() for e in expected)
        raise TypeError(f"{target.name}: expected inputs ({want}); got ({got})")
    outs = [core.ShapedArray(a.shape, a.dtype) for a in target.out_avals]
    if target.in_row_axes is not None:
        outs = [_rows_typed_like(out, axis, avals, target.in_row_axes)
                for out, axis in zip(outs, target.out_row_axes)]
    return [_varying_like(out, avals) for out in outs]


def _rows_typed_like(aval: core.ShapedArray, row_axis, avals, in_row_axes) -> core.ShapedArray:
    """With ``Explicit`` mesh axes, types carry shardings: an output's rows are sharded as
    the first row input's, and an output without rows (a sum over them) is replicated."""
    for a, axis in zip(avals, in_row_axes):
        if axis is None:
            continue
        mesh_axes = _mesh_axes_at(a.sharding.spec, axis)
        if mesh_axes is None:
            return aval
        return aval.update(sharding=a.sharding.update(spec=_rows_spec(aval, row_axis, mesh_axes)))
    return aval


def _mesh_axes_at(spec, axis: int):
    """The mesh axes a partition spec splits dimension ``axis`` over (``None``: none)."""
    return spec[axis] if axis < len(spec) else None


def _rows_spec(aval, row_axis, mesh_axes) -> jax.sharding.PartitionSpec:
    """``aval``'s rows split over ``mesh_axes``, its other dimensions replicated."""
    return jax.sharding.PartitionSpec(*[mesh_axes if d == row_axis else None for d in range(len(aval.shape))])


@call_p.def_impl
def _eager(*args, target: Target):
    return _jitted(target)(*args)


@functools.lru_cache(maxsize=4096)
def traced_implementation(target: Target, platform: str) -> Callable[..., tuple[jax.Array, ...]]:
    """``target``'s implementation for ``platform``, as one jitted function per target.

    Derived targets (derivatives, batches) transform this function, and every call of the
    target lowers it: JAX traces it once and transforms its jaxpr, where differentiating
    the Python function anew for every derived target and call site re-traced each
    forward pass once per derivative order (in the MACE training step, 2.1 of its 2.6 s
    of lowering)."""
    return jax.jit(target.implementation(platform))


@functools.lru_cache(maxsize=512)
def _jitted(target: Target):
    """One compiled program per target (an op called eagerly runs as one jitted call)."""
    return jax.jit(functools.partial(bind, target))


def _jvp(primals, tangents, *, target: Target):
    outs = bind(target, *primals)
    wrt = tuple(
        i for i, (t, a) in enumerate(zip(tangents, target.in_avals))
        if type(t) is not ad.Zero and _differentiable(a)
    )
    if not wrt:
        return outs, [ad.Zero(_tangent_aval(a)) for a in target.out_avals]
    tangents_out = bind(Linearized(target, wrt), *primals, *(tangents[i] for i in wrt))
    return outs, list(tangents_out)


def _transpose(cotangents, *args, target: Target):
    if not isinstance(target, Linearized):  # JAX transposes only what is linear
        raise TypeError(f"{target.name}: only its JVP is linear; it has no transpose")
    n = len(target.inner.in_avals)
    primals = args[:n]
    if any(ad.is_undefined_primal(p) for p in primals):
        raise TypeError(f"{target.name}: the primal inputs must be known to transpose")
    cotangents = [ad.instantiate_zeros(c) for c in cotangents]
    grads = bind(Vjp(target.inner, target.wrt), *primals, *cotangents)
    return [None] * n + list(grads)


def _batch(args, dims, *, target: Target):
    """A batch of calls as one call on bigger arrays, when the target's layouts allow.

    Pallas batches a kernel's scalar prefetch with a serial loop on TPU, and launches one
    grid per batch element on GPU: ``jax.vmap`` of a kernel is a loop of launches. The
    ops are unions of independent problems along their spaces (:class:`Layout`), so the
    batch folds into them instead: arrays of a folded space, broadcast when unmapped,
    are reshaped ``(B, n, ...) -> (B * n, ...)``, index arrays into a folded space are
    offset by ``b * n`` (out-of-range indices, which drop their row or edge, stay out of
    range), and the outputs are reshaped back. One call of the same implementation, at
    the folded sizes, hence one launch on every backend; a tangent folds like its primal,
    a cotangent like its output (the derived targets' layouts).

    Where no fold exists (an array with no axis in a space is mapped, such as shared
    weights of an ensemble, or an output has none, such as per-example gradients of
    shared weights), a :class:`Batched` call: ``jax.vmap`` of the implementations.
    """
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    mapped = tuple(d is not None for d in dims)
    args = [jnp.moveaxis(a, d, 0) if m else a for a, d, m in zip(args, dims, mapped)]
    sizes = _fold_sizes(target, mapped, size)
    if sizes is None:
        outs = bind(Batched(target, mapped, size), *args)
    else:
        outs = _folded_call(target, sizes, args, mapped, size)
    return list(outs), [0] * len(outs)


def _fold_sizes(target: Target, mapped: tuple[bool, ...], size: int) -> dict[str, int] | None:
    """The spaces a batch of ``size`` calls of ``target`` folds into, with their unbatched
    sizes, or ``None`` when it cannot fold.

    A space folds when an array with an axis in it must: a mapped input, every output
    (each batch element has its own), an input with an axis in a folded space, and an
    index array into a folded space (its offsets differ per batch element). An array
    that must fold folds all its spaces, to a fixpoint. Each folding array needs exactly
    one axis in a folded space, the axis its batch merges into.
    """
    ins, outs = target.in_layouts, target.out_layouts
    if ins is None or outs is None or size == 0:
        return None
    arrays = list(zip(target.in_avals, ins)) + list(zip(target.out_avals, outs))
    extent: dict[str, int] = {}
    for aval, layout in arrays:
        if len(layout.axes) > aval.ndim or len(layout.spaces) != len(layout.axes) - layout.axes.count(None):
            return None  # a layout longer than its array, or one space on two axes
        for space, n in zip(layout.axes, aval.shape):
            if space is not None and extent.setdefault(space, n) != n:
                return None
    must = [layout for layout, m in zip(ins, mapped) if m] + list(outs)
    if any(not layout.spaces for layout in must):
        return None
    folded = frozenset().union(*(layout.spaces for layout in must))
    while True:
        grown = folded
        for layout in ins:
            if layout.spaces & grown or layout.indexes in grown:
                if not layout.spaces:
                    return None  # an index array without a space into a folded space
                grown |= layout.spaces
        if grown == folded:
            break
        folded = grown
    for aval, layout in arrays:
        if len(layout.spaces & folded) > 1:
            return None  # a batch merges into one axis of an array, not two
        if layout.indexes in folded:
            if not jnp.issubdtype(aval.dtype, jnp.integer):
                return None
            if size * extent[layout.indexes] > np.iinfo(np.int32).max:
                return None  # offsets past int32 (the kernels' index type)
    return {space: extent[space] for space in folded}


def _folded_call(target: Target, sizes: Mapping[str, int], args, mapped, size: int):
    """``target`` on ``size`` calls' arguments (batch axis first where ``mapped``) as one
    call with the batch folded into the spaces of ``sizes``; outputs batch-first."""
    folded_args = []
    for a, layout, m in zip(args, target.in_layouts, mapped):
        axis = _folded_axis(layout, sizes)
        if axis is None:  # unmapped, and not in a folded space: shared by every call
            folded_args.append(a)
            continue
        if not m:
            a = jnp.broadcast_to(a, (size,) + jnp.shape(a))
        if layout.indexes in sizes:
            n = sizes[layout.indexes]
            offsets = (jnp.arange(size, dtype=jnp.int32) * n).reshape((size,) + (1,) * (a.ndim - 1))
            # out of range stays out of range: -1, never another batch element's index
            a = jnp.where(in_range(a, n), a.astype(jnp.int32) + offsets, jnp.int32(-1))
        a = jnp.moveaxis(a, 0, axis)
        folded_args.append(a.reshape(a.shape[:axis] + (size * a.shape[axis + 1],) + a.shape[axis + 2:]))
    resized = target.resized({space: size * n for space, n in sizes.items()})
    outs = bind(resized, *folded_args)
    unfolded = []
    for out, layout in zip(outs, target.out_layouts):
        axis = _folded_axis(layout, sizes)
        out = out.reshape(out.shape[:axis] + (size, sizes[layout.axes[axis]]) + out.shape[axis + 1:])
        unfolded.append(jnp.moveaxis(out, axis, 0))
    return unfolded


def _folded_axis(layout: Layout, sizes: Mapping[str, int]) -> int | None:
    return next((k for k, space in enumerate(layout.axes) if space in sizes), None)


def _lowering(platform: str):
    def lower(ctx, *args, target: Target):
        implementation = traced_implementation(target, platform)
        if target.in_row_axes is not None and _partitioned_over_devices(ctx):
            implementation = _row_partitioned(target, implementation)
        # The implementations are per-device code without collectives: traced on plain
        # types, they need no shard_map varying-axes annotations of their own.
        ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in])
        lowering = mlir.lower_fun(lambda *a: tuple(implementation(*a)), multiple_results=True)
        with config._check_vma(False), _lowering_gpu(platform, target.name):
            return lowering(ctx, *args)

    return lower


# ---- the GPU a CUDA lowering is for, on a host without one ---------------------------------
#
# From JAX 0.11 on, Pallas lowers a Triton kernel for a known GPU: the attached one, or the
# abstract device of the current abstract mesh. JAX's advice for a host without a GPU,
# `jax.sharding.use_abstract_mesh` around the lowering, is refused for programs with
# e3kernels ops (their lowering needs the concrete devices, for the multi-device rule), so
# e3kernels applies the abstract device around its own lowering only: `gpu_target`.

_gpu_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("e3kernels_gpu_target", default=None)
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@contextlib.contextmanager
def gpu_target(device_kind: str) -> Iterator[None]:
    """Lower CUDA kernels for ``device_kind`` (``"NVIDIA H100"``, ``"NVIDIA A100"``: a name
    JAX's Pallas knows) when the host has no GPU: exporting for ``("cuda", "tpu", "cpu")``
    from a laptop, or checking a CUDA lowering on a CPU-only machine. JAX >= 0.11 needs it
    there; with a GPU attached, or JAX 0.10, the GPU lowered for is the attached one, or
    none, and this has no effect.

    >>> import e3kernels
    >>> with e3kernels.gpu_target("NVIDIA H100"):
    ...     pass  # jax.jit(f).trace(...).lower(lowering_platforms=("cuda",)), jax.export(...)
    """
    if not isinstance(device_kind, str) or not device_kind.startswith(("NVIDIA", "Tesla")):
        raise ValueError(
            f"gpu_target: expected an NVIDIA device kind such as 'NVIDIA H100'; got {device_kind!r}"
        )
    token = _gpu_target.set(device_kind)
    try:
        yield
    finally:
        _gpu_target.reset(token)


def abstract_gpu_mesh(device_kind: str) -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh of the GPU ``device_kind``, which Pallas lowers Triton for."""
    device = jax.sharding.AbstractDevice(device_kind, None, "gpu")
    return jax.sharding.AbstractMesh((1,), ("e3kernels_gpu",), abstract_device=device)


@contextlib.contextmanager
def _lowering_gpu(platform: str, op: str) -> Iterator[None]:
    if platform != "cuda":
        yield
        return
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    attached = abstract is not None and abstract.platform in _GPU_PLATFORMS
    attached = attached or jax.devices()[0].platform in _GPU_PLATFORMS
    kind = _gpu_target.get()
    context = contextlib.nullcontext()
    if not attached and kind is not None:
        context = jax.sharding.use_abstract_mesh(abstract_gpu_mesh(kind))
    try:
        with context:
            yield
    except RuntimeError as error:
        if "No supported GPU devices found" not in str(error):
            raise
        raise RuntimeError(
            f"{op}: lowering its Triton kernels for CUDA needs the GPU they are for, and this "
            "host has none (JAX >= 0.11 lowers Triton for a known GPU). Lower inside "
            "`with e3kernels.gpu_target('NVIDIA H100'):` (or the GPU you will run on), or lower "
            "the reference for CUDA (backend='reference')."
        ) from error


# ---- sharded jit: every device computes its own rows --------------------------------------
#
# Under a sharded ``jax.jit`` XLA's SPMD partitioner sees the op as opaque code: it would
# gather every row onto every device (the sort that groups rows by weight set cannot be
# partitioned along the sorted axis). The op is row-wise, so its lowering, when
# partitioned over several devices, is a ``custom_partitioning`` call whose rule keeps the
# rows where they are: each device runs the platform's implementation on its own rows, and
# an output without rows (a weight gradient: a sum over rows) is summed over the devices,
# once. Inputs without rows (weights) are replicated.


def _partitioned_over_devices(ctx) -> bool:
    """Lowered by jit for several real devices. Not for ``jax.export``: a serialized
    program cannot carry the partitioning rule (a Python callback), so an exported
    multi-device program runs the op on all rows."""
    axis_context = ctx.module_context.axis_context
    return (
        not ctx.module_context.lowering_parameters.for_export
        and isinstance(axis_context, sharding_impls.ShardingContext)
        and axis_context.device_assignment is not None
        and axis_context.num_devices > 1
    )


def _row_mesh_axes(arg_shapes, row_axes) -> tuple[str, ...] | None:
    """The mesh axes the first row input's rows are split over, or ``None`` (replicate the
    rows) when they are not split, not split evenly, or not by named mesh axes."""
    for shape, axis in zip(arg_shapes, row_axes):
        if axis is None:
            continue
        sharding = shape.sharding
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        axes = _mesh_axes_at(sharding.spec, axis)
        if axes is None:
            return None
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if shape.shape[axis] % int(np.prod([sharding.mesh.shape[a] for a in axes])):
            return None
        return axes
    return None


def _rows_sharding(mesh, mesh_axes, shape, row_axis):
    return jax.sharding.NamedSharding(mesh, _rows_spec(shape, row_axis, mesh_axes))


def _sharding_rule(target: Target):
    """Shardy's rule: one factor ``n`` for the rows, and every other dimension replicated."""
    replicated = []  # every factor but "n", each named once

    def mapping(aval, row_axis, prefix):
        names = []
        for d in range(len(aval.shape)):
            if d == row_axis:
                names.append("n")
            else:
                replicated.append(f"{prefix}{len(replicated)}")
                names.append(replicated[-1])
        return " ".join(names)

    operands = [mapping(a, r, "i") for a, r in zip(target.in_avals, target.in_row_axes)]
    results = [mapping(a, r, "o") for a, r in zip(target.out_avals, target.out_row_axes)]
    reduction = () if any(r is not None for r in target.out_row_axes) else ("n",)
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    return rule, dict(need_replication_factors=tuple(replicated), reduction_factors=reduction)


def _row_partitioned(target: Target, implementation):
    in_rows, out_rows = target.in_row_axes, target.out_row_axes

    def shardings(mesh, arg_shapes, result_shapes):
        mesh_axes = _row_mesh_axes(arg_shapes, in_rows)
        args = tuple(_rows_sharding(mesh, mesh_axes, s, r) for s, r in zip(arg_shapes, in_rows))
        results = tuple(_rows_sharding(mesh, mesh_axes, s, r) for s, r in zip(result_shapes, out_rows))
        return mesh_axes, args, results

    def partition(mesh, arg_shapes, result_shapes):
        mesh_axes, args, results = shardings(mesh, arg_shapes, result_shapes)

        def per_device(*local):
            # Per-device code, traced without the caller's mesh: under Explicit mesh axes
            # JAX 0.12 would annotate its values (and the psum's reduction) with sharding
            # custom calls that no partitioner removes once the module is partitioned, and
            # XLA then fails ("No registered implementation for untyped custom call to
            # Sharding").
            with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
                outs = tuple(implementation(*local))
                if not mesh_axes:
                    return outs
                return tuple(o if r is not None else jax.lax.psum(o, mesh_axes)
                             for o, r in zip(outs, out_rows))

        return mesh, per_device, results, args

    def infer_sharding_from_operands(mesh, arg_shapes, result_shapes):
        return shardings(mesh, arg_shapes, result_shapes)[2]

    # jit closes the implementation's constants (custom_partitioning accepts none of its own)
    partitioned = custom_partitioning(jax.jit(lambda *args: tuple(implementation(*args))))
    rule, factors = _sharding_rule(target)
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=rule,
        **factors,
    )
    return partitioned


ad.primitive_jvps[call_p] = _jvp
ad.primitive_transposes[call_p] = _transpose
batching.primitive_batchers[call_p] = _batch
for _platform in PLATFORMS:
    mlir.register_lowering(call_p, _lowering(_platform), platform=_platform)
# jit then lowers with its devices known, which the partitioning rule needs
jax_dispatch.prim_requires_devices_during_lowering.add(call_p)


# ---- the entry point of the ops ------------------------------------------------------------


def call(
    name: str,
    key: Hashable | None,
    implementations: Mapping[str, Callable[..., jax.Array]],
    out: jax.ShapeDtypeStruct,
    args: Sequence,
    row_axes: Sequence[int | None] | None = None,
    out_row_axis: int | None = 0,
    spaces: Sequence[str] | None = None,
    out_spaces: str | None = None,
) -> jax.Array:
    """``implementations[platform](*args)`` for the platform the program is lowered for.

    Args:
      name: the op's name (error messages, and the ``jaxpr``).
      key: everything static the implementations depend on (plan, backend, precision):
        two calls with equal names, keys and argument types must compute the same.
        ``None``: this call shares nothing.
      implementations: one function per name of :data:`PLATFORMS`, each taking ``args``
        and returning one array of type ``out``.
      out: the output's shape and dtype, the same on every platform.
      args: the op's arguments, a pytree (``None`` leaves allowed).
      row_axes: for a row-wise op, per argument of ``args``, the axis of its rows (the
        output's rows are its axis 0), or ``None`` for an argument shared by all rows.
        Under a sharded ``jax.jit`` each device then computes its own rows.
      out_row_axis: with ``row_axes``, the output's row axis, or ``None`` for an output
        that sums over the rows (each device sums its own, then one all-reduce).
      spaces: per argument of ``args`` (each of its arrays), its :class:`Layout` as a
        string: ``"row"``, ``"species"``, ``"edge -> node"``, ``""``. With ``out_spaces``,
        ``jax.vmap`` of the op folds the batch into these spaces, one call at bigger sizes
        (one kernel launch), so the implementations must compute every size from their
        arguments' shapes. ``None``: ``jax.vmap`` maps the implementations.
      out_spaces: the output's layout.
    """
    leaves, tree = jax.tree_util.tree_flatten(args)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    per_leaf = lambda per_arg: tuple(
        value for arg, value in zip(args, per_arg, strict=True) for _ in jax.tree_util.tree_leaves(arg)
    )
    in_row_axes = None if row_axes is None else per_leaf(row_axes)
    in_layouts = out_layouts = None
    if spaces is not None and out_spaces is not None:
        in_layouts = per_leaf([Layout.parse(spec) for spec in spaces])
        out_layouts = (Layout.parse(out_spaces),)

    def flat(implementation):
        return lambda *flat_args: (implementation(*jax.tree_util.tree_unflatten(tree, flat_args)),)

    target = Op(
        name=name,
        key=object() if key is None else (key, tree),
        in_avals=tuple(core.ShapedArray(np.shape(v), v.dtype) for v in leaves),
        out_avals=(core.ShapedArray(out.shape, out.dtype),),
        in_row_axes=in_row_axes,
        out_row_axes=None if row_axes is None else (out_row_axis,),
        implementations={p: flat(implementations[p]) for p in PLATFORMS},
        in_layouts=in_layouts,
        out_layouts=out_layouts,
    )
    return bind(target, *leaves)[0]
