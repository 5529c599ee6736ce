"""Where a compiled program's time goes, by XLA's own accounting.

A profiler trace of the compiled program records one event per executed HLO instruction
(on CPU, each thunk of XLA's runtime, on the worker thread that ran it; on GPU, the
device's "XLA Ops" line). Each instruction's ``op_name`` metadata is the JAX name stack
of the operation it came from: ``jit(f)/transpose(jvp(mace))/message_passing_convolution/...``,
with Haiku modules and ``jax.named_scope`` blocks as its path segments, kept through
differentiation. Summing the events of each instruction and classifying its name stack
gives each part of a model its share.

What it counts, and what it does not:

* the time of leaf instructions (a ``while``, ``conditional`` or ``call`` event spans its
  body's events, which are counted instead), less the profiler's own per-event cost
  (:func:`instruction_seconds`), so that the parts sum to the untraced run time (times
  the overlap, where XLA runs instructions on several threads at once);
* a fusion counts in full for one part: that of the contraction it contains, if any, else
  that of its root instruction (XLA fuses across parts only at their boundaries, mostly
  elementwise work);
* instructions without a name stack (copies XLA inserts for layouts) count as "rest".
"""

from __future__ import annotations

import collections
import functools
import glob
import re
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

#: the parts of a MACE step, in the order of the tables and charts
MACE_PARTS = (
    "spherical harmonics + radial embedding",
    "radial network",
    "convolution",
    "Linears",
    "symmetric contraction",
    "rest",
)

# Names in e3kernels.models.mace: the edge embedding's named scope and the Haiku module
# names of its Linears (e3kernels' and e3nn-jax's modules are named alike)
_LINEARS = {"embedding", "skip", "linear_up", "linear_down", "species_mix", "linear_product", "readout"}
_CONTROL_FLOW = {"while", "conditional", "call"}
_CONTRACTIONS = {"dot", "convolution"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEES = re.compile(r"(?:body|condition|calls|to_apply)=(%?[\w.\-]+)|branch_computations=\{([^}]*)\}")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([a-z][\w\-]*)\(")


def mace_part(name_stack: str) -> str:
    """The part of :class:`e3kernels.models.mace.MACE` an instruction with JAX name stack
    ``name_stack`` belongs to (one of :data:`MACE_PARTS`)."""
    segments = set(re.findall(r"[\w.\-]+", name_stack))  # "vmap(symmetric_tensor_product)" too
    if "edge_embedding" in segments:
        return "spherical harmonics + radial embedding"
    if "message_passing_convolution" in segments:
        return "radial network" if "multi_layer_perceptron" in segments else "convolution"
    if "symmetric_tensor_product" in segments:
        return "symmetric contraction"
    if segments & _LINEARS:
        return "Linears"
    return "rest"


@functools.lru_cache(maxsize=8)
def _parsed(compiled):
    """Per HLO instruction of ``compiled``'s text: opcode, own name stack ("" if none) and
    computation; per computation, the instruction that calls it and its first contraction's
    name stack; per instruction, the computations it calls."""
    opcode, stack, computation_of, caller, callees, contraction = {}, {}, {}, {}, {}, {}
    computation = None
    for line in compiled.as_text().splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name = match.group(1)
        opcode[name], computation_of[name] = match.group(2), computation
        found = re.search(r'op_name="([^"]*)"', line)
        stack[name] = found.group(1) if found else ""
        if opcode[name] in _CONTRACTIONS and stack[name]:
            contraction.setdefault(computation, stack[name])
        for groups in _CALLEES.findall(line):
            for callee in re.findall(r"[\w.\-]+", " ".join(groups)):
                caller.setdefault(callee, name)
                callees.setdefault(name, []).append(callee)
    return opcode, stack, computation_of, caller, callees, contraction


def instructions(compiled) -> dict[str, tuple[str, str]]:
    """Every HLO instruction of ``compiled`` (a ``jax.stages.Compiled``): name ->
    (opcode, JAX name stack). A fusion that contains a contraction (``dot``,
    ``convolution``) takes the contraction's, its cost (its own is its root's, often an
    elementwise consumer). An instruction without one (a loop counter's copy, a layout
    copy) takes that of the instruction that calls its computation (the loop), or "" at
    the top level."""
    opcode, stack, computation_of, caller, callees, contraction = _parsed(compiled)

    def resolved(name: str, depth: int = 0) -> str:
        if opcode[name] == "fusion":  # a fused contraction is what the fusion costs
            found = [contraction[c] for c in callees.get(name, ()) if c in contraction]
            if found:
                return found[0]
        parent = caller.get(computation_of[name])
        if stack[name] or parent is None or depth > 64:
            return stack[name]
        return resolved(parent, depth + 1)

    return {name: (opcode[name], resolved(name)) for name in opcode}


def instruction_seconds(compiled, args: Sequence, runs: int) -> dict[str, float]:
    """Seconds per run spent in each leaf HLO instruction of ``compiled(*args)``.

    From a profiler trace of ``runs`` runs, corrected for what tracing adds: recording an
    event costs the profiler about as much as a small loop iteration's work (a loop of
    10 ns iterations records 400 ns events here), so a program of many small loop steps
    runs ten times slower traced. Every event's duration, less one per-event cost ``k``,
    counts (never below zero); ``k`` is fitted so that the events sum to the untraced run
    time, timed right before, times the trace's overlap (the events' total over the time
    they cover: work XLA ran on several threads at once, which is not the profiler's cost).
    Only events in loop bodies are corrected: the others are few and long, and one ``k``
    taken off a program's few long events would wipe out its many short ones.
    """
    from jax.profiler import ProfileData

    known = instructions(compiled)
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(runs):
        jax.block_until_ready(compiled(*args))
    untraced = (time.perf_counter() - start) / runs * 1e9
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        try:
            for _ in range(runs):
                jax.block_until_ready(compiled(*args))
        finally:
            jax.profiler.stop_trace()
        traces = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        if len(traces) != 1:
            raise RuntimeError(f"breakdown: expected one profiler trace in {folder}; found {traces}")
        profile = ProfileData.from_file(traces[0])
    lines = [line for plane in profile.planes for line in plane.lines]
    device_lines = [line for line in lines if line.name == "XLA Ops"]
    names, starts, durations = [], [], []
    for line in device_lines or lines:
        for event in line.events:
            opcode = known.get(event.name, (None,))[0]
            if opcode is not None and opcode not in _CONTROL_FLOW:
                names.append(event.name)
                starts.append(event.start_ns)
                durations.append(event.duration_ns)
    if not names:
        raise RuntimeError("breakdown: the profiler trace names none of the program's instructions")
    durations = np.asarray(durations, np.float64)
    # events on several threads at once are work done in parallel, not the profiler's
    # cost: the target keeps the trace's overlap (event time over the time under events)
    overlap = durations.sum() / _covered(np.asarray(starts, np.float64), durations)
    # the profiler's cost matters where events are many and small: in loop bodies
    in_loops = _in_loops(compiled)
    looped = np.array([name in in_loops for name in names])
    fixed = durations[~looped].sum()
    k = _per_event_cost(durations[looped], max(untraced * runs * overlap - fixed, 0.0))
    corrected = np.where(looped, np.maximum(durations - k, 0.0), durations)
    nanoseconds: collections.Counter = collections.Counter()
    for name, value in zip(names, corrected):
        nanoseconds[name] += value
    return {name: ns / runs / 1e9 for name, ns in nanoseconds.items()}


def _in_loops(compiled) -> frozenset[str]:
    """The instructions of ``compiled`` inside a ``while`` loop's body or condition."""
    opcode, _, computation_of, caller, _, _ = _parsed(compiled)

    def looped(name: str, depth: int = 0) -> bool:
        parent = caller.get(computation_of[name])
        if parent is None or depth > 64:
            return False
        return opcode[parent] == "while" or looped(parent, depth + 1)

    return frozenset(name for name in opcode if looped(name))


def _covered(starts: np.ndarray, durations: np.ndarray) -> float:
    """The length of the union of the intervals ``[start, start + duration)``."""
    order = np.argsort(starts)
    starts, ends = starts[order], (starts + durations)[order]
    reach = np.maximum.accumulate(ends)
    gaps = np.maximum(starts[1:] - reach[:-1], 0.0)  # uncovered time before each interval
    return float(reach[-1] - starts[0] - gaps.sum())


def _per_event_cost(durations: np.ndarray, total: float) -> float:
    """The ``k >= 0`` with ``sum(max(durations - k, 0)) == total`` (0 if already below)."""
    if durations.sum() <= total:
        return 0.0
    low, high = 0.0, float(durations.max())
    for _ in range(60):  # bisection: the sum decreases in k
        k = (low + high) / 2
        low, high = (k, high) if np.maximum(durations - k, 0.0).sum() > total else (low, k)
    return (low + high) / 2


def breakdown(compiled, args: Sequence, part: Callable[[str], str] = mace_part,
              parts: Sequence[str] = MACE_PARTS, runs: int = 5) -> dict[str, float]:
    """Seconds per run of ``compiled(*args)`` in each of ``parts``, each instruction
    assigned by ``part(name_stack)``: work time, which sums to the untraced run time where
    XLA runs one instruction at a time (more where it overlaps them)."""
    known = instructions(compiled)
    seconds = dict.fromkeys(parts, 0.0)
    for name, value in instruction_seconds(compiled, args, runs).items():
        seconds[part(known[name][1])] += value
    return seconds


def table(rows: dict[tuple[str, str], dict[str, float]], parts: Sequence[str] = MACE_PARTS) -> str:
    """A Markdown table: per (candidate, mode), ms per run and share of each part."""
    header = "| candidate | mode | " + " | ".join(parts) + " | work ms |"
    lines = [header, "|" + "---|" * (len(parts) + 3)]
    for (candidate, mode), seconds in rows.items():
        total = sum(seconds.values())
        cells = [f"{1e3 * seconds[p]:.1f} ({100 * seconds[p] / total:.0f}%)" for p in parts]
        lines.append(f"| {candidate} | {mode} | " + " | ".join(cells) + f" | {1e3 * total:.1f} |")
    return "\n".join(lines)
