"""The symmetric contraction as a sparse polynomial, and the polynomials its derivatives need.

Pure Python/numpy, cached per plan, independent of Pallas (the CPU reference may reuse it).

A :class:`SparsePolynomial` is a static list of terms over per-channel variables::

    out[n, c, o] = sum_{t: out_t = o} scale_t * B[s_n, coef_t, c] * prod_{v in vars_t} z[n, c, v]

where ``z`` is the concatenation (along the last axis) of one or more ``(N, C, size)`` inputs,
``B`` a ``(S, num_coef, C)`` coefficient table and ``s_n`` row ``n``'s weight set. Read as a
*row reduction* (``num_coef == 0``), the same terms mean instead::

    red[s, o, c] = sum_{n: s_n = s} sum_{t: out_t = o} scale_t * prod_{v in vars_t} z[n, c, v]

Differentiation closes on these two forms (see :func:`input_gradient`,
:func:`coefficient_gradient`, :func:`reduction_input_gradient`), so gradients of any order
are again sparse polynomials and row reductions.

:func:`symmetric_terms` writes a :class:`~e3kernels.irreps.SymmetricPlan` in this form: the
plan's basis ``U_p`` (e3nn's, divided by its multiplicity) is symmetrised over sorted
monomials ``J = (j1 <= ... <= j_order)`` by summing the entries of every permutation of
``J``, which is exact whether or not ``U_p`` is symmetric, and each nonzero ``(J, i)`` of
``sum_k U_p[J, k, i] w_p[k, c]`` becomes one term with its own coefficient row
``B[s, row, c] = sum_k A[row, k] w[s, k, c]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from e3kernels.irreps import SymmetricPlan

#: relative size under which a symmetrised basis entry is round-off of a cancelling sum
_ZERO_TOLERANCE = 1e-10


class Term(NamedTuple):
    """``scale * B[s, coef, c] * prod z[n, c, vars]`` added to output column ``out``."""

    vars: tuple[int, ...]  # sorted; a repeated variable is a power
    out: int
    coef: int  # coefficient row; -1 in a row reduction
    scale: float


@dataclasses.dataclass(frozen=True)
class SparsePolynomial:
    """A static sparse polynomial (or row reduction, when ``num_coef == 0``); see module doc.

    Terms are sorted by variables, so terms sharing leading variables are neighbours and
    a kernel computes each shared prefix product once.
    """

    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    num_coef: int
    terms: tuple[Term, ...]

    @property
    def num_vars(self) -> int:
        return sum(self.in_sizes)

    @property
    def num_out(self) -> int:
        return sum(self.out_sizes)

    @property
    def degree(self) -> int:
        return max((len(t.vars) for t in self.terms), default=0)

    def locate_input(self, var: int) -> tuple[int, int]:
        """``(input number, column)`` of a variable."""
        return _locate(self.in_sizes, var)

    def locate_output(self, out: int) -> tuple[int, int]:
        """``(output number, column)`` of an output index."""
        return _locate(self.out_sizes, out)


def _locate(sizes: tuple[int, ...], index: int) -> tuple[int, int]:
    for array, size in enumerate(sizes):
        if index < size:
            return array, index
        index -= size
    raise IndexError(index)


def make_polynomial(in_sizes, out_sizes, num_coef, terms: Iterable[Term]) -> SparsePolynomial:
    """Merge terms equal but for their scale, drop zero ones, sort for prefix sharing."""
    merged: dict[tuple, float] = {}
    for t in terms:
        key = (t.vars, t.out, t.coef)
        merged[key] = merged.get(key, 0.0) + t.scale
    kept = sorted(Term(*key, scale) for key, scale in merged.items() if scale != 0.0)
    return SparsePolynomial(tuple(in_sizes), tuple(out_sizes), num_coef, tuple(kept))


def _partial_derivatives(term: Term) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """``(variable, its power, the other variables)`` for each distinct variable of ``term``."""
    for var in sorted(set(term.vars)):
        rest = list(term.vars)
        rest.remove(var)
        yield var, term.vars.count(var), tuple(rest)


@functools.cache
def input_gradient(poly: SparsePolynomial) -> SparsePolynomial:
    """The VJP of a polynomial w.r.t. its inputs: a polynomial of ``(inputs, cotangents)``.

    ``d/dz_v [scale B z_J] * g_out = (power * scale) B z_{J - v} g_out``: cotangent column
    ``o`` is variable ``num_vars + o``; the outputs are the inputs' gradients.
    """
    assert poly.num_coef > 0, "input_gradient is for polynomials, not row reductions"
    cotangent = poly.num_vars
    terms = (
        Term(tuple(sorted(rest + (cotangent + t.out,))), var, t.coef, t.scale * power)
        for t in poly.terms
        for var, power, rest in _partial_derivatives(t)
    )
    return make_polynomial(poly.in_sizes + poly.out_sizes, poly.in_sizes, poly.num_coef, terms)


@functools.cache
def coefficient_gradient(poly: SparsePolynomial) -> SparsePolynomial:
    """The VJP of a polynomial w.r.t. its coefficient table: a row reduction of
    ``(inputs, cotangents)`` whose output ``q`` is the gradient of coefficient row ``q``."""
    assert poly.num_coef > 0, "coefficient_gradient is for polynomials, not row reductions"
    cotangent = poly.num_vars
    terms = (Term(tuple(sorted(t.vars + (cotangent + t.out,))), t.coef, -1, t.scale) for t in poly.terms)
    return make_polynomial(poly.in_sizes + poly.out_sizes, (poly.num_coef,), 0, terms)


@functools.cache
def reduction_input_gradient(reduction: SparsePolynomial) -> SparsePolynomial:
    """The VJP of a row reduction w.r.t. its inputs: a polynomial of the same inputs whose
    coefficient table is the reduction's cotangent ``G[s, o, c]``."""
    assert reduction.num_coef == 0, "reduction_input_gradient is for row reductions"
    terms = (
        Term(rest, var, t.out, t.scale * power)
        for t in reduction.terms
        for var, power, rest in _partial_derivatives(t)
    )
    return make_polynomial(reduction.in_sizes, reduction.in_sizes, reduction.num_out, terms)


class TermTable(NamedTuple):
    """A polynomial's terms as the arrays every evaluator loops over (numpy, cached): the
    program is a loop over outputs and, per output, over its terms, whatever their number.

    Terms are sorted by output; output ``o``'s are ``offsets[o]`` to ``offsets[o + 1]``.
    """

    #: ``degree`` arrays ``(T,)`` int32: a term's variables, the short ones padded with
    #: ``num_vars``, which evaluators read as a plane of ones
    variables: tuple[np.ndarray, ...]
    coef: np.ndarray  # (T,) int32 coefficient row (0 in a row reduction)
    scale: np.ndarray  # (T,) float64
    offsets: np.ndarray  # (num_out + 1,) int32


@functools.cache
def term_table(poly: SparsePolynomial) -> TermTable:
    terms = sorted(poly.terms, key=lambda t: (t.out, t.vars))
    degree = max(poly.degree, 1)
    variables = tuple(
        np.array([t.vars[j] if j < len(t.vars) else poly.num_vars for t in terms], np.int32)
        for j in range(degree)
    )
    offsets = np.searchsorted([t.out for t in terms], np.arange(poly.num_out + 1)).astype(np.int32)
    return TermTable(
        variables,
        np.array([max(t.coef, 0) for t in terms], np.int32),
        np.array([t.scale for t in terms], np.float64),
        offsets,
    )


@dataclasses.dataclass(frozen=True)
class SymmetricTerms:
    """A plan's contraction as one sparse polynomial of ``x`` plus its coefficient map.

    ``polynomial`` has one input (``x``, ``plan.dim_in`` columns), one output
    (``plan.dim_out`` columns) and one coefficient row per term. The coefficient table is
    ``B[s, q, c] = sum_k coefficients[q, k] W[s, k, c]``, ``W`` being the paths' weights
    concatenated along their ``mul`` axis in plan order.
    """

    polynomial: SparsePolynomial
    coefficients: np.ndarray  # (num_coef, sum of path muls), float64


@functools.cache
def symmetric_terms(plan: SymmetricPlan) -> SymmetricTerms:
    """The cached :class:`SymmetricTerms` of ``plan``."""
    scale = max((np.abs(p.basis).max(initial=0.0) for p in plan.paths), default=0.0)
    tolerance = _ZERO_TOLERANCE * scale
    total_mul = sum(p.mul for p in plan.paths)
    monomial_terms, rows = [], []
    mul_start = 0
    for path in plan.paths:
        for monomial, block in _symmetrised_basis(path.basis, path.order):
            for i in range(block.shape[1]):  # block: (mul, ir_dim)
                if np.abs(block[:, i]).max() > tolerance:
                    row = np.zeros(total_mul)
                    row[mul_start : mul_start + path.mul] = block[:, i]
                    monomial_terms.append((monomial, path.out_start + i))
                    rows.append(row)
        mul_start += path.mul
    ordering = sorted(range(len(rows)), key=lambda r: monomial_terms[r])
    terms = [Term(*monomial_terms[r], coef, 1.0) for coef, r in enumerate(ordering)]
    polynomial = SparsePolynomial((plan.dim_in,), (plan.dim_out,), len(terms), tuple(terms))
    coefficients = np.array([rows[r] for r in ordering]).reshape(len(rows), total_mul)
    return SymmetricTerms(polynomial, coefficients)


def _symmetrised_basis(basis: np.ndarray, order: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """``(J, sum of basis[j] over the index tuples j that sort to J)`` for each sorted J
    that any nonzero entry reaches; the sums are ``(mul, ir_dim)`` blocks."""
    dim = basis.shape[0]
    flat = basis.reshape(dim**order, -1)
    nonzero = np.flatnonzero(np.any(flat != 0, axis=1))
    indices = np.sort(np.stack(np.unravel_index(nonzero, (dim,) * order), axis=1), axis=1)
    monomials, which = np.unique(indices, axis=0, return_inverse=True)
    sums = np.zeros((len(monomials), flat.shape[1]))
    np.add.at(sums, which.reshape(-1), flat[nonzero])
    for monomial, total in zip(monomials, sums):
        yield tuple(int(j) for j in monomial), total.reshape(basis.shape[-2:])
