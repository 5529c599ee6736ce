"""Trace-time unrolling of a sparse polynomial's terms inside a kernel body (any backend).

The term list is static, so a kernel body is straight-line code: one multiply-add per term
on a ``(rows, channels)`` tile, plus the products of the term's variables. Terms arrive
sorted by variables, so the product of a term's leading variables is the previous term's
when they share them: a stack of prefix products computes every distinct prefix once and
drops it as soon as no later term uses it. An output is handed to ``finish`` right after
its last term, so only the outputs still being summed stay live (register pressure).

The arithmetic here and in the kernels' per-term callbacks is ``jax.lax``, not ``jnp``:
every ``jnp`` operator is a small jitted function, and tracing thousands of them is most
of the cost of lowering (or interpreting) an unrolled kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax import lax

from e3kernels.symmetric_terms import Term

Tile = Any  # a traced (rows, channels) array


def unroll_terms(
    terms: Sequence[Term],
    load_var: Callable[[int], Tile],
    term_value: Callable[[Term, Tile | None], Tile],
    finish: Callable[[int, Tile], None],
) -> set[int]:
    """Emit ``finish(out, sum of term_value(t, prod of t's variables))`` for every output.

    ``load_var(v)`` is called once per variable; ``term_value`` gets ``None`` for a term
    without variables and returns a full tile. Returns the outputs that had terms (the
    caller fills the others).
    """
    last_term_of = {t.out: k for k, t in enumerate(terms)}
    loaded: dict[int, Tile] = {}
    prefix: list[tuple[int, Tile]] = []  # (variable, product of the variables so far)
    sums: dict[int, Tile] = {}
    for k, term in enumerate(terms):
        shared = _common_prefix_length([v for v, _ in prefix], term.vars)
        del prefix[shared:]
        for var in term.vars[shared:]:
            if var not in loaded:
                loaded[var] = load_var(var)
            product = loaded[var] if not prefix else lax.mul(prefix[-1][1], loaded[var])
            prefix.append((var, product))
        value = term_value(term, prefix[-1][1] if prefix else None)
        sums[term.out] = value if term.out not in sums else lax.add(sums[term.out], value)
        if last_term_of[term.out] == k:
            finish(term.out, sums.pop(term.out))
    return set(last_term_of)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def peak_live_tiles(terms: Sequence[Term]) -> int:
    """Most tiles :func:`unroll_terms` keeps live at once (loaded variables, open sums,
    prefix products): what a kernel sizes its tiles by to stay within registers."""
    last_term_of = {t.out: k for k, t in enumerate(terms)}
    loaded: set[int] = set()
    open_sums: set[int] = set()
    peak = 0
    for k, term in enumerate(terms):
        loaded.update(term.vars)
        open_sums.add(term.out)
        peak = max(peak, len(loaded) + len(open_sums) + len(term.vars))
        if last_term_of[term.out] == k:
            open_sums.discard(term.out)
    return peak


def ordered_for_registers(terms: Sequence[Term], max_live_tiles: int) -> tuple[Term, ...]:
    """The terms in variable order (prefix sharing) unless that keeps more than
    ``max_live_tiles`` tiles live; then grouped by output, so each output completes at
    once (e.g. a row reduction whose outputs each gather terms from far apart)."""
    if peak_live_tiles(terms) <= max_live_tiles:
        return tuple(terms)
    return tuple(sorted(terms, key=lambda t: (t.out, t.vars)))


def broadcast(value, shape: tuple[int, ...]):
    """``value`` (e.g. a ``(1, channels)`` coefficient row) broadcast to ``shape``."""
    if value.shape == tuple(shape):
        return value
    return lax.broadcast_in_dim(value, shape, tuple(range(value.ndim)))


def coefficient_term(monomial, coefficient_row, scale: float, shape: tuple[int, ...]):
    """``scale * coefficient_row * monomial`` as a tile (a constant term without monomial)."""
    row = broadcast(scaled(coefficient_row, scale), shape)
    return row if monomial is None else lax.mul(monomial, row)


def scaled(value, scale: float):
    return value if scale == 1.0 else lax.mul(value, lax.full(value.shape, scale, value.dtype))


def row_sum(tile, keepdims: bool = False):
    """The sum over a tile's rows (axis 0)."""
    total = lax.reduce(tile, np.array(0, tile.dtype), lax.add, (0,))
    return lax.expand_dims(total, (0,)) if keepdims else total
