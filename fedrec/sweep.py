"""``fedrec sweep``: a grid of runs from one base config, run in parallel, resumable, reported.

Each point of the cartesian product of the ``--grid`` values (times ``--seeds``) is one
run folder under ``--logdir``, named by its values (``fl.local_lr=0.1__seed=0``), run as
its own ``fedrec simulate`` (or ``train``) process: a crash, a diverged model or Ctrl-C
stays within its point, and the CLI's checks and one-line errors apply unchanged. Every
point's config is checked before the first run starts. A finished point (its summary
says so) is skipped; any other is started with ``--resume``, which continues an
interrupted run from its newest checkpoint (or starts it afresh). At the end, one report
over all points, seeds drawn as mean and spread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from fedrec.utilities.config import ConfigError, load_config

__all__ = ["Point", "parse_grid", "make_points", "check_points", "is_finished", "run_sweep"]

SEED_KEYS = {"simulate": ("fl.seed",),
             "train": ("train.config.data_seed", "train.config.init_seed", "train.config.model_seed")}
LOGS = "logs"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclasses.dataclass
class Point:
    """One run of the grid: its folder name and the ``--set`` overrides that make it."""

    name: str
    sets: List[str]
    values: Dict[str, str]


def _split_values(text: str) -> List[str]:
    """``0.1,0.3`` -> [``0.1``, ``0.3``]; commas inside brackets or braces stay
    (``[1,2],[3]`` is two values)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["fl.local_lr=0.1,0.3", ...]`` -> [(key, values)], in the order given."""
    grid: List[Tuple[str, List[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid fl.local_lr=0.1,0.3)")
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid: key {key!r} given twice; put all its values in one --grid")
        parsed = _split_values(values)
        if "" in parsed:
            raise ConfigError(f"--grid {item!r}: an empty value")
        grid.append((key, parsed))
    return grid


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def point_name(values: Dict[str, str]) -> str:
    """A folder name from the point's values: ``key=value`` joined by ``__``, characters a
    shell or a file system dislikes replaced; long or clashing names end in a hash."""
    name = "__".join(f"{_safe(k)}={_safe(v)}" for k, v in values.items()) or "base"
    if len(name) > 120:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name[:100]}__{digest}"
    return name


def make_points(grid: Sequence[Tuple[str, List[str]]], seeds: int, seed_keys: Sequence[str]) -> List[Point]:
    """The cartesian product of ``grid``, each point once per seed (0 .. seeds-1)."""
    keys = [k for k, _ in grid]
    points: List[Point] = []
    for combo in itertools.product(*[values for _, values in grid]):
        values = dict(zip(keys, combo))
        for seed in range(seeds):
            named = dict(values, seed=str(seed)) if seeds > 1 else dict(values)
            sets = [f"{k}={v}" for k, v in values.items()]
            if seeds > 1:
                sets += [f"{key}={seed}" for key in seed_keys]
            points.append(Point(point_name(named), sets, named))
    names = [p.name for p in points]
    for point in points:  # sanitising can make two names one: tell them apart
        if names.count(point.name) > 1:
            point.name += "__" + hashlib.sha1(json.dumps(point.values, sort_keys=True).encode()).hexdigest()[:8]
    return points


def _known(base: Dict[str, Any], key: str) -> bool:
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_points(base_path: str, points: Sequence[Point], grid_keys: Sequence[str], command: str,
                 sets: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Every point's config, checked before anything runs: grid keys must be config keys
    (in the base config, or ones its ``fl`` / ``train.config`` sections accept), and each
    point's values must pass those sections' checks. Returns name -> config."""
    from fedrec.federated.config import fl_config_from
    from fedrec.runner import build_train_config

    base = load_config(base_path, sets=list(sets))
    for key in grid_keys:
        if _known(base, key):
            continue
        section = key.split(".")[0]
        accepted = (key.startswith("fl.") and "fl" in base) or key.startswith("train.config.")
        if not accepted:
            top = base.get(section)
            hint = f"; keys under {section!r}: {sorted(top)}" if isinstance(top, dict) else ""
            raise ConfigError(f"--grid: unknown config key {key!r} (not in {base_path}){hint}")
    configs: Dict[str, Dict[str, Any]] = {}
    for point in points:
        config = load_config(base_path, sets=[*sets, *point.sets])
        try:
            if command == "simulate":
                fl_config_from(config)
            build_train_config(config)
        except ConfigError as err:
            raise ConfigError(f"--grid point {point.name}: {err}") from None
        configs[point.name] = config
    return configs


def is_finished(folder: Path, config: Dict[str, Any], command: str) -> bool:
    """A simulation whose summary says every round is done (for this config's
    ``fl.num_rounds``), or a training run that wrote its final test line."""
    if command == "simulate":
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        wanted = config.get("fl", {}).get("num_rounds")
        if "finished" in summary:
            return bool(summary["finished"]) and summary.get("num_rounds") == wanted
        return isinstance(summary.get("rounds"), int) and summary["rounds"] >= (wanted or 0)
    from fedrec.report.runs import load_run

    try:
        return "test" in load_run(folder).phases
    except ValueError:
        return False


@dataclasses.dataclass
class Outcome:
    point: Point
    status: str  # "skipped" (finished before), "done", "failed"
    seconds: float = 0.0
    message: str = ""


def _run_point(point: Point, command: str, base_path: str, sets: Sequence[str], logdir: Path,
               threads: Optional[int]) -> Outcome:
    folder = logdir / point.name
    log = logdir / LOGS / f"{point.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedrec.cli", command, "--config", base_path]
    for item in [*sets, *point.sets]:
        argv += ["--set", item]
    argv += ["--logdir", str(folder), "--resume"]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        status = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    seconds = time.perf_counter() - started
    if status == 0:
        return Outcome(point, "done", seconds)
    if status == 130:
        raise KeyboardInterrupt
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return Outcome(point, "failed", seconds, f"exit status {status}: {last[:300]} (log: {log})")


def run_sweep(base_path: str, grid_items: Sequence[str], logdir: str | Path, seeds: int = 1, jobs: int = 1,
              command: str = "simulate", sets: Sequence[str] = (), report: bool = True,
              echo: Any = print) -> Tuple[List[Outcome], Optional[Path]]:
    """Run (or finish) the grid; returns each point's outcome and the report's path."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    grid = parse_grid(grid_items)
    points = make_points(grid, seeds, SEED_KEYS[command])
    configs = check_points(base_path, points, [k for k, _ in grid], command, sets)
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "sweep.yml").write_text(yaml.safe_dump(
        {"command": command, "config": str(base_path), "grid": dict(grid), "seeds": seeds, "sets": list(sets),
         "points": [p.name for p in points]}, sort_keys=False))
    outcomes: List[Outcome] = []
    todo = []
    for point in points:
        if is_finished(logdir / point.name, configs[point.name], command):
            outcomes.append(Outcome(point, "skipped"))
        else:
            todo.append(point)
    echo(f"sweep: {len(points)} point(s) in {logdir}: {len(points) - len(todo)} finished before, "
         f"{len(todo)} to run, {min(jobs, max(len(todo), 1))} at a time")
    threads = 1 if jobs > 1 else None
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(_run_point, p, command, base_path, sets, logdir, threads) for p in todo]
        for count, future in enumerate(futures, 1):
            outcome = future.result()
            outcomes.append(outcome)
            text = f"{outcome.seconds:.1f}s" if outcome.status == "done" else outcome.message
            echo(f"  [{count}/{len(todo)}] {outcome.point.name}: {outcome.status} {text}")
    except BaseException:  # Ctrl-C: the running points stop too (same terminal); start no more
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    page = None
    existing = [logdir / p.name for p in points if (logdir / p.name / "metrics.jsonl").is_file()]
    if report and existing:
        from fedrec.report import write_report

        page = write_report(existing, logdir / "report", group_seeds=seeds > 1,
                            title=f"fedrec sweep: {', '.join(k for k, _ in grid)} ({len(points)} runs)")
    return outcomes, page
