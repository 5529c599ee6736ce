"""Tables and charts of bench results: medians and speed-ups against e3nn-jax."""

from __future__ import annotations

from pathlib import Path

from bench import breakdown

BASELINE = "e3nn-jax"
#: for single ops: the output, a loss's gradients, and a force-style loss's gradients (a
#: function of the first gradient w.r.t. the input); the model workloads' fwd is energy and
#: forces, their fwd+bwd the training step (already a second order)
MODES = ("fwd", "fwd+bwd", "2nd order")


def _by_candidate(measured) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for m in measured:
        table.setdefault(m.candidate, {})[m.mode] = m
    return table


def speedups(result) -> dict[str, dict[str, float | None]]:
    """Per candidate and mode: baseline median / candidate median (higher is faster)."""
    rows = _by_candidate(result["measured"])
    base = rows.get(result.get("baseline", BASELINE), {})
    out = {}
    for name, modes in rows.items():
        out[name] = {}
        for mode in MODES:
            m, b = modes.get(mode), base.get(mode)
            ok = m is not None and m.stats.rounds and b is not None and b.stats.rounds
            out[name][mode] = b.stats.median / m.stats.median if ok else None
    return out


def _ms(m) -> str:
    if m is None:
        return "-"
    if m.error:
        return "failed"
    return f"{1e3 * m.stats.median:.2f}"


def _mb(m) -> str:
    return "-" if m is None or m.temp_bytes is None else f"{m.temp_bytes / 1e6:.1f}"


def _seconds(m) -> str:
    return "-" if m is None or m.compile_seconds is None else f"{m.compile_seconds:.1f}"


def _ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(result) -> str:
    """A Markdown table, one line per candidate and mode: median ms, speed-up vs e3nn-jax,
    compiled temp MB and trace + compile seconds."""
    header = "| candidate | mode | median ms | speed-up | temp MB | trace+compile s |"
    lines = [f"\n### {result['title']}, N={result['rows']}\n", header, "|" + "---|" * 6]
    ratios = speedups(result)
    for name, modes in _by_candidate(result["measured"]).items():
        for mode in MODES:
            m = modes.get(mode)
            if m is not None:
                cells = [name, mode, _ms(m), _ratio(ratios[name][mode]), _mb(m), _seconds(m)]
                lines.append("| " + " | ".join(cells) + " |")
    profiled = {(m.candidate, m.mode): m.breakdown for m in result["measured"] if m.breakdown}
    if profiled:
        lines += ["", "Where the time goes (XLA's per-instruction accounting: work ms per run and share; "
                  "they sum to the run time, more where threads overlap; see bench/breakdown.py):",
                  "", breakdown.table(profiled)]
    errors = [f"- {m.candidate} {m.mode}: {m.error}" for m in result["measured"] if m.error]
    if errors:
        lines += ["", "Failures:"] + errors
    return "\n".join(lines)


def chart(results, path: Path, machine: dict, quick: bool = False) -> Path | None:
    """Per workload: speed-ups vs e3nn-jax (log scale, top; each bar labelled with the
    ratio and the median time) and trace + compile seconds (bottom), every mode. The title
    names the machine and marks a ``--quick`` run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with_breakdown = any(m.breakdown for r in results for m in r["measured"])
    fig, axes = plt.subplots(2 + with_breakdown, len(results),
                             figsize=(5.5 * len(results), 8 + 4 * with_breakdown), squeeze=False)
    for column, result in enumerate(results):
        by_name = _by_candidate(result["measured"])
        ratios = speedups(result)
        names = list(ratios)
        top, bottom = axes[0][column], axes[1][column]
        modes = [mode for mode in MODES if any(mode in by_name[n] for n in names)]
        width = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            xs = [i + width * k for i in range(len(names))]
            speed = [ratios[n][mode] or 0.0 for n in names]
            compile_s = [(by_name[n].get(mode) and by_name[n][mode].compile_seconds) or 0.0 for n in names]
            bars = top.bar(xs, speed, width=width, label=mode)
            medians = [by_name[n].get(mode) for n in names]
            labels = [f"{v:.1f}x\n{_ms(m)} ms" if v else "" for v, m in zip(speed, medians)]
            top.bar_label(bars, labels=labels, fontsize=6)
            bars = bottom.bar(xs, compile_s, width=width, label=mode)
            bottom.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in compile_s], fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right",
                          fontsize=8)
            ax.legend(fontsize=8)
        top.set_yscale("log")
        top.set_ylim(top=top.get_ylim()[1] * 4)  # room for the labels above the tallest bar
        top.axhline(1.0, color="gray", linewidth=0.8)
        top.set_title(f"{result['workload']} (N={result['rows']})", fontsize=9)
        top.set_ylabel(f"speed-up vs {result.get('baseline', BASELINE)} (median)")
        bottom.set_ylabel("trace + compile, s")
        if with_breakdown:
            _breakdown_chart(axes[2][column], result)
    platform, kind = machine["device"].split(": ", 1)
    device = f"{machine['cpus']}-core CPU ({machine['processor']})" if platform == "cpu" else kind
    size = "QUICK RUN (small sizes, 3 rounds)" if quick else "default sizes"
    fig.suptitle(f"e3kernels bench: {device}\njax {machine['jax']}, {machine['date']}, {size}",
                 fontsize=10, color="firebrick" if quick else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _breakdown_chart(ax, result) -> None:
    """Stacked bars: each profiled candidate and mode's work ms per run, by part."""
    profiled = [m for m in result["measured"] if m.breakdown]
    if not profiled:
        ax.axis("off")
        return
    labels = [f"{m.candidate}\n{m.mode}" for m in profiled]
    left = [0.0] * len(profiled)
    for part in breakdown.MACE_PARTS:
        widths = [1e3 * m.breakdown.get(part, 0.0) for m in profiled]
        ax.barh(labels, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("work ms per run, by part (bench/breakdown.py)")
    ax.legend(fontsize=6, loc="lower right")
