"""Reading run folders for reports: what a run wrote, read so that a damaged folder still reports.

A report is read after the fact, often of runs that were killed or that come from older
versions, so nothing here raises for a damaged file: a torn last line of
``metrics.jsonl`` (a killed run) is dropped with a note, an unreadable config or summary
is a note. Only a folder that holds no run at all is an error (:class:`ReportError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from fedrec.utilities.logger import CONFIG_FILE, METRICS_FILE

__all__ = ["ReportError", "Run", "load_run", "find_runs", "numeric_keys"]

PARTITION_FILE = "partition.npz"
SUMMARY_FILE = "summary.json"
# Record keys that say where a value was logged, not what was measured.
INDEX_KEYS = ("phase", "step", "epoch", "round")


class ReportError(ValueError):
    """A report cannot be written (no run in a folder, nothing to show); the message says why."""


@dataclasses.dataclass
class Run:
    """One run folder, read: its metrics grouped by phase, config, summary and notes."""

    path: Path
    name: str
    phases: Dict[str, List[Dict[str, Any]]]
    config: Dict[str, Any]
    summary: Dict[str, Any]
    notes: List[str]

    @property
    def kind(self) -> str:
        """``fl`` for a simulation (``fl`` records), else ``train``."""
        return "fl" if "fl" in self.phases else "train"

    @property
    def partition_path(self) -> Optional[Path]:
        path = self.path / PARTITION_FILE
        return path if path.is_file() else None

    def series(self, phase: str, key: str) -> tuple[List[float], List[float]]:
        """(x, y) of ``key`` in ``phase``: x is the round for FL, the step otherwise; records
        without a finite value of ``key`` are left out."""
        xs: List[float] = []
        ys: List[float] = []
        for record in self.phases.get(phase, []):
            value = record.get(key)
            if _is_number(value) and math.isfinite(value):
                xs.append(float(record.get("round", record.get("step", len(xs)))))
                ys.append(float(value))
        return xs, ys


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(records: List[Dict[str, Any]]) -> List[str]:
    """Keys with a number in at least one record, in first-seen order (index keys left out)."""
    seen: Dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in INDEX_KEYS and _is_number(value):
                seen.setdefault(key, None)
    return list(seen)


def _read_records(path: Path, notes: List[str]) -> List[Dict[str, Any]]:
    """metrics.jsonl's records; a torn last line or a bad line is dropped with a note."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: List[Dict[str, Any]] = []
    bad: List[int] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            bad.append(lineno)
            continue
        records.append(record)
    if bad == [len(lines)]:
        notes.append(f"{path}: the last line is cut short (a run stopped while writing it); left out")
    elif bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(f"{path}: {len(bad)} line(s) are not JSON records (line {shown}); left out")
    return records


def _read_mapping(path: Path, notes: List[str], parse: Any) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        notes.append(f"{path}: unreadable ({type(err).__name__}); left out")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path}: not a mapping; left out")
        return {}
    return value


def load_run(path: str | Path, name: Optional[str] = None) -> Run:
    """Read the run in ``path``; :class:`ReportError` when ``path`` holds no run."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such folder")
    if not path.is_dir():
        raise ReportError(f"{path} is not a run folder (a run folder holds {METRICS_FILE})")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        inner = sorted(p.parent.name for p in path.glob(f"*/{METRICS_FILE}"))
        hint = (f"; it holds runs: {', '.join(inner[:5])}{' ...' if len(inner) > 5 else ''} "
                "(name them, or use the sweep's folder)") if inner else ""
        raise ReportError(f"{path} is not a run folder: it has no {METRICS_FILE}{hint}")
    notes: List[str] = []
    records = _read_records(metrics, notes)
    phases: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        phases.setdefault(str(record.get("phase", "metrics")), []).append(record)
    config = _read_mapping(path / CONFIG_FILE, notes, yaml.safe_load)
    summary = _read_mapping(path / SUMMARY_FILE, notes, json.loads)
    if not records:
        notes.append(f"{metrics} holds no records yet")
    return Run(path=path, name=name or path.name, phases=phases, config=config, summary=summary, notes=notes)


def find_runs(paths: List[str | Path]) -> List[Path]:
    """Run folders named by ``paths``: a run folder itself, or a folder of runs (a sweep)."""
    found: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / METRICS_FILE).is_file():
            inner = sorted(p.parent for p in path.glob(f"*/{METRICS_FILE}"))
            if inner:
                found.extend(inner)
                continue
        found.append(path)
    return found
