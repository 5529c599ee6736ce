"""The vocabulary every op's kernels share (``kernels/<op>/``, Triton and Mosaic): how a
kernel is launched, its dot, the TPU vreg and its slabs, and a tile's row sum.

The tile schedule all kernels run over is :class:`e3kernels.grouping.RowTiles`, shared
with the CPU reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from e3kernels.grouping import cdiv

FAMILIES = ("triton", "mosaic")
#: a TPU vreg: 8 sublanes x 128 lanes of 32 bits
SUBLANES, LANES = 8, 128


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which kernel family runs and how it is launched; static (hashable) for ``custom_vjp``.

    Attributes:
      family: ``"triton"`` (GPU) or ``"mosaic"`` (TPU).
      interpret: run the kernels in Pallas interpret mode (on any backend, e.g. CPU).
      tile_rows: rows per tile; ``None`` lets each kernel choose. Small tiles keep
        interpret-mode tests fast while still spanning several tiles.
      num_warps, num_stages: Triton's launch parameters (Mosaic has none).
    """

    family: str
    interpret: bool = False
    tile_rows: int | None = None
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"KernelConfig: family must be one of {FAMILIES}; got {self.family!r}")

    @property
    def pallas_interpret(self) -> Any:
        """``pallas_call``'s ``interpret`` argument: Mosaic kernels interpret with TPU semantics."""
        if not self.interpret:
            return False
        return pltpu.InterpretParams() if self.family == "mosaic" else True

    def triton_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


#: each family with its default launch, for real hardware and in interpret mode (tests
#: run the TPU kernels on CPU with ``MOSAIC_INTERPRET``)
TRITON = KernelConfig("triton")
TRITON_INTERPRET = KernelConfig("triton", interpret=True)
MOSAIC = KernelConfig("mosaic")
MOSAIC_INTERPRET = KernelConfig("mosaic", interpret=True)


def why_not_dtype(dtype) -> str | None:
    """Why no kernel runs inputs of ``dtype``, or ``None``: every kernel accumulates in
    float32, so float64 runs on the reference."""
    if jnp.dtype(dtype) == jnp.float64:
        return "float64 inputs run on the reference (the kernels accumulate in float32)"
    return None


def per_config(op, dtype, /, **static) -> dict[str, Any] | str:
    """``{"gpu", "tpu", "interpret"}`` -> ``op`` with that platform's config (Triton, Mosaic,
    Triton in interpret mode on CPU) and ``static`` bound, or why no kernel takes ``dtype``."""
    if (reason := why_not_dtype(dtype)) is not None:
        return reason
    return {name: functools.partial(op, config=config, **static)
            for name, config in (("gpu", TRITON), ("tpu", MOSAIC), ("interpret", TRITON_INTERPRET))}


def power_of_two_block(size: int, widest: int | None = None) -> int:
    """A Triton block of ``size`` elements (channels): the power of two at least ``size``,
    as Triton's block shapes must be, at most ``widest`` (if given)."""
    block = 1 << (max(size, 1) - 1).bit_length()
    return block if widest is None else min(widest, block)


def lane_padded(num_channels: int) -> int:
    """``num_channels`` rounded up to whole 128-lane blocks: a Mosaic kernel's channel axis."""
    return cdiv(num_channels, LANES) * LANES


def dot(a, b, precision: lax.Precision, contract_rows: bool = False, split_high: bool = False,
        contract_columns: bool = False):
    """``a @ b`` (``a.T @ b`` with ``contract_rows``, ``a @ b.T`` with ``contract_columns``)
    accumulated in float32.

    Float32 operands multiply at ``precision`` (JAX's contract); 16-bit operands multiply
    in their own dtype, where precision has no meaning. ``split_high`` computes ``HIGH``
    as XLA does on TPU, three bfloat16 passes (``hi*hi + hi*lo + lo*hi``), for Mosaic,
    which has no such dot.
    """
    dtype = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    dims = (((0,), (0,)) if contract_rows else ((1,), (1,)) if contract_columns else ((1,), (0,)), ((), ()))
    if dtype != jnp.float32:
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    if split_high and precision == lax.Precision.HIGH:
        a_hi, b_hi = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        a_lo = (a - a_hi.astype(jnp.float32)).astype(jnp.bfloat16)
        b_lo = (b - b_hi.astype(jnp.float32)).astype(jnp.bfloat16)
        passes = ((a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))
        return sum(lax.dot_general(x, y, dims, preferred_element_type=jnp.float32) for x, y in passes)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def for_each_slab(row_block: int, body) -> None:
    """Run ``body(rows)`` on each 8-row slab (one vreg high) of a ``row_block``-row tile."""

    def step(i, carry):
        body(pl.ds(pl.multiple_of(i * SUBLANES, SUBLANES), SUBLANES))
        return carry

    lax.fori_loop(0, row_block // SUBLANES, step, 0)


def row_sum(tile, keepdims: bool = False):
    """The sum over a tile's rows (axis 0)."""
    total = lax.reduce(tile, np.array(0, tile.dtype), lax.add, (0,))
    return lax.expand_dims(total, (0,)) if keepdims else total
