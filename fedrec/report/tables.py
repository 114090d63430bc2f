"""The report's tables: final and best value of every metric per run, and the config diff.

Both are plain data (lists and dicts) so that the HTML page, the console and the tests
read the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedrec.report.runs import Run, numeric_keys

__all__ = ["direction", "flatten", "config_diff", "MetricCell", "metric_table", "format_value"]

# Which way is better, for the metrics whose "best" means something.
_HIGHER = ("roc_auc", "auc", "accuracy", "hr", "hit_rate", "ndcg", "precision", "recall", "samples_per_second")
_LOWER = ("log_loss", "loss", "train_loss", "mse", "rmse", "mae")
# Metric keys shown first (quality before cost), in this order.
QUALITY = ("roc_auc", "log_loss", "accuracy", "train_loss", "loss", "epsilon")


def direction(key: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when "best" means nothing."""
    base = key.lower().split("@")[0]
    if base in _HIGHER:
        return 1
    if base in _LOWER:
        return -1
    return 0


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings as dotted keys (``{"fl": {"num_rounds": 3}}`` -> ``{"fl.num_rounds": 3}``)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_MISSING = object()


def config_diff(runs: Sequence[Run], ignore: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """dotted key -> {run name: value} for the keys whose values differ between ``runs``
    (a key missing from a run counts as differing; its value is shown as None)."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat)) if flat else []
    diff: Dict[str, Dict[str, Any]] = {}
    for key in keys:
        if key in ignore:
            continue
        values = [f.get(key, _MISSING) for f in flat]
        texts = {json.dumps(v, sort_keys=True, default=str) if v is not _MISSING else "<missing>" for v in values}
        if len(texts) > 1:
            diff[key] = {run.name: (None if v is _MISSING else v) for run, v in zip(runs, values)}
    return diff


@dataclasses.dataclass
class MetricCell:
    """One run's (or one group's) final and best value of one metric."""

    final: float
    best: Optional[float] = None
    best_at: Optional[float] = None
    final_spread: Optional[float] = None  # spread over seeds, for groups
    best_spread: Optional[float] = None
    count: int = 1


def _cell(xs: List[float], ys: List[float], key: str) -> MetricCell:
    sign = direction(key)
    cell = MetricCell(final=ys[-1])
    if sign:
        i = max(range(len(ys)), key=lambda j: sign * ys[j])
        cell.best, cell.best_at = ys[i], xs[i]
    return cell


def metric_keys(runs: Sequence[Run]) -> List[Tuple[str, str]]:
    """(phase, key) of every numeric metric of ``runs``: quality metrics first."""
    seen: Dict[Tuple[str, str], None] = {}
    for run in runs:
        for phase, records in run.phases.items():
            for key in numeric_keys(records):
                seen.setdefault((phase, key), None)

    def order(item: Tuple[str, str]) -> Tuple[int, int, str, str]:
        phase, key = item
        phase_rank = {"fl": 0, "val": 1, "test": 2, "train": 3}.get(phase, 4)
        quality = QUALITY.index(key) if key in QUALITY else len(QUALITY)
        return (quality, phase_rank, phase, key)

    return sorted(seen, key=order)


def metric_table(runs: Sequence[Run]) -> Dict[Tuple[str, str], Dict[str, MetricCell]]:
    """(phase, key) -> {run name: cell}; a run without a value of that metric has no cell."""
    table: Dict[Tuple[str, str], Dict[str, MetricCell]] = {}
    for phase, key in metric_keys(runs):
        row: Dict[str, MetricCell] = {}
        for run in runs:
            xs, ys = run.series(phase, key)
            if ys:
                row[run.name] = _cell(xs, ys, key)
        table[(phase, key)] = row
    return table


def _mean_spread(values: List[float]) -> Tuple[float, Optional[float]]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_table(table: Dict[Tuple[str, str], Dict[str, MetricCell]],
                groups: Mapping[str, Sequence[str]]) -> Dict[Tuple[str, str], Dict[str, MetricCell]]:
    """The table over groups of runs (seeds of one point): mean and sample std of the cells."""
    out: Dict[Tuple[str, str], Dict[str, MetricCell]] = {}
    for metric, row in table.items():
        grouped: Dict[str, MetricCell] = {}
        for group, names in groups.items():
            cells = [row[n] for n in names if n in row]
            if not cells:
                continue
            final, final_spread = _mean_spread([c.final for c in cells])
            cell = MetricCell(final=final, final_spread=final_spread, count=len(cells))
            bests = [c.best for c in cells if c.best is not None]
            if bests:
                cell.best, cell.best_spread = _mean_spread(bests)
            grouped[group] = cell
        out[metric] = grouped
    return out


def format_value(value: Any) -> str:
    """A number in a table cell: 4 significant digits, thousands grouped for large ones."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value, default=str) if not isinstance(value, str) else value
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"
