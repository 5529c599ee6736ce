"""Tables and charts of bench results: medians and speed-ups against e3nn-jax."""

from __future__ import annotations

from pathlib import Path

BASELINE = "e3nn-jax"
MODES = ("fwd", "fwd+bwd")


def _by_candidate(measured) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for m in measured:
        table.setdefault(m.candidate, {})[m.mode] = m
    return table


def speedups(result) -> dict[str, dict[str, float | None]]:
    """Per candidate and mode: baseline median / candidate median (higher is faster)."""
    rows = _by_candidate(result["measured"])
    base = rows.get(BASELINE, {})
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
    """A Markdown table: median ms, speed-up vs e3nn-jax, compiled temp MB and trace +
    compile seconds, per mode."""
    header = (
        "| candidate | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up "
        "| fwd temp MB | fwd+bwd temp MB | fwd compile s | fwd+bwd compile s |"
    )
    lines = [f"\n### {result['title']}, N={result['rows']}\n", header, "|" + "---|" * 9]
    ratios = speedups(result)
    for name, modes in _by_candidate(result["measured"]).items():
        fwd, bwd = modes.get("fwd"), modes.get("fwd+bwd")
        cells = [name, _ms(fwd), _ms(bwd), _ratio(ratios[name]["fwd"]), _ratio(ratios[name]["fwd+bwd"]),
                 _mb(fwd), _mb(bwd), _seconds(fwd), _seconds(bwd)]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {m.candidate} {m.mode}: {m.error}" for m in result["measured"] if m.error]
    if errors:
        lines += ["", "Failures:"] + errors
    return "\n".join(lines)


def chart(results, path: Path, machine: dict) -> Path | None:
    """Bar chart of speed-ups vs e3nn-jax (log scale), one panel per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        ratios = speedups(result)
        names = list(ratios)
        for k, mode in enumerate(MODES):
            values = [ratios[n][mode] or 0.0 for n in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], values, width=0.4, label=mode)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"{result['workload']} (N={result['rows']})", fontsize=9)
        ax.set_ylabel("speed-up vs e3nn-jax (median)")
        ax.legend(fontsize=8)
    fig.suptitle(f"e3kernels bench: {machine['device']}, jax {machine['jax']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
