"""Time and size of ``fedrec report`` over a 10-run x 100-round sweep (no training: the
metrics.jsonl files are written directly, shaped like a DP FL run's).

    .venv/bin/python benchmarks/report_render.py [--runs 10] [--rounds 100] [--seeds 2]

Prints one JSON line: seconds to write the report (wall and CPU), the HTML page's size in
MB, the PNG files' count and size. The issue's aims: under 5 s and under 10 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, emit


def write_runs(root: Path, runs: int, rounds: int, seeds: int) -> list:
    base = yaml.safe_load((ROOT / "configs" / "dlrm_fl.yml").read_text())
    folders = []
    for i in range(runs):
        lr = 0.1 * (1 + i // seeds)
        seed = i % seeds
        folder = root / f"fl.local_lr={lr:g}__seed={seed}"
        folder.mkdir(parents=True)
        rng = random.Random(i)
        config = yaml.safe_load(yaml.safe_dump(base))
        config["fl"].update(local_lr=lr, seed=seed)
        (folder / "config.yml").write_text(yaml.safe_dump(config))
        with open(folder / "metrics.jsonl", "w") as f:
            for r in range(1, rounds + 1):
                auc = 0.75 - 0.2 * math.exp(-r / (10 + 5 * i)) + rng.gauss(0, 0.003)
                row = {"phase": "fl", "step": r, "round": r, "clients": 100, "samples": 16000 + rng.randint(0, 999),
                       "round_seconds": 1.5 + rng.random(), "train_loss": 0.5 + 0.1 * math.exp(-r / 20),
                       "bytes_down": 40_000_000, "bytes_up": 38_000_000 + rng.randint(0, 10 ** 6),
                       "dp_clipped": rng.randint(0, 100), "epsilon": 0.05 * r, "roc_auc": auc,
                       "log_loss": 0.6 - (auc - 0.55), "accuracy": 0.75 + rng.random() * 0.01,
                       "eval_seconds": 0.3}
                f.write(json.dumps(row) + "\n")
        (folder / "summary.json").write_text(json.dumps({"rounds": rounds, "finished": True}))
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2, help="runs per point (grouped: mean and std)")
    args = parser.parse_args()
    from fedrec.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_runs(root / "sweep", args.runs, args.rounds, args.seeds)
        for group in (False, True):
            out = root / f"report-{group}"
            wall, cpu = time.perf_counter(), time.process_time()
            page = write_report([root / "sweep"], out, group_seeds=group)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            pngs = list((out / "png").glob("*.png"))
            emit(bench="report_render", runs=args.runs, rounds=args.rounds, group_seeds=group,
                 seconds=round(wall, 3), cpu_seconds=round(cpu, 3),
                 html_mb=round(page.stat().st_size / 1e6, 3), pngs=len(pngs),
                 png_mb=round(sum(p.stat().st_size for p in pngs) / 1e6, 3),
                 charts=len(json.loads((out / "report.json").read_text())["charts"]),
                 aim="seconds < 5, html_mb < 10")


if __name__ == "__main__":
    main()
