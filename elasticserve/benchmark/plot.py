"""PNG plots of `bench serve` result directories: latency vs throughput, goodput, shape mix."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

# Figure without pyplot renders through Agg and touches no global backend or GUI state.
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .serve import load_runs


def _label(path: Path, paths: list[Path]) -> str:
    # Directory names label the curves; full paths only where two names collide.
    same = sum(p.name == path.name for p in paths)
    return path.name if path.name and same == 1 else str(path)


def _positions(rates: list[float]) -> dict[float, float]:
    # inf has no place on a rate axis: put it a step beyond the largest finite rate.
    finite = [r for r in rates if math.isfinite(r)]
    top = max(finite, default=1.0)
    return {r: (r if math.isfinite(r) else top * 1.25) for r in rates}


def _rate_label(rate: float) -> str:
    return "∞" if math.isinf(rate) else f"{rate:g}"


def _rate_axis(ax: Axes, where: dict[float, float]) -> None:
    ax.set_xticks(list(where.values()))
    ax.set_xticklabels([_rate_label(r) for r in where])
    ax.set_xlabel("request rate (req/s)")


def _shape_order(shape: str) -> tuple[list[float], str]:
    # d30-w1.0 above d15-w0.5 above d5-w0.5: by the numbers in the name, not its letters.
    return [-float(x) for x in re.findall(r"\d+(?:\.\d+)?", shape)], shape


def _series(summaries: list[dict[str, Any]], key: str) -> list[float]:
    # A run where nothing completed has null latencies: a gap in the curve, not a crash.
    return [math.nan if s[key] is None else float(s[key]) for s in summaries]


def summaries_by_label(dirs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Each result directory's run summaries by rate, under the label its curves get."""
    runs = {_label(d, dirs): [run["summary"] for run in load_runs(d)] for d in dirs}
    empty = [label for label, summaries in runs.items() if not summaries]
    if empty:
        raise FileNotFoundError(f"no rate-*.json results in {', '.join(empty)}")
    return runs


def _plain(value: float, _: object = None) -> str:
    # 0.5, 20, 1500: what a reader compares with an SLO, not 2×10¹.
    return f"{value:g}" if value < 1e5 else f"{value:.0e}"


def _log_axis(ax: Axes) -> None:
    """A log y axis ticked at 1, 2, 5 × 10^k with plain labels, no unlabelled minor clutter."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _slo(runs: dict[str, list[dict[str, Any]]], key: str) -> float | None:
    # The SLO line is drawn only when every run was measured against the same one.
    values = {s.get(key) for ss in runs.values() for s in ss}
    return next(iter(values)) if len(values) == 1 and None not in values else None


def latency_figure(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """TTFT and TPOT, p50 (solid) and p99 (dashed), against achieved output tokens/s."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    fig.suptitle("Latency against achieved throughput")
    for ax, metric in zip(fig.subplots(1, 2), ("ttft", "tpot"), strict=True):
        for i, (label, summaries) in enumerate(runs.items()):
            x = _series(summaries, "output_throughput")
            for pct, style in (("median", "o-"), ("p99", "s--")):
                y = _series(summaries, f"{metric}_{pct}_ms")
                name = "p50" if pct == "median" else pct
                ax.plot(x, y, style, color=f"C{i}", label=f"{label} {name}")
        if (slo := _slo(runs, f"slo_{metric}_ms")) is not None:
            ax.axhline(slo, color="0.3", linestyle=":", label=f"SLO {slo:g} ms")
        _log_axis(ax)
        ax.set_title(f"{metric.upper()} (p50 solid, p99 dashed)")
        ax.set_xlabel("achieved output throughput (tok/s)")
        ax.set_ylabel(f"{metric.upper()} (ms, log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


def goodput_figure(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """SLO goodput (solid) and quality-adjusted goodput (dotted) against request rate."""
    where = _positions([float(s["request_rate"]) for ss in runs.values() for s in ss])
    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.set_title("SLO goodput against request rate")
    for i, (label, summaries) in enumerate(runs.items()):
        x = [where[float(s["request_rate"])] for s in summaries]
        ax.plot(x, _series(summaries, "goodput"), "o-", color=f"C{i}", label=label)
        if any(s["qa_goodput"] is not None for s in summaries):
            ax.plot(
                x,
                _series(summaries, "qa_goodput"),
                "^:",
                color=f"C{i}",
                label=f"{label} (quality-adjusted)",
            )
    finite = sorted(r for r in where if math.isfinite(r))
    if finite:  # goodput equal to the offered rate: every request within the SLO
        ax.plot(finite, finite, color="0.6", linestyle=":", label="offered rate")
    _rate_axis(ax, where)
    ax.set_ylabel("goodput (req/s within SLO)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


def shape_mix_figure(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Per directory, stacked bars of the served-token fraction per shape at each rate."""
    served = {shape for ss in runs.values() for s in ss for shape in s["shape_mix"]}
    shapes = sorted(served, key=_shape_order)
    color = {shape: f"C{i % 10}" for i, shape in enumerate(shapes)}
    fig = Figure(figsize=(4.5 * len(runs) + 1.5, 4.8), layout="constrained")
    fig.suptitle("Served-shape mix by request rate")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (label, summaries) in zip(axes, runs.items(), strict=True):
        x = list(range(len(summaries)))
        bottom = [0.0] * len(summaries)
        for shape in shapes:
            height = [s["shape_mix"].get(shape, 0.0) for s in summaries]
            ax.bar(x, height, bottom=bottom, color=color[shape], label=shape)
            bottom = [b + h for b, h in zip(bottom, height, strict=True)]
        ax.set_xticks(x)
        ax.set_xticklabels([_rate_label(float(s["request_rate"])) for s in summaries])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("fraction of served tokens")
        ax.set_title(label)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8)
    return fig


def plot_runs(dirs: list[Path], out: Path) -> list[Path]:
    """Write latency_throughput.png, goodput.png and shape_mix.png for `dirs` into `out`."""
    runs = summaries_by_label(dirs)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "latency_throughput": latency_figure(runs),
        "goodput": goodput_figure(runs),
        "shape_mix": shape_mix_figure(runs),
    }
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
        paths.append(out / f"{name}.png")
    return paths
