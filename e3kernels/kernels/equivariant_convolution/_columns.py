"""The convolution's tensor product as both kernel families unroll it: per output column, its
nonzero terms ``T[i, j, q]``, and their sum on tiles.

A module of its own so that the entry point (``__init__``) and the two families
(``_triton``, ``_mosaic``) all import it, and none of them imports another's caller.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from e3kernels.irreps import ConvolutionPlan

#: per output column with terms: ``(q, path, ((i, j, T[i, j, q]), ...))``
Columns = tuple[tuple[int, int, tuple[tuple[int, int, float], ...]], ...]


def column_terms(plan: ConvolutionPlan) -> Columns:
    """Per output column ``q`` with nonzero terms: ``(q, path, ((i, j, T[i, j, q]), ...))``,
    columns in order (each path's columns are consecutive)."""
    columns = []
    for q in range(plan.dim_out):
        i, j = np.nonzero(plan.table[:, :, q])
        if len(i):
            terms = tuple((int(a), int(b), float(plan.table[a, b, q])) for a, b in zip(i, j))
            columns.append((q, plan.path_of_column[q], terms))
    return tuple(columns)


def used_inputs(columns: Columns) -> list[int]:
    """The input columns ``i`` that terms of ``columns`` read."""
    return sorted({i for _, _, terms in columns for i, _, _ in terms})


def used_harmonics(columns: Columns) -> list[int]:
    """The spherical harmonic columns ``j`` that terms of ``columns`` read."""
    return sorted({j for _, _, terms in columns for _, j, _ in terms})


def term_sum(terms, inputs: dict, harmonics: dict):
    """``sum T[i, j, q] * inputs[i] * harmonics[j]`` over one column's ``terms``, in float32
    tiles: ``inputs[i]`` a tile of input column ``i``, ``harmonics[j]`` its edges' harmonic
    ``j``, a tile of the same shape (Mosaic) or one value per edge that broadcasts (Triton)."""
    total = None
    for i, j, coef in terms:
        value = inputs[i] * harmonics[j] * jnp.float32(coef)
        total = value if total is None else total + value
    return total
