r"""Fused Pallas kernels for ``symmetric_contraction`` (GPU: Triton lowering, TPU: Mosaic).

Algorithm ("weights first", then one sparse polynomial per row and channel):

1. Once per plan (numpy, :func:`e3kernels.symmetric_terms.symmetric_terms`): the plan's
   basis is symmetrised over sorted monomials ``J = (j1 <= .. <= j_order)`` and its
   nonzero ``(J, output column)`` pairs become *terms*, each with a coefficient row
   ``A[t, :]`` over the paths' ``mul`` axes.
2. Per call, a small XLA einsum ``B[s, t, c] = sum_k A[t, k] W[s, k, c]`` (``S = 1`` for
   shared weights), then one kernel computes, for every row ``n`` and channel ``c``,
   ``out[n, c, o_t] += B[s_n, t, c] * prod_{j in J_t} x[n, c, j]``, in float32, as a loop
   over the term table (``_term_loop``): the kernel's code is the same for any term list.
   With indexed weights rows are sorted by index (``e3kernels.grouping``), so that a tile
   of rows reads one ``B[s]``; rows with an invalid index form their own tiles, written as
   NaN.
3. The backward passes are the same kernels with derived term lists
   (``e3kernels.sparse_polynomial``: input gradients are polynomials again, coefficient
   gradients per-tile row sums), so any order of differentiation runs the same two
   kernels; the weights' gradient then flows through the einsum of step 2. This is the
   reference's own function (``reference.symmetric_contraction.contract``) on a kernel
   evaluator.

Cost at MACE-M (``0e+1o+2e+3o``, orders 1-3, keep ``0e+1o``, C = 128): the basis is 98.9 %
zeros, so the forward is 410 terms (order 3: 355 of the 816 sorted monomials x output
components; order 2: 51; order 1: 4), ~1.6 kFLOP per channel, ~200 kFLOP per row, against
~1 MFLOP for a dense contraction of the basis. A term reads its variables' planes (from
L1 or VMEM after the first term that reads them) and one coefficient row; the input
gradient has 993 terms, the weight gradient 410, second-order gradients ~2700.

Why a loop and not the terms unrolled into straight-line code (what these kernels were
before, with shared prefix products): unrolled, the H100 compile of the forward took 88 s,
its gradient 191 s and a force-style second order 682 s, with register spills; looped,
0.5 s, 1.0 s and 1.2 s, 40 registers and no spill (``make compile-check``).

Orders above 4 (and term lists above ``MAX_TERMS``) are not handled
(:func:`why_unsupported`): the terms grow like ``dim_in ** order / order!``, and the term
table lives in TPU SMEM and each weight set's coefficient rows in one VMEM block.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from e3kernels.irreps import SymmetricPlan
from e3kernels.kernels._common import MOSAIC as MOSAIC  # re-exported: the configs tests run
from e3kernels.kernels._common import MOSAIC_INTERPRET as MOSAIC_INTERPRET  # the TPU kernels on CPU
from e3kernels.kernels._common import TRITON as TRITON
from e3kernels.kernels._common import TRITON_INTERPRET as TRITON_INTERPRET
from e3kernels.kernels._common import KernelConfig, per_config
from e3kernels.reference.symmetric_contraction import contract
from e3kernels.symmetric_terms import SparsePolynomial, symmetric_terms

MAX_ORDER = 4
#: beyond this, a term table column outgrows the SMEM budget the TPU index-memory test
#: holds every kernel to, and a weight set's coefficient rows a 2 MiB VMEM block
MAX_TERMS = 4096


def why_unsupported(plan: SymmetricPlan) -> str | None:
    """Why the kernels cannot run ``plan``, or ``None`` when they can."""
    if max(plan.orders) > MAX_ORDER:
        return f"orders above {MAX_ORDER} have too many terms (got orders {plan.orders})"
    return why_too_many_terms(symmetric_terms(plan).polynomial)


def why_too_many_terms(poly: SparsePolynomial) -> str | None:
    """Why the kernels cannot run ``poly`` (more than :data:`MAX_TERMS` terms), or ``None``."""
    if len(poly.terms) > MAX_TERMS:
        return f"{len(poly.terms)} nonzero terms; the kernels handle at most {MAX_TERMS}"
    return None


def implementations(plan: SymmetricPlan, dtype) -> dict[str, Callable] | str:
    """``{"gpu", "tpu", "interpret"}`` implementations ``f(x, weights, indices)`` of the
    reference's signature, or the reason (:func:`why_unsupported`) there are none.

    Tests reach the TPU kernels on CPU with ``symmetric_contraction(..., config=MOSAIC_INTERPRET)``.
    """
    reason = why_unsupported(plan)
    if reason is not None:
        return reason
    return per_config(symmetric_contraction, dtype, plan=plan)


def symmetric_contraction(x, weights, indices, *, plan: SymmetricPlan, config: KernelConfig):
    """The reference's ``symmetric_contraction`` on ``config``'s kernels (e.g.
    ``MOSAIC_INTERPRET`` runs the TPU kernels on CPU), summing in float32."""
    return contract(x, tuple(weights), indices, plan, config, jnp.float32)
