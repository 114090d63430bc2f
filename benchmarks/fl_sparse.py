"""Sparse embedding updates against dense ones, and the Kaggle-sized model in sparse mode.

    .venv/bin/python benchmarks/fl_sparse.py [--rows 200000] [--rounds 4]

Prints JSON lines:
* ``mode``: for one task (demo DLRM with tables hashed to ``--mid-range`` rows each,
  1,000 workers, 50 per round), dense and sparse modes each in a fresh process: bytes
  down/up per round, seconds per round, peak RSS; then ``dense_over_sparse`` ratios.
* ``kaggle``: the reference Kaggle table count and size (26 tables hashed to 1,300,000
  rows each: 33.8M rows x 16, about 2 GiB of fp32), sparse mode, 1,000 workers, 50 per
  round: seconds per round against the compute floor (same samples, same batches,
  trained centrally in the same process), peak RSS, bytes per round, and what dense
  mode would send for the same round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, compare_with_floor, emit, make_data, peak_rss_mib

KAGGLE_RANGE = 1_300_000


def _config(workdir: Path, rows: int, max_ind_range: int, mode: str, sparse_grads: bool):
    config = make_data(workdir, rows, max_ind_range=max_ind_range)
    config["model"]["embedding_types"] = {
        "threshold": 100, "base": {"name": "torch_bag", "mode": "sum", "sparse": sparse_grads}}
    config["fl"].update({"num_workers": 1000, "client_num_per_round": 50, "num_rounds": 10_000,
                         "eval_every_n_rounds": 10_000, "checkpoint_every_n_rounds": 10_000,
                         "embedding_updates": mode, "partitioner": {"name": "iid"}})
    return config


def child(workdir: Path, rows: int, rounds: int, max_ind_range: int, mode: str, floor: bool) -> None:
    import torch

    from fedrec.federated.simulation import Simulation

    torch.set_num_threads(1)
    config = _config(workdir, rows, max_ind_range, mode, sparse_grads=True)
    sim = Simulation(config, workdir / f"fl-{mode}-{max_ind_range}")
    table_rows = sum(sim.trainer.dataset.table_sizes)
    model_bytes = sum(t.numel() for t in sim.global_state.values()) * sim.fl.value_bytes
    if floor:
        result = compare_with_floor(sim, rounds)
        rows_out = result.pop("rows")
    else:
        rows_out = [sim.run_round() for _ in range(rounds)]
        seconds = [r["round_seconds"] for r in rows_out[1:]]
        result = {"sim_seconds_per_round": sum(seconds) / len(seconds)}
    sim.close()
    measured = rows_out[1:]
    print(json.dumps({
        "mode": mode, "table_rows": table_rows, "model_mib": model_bytes / 2**20,
        "bytes_down_per_round": sum(r["bytes_down"] for r in measured) / len(measured),
        "bytes_up_per_round": sum(r["bytes_up"] for r in measured) / len(measured),
        "dense_bytes_per_round_equivalent": model_bytes * sim.fl.client_num_per_round,
        "peak_rss_mib": peak_rss_mib(), **result}))


def run_child(workdir: Path, args: argparse.Namespace, max_ind_range: int, mode: str, floor: bool) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--max-ind-range", str(max_ind_range),
               "--rows", str(args.rows), "--rounds", str(args.rounds), "--workdir", str(workdir)]
    if floor:
        command.append("--floor")
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mid-range", type=int, default=100_000)
    parser.add_argument("--workdir")
    parser.add_argument("--child")
    parser.add_argument("--max-ind-range", type=int)
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--skip-kaggle", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.child:
            child(workdir, args.rows, args.rounds, args.max_ind_range, args.child, args.floor)
            return
        make_data(workdir, args.rows, max_ind_range=args.mid_range)
        results = {}
        for mode in ("dense", "sparse"):
            results[mode] = run_child(workdir, args, args.mid_range, mode, floor=False)
            emit(bench="mode", **results[mode])
        dense, sparse = results["dense"], results["sparse"]
        emit(bench="dense_over_sparse",
             bytes_up=dense["bytes_up_per_round"] / sparse["bytes_up_per_round"],
             bytes_down=dense["bytes_down_per_round"] / sparse["bytes_down_per_round"],
             seconds=dense["sim_seconds_per_round"] / sparse["sim_seconds_per_round"],
             peak_rss=dense["peak_rss_mib"] / sparse["peak_rss_mib"])
        if not args.skip_kaggle:
            make_data(workdir, args.rows, max_ind_range=KAGGLE_RANGE)
            kaggle = run_child(workdir, args, KAGGLE_RANGE, "sparse", floor=True)
            emit(bench="kaggle", **kaggle,
                 dense_over_sparse_bytes_up=kaggle["dense_bytes_per_round_equivalent"] / kaggle["bytes_up_per_round"])


if __name__ == "__main__":
    main()
