"""Reference (pure jax.numpy) symmetric contraction: the plan's sparse polynomial, unrolled.

What it computes (the specification, see :func:`e3kernels.ops.symmetric_contraction`)::

    out[n, c, i] = sum_paths sum_k W_p[s_n, k, c] sum_{j_1..j_nu} U_p[j_1, .., j_nu, k, i]
                   * x[n, c, j_1] * ... * x[n, c, j_nu]

:func:`~e3kernels.symmetric_terms.symmetric_terms` writes this as a sparse polynomial:
terms ``(J_t, o_t)`` (a sorted monomial ``x_J = prod_{j in J} x[.., j]``, an output column)
and a coefficient matrix ``A`` with ``B[s, t, c] = sum_k A[t, k] W[s, k, c]``, ``W`` the
paths' weights concatenated along ``mul``. Hence::

    out[n, c, o] = sum_{t: o_t = o} B[s_n, t, c] x_J_t[n, c]
                 = sum_k W[s_n, k, c] P[o, k][n, c],    P[o, k] = sum_{t: o_t = o} A[t, k] x_J_t

and this module evaluates the second line ("weights last"): ``P`` is a polynomial with
static coefficients, the same for every row, and the weights come in only at the end, one
product per nonzero ``(o, k)``. Per row and channel that is a few hundred multiply-adds
(MACE-M: 410 terms), where gathering ``B[s_n]`` would move ``num_terms`` coefficients per
row and the dense basis (what e3nn contracts, per row) has ``dim_in ** order`` entries.

Algorithm. :func:`_unrolled` writes the polynomial out as a graph of ``(N, C)`` arrays:
the ``dim_in`` planes of ``x``, each monomial as its longest prefix times a plane (terms
are sorted, so prefixes are shared), each ``P[o, k]`` as a linear combination of
monomials with Python-float coefficients, then ``sum_k W[s_n, k] * P[o, k]``, the
``W[s_n, k]`` gathered as ``(N, C)`` arrays. XLA fuses that elementwise graph into a few
loops over rows; gradients of any order are plain autodiff of it.

Its size, hence compile time (and that of higher-order gradients), grows with the number
of terms. Above :data:`MAX_UNROLLED_TERMS` terms, :func:`_vectorized` evaluates the same
formula with monomials and coefficients along an array axis, on blocks of rows in
sequence (:func:`_by_row_blocks`) to bound memory: compile time is then a few seconds
whatever the plan, runtime ~10x that of the unrolled graph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from e3kernels.grouping import in_range
from e3kernels.irreps import SymmetricPlan
from e3kernels.spec import accumulation_dtype
from e3kernels.symmetric_terms import symmetric_terms

#: Plans with more terms than this use :func:`_vectorized` rather than :func:`_unrolled`.
#: Measured on a 2-core CPU (N = 1000, C = 128, indexed weights), compile times of the
#: unrolled forward+backward / force-training second-order gradient: 410 terms (MACE-M:
#: ``0e+1o+2e+3o``, orders 1-3, keep ``0e+1o``) 3 s / 11 s; 887 (keep ``0e+1o+2e``)
#: 10 s / 21 s; 1555 (keep all) 15 s / 29 s; 2091 (orders 1-4, keep ``0e+1o``) 32 s / 88 s
#: with 1 GB of temporaries, where :func:`_vectorized` takes 7 s / 11 s (and 1.2 s / 2.1 s
#: to run, against 0.35 s / 2.6 s unrolled). Every plan of orders <= 3 on irreps up to
#: ``l = 3`` stays unrolled.
MAX_UNROLLED_TERMS = 1600

#: Elements ``rows * C * size`` of one ``(size, rows, C)`` array of :func:`_vectorized`.
_VECTORIZED_BLOCK = 1 << 20


def symmetric_contraction(x, weights: Sequence[jax.Array], indices, *, plan: SymmetricPlan):
    """``(N, C, plan.dim_out)`` contraction of ``x`` ``(N, C, dim_in)`` (see module doc).

    ``weights``: one ``(mul, C)`` array per path, or ``(S, mul, C)`` selected per row by
    ``indices`` ``(N,)``; rows whose index is outside ``[0, S)`` are NaN.
    """
    return _contract(x, tuple(weights), indices, plan, unrolled=None)


def _contract(x, weights, indices, plan, *, unrolled: bool | None):
    """``unrolled``: force a path (tests); ``None`` chooses by the number of terms."""
    n, c, dim_in = x.shape
    out_dtype, dtype = x.dtype, accumulation_dtype(x, *weights)  # 16-bit inputs: float32 sums
    num_terms = len(symmetric_terms(plan).polynomial.terms)
    if num_terms == 0 or n == 0 or c == 0:
        out = jnp.zeros((n, c, plan.dim_out), dtype)
    else:
        x = x.astype(dtype)
        w = jnp.concatenate([jnp.asarray(w, dtype) for w in weights], axis=-2)  # ([S,] K, C)
        # never wrap around: rows with an index out of range are masked below
        safe = None if indices is None else jnp.clip(indices, 0, w.shape[0] - 1)
        if unrolled is None:
            unrolled = num_terms <= MAX_UNROLLED_TERMS
        if unrolled:
            out = _unrolled(x, w, safe, plan)
        else:
            out = _by_row_blocks(_vectorized, x, w if safe is None else w[safe], plan)
    if indices is not None and weights:
        num = weights[0].shape[0]
        out = jnp.where(in_range(indices, num)[:, None, None], out, jnp.nan)
    return out.astype(out_dtype)


# ---- fast path: the polynomial unrolled ---------------------------------------------------


def _unrolled(x, w, indices, plan: SymmetricPlan):
    """``out[.., o] = sum_k W[.., k] * P[o, k]`` with one ``(N, C)`` array per monomial and P.

    ``x``: ``(N, C, dim_in)``; ``w``: ``(S, K, C)`` selected by ``indices`` ``(N,)``, or
    ``(K, C)`` shared. How the arrays are cut decides the speed of the gradients (XLA:CPU,
    2-core x86, MACE-M):

    * ``x`` and ``w`` are cut with ``jnp.split``, not indexed (``x[..., j]``): the transpose
      of a split is one concatenation, that of ``dim_in`` slices a sum of paddings, which
      XLA fuses into one loop recomputing every plane's gradient for every element (a
      backward pass ~10x slower).
    * ``x`` is split along a leading axis (``moveaxis`` first, which XLA fuses into the
      forward loops for free), so the planes' cotangent is a concatenation along that axis
      and a transpose. Split along the last axis, XLA fused the whole second-order graph
      of every plane into the loop that assembles ``x``'s cotangent, which in force
      training also takes in the paddings of e3nn's ``IrrepsArray.chunks`` upstream
      (``mul_to_axis``), recomputing it per element: the training step of the MACE block
      in ``bench/workloads.py``, at N = 1000, took 976 ms against 384 ms, and 100 s
      against 25 s to compile.
    * Each ``W[s_n, k]`` is gathered on its own, ``(N, C)``, which XLA fuses into the loops
      using it; one ``(N, K, C)`` gather is materialised, and its gradient assembled, whole
      (forward and backward ~2x slower).
    """
    terms = symmetric_terms(plan)
    planes = [p[0] for p in jnp.split(jnp.moveaxis(x, -1, 0), x.shape[-1])]  # dim_in x (N, C)
    monomials: dict[tuple[int, ...], jax.Array] = {}

    def monomial(vars_):  # terms are sorted, so a prefix is computed once, then reused
        if vars_ not in monomials:
            monomials[vars_] = (
                planes[vars_[0]] if len(vars_) == 1 else monomial(vars_[:-1]) * planes[vars_[-1]]
            )
        return monomials[vars_]

    partial: dict[tuple[int, int], jax.Array] = {}  # P[o, k] = sum_t A[t, k] x_J_t
    for t in terms.polynomial.terms:
        row = terms.coefficients[t.coef] * t.scale
        for k in np.flatnonzero(row):
            term = float(row[k]) * monomial(t.vars)
            key = (t.out, int(k))
            partial[key] = term if key not in partial else partial[key] + term

    weights = [wk.squeeze(-2) for wk in jnp.split(w, w.shape[-2], axis=-2)]  # K x ([S,] C)
    if indices is not None:
        weights = [wk[indices] for wk in weights]  # K x (N, C)
    columns = [None] * plan.dim_out
    for (o, k), p in sorted(partial.items()):
        columns[o] = weights[k] * p if columns[o] is None else columns[o] + weights[k] * p
    zero = jnp.zeros(x.shape[:-1], x.dtype)
    return jnp.stack([zero if column is None else column for column in columns], axis=-1)


# ---- fallback: monomials and coefficients along an axis ----------------------------------


def _by_row_blocks(evaluate, x, w, plan: SymmetricPlan):
    """``evaluate(x, w, plan)`` on blocks of rows in sequence (``lax.map``) with each block's
    arrays ``(size, rows, C)`` under :data:`_VECTORIZED_BLOCK` elements, and rematerialised
    (``jax.checkpoint``) in the backward pass rather than stored."""
    n, c, dim_in = x.shape
    rows = min(n, max(1, _VECTORIZED_BLOCK // (c * _vectorized_tables(plan).size)))
    blocks = -(-n // rows)
    pad = ((0, blocks * rows - n),)
    x = jnp.pad(x, pad + ((0, 0), (0, 0))).reshape(blocks, rows, c, dim_in)
    if w.ndim == 3:  # one weight set per row
        w = jnp.pad(w, pad + ((0, 0), (0, 0))).reshape((blocks, rows) + w.shape[1:])
        block = jax.checkpoint(lambda args: evaluate(*args, plan))
        out = jax.lax.map(block, (x, w))
    else:
        out = jax.lax.map(jax.checkpoint(lambda x: evaluate(x, w, plan)), x)
    return out.reshape(blocks * rows, c, plan.dim_out)[:n]


def _vectorized(x, w, plan: SymmetricPlan):
    """``out[.., o] = sum_k W[.., k] * P[o, k]`` as :func:`_unrolled`, with arrays
    ``(size, R, C)``: every monomial of one degree from the previous degree's by one
    gather and product, the nonzeros ``A[t, k] x_J_t`` by one gather, then the sums over
    consecutive entries (``jnp.split``, sorted by ``(o, k)``) that make ``P[o, k]``, then
    the weights and the sums that make each output column."""
    tables = _vectorized_tables(plan)
    xt = jnp.moveaxis(x, -1, 0)  # (dim_in, R, C): a variable's block is contiguous
    nodes = [xt]  # per degree, the monomials that are prefixes of terms
    for parent, var in tables.levels:
        nodes.append(nodes[-1][parent] * xt[var])
    entries = jnp.concatenate(nodes)[tables.entry_node]  # (E, R, C)
    entries = entries * jnp.asarray(tables.entry_coef[:, None, None], x.dtype)
    p = jnp.stack([e.sum(0) for e in jnp.split(entries, tables.pair_splits)])  # (pairs, R, C)
    wt = jnp.moveaxis(w, -2, 0)  # (K, [R,] C)
    contrib = p * (wt[tables.pair_k] if wt.ndim == 3 else wt[tables.pair_k][:, None, :])
    return jnp.stack([e.sum(0) for e in jnp.split(contrib, tables.column_splits)], axis=-1)


class _Tables(NamedTuple):
    levels: list  # per degree 2, 3, ..: (parent prefix, last variable) of each of its monomials
    entry_node: np.ndarray  # (E,) per nonzero A[t, k], sorted by (o_t, k): t's monomial node
    entry_coef: np.ndarray  # (E,) the nonzero A[t, k]
    pair_splits: list  # where the entries of each (o, k) start, but the first
    pair_k: np.ndarray  # (pairs,) each (o, k)'s k
    column_splits: list  # where the pairs of each output column start, but the first
    size: int  # the largest first axis of the block's arrays


@functools.cache
def _vectorized_tables(plan: SymmetricPlan) -> _Tables:
    terms = symmetric_terms(plan)
    poly = terms.polynomial
    nodes = [{(j,): j for j in range(plan.dim_in)}]  # per degree: monomial -> its index
    for degree in range(2, poly.degree + 1):
        prefixes = sorted({t.vars[:degree] for t in poly.terms if len(t.vars) >= degree})
        nodes.append({vars_: i for i, vars_ in enumerate(prefixes)})
    levels = [
        (np.array([nodes[d - 1][v[:-1]] for v in nodes[d]]), np.array([v[-1] for v in nodes[d]]))
        for d in range(1, len(nodes))
    ]
    offsets = np.cumsum([0] + [len(level) for level in nodes])
    entries = sorted(
        (t.out, int(k), offsets[len(t.vars) - 1] + nodes[len(t.vars) - 1][t.vars], t.scale * a[k])
        for t in poly.terms
        for a in [terms.coefficients[t.coef]]
        for k in np.flatnonzero(a)
    )
    pairs = sorted({(o, k) for o, k, _, _ in entries})
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    pair_of = [pair_index[o, k] for o, k, _, _ in entries]
    pair_bounds = np.searchsorted(pair_of, np.arange(1, len(pairs))).tolist()
    column_bounds = np.searchsorted([o for o, _ in pairs], np.arange(1, plan.dim_out)).tolist()
    return _Tables(
        levels,
        np.array([node for _, _, node, _ in entries]),
        np.array([a for _, _, _, a in entries]),
        pair_bounds,
        np.array([k for _, k in pairs]),
        column_bounds,
        max(len(entries), offsets[-1]),
    )
