"""Timing and memory measurement: jitted candidates, interleaved, medians over repeats."""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from pytest_benchmark.stats import Stats


@dataclasses.dataclass
class Measured:
    """One candidate's function, timed: seconds per call and compiled temporary bytes."""

    candidate: str
    mode: str  # one of report.MODES
    stats: Stats = dataclasses.field(default_factory=Stats)
    temp_bytes: int | None = None
    compile_seconds: float | None = None  # trace, lower and compile
    error: str | None = None
    breakdown: dict[str, float] | None = None  # seconds per run by part (bench.breakdown)

    def as_dict(self) -> dict[str, Any]:
        stats = self.stats.as_dict() if self.stats.rounds else None
        return {
            "candidate": self.candidate,
            "mode": self.mode,
            "seconds": stats,
            "temp_bytes": self.temp_bytes,
            "compile_seconds": self.compile_seconds,
            "error": self.error,
            "breakdown": self.breakdown,
        }


def _block(tree):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def compile_one(fn: Callable, args: Sequence, measured: Measured) -> Callable | None:
    """Trace, lower and compile ``fn`` for ``args`` (timed together: what a user waits for
    at the first call), run it once, record temp memory. None on failure."""
    try:
        start = time.perf_counter()
        compiled = jax.jit(fn).trace(*args).lower().compile()
        measured.compile_seconds = time.perf_counter() - start
        _block(compiled(*args))  # first run: warm caches, allocate
    except Exception as error:  # a candidate failing must not stop the others
        measured.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return None
    analysis = compiled.memory_analysis()
    if analysis is not None:
        measured.temp_bytes = int(analysis.temp_size_in_bytes)
    return compiled


def run_interleaved(
    jobs: list[tuple[Measured, Callable, Sequence]],
    repeats: int,
    min_seconds: float,
    progress: Callable[[str], None],
) -> None:
    """Time every job ``repeats`` times, in a fresh random order each round.

    Interleaving spreads machine noise (other processes, thermal drift) evenly over the
    candidates, so their ratios stay meaningful on a shared machine. Each timing is the
    mean of enough back-to-back calls to last ``min_seconds``, after one untimed call:
    right after a candidate with gigabytes of temporaries (e3nn-jax, cuequivariance), the
    first calls of a fast one ran up to 5x slower (the dense matmul's median went from
    ~26 to 129 ms), which measured the order of the round rather than the candidate.
    """
    calls = {}
    for measured, compiled, args in jobs:
        start = time.perf_counter()
        _block(compiled(*args))
        once = time.perf_counter() - start
        calls[id(measured)] = max(1, int(min_seconds / max(once, 1e-6)))
    order = list(range(len(jobs)))
    rng = random.Random(0)
    for round_ in range(repeats):
        rng.shuffle(order)
        for k in order:
            measured, compiled, args = jobs[k]
            n = calls[id(measured)]
            _block(compiled(*args))  # settle after the previous candidate, untimed
            start = time.perf_counter()
            for _ in range(n):
                out = compiled(*args)
            _block(out)
            measured.stats.update((time.perf_counter() - start) / n)
        progress(f"  round {round_ + 1}/{repeats}")


def printer(quiet: bool) -> Callable[[str], None]:
    def progress(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return progress
