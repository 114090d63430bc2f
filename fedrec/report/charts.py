"""The report's charts as plain data: one :class:`Chart` model, drawn twice (Plotly for the
HTML page, Matplotlib for the PNG files), so both always show the same numbers.

A line chart may have several x axes (round, cumulative bytes, virtual time, wall time):
the page switches between them with buttons; the PNGs show the first, plus the others for
the quality metrics.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

from fedrec.report.runs import Run, numeric_keys
from fedrec.report.tables import QUALITY

__all__ = ["Series", "Chart", "metric_charts", "group_series"]

ROUND, STEP = "round", "step"
BYTES = "cumulative MB (up + down)"
VIRTUAL = "virtual time (s)"
WALL = "wall time (s)"
# Phases whose single record is a table row, not a curve.
_NOT_CURVES = ("test",)


@dataclasses.dataclass
class Series:
    """One line (or one histogram's values): ``x`` per axis name, all as long as ``y``."""

    name: str
    y: List[float]
    x: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
    spread: Optional[List[float]] = None  # +- band (std over seeds)


@dataclasses.dataclass
class Chart:
    """A chart: ``kind`` is "line" (y against one of ``axes``) or "hist" (the ``y`` values)."""

    key: str  # unique, safe as a file name
    title: str
    y_label: str
    series: List[Series]
    axes: List[str] = dataclasses.field(default_factory=list)
    kind: str = "line"
    section: str = "metrics"
    note: str = ""
    reference: Optional[float] = None  # a dashed horizontal line (hist: vertical), e.g. the global rate


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "chart"


def _axes_of(records: List[dict]) -> Dict[str, List[float]]:
    """Every record's position on each x axis the records allow (FL runs)."""
    axes: Dict[str, List[float]] = {ROUND: [float(r.get("round", r.get("step", i))) for i, r in enumerate(records)]}
    if any("bytes_up" in r or "bytes_down" in r for r in records):
        total, xs = 0.0, []
        for r in records:
            total += float(r.get("bytes_up") or 0) + float(r.get("bytes_down") or 0)
            xs.append(total / 1e6)
        axes[BYTES] = xs
    if any(isinstance(r.get("virtual_time"), (int, float)) for r in records):
        last, xs = 0.0, []
        for r in records:
            value = r.get("virtual_time")
            last = float(value) if isinstance(value, (int, float)) else last
            xs.append(last)
        axes[VIRTUAL] = xs
    if any("round_seconds" in r for r in records):
        total, xs = 0.0, []
        for r in records:
            total += float(r.get("round_seconds") or 0) + float(r.get("eval_seconds") or 0)
            xs.append(total)
        axes[WALL] = xs
    return axes


def _run_series(run: Run, phase: str, key: str) -> Optional[Series]:
    records = run.phases.get(phase, [])
    if phase == "fl":
        axes = _axes_of(records)
    else:
        axes = {STEP: [float(r.get("step", i)) for i, r in enumerate(records)]}
    keep = [i for i, r in enumerate(records) if _finite(r.get(key))]
    if not keep:
        return None
    return Series(name=run.name, y=[float(records[i][key]) for i in keep],
                  x={axis: [xs[i] for i in keep] for axis, xs in axes.items()})


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def group_series(name: str, members: Sequence[Series]) -> Series:
    """Mean and sample std over ``members`` (seeds of one point), at each position of the
    first axis that any member has; the other axes are averaged the same way."""
    first = next(iter(members[0].x))
    at: Dict[float, List[tuple]] = {}
    for series in members:
        for i, x in enumerate(series.x[first]):
            at.setdefault(x, []).append((series, i))
    axes = [a for a in members[0].x if all(a in s.x for s in members)]
    out = Series(name=name, y=[], x={a: [] for a in axes}, spread=[])
    for x in sorted(at):
        points = at[x]
        ys = [s.y[i] for s, i in points]
        mean = sum(ys) / len(ys)
        out.y.append(mean)
        out.spread.append(math.sqrt(sum((v - mean) ** 2 for v in ys) / (len(ys) - 1)) if len(ys) > 1 else 0.0)
        for a in axes:
            vals = [s.x[a][i] for s, i in points]
            out.x[a].append(sum(vals) / len(vals))
    return out


def _title(phase: str, key: str) -> str:
    if phase == "fl":
        return key
    return f"{phase} {key}"


def metric_charts(runs: Sequence[Run], groups: Optional[Mapping[str, Sequence[str]]] = None) -> List[Chart]:
    """A line chart per (phase, metric) over all runs (or groups of runs), quality first."""
    by_name = {run.name: run for run in runs}
    phase_keys: Dict[tuple, None] = {}
    for run in runs:
        for phase, records in run.phases.items():
            if phase in _NOT_CURVES:
                continue
            for key in numeric_keys(records):
                phase_keys.setdefault((phase, key), None)

    def order(item: tuple) -> tuple:
        phase, key = item
        return ({"fl": 0, "val": 1, "train": 2}.get(phase, 3), QUALITY.index(key) if key in QUALITY else 99, phase)

    charts: List[Chart] = []
    for phase, key in sorted(phase_keys, key=order):
        series: List[Series] = []
        if groups:
            for group, names in groups.items():
                members = [s for s in (_run_series(by_name[n], phase, key) for n in names) if s is not None]
                if members:
                    series.append(group_series(group, members))
        else:
            series = [s for s in (_run_series(run, phase, key) for run in runs) if s is not None]
        if not series:
            continue
        axes = [a for a in series[0].x if all(a in s.x for s in series)]
        # runs that log this phase (same kind of run) but not this metric
        missing = [run.name for run in runs
                   if run.phases.get(phase) and not any(key in r for r in run.phases[phase])]
        note = f"not recorded by: {', '.join(missing)}" if missing and len(runs) > 1 else ""
        section = "Federated simulation" if phase == "fl" else "Standard training"
        charts.append(Chart(key=safe_key(f"{phase}-{key}"), title=_title(phase, key), y_label=key,
                            series=series, axes=axes, section=section, note=note))
    return charts
