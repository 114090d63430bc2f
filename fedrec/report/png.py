"""PNG files of the report's charts (Matplotlib, Agg: no display needed), for papers and
for looking from a terminal. Same :class:`Chart` data as the HTML page, same colours."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from fedrec.report.charts import Chart
from fedrec.report.tables import QUALITY

__all__ = ["write_pngs"]


def _draw(chart: Chart, colors: Dict[str, str], axis: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)  # not pyplot: no global state, nothing to close
    ax = fig.add_subplot()
    if chart.kind == "hist":
        for series in chart.series:
            ax.hist(series.y, bins=30, alpha=0.6, label=series.name, color=colors[series.name])
        if chart.reference is not None:
            ax.axvline(chart.reference, linestyle="--", color="#444")
        ax.set_xlabel(chart.title.split(" (")[0])
        ax.set_ylabel(chart.y_label)
    else:
        for series in chart.series:
            x = series.x[axis]
            ax.plot(x, series.y, label=series.name, color=colors[series.name], linewidth=1.5,
                    marker="o" if len(x) <= 30 else None, markersize=3)
            if series.spread is not None:
                ax.fill_between(x, [y - s for y, s in zip(series.y, series.spread)],
                                [y + s for y, s in zip(series.y, series.spread)], color=colors[series.name], alpha=0.2)
        if chart.reference is not None:
            ax.axhline(chart.reference, linestyle="--", color="#444")
        ax.set_xlabel(axis)
        ax.set_ylabel(chart.y_label)
        ax.grid(alpha=0.3)
        if axis in ("round", "step"):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(chart.title, fontsize=10)
    if len(chart.series) > 1:
        ax.legend(fontsize=7, loc="best")
    # fixed margins rather than tight_layout, which lays the figure out twice (half the time)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.15)
    fig.savefig(path, pil_kwargs={"compress_level": 1})


def write_pngs(charts: Sequence[Chart], colors: Dict[str, str], folder: Path) -> List[str]:
    """Write each chart as ``<key>.png`` (quality metrics also against their other x axes);
    returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names: List[str] = []
    for chart in charts:
        axes = chart.axes[:1] if chart.kind == "line" else [""]
        if chart.kind == "line" and chart.y_label in QUALITY:
            axes = list(chart.axes)
        for i, axis in enumerate(axes):
            suffix = "" if i == 0 else "-vs-" + axis.split(" (")[0].replace(" ", "_")
            name = f"{chart.key}{suffix}.png"
            _draw(chart, colors, axis, folder / name)
            names.append(name)
    return names
