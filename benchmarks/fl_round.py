"""Simulator round time against the compute floor, and memory/start-up against workers.

    .venv/bin/python benchmarks/fl_round.py [--rows 200000] [--rounds 6]

Prints JSON lines:
* ``round_ratio``: the demo DLRM (configs/dlrm_fl.yml), 1,000 workers, 100 per round:
  simulator seconds per round against training the same samples with the same batches
  centrally in the same process (the compute floor), alternated in one run. Aim <= 1.15.
* ``scale``: peak RSS and start-up seconds at 1,000 / 10,000 / 100,000 workers (each in a
  fresh process, one round of 100 clients), and the RSS ratio 10k / 1k (aim <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, compare_with_floor, emit, make_data, peak_rss_mib


def round_ratio(workdir: Path, rows: int, rounds: int, threads: int) -> None:
    import torch

    from fedrec.federated.simulation import Simulation

    torch.set_num_threads(threads)
    config = make_data(workdir, rows)
    config["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "num_rounds": 10_000,
                         "partitioner": {"name": "dirichlet", "alpha": 0.5}})
    sim = Simulation(config, workdir / "fl-ratio")
    result = compare_with_floor(sim, rounds)
    sim.close()
    samples = sum(r["samples"] for r in result.pop("rows")[1:]) / max(rounds - 1, 1)
    emit(bench="round_ratio", workers=1000, per_round=100, threads=threads,
         samples_per_round=samples, **result)


def scale_child(workdir: Path, rows: int, workers: int) -> None:
    from fedrec.federated.simulation import Simulation

    config = make_data(workdir, rows)
    config["fl"].update({"num_workers": workers, "client_num_per_round": 100, "num_rounds": 1,
                         "partitioner": {"name": "iid"}, "eval_every_n_rounds": 1})
    start = time.perf_counter()
    sim = Simulation(config, workdir / f"fl-scale-{workers}")
    startup = time.perf_counter() - start
    row = sim.run_round()
    sim.close()
    print(json.dumps({"workers": workers, "startup_seconds": startup, "round_seconds": row["round_seconds"],
                      "peak_rss_mib": peak_rss_mib()}))


def scale(workdir: Path, rows: int) -> None:
    results = {}
    for workers in (1000, 10_000, 100_000):
        out = subprocess.run([sys.executable, __file__, "--child-scale", str(workers), "--rows", str(rows),
                              "--workdir", str(workdir)], capture_output=True, text=True, cwd=ROOT, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results[workers] = result
        emit(bench="scale", **result)
    emit(bench="scale_ratio", rss_10k_over_1k=results[10_000]["peak_rss_mib"] / results[1000]["peak_rss_mib"],
         rss_100k_over_1k=results[100_000]["peak_rss_mib"] / results[1000]["peak_rss_mib"],
         startup_100k_seconds=results[100_000]["startup_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir")
    parser.add_argument("--child-scale", type=int)
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.child_scale:
            scale_child(workdir, args.rows, args.child_scale)
            return
        round_ratio(workdir, args.rows, args.rounds, args.threads)
        if not args.skip_scale:
            scale(workdir, args.rows)


if __name__ == "__main__":
    main()
