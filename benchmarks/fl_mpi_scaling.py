"""Seconds per federated round: the local backend against 1 and 2 MPI processes.

The task is the demo DLRM of configs/dlrm_fl.yml on synthetic Criteo-format rows
generated into a temporary folder (200k by default; generation and preprocessing are
not timed): 1000 simulated workers, 100 per round, a few rounds. Each configuration
runs as its own ``fedrec simulate`` (under ``mpiexec -n K python -m mpi4py.futures`` for
K-1 MPI processes), with the project's defaults; the first round is skipped as
warm-up, and the time of a round is its training plus its evaluation on the
validation split (``round_seconds + eval_seconds`` in metrics.jsonl), the median over
the timed rounds. With ``--repeats R`` the configurations run in turn R times and each
one's best run counts (the one least disturbed by other load on the machine); ``runs``
lists them all.

Prints one JSON line per configuration (seconds per round, the speedup over the
local backend measured in this same run, and whether every round's metrics equal the
local backend's bit for bit), then a summary line.

    .venv/bin/python benchmarks/fl_mpi_scaling.py [--rows 200000] [--rounds 5] [--processes 1 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"round_seconds", "eval_seconds"}


def prepare(workdir: Path, rows: int) -> Dict[str, Any]:
    from fedrec.data import synthesize
    from fedrec.runner import run_preprocess
    from fedrec.utilities.config import load_config

    config = load_config(PROJECT_ROOT / "configs" / "dlrm_fl.yml")
    config["model"]["preproc"].update({"datafile": str(workdir / "synthetic.txt"),
                                       "output_file": str(workdir / "processed")})
    synthesize(rows, str(workdir / "synthetic.txt"), seed=0)
    run_preprocess(config, progress=False)
    return config


def run_one(config: Dict[str, Any], logdir: Path, worker_processes: int) -> List[Dict[str, Any]]:
    """One ``fedrec simulate``; its metrics.jsonl rows of phase fl."""
    config_file = logdir.with_suffix(".yml")
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "fedrec.cli", "simulate", "--config", str(config_file),
               "--logdir", str(logdir)]
    if worker_processes:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = [str(mpiexec), "-n", str(worker_processes + 1), sys.executable, "-m", "mpi4py.futures",
                   *command[1:]]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    lines = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in lines if row.get("phase") == "fl"]


def summarise(rows: List[Dict[str, Any]], warmup: int) -> Dict[str, float]:
    """Medians over the timed rounds (a round disturbed by other load counts less)."""
    timed = rows[warmup:]
    train = [r["round_seconds"] for r in timed]
    evals = [r.get("eval_seconds", 0.0) for r in timed]
    return {"seconds_per_round": statistics.median(t + e for t, e in zip(train, evals)),
            "train_seconds_per_round": statistics.median(train), "eval_seconds_per_round": statistics.median(evals)}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--num_workers", type=int, default=1000)
    parser.add_argument("--client_num_per_round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run, the first is warm-up")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="MPI processes to try")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times")
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fl_mpi_scaling-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        config = prepare(workdir, args.rows)
        config["fl"].update({"num_workers": args.num_workers, "client_num_per_round": args.client_num_per_round,
                             "num_rounds": args.rounds, "progress_bar": False})
        setups = [("local", 0)] + [("mpi", k) for k in args.processes]
        runs: Dict[str, List[Dict[str, float]]] = {}
        rows_of: Dict[str, List[Dict[str, Any]]] = {}
        load_before = os.getloadavg()
        for repeat in range(args.repeats):
            for backend, processes in setups:
                name = backend if not processes else f"mpi-{processes}"
                run_config = json.loads(json.dumps(config))
                run_config["fl"]["backend"] = backend
                logdir = workdir / f"{name}-{repeat}"
                start = time.perf_counter()
                rows = run_one(run_config, logdir, processes)
                stats = summarise(rows, warmup=1)
                stats["run_seconds"] = time.perf_counter() - start
                runs.setdefault(name, []).append(stats)
                rows_of.setdefault(name, rows)

        def strip(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
            return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

        def best(name: str) -> Dict[str, float]:  # the run least disturbed by other load
            return min(runs[name], key=lambda r: r["seconds_per_round"])

        local = best("local")
        results = []
        for backend, processes in setups:
            name = backend if not processes else f"mpi-{processes}"
            run = best(name)
            line = {"benchmark": "fl_mpi_scaling", "setup": name, "worker_processes": processes,
                    "seconds_per_round": round(run["seconds_per_round"], 4),
                    "train_seconds_per_round": round(run["train_seconds_per_round"], 4),
                    "eval_seconds_per_round": round(run["eval_seconds_per_round"], 4),
                    "speedup_vs_local": round(local["seconds_per_round"] / run["seconds_per_round"], 3),
                    "train_speedup_vs_local": round(local["train_seconds_per_round"]
                                                    / run["train_seconds_per_round"], 3),
                    "same_metrics_as_local": strip(rows_of[name]) == strip(rows_of["local"]),
                    "runs": [round(r["seconds_per_round"], 4) for r in runs[name]]}
            results.append(line)
            print(json.dumps(line), flush=True)
        print(json.dumps({"benchmark": "fl_mpi_scaling", "summary": True, "rows": args.rows,
                          "num_workers": args.num_workers, "client_num_per_round": args.client_num_per_round,
                          "rounds": args.rounds, "warmup_rounds": 1, "repeats": args.repeats,
                          "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()],
                          "speedups": {r["setup"]: r["speedup_vs_local"] for r in results}}), flush=True)


if __name__ == "__main__":
    main()
