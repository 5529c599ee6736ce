"""The sparse-polynomial kernels' shared vocabulary: a term loop in the kernel body, and
the tiled layout both kernel families read (Triton and Mosaic).

Kernel body. A loop over the outputs and, per output, a loop over its terms (the
:class:`~e3kernels.symmetric_terms.TermTable`: variables, offsets per output), each term
one product of ``(rows, channels)`` planes times its coefficient row, summed in float32.
The program is the same whatever the number of terms: the derivatives of MACE-M's
contraction (up to ~3,000 terms) compile as fast as its forward (410 terms). Unrolled,
the force-training second order took 682 s to compile for H100 and spilled registers.

Layout (the wrapper's, in XLA): every input's variables gathered in tile order
(:class:`~e3kernels.grouping.RowTiles`, so a tile of rows has one weight set), as
``(V + 1, T * rows, C_pad)`` float32 planes, the last a plane of ones (a term's padding
variable), padding rows zero. Each term's coefficient row comes pre-scaled in a
``(groups, terms, C_pad)`` table. Outputs come back ``(O, T * rows, C_pad)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from e3kernels.symmetric_terms import TermTable


def run_terms(table_refs, num_out: int, plane: Callable, coefficient: Callable, finish: Callable,
              shape: tuple[int, int]) -> None:
    """``finish(o, sum over output o's terms of coefficient(t) * prod plane(v))`` for every
    output ``o`` (a loop, not unrolled). ``table_refs``: ``(offsets, *variables)`` refs of a
    :class:`TermTable`; ``plane(v)`` a ``shape`` float32 tile, ``coefficient(t)`` a
    ``(1, shape[1])`` row."""
    offsets_ref, *variable_refs = table_refs

    def output(o, carry):
        def term(t, acc):
            value = jnp.broadcast_to(coefficient(t), shape)
            for variables_ref in variable_refs:
                value = value * plane(variables_ref[t])
            return acc + value

        finish(o, lax.fori_loop(offsets_ref[o], offsets_ref[o + 1], term, jnp.zeros(shape, jnp.float32)))
        return carry

    lax.fori_loop(0, num_out, output, 0)


def table_operands(table: TermTable) -> tuple[jax.Array, ...]:
    """``(offsets, *variables)`` as int32 arrays, the order :func:`run_terms` reads them."""
    return (jnp.asarray(table.offsets),) + tuple(jnp.asarray(v) for v in table.variables)


def term_coefficients(table: TermTable, coefs, padded_channels: int) -> jax.Array:
    """``(S, T, padded_channels)`` float32: each term's coefficient row, times its scale."""
    scale = jnp.asarray(table.scale, jnp.float32)[None, :, None]
    rows = jnp.asarray(coefs, jnp.float32)[:, table.coef, :] * scale
    return jnp.pad(rows, ((0, 0), (0, 0), (0, padded_channels - rows.shape[-1])))


def term_scales(table: TermTable, padded_channels: int) -> jax.Array:
    """``(1, T, padded_channels)`` float32: a row reduction's term scales, as coefficient rows."""
    scale = table.scale.astype(np.float32)[None, :, None]
    return jnp.asarray(np.broadcast_to(scale, (1, len(table.scale), padded_channels)))
