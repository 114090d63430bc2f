"""Device time to a target AUC on one heterogeneous device profile, and what the virtual
clock and round policies cost the simulator.

    .venv/bin/python benchmarks/fl_devices.py [--rows 100000] [--rounds 60] [--target-auc 0.65 0.70 0.72]

The profile: speeds log-uniform over 10..200 samples/s (20x), upload bandwidth log-uniform
over 20 kB/s..1 MB/s (50x), download 1..10 MB/s, every client online, 10% of the selected
clients fail mid-round. Settings, each with dense and sparse embedding updates:

- ``sync``: synchronous FedAvg, no deadline (the round waits for its slowest report);
- ``deadline+oc1.3``: a deadline at the 80th percentile of the clients' round times (so it
  is fair to both update modes, whose byte counts differ by orders of magnitude) and
  1.3x over-commitment (the first K reports are kept);
- ``fedbuff``: asynchronous FedBuff (``fl.async``): ``--per-round`` clients in flight, a
  server step every ``--per-round / 5`` arrivals, staleness weight 1/sqrt(1 + staleness),
  the same 10% dropouts. One "round" is one server step, so it runs 5x the rounds (the
  same number of client trips) and is evaluated every 5th step.

Prints JSON lines: per setting the rounds and device seconds to first reach each target AUC;
then the overhead: rounds of two simulations interleaved in this process (A without
devices, B with the profile, a deadline no client misses, no dropouts: the same clients
train, so any difference is the clock's and the policies' own cost), median seconds per
round and the ratio B / A.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, make_data

PROFILE = {"speed": {"name": "log_uniform", "low": 10, "high": 200},
           "download": {"name": "log_uniform", "low": 1.0e6, "high": 1.0e7},
           "upload": {"name": "log_uniform", "low": 2.0e4, "high": 1.0e6}}


def base_config(data_config, args, mode):
    config = copy.deepcopy(data_config)
    config["fl"].update({"num_workers": args.workers, "client_num_per_round": args.per_round,
                         "local_epochs": args.local_epochs,
                         "local_lr": args.local_lr, "num_rounds": args.rounds, "embedding_updates": mode,
                         "partitioner": {"name": "dirichlet", "alpha": 0.5}, "num_eval_batches": 4,
                         "target_auc": args.target_auc[0]})
    config["train"]["config"]["eval_batch_size"] = 4096
    return config


def deadline_at(config, logdir, quantile):
    """The ``quantile`` of every client's round time on the profile (round 0's plan)."""
    from fedrec.federated.context import RoundContext
    from fedrec.federated.simulation import Simulation

    probe = copy.deepcopy(config)
    probe["fl"]["devices"] = PROFILE
    sim = Simulation(probe, logdir)
    try:
        ids = list(range(sim.fl.num_workers))
        costs = sim.runner.planned_costs(ids, RoundContext(0, sim.seed), sim.clock.samples)
        p = sim.clock.profiles
        times = costs[:, 0] / p.download + costs[:, 1] / p.speed + costs[:, 2] / p.upload
    finally:
        sim.close()
    return float(np.quantile(times, quantile))


def fedbuff_config(config, args):
    """The ``fedbuff`` setting: the same clients' work as ``sync`` in steps of K = per_round / 5."""
    run = copy.deepcopy(config)
    buffer_size = max(1, args.per_round // 5)
    steps = args.rounds * args.per_round // buffer_size
    run["fl"].update({"async": {"concurrency": args.per_round, "buffer_size": buffer_size},
                      "num_rounds": steps, "eval_every_n_rounds": max(1, args.per_round // buffer_size)})
    return run


def time_to_target(config, logdir, targets):
    from fedrec.federated.simulation import Simulation

    sim = Simulation(config, logdir)
    try:
        start = time.perf_counter()
        history = sim.run()
        wall = time.perf_counter() - start
    finally:
        sim.close()
    last = history[-1]
    reached = {}
    for auc in targets:  # the first evaluated round at or above each target (fl.target_auc's rule)
        first = next((r for r in history if r.get("roc_auc", 0.0) >= auc), None)
        reached[f"{auc:g}"] = None if first is None else [first["round"], round(first["virtual_time"], 1)]
    return {"rounds_and_virtual_seconds_to_auc": reached, "final_auc": last.get("roc_auc"), "rounds": len(history), "virtual_seconds": last["virtual_time"],
            "wasted_samples": sim.clock.totals["wasted_samples"], "wasted_bytes": sim.clock.totals["wasted_bytes"],
            "dropped": sim.clock.totals["dropped"], "late": sim.clock.totals["late"],
            "surplus": sim.clock.totals["surplus"], "client_updates": sim.totals["clients"], "wall_seconds": wall}


def overhead(config, workdir, rounds):
    from fedrec.federated.simulation import Simulation
    from fedrec.federated.virtual_clock import VirtualClock, append_record

    plain = copy.deepcopy(config)
    plain["fl"].update({"num_rounds": 100000, "eval_every_n_rounds": 100000, "target_auc": None})
    clocked = copy.deepcopy(plain)
    clocked["fl"]["devices"] = PROFILE
    clocked["fl"]["round_policy"] = {"deadline": 1.0e9, "over_commitment": 1.0}
    sims = {"plain": Simulation(plain, workdir / "plain"), "clocked": Simulation(clocked, workdir / "clocked")}
    seconds = {name: [] for name in sims}
    try:
        for r in range(rounds):
            for name, sim in (sims.items() if r % 2 == 0 else reversed(list(sims.items()))):
                start = time.perf_counter()
                row = sim.run_round()
                if sim.clock is not None:
                    append_record(sim.logdir, VirtualClock.record(row["round"], sim.last_round.plan))
                if r > 0:
                    seconds[name].append(time.perf_counter() - start)
    finally:
        for sim in sims.values():
            sim.close()
    a, b = statistics.median(seconds["plain"]), statistics.median(seconds["clocked"])
    return {"plain_median_seconds": a, "clocked_median_seconds": b, "ratio_clocked_over_plain": b / a,
            "rounds_each": len(seconds["plain"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--local-lr", type=float, default=1.0)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--deadline-quantile", type=float, default=0.8)
    parser.add_argument("--target-auc", type=float, nargs="+", default=[0.65, 0.70, 0.72])
    parser.add_argument("--overhead-rounds", type=int, default=11)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--settings", nargs="+", default=["sync", "deadline+oc1.3", "fedbuff"],
                        help="quality settings to run")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        data_config = make_data(workdir / "data", args.rows)
        for mode in ("dense", "sparse"):
            config = base_config(data_config, args, mode)
            if not args.skip_quality:
                deadline = None
                if "deadline+oc1.3" in args.settings:
                    deadline = deadline_at(config, workdir / f"probe-{mode}", args.deadline_quantile)
                for setting, policy in (("sync", {"dropout_rate": 0.1}),
                                        ("deadline+oc1.3", {"dropout_rate": 0.1, "deadline": deadline,
                                                            "over_commitment": 1.3}),
                                        ("fedbuff", {"dropout_rate": 0.1})):
                    if setting not in args.settings:
                        continue
                    run = fedbuff_config(config, args) if setting == "fedbuff" else copy.deepcopy(config)
                    run["fl"]["devices"] = PROFILE
                    run["fl"]["round_policy"] = policy
                    emit(bench="fl_devices", mode=mode, setting=setting, target_auc=args.target_auc,
                         deadline=policy.get("deadline"), **time_to_target(run, workdir / f"{mode}-{setting}", args.target_auc))
            if args.overhead_rounds:
                emit(bench="fl_devices_overhead", mode=mode, **overhead(config, workdir / f"overhead-{mode}",
                                                                         args.overhead_rounds))


if __name__ == "__main__":
    main()
