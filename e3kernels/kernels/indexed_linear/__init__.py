"""Fused Pallas kernels of ``indexed_linear``, forward and backward, for GPU and TPU.

The op (see :func:`e3kernels.reference.indexed_linear.indexed_linear`): for every weight
block ``b`` and row ``n`` with ``s = indices[n]``,
``out[n, out_b + v*d + m] += pw_b * sum_u x[n, in_b + u*d + m] * W_b[s, u, v]``, plus
``pw * bias[s]`` on scalar columns; rows with ``s`` outside ``[0, S)`` are NaN.

Algorithm: a grouped matmul over rows sorted by index.

1. The wrapper sorts the rows by index once per call (a stable argsort; invalid indices go
   to an extra group ``S``, sorted last) and finds each group's bounds
   (``e3kernels.grouping.group_rows``). The weights are never gathered per row.
2. A static-size tile schedule cuts every group into tiles of ``tile_rows`` sorted rows:
   at most ``cdiv(N, tile_rows) + S`` tiles, each with (group, first position, end). A tile
   never straddles two groups, so each multiplies by exactly one weight set.
3. The kernel of a tile, for each irrep component ``m``, multiplies its ``(rows, mul_in)``
   slice of ``x`` by ``W_b[group]`` (one dot per ``m``, blocks of one output block
   accumulated in float32), adds the biases, and writes the rows; invalid-group rows
   are written as NaN, and output columns no block reaches as zeros.

GPU (Triton lowering, ``_triton``): the kernel reads the tile's rows straight from
e3nn's flat layout, gathering rows through the sorted row ids and columns
``u * d + m`` with a masked strided index, and scatters results to the original rows.
All blocks of the plan run in one ``pallas_call`` (grid: tile x output chunk). So ``x``
is read once and ``out`` written once, no permuted or transposed copy: at the MACE size
the op is bandwidth-bound or close to it, and every extra XLA pass over ``x`` would cost
as much as the kernel's own traffic.

TPU (Mosaic, ``_mosaic``): gathering rows in a kernel does not fit Mosaic's
DMA-a-block model, so the wrapper gathers ``x`` into a group-padded, component-major
layout ``(d, slots, mul)`` and a megablox-style grouped matmul picks the weight block
from the tile's group in scalar prefetch (``PrefetchScalarGridSpec``). This costs two
extra passes over ``x`` and ``out`` (fused by XLA with the sort), traded for plain
``(rows, mul) @ (mul_in, mul_out)`` MXU matmuls on aligned blocks.

Backward: the ``custom_vjp`` rules of ``e3kernels.grouped_linear`` (shared with the
reference), with this module's kernels as the engine: the input gradient is the same
grouped matmul with the transposed plan and weights, and the weight gradient a kernel
writing per-tile partial sums ``sum_{n in tile, m} x[n, :, m]^T g[n, :, m]``, which XLA
sums by group with a one-hot matmul at float32 precision (deterministic, unlike a float
scatter-add). Gradients of gradients (force training) run on kernels too.

Cost at the MACE size (``128x0e+128x1o+128x2e+128x3o``, S = 10, N = 4000, float32):
2 * N * 128 * 128 * (1 + 3 + 5 + 7) = 2.1 GFLOP; bytes: x 32.8 MB + out 32.8 MB +
weights 2.6 MB = 68 MB. On an H100 (3.35 TB/s, 67 TFLOP/s FP32 without tensor cores) that
is 20 us of traffic against 31 us of FP32 math at peak: at full float32 precision the
forward is compute-bound by a little, with TF32 (opt-in, below) it is memory-bound.
The backward does this twice (input and weight gradients) plus small partial sums.

Block sizes. GPU: tiles of 16 or 32 rows (16 when groups are small, to waste less of the
last tile of each group); forward chunks of at most 64 channels per dot operand (32 at
``HIGHEST``, whose dots are FMAs), the weight tiles loaded once per program and kept in
registers for every ``m``, which a loop visits (unrolled, the compiler kept every ``m``'s
gather addresses live and spilled); 4 warps. At the MACE size the grid is 135 tiles x 8
output chunks = 1080 programs, about 8 per SM of an H100, with no spills (ptxas, ``make
compile-check``). Weight-gradient programs sum 128 rows each (4 sub-tiles in a loop),
so the partials (42 tiles x 64 KiB per block) stay small against ``x``. TPU: tiles of
16 to 128 rows, so the per-``m`` matmul is (128, 128) @ (128, 128) at the MACE size; the
weight gradient uses 128-row tiles (the lane dimension of its ``(d, mul, rows)`` blocks).

Precision: JAX's contract, as the reference: float32 operands are multiplied at the
op's ``precision`` (``DEFAULT``: TF32 on GPU, one bfloat16 pass on TPU; ``HIGH``: 3xTF32
or three passes; ``HIGHEST``: IEEE float32). 16-bit operands multiply in their dtype;
accumulation is float32 and the output has ``x``'s dtype. float64 has no kernel (the
reference runs it, in float64).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from e3kernels import grouped_linear
from e3kernels.grouping import Grouping, sum_by_group
from e3kernels.irreps import LinearPlan
from e3kernels.kernels._common import KernelConfig, why_not_dtype
from e3kernels.kernels.indexed_linear import _mosaic, _triton

#: the kernel family of each platform
PLATFORMS = {"gpu": "triton", "tpu": "mosaic"}


def implementations(plan: LinearPlan, precision: lax.Precision, dtype) -> dict[str, Callable] | str:
    """The kernels for ``plan``: ``{"gpu", "tpu", "interpret"}`` -> ``f(x, weights, biases, indices)``,
    or why none handles inputs of ``dtype`` (float64).

    ``"interpret"`` is the GPU-style kernel in Pallas interpret mode (what backend
    ``"pallas"`` runs on CPU); tests reach the TPU-style kernel in interpret mode with
    ``indexed_linear(..., platform="tpu", interpret=True)``. Every plan is handled (empty
    blocks, zero multiplicities and bias-only plans included).
    """
    if (reason := why_not_dtype(dtype)) is not None:
        return reason
    options = dict(plan=plan, precision=precision)
    return {
        "gpu": functools.partial(indexed_linear, platform="gpu", **options),
        "tpu": functools.partial(indexed_linear, platform="tpu", **options),
        "interpret": functools.partial(indexed_linear, platform="gpu", interpret=True, **options),
    }


def indexed_linear(x, weights, biases, indices, *, plan: LinearPlan, platform: str = "gpu",
                   precision: lax.Precision = lax.Precision.DEFAULT, interpret: bool = False):
    """Drop-in for the reference ``indexed_linear`` running the ``platform`` kernels.

    Args:
      x: ``(N, plan.dim_in)`` float32 or bfloat16.
      weights: one ``(S, mul_in, mul_out)`` array per ``plan.blocks``.
      biases: one ``(S, mul)`` array per ``plan.biases``.
      indices: ``(N,)`` integers; rows outside ``[0, S)`` come out NaN.
      plan: the static :class:`~e3kernels.irreps.LinearPlan`.
      platform: ``"gpu"`` (Triton lowering) or ``"tpu"`` (Mosaic).
      precision: of the float32 dots (see the module doc).
      interpret: run the kernels in Pallas interpret mode (on any backend, e.g. CPU).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"indexed_linear: platform must be one of {tuple(PLATFORMS)}; got {platform!r}")
    config = KernelConfig(PLATFORMS[platform], interpret=interpret)
    make_engine = lambda num_rows, num_sets: _Kernels(config, precision, num_rows, num_sets)
    return grouped_linear.indexed_linear(make_engine, plan, x, weights, biases, indices)


@dataclasses.dataclass(frozen=True)
class _Kernels:
    """The :class:`~e3kernels.grouped_linear.Engine` of the kernels, with their tile sizes;
    static (hashable) for ``custom_vjp``."""

    config: KernelConfig
    precision: lax.Precision
    num_rows: int
    num_groups: int

    def _tile_rows(self, low: int, high: int) -> int:
        """The power of two in ``[low, high]`` nearest above the mean group size: large
        tiles reuse a weight tile over more rows, small ones waste less padding per group."""
        mean = -(-self.num_rows // self.num_groups)
        return min(max(low, 1 << (mean - 1).bit_length()), high)

    def apply(self, plan, x, weights, biases, grouping: Grouping, fill: float):
        if self.config.family == "triton":
            config = dataclasses.replace(self.config, tile_rows=self._tile_rows(16, 32))
            kernels = _triton
        else:
            config = dataclasses.replace(self.config, tile_rows=self._tile_rows(16, 128))
            kernels = _mosaic
        return kernels.apply(plan, x, weights, biases, grouping, self.num_groups, fill,
                             precision=self.precision, config=config)

    def weight_grad(self, plan, x, g, grouping: Grouping):
        """``(S, mul_in, mul_out)`` float32 per block: ``pw * sum_{n in s, m} x^T g``."""
        if self.config.family == "triton":
            config, kernels = dataclasses.replace(self.config, tile_rows=32), _triton
        else:
            config, kernels = self.config, _mosaic
        partials, tile_group = kernels.weight_partials(plan, x, g, grouping, self.num_groups,
                                                       precision=self.precision, config=config)
        return tuple(
            jnp.zeros((self.num_groups, b.mul_in, b.mul_out), jnp.float32) if p is None
            else sum_by_group(p, tile_group, self.num_groups)
            for b, p in zip(plan.blocks, partials)
        )
