"""Robust aggregation against sign-flipping clients, next to FedAvg with and without them.

    .venv/bin/python benchmarks/fl_robust.py [--rows 200000] [--rounds 30] [--scales 1,10]

The demo DLRM (configs/dlrm_fl.yml) on synthetic data, 1,000 workers, 100 per round,
Dirichlet alpha 0.1, 1 local epoch at lr 0.1 (the hard regime), ``--fraction`` of the
clients malicious (chosen by seed), uploading ``-scale`` times their honest delta, for
each of ``--scales`` (1: a plain sign flip, as long as an honest update; 10: boosted).

Prints JSON lines:
* ``setup``: the data, the split and the base-rate log loss of the validation split;
* ``norm_bound``: the bound used by ``fed_avg+norm_bound``: the median L2 norm of the
  round-1 updates of honest clients (what a server could estimate from a clean round);
* ``robust``: for each variant, AUC and log loss after every ``--eval-every`` rounds,
  and the mean seconds per round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import emit, make_data


def base_config(workdir: Path, rows: int, rounds: int, eval_every: int) -> Dict[str, Any]:
    config = make_data(workdir, rows)
    config["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "num_rounds": rounds,
                         "local_epochs": 1, "local_lr": 0.1,
                         "partitioner": {"name": "dirichlet", "alpha": 0.1},
                         "eval_every_n_rounds": eval_every, "checkpoint_every_n_rounds": rounds})
    return config


def honest_norm(config: Dict[str, Any], workdir: Path) -> float:
    """The median L2 norm of the honest clients' plain deltas in round 1."""
    from fedrec.federated.client_runner import RoundJob
    from fedrec.federated.context import RoundContext
    from fedrec.federated.simulation import Simulation

    config = copy.deepcopy(config)
    config["fl"]["fl_algo"] = {"name": "median"}  # any algorithm that returns every update
    config["fl"]["attack"] = None
    sim = Simulation(config, workdir / "norms")
    clients = sim.aggregator.sample_neighbours(0, sim.fl.client_num_per_round)
    result = sim.runner.run_job(RoundJob(RoundContext(0, sim.seed), [(0, clients)], sim.global_state))
    sim.close()
    norms = sorted(math.sqrt(u.sq_norm()) / u.weight for _, u in result.updates if u.weight)
    return norms[len(norms) // 2]


def run_variant(name: str, config: Dict[str, Any], workdir: Path) -> List[Dict[str, Any]]:
    from fedrec.federated.simulation import Simulation

    sim = Simulation(config, workdir / name.replace("+", "_").replace("@", "_"))
    rows = []
    try:
        history = sim.run()
    finally:
        sim.close()
    seconds = sum(r["round_seconds"] for r in history) / len(history)
    for row in history:
        if "roc_auc" in row:
            rows.append({"round": row["round"], "roc_auc": row["roc_auc"], "log_loss": row["log_loss"]})
    return [dict(r, seconds_per_round=seconds) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1, help="malicious clients")
    parser.add_argument("--scales", default="1,10", help="sign_flip scales, comma-separated")
    parser.add_argument("--embedding-updates", choices=["dense", "sparse"], default="dense",
                        help="sparse: median and trimmed mean combine each table row over its senders")
    parser.add_argument("--variants", help="comma-separated subset of the variants")
    parser.add_argument("--workdir")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        with contextlib.redirect_stdout(sys.stderr):  # preprocessing reports; stdout is JSON lines
            config = base_config(workdir, args.rows, args.rounds, args.eval_every)
        config["fl"]["embedding_updates"] = args.embedding_updates
        from fedrec.runner import build_trainer

        trainer = build_trainer(config, logdir=None, logger=None)
        labels = np.asarray(trainer.dataset.split("val").label, dtype=np.float64)
        ctr = float(labels.mean())
        emit(bench="setup", rows=args.rows, workers=1000, per_round=100, rounds=args.rounds,
             dirichlet_alpha=0.1, local_epochs=1, local_lr=0.1, malicious_fraction=args.fraction,
             embedding_updates=args.embedding_updates,
             val_ctr=ctr,
             base_rate_log_loss=-(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)))
        del trainer

        bound = honest_norm(config, workdir)
        emit(bench="norm_bound", bound=bound)
        f = int(round(args.fraction * 100))
        variants: Dict[str, Any] = {"fed_avg": ({"name": "fed_avg"}, None, [])}
        for scale in (float(x) for x in args.scales.split(",")):
            attack = {"name": "sign_flip", "fraction": args.fraction, "scale": scale}
            tag = f"@{scale:g}"
            variants.update({
                "fed_avg+attack" + tag: ({"name": "fed_avg"}, attack, []),
                "fed_avg+norm_bound" + tag: ({"name": "fed_avg"}, attack, [{"name": "norm_bound", "bound": bound}]),
                "median" + tag: ({"name": "median"}, attack, []),
                "trimmed_mean" + tag: ({"name": "trimmed_mean", "trim_fraction": 0.1}, attack, []),
                "multi_krum" + tag: ({"name": "krum", "num_byzantine": f, "multi_krum": 10}, attack, []),
            })
        chosen = args.variants.split(",") if args.variants else list(variants)
        for name in chosen:
            algo, attack_config, postprocessors = variants[name]
            variant = copy.deepcopy(config)
            variant["fl"].update({"fl_algo": algo, "attack": attack_config, "postprocessors": postprocessors})
            start = time.perf_counter()
            for row in run_variant(name, variant, workdir):
                emit(bench="robust", variant=name, fl_algo=algo, attack=attack_config,
                     postprocessors=postprocessors, **row)
            emit(bench="robust_done", variant=name, wall_seconds=time.perf_counter() - start)

if __name__ == "__main__":
    main()
