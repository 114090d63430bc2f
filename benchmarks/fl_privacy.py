"""User-level DP-FedAvg, dense and sparsity-preserving: quality at several epsilons,
bytes per round, and what DP costs a round.

    .venv/bin/python benchmarks/fl_privacy.py [--rows 200000] [--rounds 30] [--workers 10000]
        [--modes dense,sparse]

The demo DLRM on synthetic Criteo-format data, ``--workers`` workers (IID split),
Poisson sampling at the rate that gives about 500 clients per round, ``--rounds`` rounds,
5 local epochs at lr 0.5 (``--local-epochs``, ``--local-lr``), FedAvg's server step.
``dense``: dense embedding updates and ``dp_gaussian``; ``sparse``: sparse embedding-row
updates and ``dp_adafest`` (the rows to update privately selected each round). Each with
clip norm ``--clip``, noise calibrated to epsilon 1, 3 and 8 at delta = 1/workers, against
no DP in the same mode. Prints one JSON line per setting (AUC, log loss, epsilon, bytes
per round, rows selected, seconds per round) and the DP round-time ratio (noise on vs off).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import emit, make_data


def run(config: Dict[str, Any], workdir: Path, name: str, epsilon: Optional[float], clip: float,
        mode: str = "dense", sparse_dp: Optional[Dict[str, Any]] = None,
        dense_dp: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from fedrec.federated.simulation import Simulation

    config = copy.deepcopy(config)
    config["fl"]["embedding_updates"] = mode
    if epsilon is not None:
        mechanism = {"name": "dp_gaussian", **(dense_dp or {})} if mode == "dense" else \
            {"name": "dp_adafest", **(sparse_dp or {})}
        config["fl"]["postprocessors"] = [{**mechanism, "clip_norm": clip, "target_epsilon": epsilon}]
    sim = Simulation(config, workdir / f"fl-{name}")
    try:
        history = sim.run()
    finally:
        sim.close()
    last = history[-1]
    seconds = sorted(row["round_seconds"] for row in history[1:])
    result = {"setting": name, "mode": mode, "target_epsilon": epsilon, "epsilon": last.get("epsilon"),
              "update_noise_multiplier": (last.get("dp_noise_std") or 0) / clip if epsilon else 0.0,
              "auc": last["roc_auc"], "log_loss": last["log_loss"],
              "clients_per_round": sum(row["clients"] for row in history) / len(history),
              "bytes_up_per_round": sum(row["bytes_up"] for row in history) / len(history),
              "bytes_down_per_round": sum(row["bytes_down"] for row in history) / len(history),
              "rows_selected_per_round": sum(row.get("dp_rows_selected", 0) for row in history) / len(history),
              "final_clip_norm": last.get("dp_clip_norm"),
              "median_round_seconds": seconds[len(seconds) // 2]}
    emit(bench="fl_privacy", **result)
    return result


def interleaved_overhead(config: Dict[str, Any], workdir: Path, mode: str, clip: float, rounds: int,
                         sparse_dp: Dict[str, Any]) -> None:
    """DP's cost on a round: a plain and a DP simulation of the same config, their rounds
    alternated in one process so that the machine's noise hits both alike (the first
    round of each warms up and is left out)."""
    import statistics

    from fedrec.federated.simulation import Simulation

    plain_config = copy.deepcopy(config)
    plain_config["fl"]["embedding_updates"] = mode
    dp_config = copy.deepcopy(plain_config)
    mechanism = {"name": "dp_gaussian"} if mode == "dense" else {"name": "dp_adafest", **sparse_dp}
    dp_config["fl"]["postprocessors"] = [{**mechanism, "clip_norm": clip, "target_epsilon": 3.0}]
    mechanism_seconds = _time_postprocessors()
    sims = [Simulation(plain_config, workdir / f"overhead-{mode}-plain"),
            Simulation(dp_config, workdir / f"overhead-{mode}-dp")]
    seconds: List[List[float]] = [[], []]
    spent: List[float] = []
    try:
        for round_idx in range(rounds):
            # the same clients in both: whichever runs second finds their data in the caches,
            # so the order alternates
            for which in ((0, 1) if round_idx % 2 else (1, 0)):
                before = mechanism_seconds[0]
                row = sims[which].run_round()
                if round_idx:  # the first round warms up
                    seconds[which].append(row["round_seconds"])
                    if which == 1:
                        spent.append(mechanism_seconds[0] - before)
    finally:
        for sim in sims:
            sim.close()
    plain, private = (statistics.median(s) for s in seconds)
    mechanism = statistics.median(spent)
    emit(bench="fl_privacy_overhead_interleaved", mode=mode, rounds=rounds - 1, plain_round_seconds=plain,
         dp_round_seconds=private, dp_over_plain_round_seconds=private / plain,
         dp_mechanism_seconds=mechanism, dp_mechanism_share_of_dp_round=mechanism / private)


def _time_postprocessors() -> List[float]:
    """Seconds spent in the postprocessor chains (client and server side), accumulated in
    the returned one-element list: the DP mechanism's own work, whatever else a round does
    (a model trained with DP may itself train faster or slower than without)."""
    import time

    from fedrec.federated import client_runner, simulation

    total = [0.0]

    def timed(function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start
        return run

    client_runner.run_client_chain = timed(client_runner.run_client_chain)
    simulation.run_server_chain = timed(simulation.run_server_chain)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--local-lr", type=float, default=0.5)
    parser.add_argument("--epsilons", default="8,3,1")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--modes", default="dense,sparse")
    parser.add_argument("--selection-noise-ratio", type=float, default=1.0)
    parser.add_argument("--contribution-clip", type=float, default=1.0)
    parser.add_argument("--adaptive-quantile", type=float, default=None,
                        help="adaptive clipping to this quantile (the clip norm starts at --clip)")
    parser.add_argument("--workdir")
    parser.add_argument("--overhead-rounds", type=int, default=0,
                        help="only measure DP's round-time cost: this many alternated rounds per mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        config = make_data(workdir, args.rows)
        config["fl"].update({"num_workers": args.workers, "client_num_per_round": args.per_round,
                             "num_rounds": args.rounds, "eval_every_n_rounds": args.rounds,
                             "sampler": {"name": "poisson"}, "partitioner": {"name": "iid"},
                             "local_epochs": args.local_epochs, "local_lr": args.local_lr})
        sparse_dp = {"selection_noise_ratio": args.selection_noise_ratio, "contribution_clip": args.contribution_clip}
        dense_dp = None if args.adaptive_quantile is None else \
            {"adaptive_clipping": {"target_quantile": args.adaptive_quantile}}
        sparse_dp.update(dense_dp or {})
        if args.overhead_rounds:
            for mode in args.modes.split(","):
                interleaved_overhead(config, workdir, mode, args.clip, args.overhead_rounds, sparse_dp)
            return
        for mode in args.modes.split(","):
            plain = None if args.skip_plain else run(config, workdir, f"{mode}_no_dp", None, args.clip, mode)
            suffix = "_adaptive" if dense_dp else ""
            results = [run(config, workdir, f"{mode}_eps_{e}{suffix}", float(e), args.clip, mode, sparse_dp, dense_dp)
                       for e in args.epsilons.split(",") if e]
            if plain and results:
                emit(bench="fl_privacy_overhead", mode=mode,
                     dp_over_plain_round_seconds=results[0]["median_round_seconds"] / plain["median_round_seconds"])


if __name__ == "__main__":
    main()
