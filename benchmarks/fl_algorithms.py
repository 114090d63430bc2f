"""Every FL algorithm in the hard regime, next to centralized training on the same data.

    .venv/bin/python benchmarks/fl_algorithms.py [--rows 200000] [--rounds 30] [--algos fed_avg,scaffold]

The regime of the README's table: the demo DLRM on synthetic Criteo-format data,
1,000 workers, 100 per round, Dirichlet alpha 0.1 over the label, 1 local epoch at
lr 0.1, batch 32. Prints one JSON line per algorithm with val AUC and log loss after
rounds 10, 20 and 30, seconds per round, and one for centralized training (1 epoch of
the recipe, SGD lr 0.1, batch 128), plus the base-rate log loss of the val split.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

from _common import emit, make_data

ALGORITHMS: Dict[str, Dict[str, Any]] = {
    "fed_avg": {"name": "fed_avg"},
    "fed_avgm": {"name": "fed_avgm", "server_lr": 1.0, "server_momentum": 0.9},
    "fed_adam": {"name": "fed_adam", "server_lr": 0.01, "tau": 0.001},
    "fed_yogi": {"name": "fed_yogi", "server_lr": 0.01, "tau": 0.001},
    "fed_adagrad": {"name": "fed_adagrad", "server_lr": 0.01, "tau": 0.001},
    "fed_prox": {"name": "fed_prox", "mu": 0.01},
    "scaffold": {"name": "scaffold"},
    "fed_nova": {"name": "fed_nova"},
    "q_fedavg": {"name": "q_fedavg", "q": 1.0},
}


def hard_regime(config: Dict[str, Any], rounds: int) -> Dict[str, Any]:
    config = copy.deepcopy(config)
    config["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "num_rounds": rounds,
                         "partitioner": {"name": "dirichlet", "alpha": 0.1}, "local_epochs": 1,
                         "local_steps": None, "local_lr": 0.1, "local_batch_size": 32,
                         "eval_every_n_rounds": 10, "progress_bar": False})
    return config


def run_algorithm(config: Dict[str, Any], name: str, workdir: Path) -> None:
    from fedrec.federated.simulation import Simulation
    from fedrec.utilities import registry

    fl_algo = ALGORITHMS[name]
    try:
        registry.lookup("fl_algo", fl_algo["name"])
    except registry.RegistryError as err:
        emit(bench="fl_algorithms", algorithm=name, skipped=str(err))
        return
    config = copy.deepcopy(config)
    config["fl"]["fl_algo"] = fl_algo
    start = time.perf_counter()
    sim = Simulation(config, workdir / f"fl-{name}")
    try:
        history = sim.run()
    finally:
        sim.close()
    at = {row["round"]: row for row in history if "roc_auc" in row}
    fields = {}
    for r in sorted(at):
        fields[f"auc_{r}"] = at[r]["roc_auc"]
        fields[f"log_loss_{r}"] = at[r]["log_loss"]
    emit(bench="fl_algorithms", algorithm=name, fl_algo=fl_algo,
         seconds_per_round=sum(row["round_seconds"] for row in history) / len(history),
         wall_seconds=time.perf_counter() - start, **fields)


def centralized(config: Dict[str, Any], workdir: Path) -> None:
    import numpy as np

    from fedrec.runner import build_trainer

    trainer = build_trainer(config, logdir=None)
    start = time.perf_counter()
    metrics = trainer.train()
    ctr = float(np.asarray(trainer.dataset.split("val").label).mean())
    base = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    emit(bench="fl_algorithms", algorithm="centralized", auc=metrics.get("roc_auc"),
         log_loss=metrics.get("log_loss"), base_rate_log_loss=base, val_ctr=ctr,
         wall_seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--algos", default=",".join(ALGORITHMS))
    parser.add_argument("--skip-centralized", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        config = make_data(workdir, args.rows)
        config["train"]["config"]["progress_bar"] = False
        if not args.skip_centralized:
            centralized(config, workdir)
        for name in args.algos.split(","):
            run_algorithm(hard_regime(config, args.rounds), name, workdir)


if __name__ == "__main__":
    main()
