"""Static column bookkeeping for the indexed-linear kernels, derived from a LinearPlan.

The kernels write every output column exactly once (GPU outputs are not zero-initialised),
so the output row is cut into *segments*: one per output block of the plan, holding the
weight blocks and biases that add into it, and zero segments for the columns no path
reaches. Segments are in column order and cover ``[0, dim_out)``.
"""

from __future__ import annotations

import dataclasses

from e3kernels.irreps import LinearBlock, LinearPlan


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
