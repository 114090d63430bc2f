"""Dense mode at the compute floor: per-sample cost of dense updates (the full-table path
and the fast path) and of sparse updates against the compute floor, in one process.

    .venv/bin/python benchmarks/fl_dense_floor.py [--rows 200000] [--rounds 6]

The setting of issue 15's item 0: 1,000 workers, 100 per round, 1 local epoch, batch 32,
26 tables of 10,000 rows (``make_data(..., max_ind_range=10000)``), FedAvg. Three
simulations of the same run (``fl.dense_fast_path: off``, dense with the fast path,
``embedding_updates: sparse``) advance one round each in turn, and after each simulator
round the floor (the same clients' batches trained one after another in a plain loop,
``_common.floor_round``) is timed on the same model, so machine noise falls on all of
them. Prints JSON lines: ``variant`` (microseconds per sample, simulator and floor, and
their ratio, medians over the rounds after the first; bytes per round; final AUC) and
``summary`` (the three ratios, and whether the final AUCs and global weights are identical).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import emit, floor_round, make_data

VARIANTS = {"dense_full_table": {"embedding_updates": "dense", "dense_fast_path": "off"},
            "dense_fast_path": {"embedding_updates": "dense", "dense_fast_path": "auto"},
            "sparse": {"embedding_updates": "sparse"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-ind-range", type=int, default=10_000)
    parser.add_argument("--workdir")
    args = parser.parse_args()

    import copy

    import torch

    from fedrec.federated.simulation import Simulation

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        base = make_data(workdir, args.rows, max_ind_range=args.max_ind_range)
        base["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "local_epochs": 1,
                           "local_batch_size": 32, "local_lr": 0.1, "num_rounds": args.rounds,
                           "eval_every_n_rounds": args.rounds, "checkpoint_every_n_rounds": 10_000})
        sims = {}
        for name, fl in VARIANTS.items():
            config = copy.deepcopy(base)
            config["fl"].update(fl)
            sims[name] = Simulation(config, workdir / f"fl-{name}")
        notes = {name: sim.runner.dense_path_note for name, sim in sims.items()}
        per_sample = {name: [] for name in sims}
        floor_per_sample = {name: [] for name in sims}
        last = {}
        for r in range(args.rounds):
            for name, sim in sims.items():
                row = sim.run_round()
                floor = floor_round(sim, r)
                if r >= 1:
                    per_sample[name].append(row["round_seconds"] / row["samples"] * 1e6)
                    floor_per_sample[name].append(floor / row["samples"] * 1e6)
                last[name] = row
        ratios = {}
        for name, sim in sims.items():
            ratio = statistics.median(s / f for s, f in zip(per_sample[name], floor_per_sample[name]))
            ratios[name] = ratio
            emit(bench="variant", variant=name, note=notes[name], sim_us_per_sample=statistics.median(per_sample[name]),
                 floor_us_per_sample=statistics.median(floor_per_sample[name]), ratio_sim_over_floor=ratio,
                 bytes_down_per_round=last[name]["bytes_down"], bytes_up_per_round=last[name]["bytes_up"],
                 final_roc_auc=last[name].get("roc_auc"), final_log_loss=last[name].get("log_loss"))
        full, fast, sparse = (sims[n].global_state for n in VARIANTS)
        same_weights = all(torch.equal(full[k], fast[k]) and torch.equal(full[k], sparse[k]) for k in full)
        aucs = {name: last[name].get("roc_auc") for name in sims}
        emit(bench="summary", rounds=args.rounds, rows=args.rows, max_ind_range=args.max_ind_range,
             **{f"ratio_{name}": value for name, value in ratios.items()},
             aucs_identical=len(set(aucs.values())) == 1, global_weights_identical=same_weights,
             dense_bytes_identical=(last["dense_full_table"]["bytes_down"] == last["dense_fast_path"]["bytes_down"]
                                    and last["dense_full_table"]["bytes_up"] == last["dense_fast_path"]["bytes_up"]))
        for sim in sims.values():
            sim.close()


if __name__ == "__main__":
    main()
