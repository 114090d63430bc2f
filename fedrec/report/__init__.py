"""``fedrec report``: look at runs instead of reading them.

:func:`write_report` reads run folders (:mod:`.runs`), builds the charts (:mod:`.charts`,
:mod:`.clients`) and tables (:mod:`.tables`) once, and draws them twice: a self-contained
interactive HTML page (:mod:`.html`, Plotly) and PNG files (:mod:`.png`, Matplotlib).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fedrec.report.runs import ReportError, Run, find_runs, load_run

__all__ = ["ReportError", "write_report", "seed_groups", "REPORT_FILE"]

REPORT_FILE = "report.html"
_SEED_PART = re.compile(r"(^|__)seed=[^_]*(?=__|$)")


def _unique_names(paths: Sequence[Path]) -> List[str]:
    """Folder names, made longer (parent/name) where two runs share one."""
    names = [p.name or str(p) for p in paths]
    for depth in (2, 3, 8):
        counts = {n: names.count(n) for n in names}
        if all(c == 1 for c in counts.values()):
            break
        names = [("/".join(p.resolve().parts[-depth:]) if counts[n] > 1 else n) for p, n in zip(paths, names)]
    return names


def seed_groups(runs: Sequence[Run]) -> Dict[str, List[str]]:
    """Runs whose configs differ only in seeds (keys naming a seed), grouped: label -> run names."""
    from fedrec.report.tables import flatten

    groups: Dict[str, List[str]] = {}
    labels: Dict[str, str] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(run.config).items() if "seed" not in k.rsplit(".", 1)[-1]}
        identity = json.dumps(flat, sort_keys=True, default=str) + run.kind
        if identity not in labels:
            label = _SEED_PART.sub("", run.name).strip("_") or run.name
            while label in groups:
                label += "'"
            labels[identity] = label
            groups[label] = []
        groups[labels[identity]].append(run.name)
    return groups


def _length(run: Run) -> str:
    if run.kind == "fl":
        rounds = [r.get("round") for r in run.phases["fl"] if isinstance(r.get("round"), int)]
        return f"{max(rounds) if rounds else 0} rounds"
    steps = [r.get("step") for rs in run.phases.values() for r in rs if isinstance(r.get("step"), int)]
    return f"{max(steps) if steps else 0} steps" + (" (finished)" if "test" in run.phases else "")


def _centralized_reference(runs: Sequence[Run], charts: list) -> None:
    """With one standard-training run beside FL runs, its final val metric as a dashed line
    on the FL chart of the same metric."""
    train = [r for r in runs if r.kind == "train" and r.phases.get("val")]
    if len(train) != 1 or not any(r.kind == "fl" for r in runs):
        return
    for chart in charts:
        if chart.section.startswith("Federated") and chart.y_label in ("roc_auc", "log_loss", "accuracy"):
            _, ys = train[0].series("val", chart.y_label)
            if ys:
                chart.reference = ys[-1]
                chart.note = (chart.note + ". " if chart.note else "") + \
                    f"dashed: {train[0].name}'s final val {chart.y_label} ({ys[-1]:.4f}), standard training"


def write_report(paths: Sequence[str | Path], out: str | Path, group_seeds: bool = False,
                 title: Optional[str] = None, pngs: bool = True) -> Path:
    """Write ``out/report.html`` (and ``out/png/*.png``, ``out/report.json``) for the runs in
    ``paths`` (run folders, or folders of runs such as a sweep's); returns the page's path.

    ``group_seeds``: runs that differ only in seeds are drawn as one line, mean +- std.
    """
    from fedrec.report.charts import metric_charts
    from fedrec.report.clients import client_split_charts, per_client_charts
    from fedrec.report.html import color_of, data_json, render_page
    from fedrec.report.png import write_pngs
    from fedrec.report.tables import config_diff, group_table, metric_table

    started = time.perf_counter()
    folders = find_runs(list(paths))
    if not folders:
        raise ReportError("no runs named")
    names = _unique_names(folders)
    runs = [load_run(p, n) for p, n in zip(folders, names)]
    notes = [n for run in runs for n in run.notes]
    if all(not run.phases for run in runs):
        raise ReportError("nothing to show: " + "; ".join(notes))
    groups = seed_groups(runs) if group_seeds else None
    if groups and all(len(v) == 1 for v in groups.values()):
        groups = None
    table = metric_table(runs)
    columns = [run.name for run in runs]
    if groups:
        table = group_table(table, groups)
        columns = list(groups)
    diff_runs = runs if not groups else [next(r for r in runs if r.name == g[0]) for g in groups.values()]
    diff = config_diff(diff_runs)
    if groups:  # columns are groups: name them by their label, drop the seeds
        diff = {k: {label: v[members[0]] for label, members in groups.items()} for k, v in diff.items()
                if "seed" not in k.rsplit(".", 1)[-1]}
    charts = metric_charts(runs, groups)
    _centralized_reference(runs, charts)
    charts += client_split_charts(runs, notes)
    charts += per_client_charts(runs, notes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors: Dict[str, str] = {}
    for chart in charts:
        for series in chart.series:
            colors.setdefault(series.name, color_of(len(colors)))
    png_names = [f"png/{n}" for n in write_pngs(charts, colors, out / "png")] if pngs else []
    runs_table = [{"name": r.name, "kind": r.kind, "length": _length(r), "path": str(r.path)} for r in runs]
    page = render_page(title or f"fedrec report: {len(runs)} run(s)", runs_table, columns, table, diff, charts,
                       notes, png_names, colors)
    target = out / REPORT_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    (out / "report.json").write_text(json.dumps({
        "runs": runs_table, "groups": groups, "config_diff": diff, "notes": notes,
        "charts": [c.key for c in charts], "pngs": png_names,
        "metrics": json.loads(data_json(table)), "seconds": time.perf_counter() - started}, indent=1, default=str))
    return target
