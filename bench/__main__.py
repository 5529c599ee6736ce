"""python -m bench: compare e3kernels with e3nn-jax (and cuequivariance-jax) side by side.

Every candidate is jitted and compiled first (its compiled temporary memory is recorded),
then all candidates of a workload are timed interleaved, in a new random order each
round; the table shows medians and speed-ups against e3nn-jax measured in the same run.
Results go to bench/results/ as JSON and a PNG chart.

    python -m bench                 # default sizes (a few minutes on a 2-core CPU)
    python -m bench --quick         # small sizes, fewer rounds
    python -m bench --workloads indexed_linear --rows 2000
    python -m bench --devices 4     # adds the data-parallel block on 4 devices against 1
                                    # (on CPU: 4 virtual devices sharing its cores)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform as platform_module
from pathlib import Path

import jax

from bench import breakdown, report
from bench.timing import Measured, compile_one, printer, run_interleaved
from bench.workloads import DATA_PARALLEL, ROWS, WORKLOADS

#: what a workload's speed-ups are against, where not e3nn-jax
BASELINES = {"data_parallel": "1 device", "cue": "cuex naive"}

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=summary.partition(": ")[2], epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 rounds")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--rows", type=int, help="rows (atoms) for every workload")
    parser.add_argument("--repeats", type=int, help="timing rounds (default 7, 3 with --quick)")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="min duration of one timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--devices", type=int, default=1,
                        help="N > 1 adds the data-parallel training step on N devices against 1")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices: expected a positive int; got {args.devices}")
    if args.devices > 1:
        # before JAX starts its backends; on CPU, N virtual devices (GPUs are not affected)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    known = list(WORKLOADS) + (["data_parallel"] if args.devices > 1 else [])
    unknown = [w for w in names if w not in known]
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; expected names from {known} "
                     "(data_parallel needs --devices N > 1)")
    if args.rows is not None and args.rows < 1:
        parser.error(f"--rows: expected a positive int; got {args.rows}")
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 1:
        parser.error(f"--repeats: expected a positive int; got {repeats}")

    platform = jax.default_backend()
    workloads = dict(WORKLOADS)
    if args.devices > 1:
        if len(jax.devices()) < args.devices:
            parser.error(f"--devices: {args.devices} asked for; this machine has {len(jax.devices())}")
        title, build = DATA_PARALLEL
        workloads["data_parallel"] = (title, functools.partial(build, devices=args.devices))
        if "data_parallel" not in names and args.workloads == parser.get_default("workloads"):
            names.append("data_parallel")
    sizes = ROWS[("cpu" if platform == "cpu" else "gpu", args.quick)]
    progress = printer(args.quiet)
    machine = describe_machine()
    progress(f"e3kernels bench on {machine['device']} ({machine['cpus']} CPUs), jax {jax.__version__}")

    results = []
    for index, name in enumerate(names, 1):
        title, build = workloads[name]
        rows = args.rows or sizes[name]
        progress(f"[{index}/{len(names)}] {title}, N={rows}: building candidates")
        jobs, measured, profiled = [], [], []
        for candidate in build(rows, platform):
            for mode, fn in candidate.modes():
                m = Measured(candidate.name, mode)
                progress(f"  compiling {candidate.name} {mode}")
                compiled = compile_one(fn, candidate.args, m)
                if compiled is None:
                    progress(f"    failed: {m.error}")
                else:
                    jobs.append((m, compiled, candidate.args))
                    if candidate.breakdown:
                        profiled.append(jobs[-1])
                measured.append(m)
        progress(f"  timing {len(jobs)} functions, {repeats} interleaved rounds")
        run_interleaved(jobs, repeats, args.min_seconds, progress)
        for m, compiled, call_args in profiled:  # after the timings, which the profiler would slow
            progress(f"  profiling {m.candidate} {m.mode}: where the time goes")
            m.breakdown = breakdown.breakdown(compiled, call_args)
        result = {"workload": name, "title": title, "rows": rows, "measured": measured,
                  "baseline": BASELINES.get(name, report.BASELINE)}
        print(report.table(result), flush=True)
        results.append(result)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload = {"machine": machine, "repeats": repeats, "quick": args.quick, "results": [
        {**r, "measured": [m.as_dict() for m in r["measured"]]} for r in results
    ]}
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    png_path = report.chart(results, args.out / f"bench-{stamp}.png", machine, quick=args.quick)
    progress(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no matplotlib: no chart)"))
    return 0


def describe_machine() -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "cpus": os.cpu_count(),
        "processor": platform_module.processor() or platform_module.machine(),
        "python": platform_module.python_version(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
