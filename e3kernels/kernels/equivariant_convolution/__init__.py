r"""Fused Pallas kernels for ``equivariant_convolution`` (GPU: Triton lowering, TPU: Mosaic).

The op and every derivative of it are partials of one multilinear form (see
:mod:`e3kernels.reference.equivariant_convolution`, whose :func:`form_partial` wires the
differentiation): the kernels implement the four partials (five with fused radial weights),
:class:`KernelPartials`.

* ``dF/dg`` (the convolution) and ``dF/dx``: *node partials*. The edges are sorted by the
  node they sum into (receivers, senders; :func:`e3kernels.grouping.group_rows`), and each
  node's edges are summed in a fixed order by one program (deterministic: no atomics).
  A block of edges at a time, the program gathers the other end's node features, the
  edges' spherical harmonics and weights, and runs the tensor product's nonzero terms
  (:func:`._columns.column_terms`) in float32 registers: the messages exist only there.
* ``dF/dw`` and ``dF/dsh``: *edge partials*, one block of edges per program, in the edges'
  own order; ``dF/dsh`` sums over channels, per channel block, and XLA adds the blocks.

Fused radial weights (``w[e] = h[e] @ W``; the form in ``(x, sh, h, g, W)``): every kernel
that reads weights forms a tile's weights from its edges' hidden rows, one matmul per path
on tensor cores (Triton) or the MXU (Mosaic), and ``dF/dw`` is replaced by ``dF/dh`` (each
path's ``dF/dw`` tile contracted with ``W``, per edge) and ``dF/dW`` (``h^T @ dF/dw`` summed
over edges in a fixed order). No ``(E, P, C)`` array is written or read on any path.
The matmuls run at the op's ``precision`` (JAX's contract, as the reference's).

Arithmetic at MACE's second interaction (``0e+1o`` x ``0e+1o+2e+3o`` -> ``0e+1o+2e+3o``, C =
128): 86 nonzero terms, ~260 FLOP per edge and channel for the convolution, against the 40
output columns written per node: HBM traffic is the gathered sender rows (16 B per
channel), the weights (40 B per channel) and the spherical harmonics per edge, ~7 kB per
edge, so ~2 FLOP per byte at 5000 edges: memory-bound, as the messages never reach HBM.
Fused, an edge's weights (5 kB) become its hidden row (256 B at H = 64), for 2 * H * P * C
more FLOP per edge (P = 10 paths) on tensor cores or the MXU: at 120,000 edges, ~20 GFLOP
in place of ~1.2 GB of weights written and read.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from e3kernels.grouping import counted_edges
from e3kernels.irreps import ConvolutionPlan
from e3kernels.kernels._common import MOSAIC as MOSAIC  # re-exported: the configs tests run
from e3kernels.kernels._common import MOSAIC_INTERPRET as MOSAIC_INTERPRET  # the TPU kernels on CPU
from e3kernels.kernels._common import TRITON as TRITON
from e3kernels.kernels._common import TRITON_INTERPRET as TRITON_INTERPRET
from e3kernels.kernels._common import KernelConfig, per_config
from e3kernels.kernels.equivariant_convolution import _mosaic, _triton
from e3kernels.reference.equivariant_convolution import (
    MATRIX,
    OUT,
    WEIGHTS,
    X,
    convolve,
    has_no_work,
    partial_shape,
)


def implementations(plan: ConvolutionPlan, avg_num_neighbors: float, dtype) -> dict[str, Callable] | str:
    """``{"gpu", "tpu", "interpret"}`` implementations ``f(x, sh, weights, senders,
    receivers)``, or why there are none."""
    return per_config(equivariant_convolution, dtype, plan=plan, avg_num_neighbors=avg_num_neighbors)


def radial_implementations(plan: ConvolutionPlan, avg_num_neighbors: float, dtype,
                           precision) -> dict[str, Callable] | str:
    """As :func:`implementations`, for fused radial weights: ``f(x, sh, hidden, matrix,
    senders, receivers)`` with ``matrix`` ``(H, P, C)``."""
    return per_config(radial_equivariant_convolution, dtype, plan=plan, avg_num_neighbors=avg_num_neighbors,
                      precision=precision)


def equivariant_convolution(x, sh, weights, senders, receivers, *, plan: ConvolutionPlan,
                            avg_num_neighbors: float, config: KernelConfig):
    """The op on ``config``'s kernels (``MOSAIC_INTERPRET`` runs the TPU kernels on CPU)."""
    return convolve(KernelPartials(plan, config), x, sh, weights, senders, receivers, avg_num_neighbors)


def radial_equivariant_convolution(x, sh, hidden, matrix, senders, receivers, *, plan: ConvolutionPlan,
                                   avg_num_neighbors: float, config: KernelConfig, precision):
    """The op with fused radial weights (``matrix`` ``(H, P, C)``) on ``config``'s kernels."""
    return convolve(KernelPartials(plan, config, precision), x, sh, hidden, senders, receivers,
                    avg_num_neighbors, matrix)


class KernelPartials:
    """The form's partials on one kernel family (see the module's docstring); ``precision``:
    of the fused radial weights' matmuls."""

    def __init__(self, plan: ConvolutionPlan, config: KernelConfig, precision=None):
        self.plan, self.config, self.precision = plan, config, precision

    def __hash__(self):
        return hash((type(self), self.plan, self.config, self.precision))

    def __eq__(self, other):
        return type(other) is type(self) and (other.plan, other.config, other.precision) == (
            self.plan, self.config, self.precision)

    def __call__(self, which, out_dtype, args, senders, receivers, num_nodes):
        family = {"triton": _triton, "mosaic": _mosaic}[self.config.family]
        x, sh, weights, g = args[:4]
        fused = len(args) > MATRIX
        plan, config = self.plan, self.config
        if has_no_work(args, senders, num_nodes):
            return jnp.zeros(partial_shape(plan, which, args, senders.shape[0], num_nodes), out_dtype)
        # the one edge rule, in XLA: node partials then never visit a dropped edge, and edge
        # partials test its ends in the kernel (edge_in_range) to skip it
        _, senders, receivers = counted_edges(senders, receivers, num_nodes)
        kernels = dict(config=config, precision=self.precision)
        if which == MATRIX:
            return family.matrix_partial(plan, x, sh, g, weights, senders, receivers, out_dtype, **kernels)
        if which == WEIGHTS:
            if fused:
                return family.hidden_partial(plan, x, sh, g, args[MATRIX], senders, receivers, out_dtype,
                                             **kernels)
            return family.weights_partial(plan, x, sh, g, senders, receivers, out_dtype, config=config)
        weights = (weights, args[MATRIX]) if fused else (weights,)
        if which == OUT:
            return family.node_partial(plan, OUT, x, sh, weights, senders, receivers, out_dtype, **kernels)
        if which == X:
            return family.node_partial(plan, X, g, sh, weights, receivers, senders, out_dtype, **kernels)
        return family.sh_partial(plan, x, weights, g, senders, receivers, out_dtype, **kernels)
