"""MovieLens quality table and the 100,000-user scale figures (README: "MovieLens: every user a client").

    python benchmarks/movielens.py                         # the table on ml-latest-small
    python benchmarks/movielens.py --scale_users 100000    # synthetic users: memory and seconds per round
    python benchmarks/movielens.py --scale_users 100000 --compare_users 10000   # + memory growth per user
    python benchmarks/movielens.py --floor_rounds 10       # a FedAvg MF round over its compute floor

Table: centralized biased MF, NeuMF and two-tower, and federated (every user a client, 50 users per
round) with FedAvg and FedAdam, leave-one-out test HR@10 / NDCG@10 against 99 sampled
negatives and against every item the user has not rated in train, and RMSE of explicit-feedback MF (mse). Each row is one JSON line; the markdown
table follows at the end (on stderr, so that stdout stays JSON lines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import ROOT, emit, peak_rss_mib

ML_SMALL = ROOT.parent / "shared" / "data" / "movielens" / "ml-latest-small" / "ratings.csv"


TWO_TOWER = {"name": "two_tower", "embedding_dim": 32, "user_layers": [32], "item_layers": [64, 32],
             "loss_function": "bce", "init_std": 0.1, "sparse": True}


def base_config(name: str, datafile: Path, workdir: Path, explicit: bool) -> Dict[str, Any]:
    from fedrec.utilities.config import load_config

    config = load_config(ROOT / "configs" / name)
    feedback = "explicit" if explicit else "implicit"
    config["model"]["preproc"].update({"datafile": str(datafile), "feedback": feedback,
                                       "output_file": str(workdir / f"processed-{feedback}")})
    config["train"]["config"]["progress_bar"] = False
    config["fl"]["progress_bar"] = False
    if explicit:
        # picked by hand from a few (lr, l2) pairs on ml-latest-small (not a validated tuning)
        config["model"].update({"loss_function": "mse", "init_std": 0.1, "l2": 0.1})
        config["train"]["optimizer"] = {"name": "split", "sparse": {"name": "sparse_adam", "lr": 0.01},
                                        "dense": {"name": "adam", "lr": 0.01}}
    return config


def preprocess(config: Dict[str, Any]) -> None:
    from fedrec.runner import run_preprocess

    if not Path(config["model"]["preproc"]["output_file"]).exists():
        run_preprocess(config, progress=False)


def centralized(label: str, config: Dict[str, Any], logdir: Path) -> Dict[str, Any]:
    import contextlib
    import io

    from fedrec.runner import run_train

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_train(config, logdir)
    return {"setting": label, "seconds": time.perf_counter() - start,
            **{k[5:]: v for k, v in result.items() if k.startswith("test_")}}


def federated(label: str, config: Dict[str, Any], logdir: Path) -> Dict[str, Any]:
    from fedrec.federated.simulation import Simulation
    from fedrec.runner import with_data_defaults

    start = time.perf_counter()
    sim = Simulation(with_data_defaults(config), logdir)
    history = sim.run()
    metrics, _ = sim.trainer.evaluate_federated(sim.global_state,
                                                lambda users: sim.runner.private_rows_and_stored(
                                                    users, sim.round_idx),
                                                phase="test")
    sim.close()
    rounds = len(history)
    return {"setting": label, "seconds": time.perf_counter() - start, "rounds": rounds,
            "seconds_per_round": sum(r["round_seconds"] for r in history) / max(rounds, 1),
            "mb_up_per_round": sum(r["bytes_up"] for r in history) / 1e6 / max(rounds, 1), **metrics}


def table(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    datafile = Path(args.data)
    if not datafile.is_file():
        sys.exit(f"{datafile} is missing: get ml-latest-small from grouplens.org (see its README.txt for the terms)")
    rows: List[Dict[str, Any]] = []
    fl = {"num_rounds": args.rounds, "client_num_per_round": 50, "eval_every_n_rounds": args.rounds,
          "local_epochs": args.local_epochs}
    runs = [
        ("centralized MF", "movielens_mf_fl.yml", False, None),
        ("centralized NeuMF", "movielens_ncf_fl.yml", False, None),
        ("FedAvg MF", "movielens_mf_fl.yml", False, {"name": "fed_avg"}),
        ("FedAdam MF", "movielens_mf_fl.yml", False, {"name": "fed_adam", "server_lr": args.server_lr}),
        ("FedAvg NeuMF", "movielens_ncf_fl.yml", False, {"name": "fed_avg"}),
        ("FedAdam NeuMF", "movielens_ncf_fl.yml", False, {"name": "fed_adam", "server_lr": args.server_lr}),
        ("centralized two-tower", "movielens_mf_fl.yml", False, None),
        ("FedAdam two-tower", "movielens_mf_fl.yml", False, {"name": "fed_adam", "server_lr": args.server_lr}),
        ("centralized MF, explicit (mse)", "movielens_mf_fl.yml", True, None),
        ("FedAvg MF, explicit (mse)", "movielens_mf_fl.yml", True, {"name": "fed_avg"}),
    ]
    for label, name, explicit, algo in runs:
        if args.only and not any(o.lower() in label.lower() for o in args.only):
            continue
        config = base_config(name, datafile, workdir, explicit)
        config["train"]["config"]["num_epochs"] = args.epochs
        if "two-tower" in label:  # user embedding 32 -> [32]; item embedding 32 -> [64, 32]
            config["model"] = {**TWO_TOWER, "preproc": config["model"]["preproc"]}
        config["fl"].update(fl)
        preprocess(config)
        logdir = workdir / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        if algo is None:
            row = centralized(label, config, logdir)
        else:
            config["fl"]["fl_algo"] = algo
            if explicit:
                config["fl"]["local_lr"] = args.explicit_local_lr
            if "two-tower" in label:  # its MLPs diverge at MF's local lr (0.5: nan by round 13)
                config["fl"]["local_lr"] = args.two_tower_local_lr
            row = federated(label, config, logdir)
        emit(**row, peak_rss_mib=peak_rss_mib())
        rows.append(row)
    lines = ["| setting | HR@10 | NDCG@10 | HR@10 full | NDCG@10 full | RMSE | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rmse = f"{row['rmse']:.3f}" if "rmse" in row else "-"
        lines.append(f"| {row['setting']} | {row['hr@10']:.3f} | {row['ndcg@10']:.3f} | {row['hr@10_full']:.3f} | "
                     f"{row['ndcg@10_full']:.3f} | {rmse} | {row['seconds']:.0f} |")
    print("\n".join(lines), file=sys.stderr)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (Linux: ``/proc/self/clear_refs``), so that a
    later peak excludes what came before (synthesis, preprocessing); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_mib() -> float:
    """The peak RSS since the last :func:`reset_peak_rss` (VmHWM), else since the start."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def per_user_bytes(sim: Any, per_user: Dict[str, Any]) -> Dict[str, float]:
    """Bytes per user of everything the simulation and its evaluation hold per user,
    read from the live objects: what memory may grow by with users at fixed ratings."""
    users = sim.trainer.dataset.num_users
    model = sim.trainer.model
    table = sim.aggregator.in_neighbours
    rank_arrays = 2 if sim.trainer.train_config.full_ranking else 1  # score_split's ranks, held while summarised
    return {
        "private_user_rows": sum(model.get_parameter(n).numel() * model.get_parameter(n).element_size()
                                 for n in model.private_tables()) / users,
        "partition_offsets": sim.partition.offsets.nbytes / users,
        "aggregator_neighbour_table": (table._ids.nbytes + table._sample_nums.nbytes) / users,
        "evaluation_results": (sum(v.nbytes for v in per_user.values()) + rank_arrays * 8 * len(per_user["user"])
                               + 8 + 1) / users,  # + the user ids and the stored flags of evaluate_federated
    }


def scale(args: argparse.Namespace) -> Dict[str, Any]:
    """Synthetic users with 64-dimensional private embeddings: peak RSS and seconds per round."""
    from fedrec.data.synthetic_ratings import synthesize_ratings

    workdir = Path(args.workdir) / f"scale-{args.scale_users}-{args.ratings_per_user}"
    workdir.mkdir(parents=True, exist_ok=True)
    datafile = workdir / "ratings.csv"
    start = time.perf_counter()
    if not datafile.exists():
        meta = synthesize_ratings(datafile, num_users=args.scale_users, num_items=3000,
                                  mean_per_user=args.ratings_per_user,
                                  dim=16, seed=0)
    else:
        import json

        meta = json.loads(Path(f"{datafile}.meta.json").read_text())
    synth_s = time.perf_counter() - start
    config = base_config("movielens_mf_fl.yml", datafile, workdir, explicit=False)
    config["model"]["embedding_dim"] = 64
    config["train"]["config"]["eval_batch_size"] = 50000
    config["fl"].update({"num_rounds": args.rounds, "client_num_per_round": 50, "local_epochs": 1,
                         "eval_every_n_rounds": 10 ** 6, "checkpoint_every_n_rounds": 10 ** 6})
    start = time.perf_counter()
    preprocess(config)
    pre_s = time.perf_counter() - start
    rss_before = peak_rss_mib()
    import shutil

    from fedrec.federated.simulation import Simulation
    from fedrec.runner import with_data_defaults

    shutil.rmtree(workdir / "run", ignore_errors=True)  # a fresh state store each time
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    sim = Simulation(with_data_defaults(config), workdir / "run")
    setup_s = time.perf_counter() - start
    phase_peaks = {"setup": current_peak_rss_mib()}
    reset_peak_rss()
    history = sim.run()  # its last round is evaluated too
    phase_peaks["rounds"] = current_peak_rss_mib()
    rounds_s = [r["round_seconds"] for r in history]
    reset_peak_rss()
    start = time.perf_counter()
    before = sim.round_idx + 1  # as Simulation.evaluate: the rows stored after the last round
    metrics, per_user = sim.trainer.evaluate_federated(
        sim.global_state, lambda users: sim.runner.private_rows_and_stored(users, before))
    eval_s = time.perf_counter() - start
    phase_peaks["evaluation"] = current_peak_rss_mib()
    breakdown = per_user_bytes(sim, per_user)
    sim.close()
    row = {"bench": "movielens_scale", "users": args.scale_users, "embedding_dim": 64, "rows": meta["rows"],
           "private_embedding_mb": args.scale_users * 64 * 4 / 1e6, "synth_seconds": synth_s,
           "preprocess_seconds": pre_s, "setup_seconds": setup_s, "seconds_per_round": sum(rounds_s) / len(rounds_s),
           "rounds": len(rounds_s), "eval_seconds": eval_s, "peak_rss_mib_before_sim": rss_before,
           "peak_rss_mib": peak_rss_mib(),
           "peak_rss_mib_sim": max(phase_peaks.values()) if peak_reset else None,
           "peak_rss_mib_by_phase": phase_peaks if peak_reset else None,
           "bytes_per_user": breakdown, "oracle_hr10": meta["oracle_hr@10"], "hr10": metrics.get("hr@10")}
    emit(**row)
    if args.compare_users:
        compare(args, row)
    return row


def compare(args: argparse.Namespace, row: Dict[str, Any]) -> None:
    """The same number of ratings over ``--compare_users`` users, in a fresh process: how
    much the simulation's peak grows per user, next to what it holds per user."""
    import json
    import subprocess

    ratings = args.scale_users * args.ratings_per_user
    other = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--rounds", str(args.rounds),
                            "--scale_users", str(args.compare_users),
                            "--ratings_per_user", str(ratings // args.compare_users)],
                           check=True, capture_output=True, text=True)
    small = json.loads(other.stdout.strip().splitlines()[-1])
    emit(**small)
    key = "peak_rss_mib_sim" if row["peak_rss_mib_sim"] is not None else "peak_rss_mib"
    growth = (row[key] - small[key]) * 2 ** 20 / (row["users"] - small["users"])
    held = row["bytes_per_user"]
    emit(bench="movielens_scale_growth", users=[small["users"], row["users"]], ratings=[small["rows"], row["rows"]],
         peak_mib=[small[key], row[key]], measured_bytes_per_user=growth, held_bytes_per_user=held,
         held_total=sum(held.values()), unexplained_bytes_per_user=growth - sum(held.values()))
    lines = [(f"peak RSS of the simulation: {small[key]:.0f} MiB at {small['users']:,} users, {row[key]:.0f} MiB at "
              f"{row['users']:,} users ({small['rows']:,} vs {row['rows']:,} ratings): {growth:.0f} bytes per extra user")]
    if row["peak_rss_mib_by_phase"] and small["peak_rss_mib_by_phase"]:
        for phase, peak in row["peak_rss_mib_by_phase"].items():
            was = small["peak_rss_mib_by_phase"][phase]
            lines.append(f"  {phase:12s} peak {was:6.0f} -> {peak:6.0f} MiB: "
                         f"{(peak - was) * 2 ** 20 / (row['users'] - small['users']):5.0f} bytes per extra user")
    lines.append("held per user (measured from the objects, at the larger run):")
    lines += [f"  {name:28s} {value:8.1f} B" for name, value in held.items()]
    rest = growth - sum(held.values())
    lines.append(f"  {'total':28s} {sum(held.values()):8.1f} B; " + (
        f"the peak grows by {-rest:.0f} B a user less (not all of it is live at the peak)" if rest <= 0 else
        f"{rest:.0f} B a user more is not accounted for"))
    print("\n".join(lines), file=sys.stderr)


def floor(args: argparse.Namespace) -> None:
    """FedAvg MF rounds on ml-latest-small against their compute floor: the same clients'
    batches trained centrally (``_common.compare_with_floor``, as for DLRM)."""
    from _common import compare_with_floor

    from fedrec.federated.simulation import Simulation
    from fedrec.runner import with_data_defaults

    config = base_config("movielens_mf_fl.yml", Path(args.data), Path(args.workdir), explicit=False)
    config["fl"].update({"num_rounds": args.floor_rounds, "client_num_per_round": 50,
                         "local_epochs": args.local_epochs, "eval_every_n_rounds": 10 ** 6,
                         "fl_algo": {"name": "fed_avg"}})
    preprocess(config)
    import shutil

    shutil.rmtree(Path(args.workdir) / "floor", ignore_errors=True)  # no state left from an earlier run
    sim = Simulation(with_data_defaults(config), Path(args.workdir) / "floor")
    result = compare_with_floor(sim, args.floor_rounds)
    sim.close()
    emit(bench="movielens_floor", rounds=args.floor_rounds, **{k: v for k, v in result.items() if k != "rows"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ML_SMALL))
    parser.add_argument("--workdir", default="runs/bench_movielens")
    parser.add_argument("--epochs", type=int, default=5, help="centralized epochs")
    parser.add_argument("--rounds", type=int, default=60, help="federated rounds (50 users each)")
    parser.add_argument("--local_epochs", type=int, default=5)
    parser.add_argument("--server_lr", type=float, default=0.05, help="FedAdam's server learning rate")
    parser.add_argument("--explicit_local_lr", type=float, default=0.05)
    parser.add_argument("--two_tower_local_lr", type=float, default=0.1)
    parser.add_argument("--only", nargs="*", help="run only the settings whose label contains one of these")
    parser.add_argument("--scale_users", type=int, help="instead of the table: this many synthetic users")
    parser.add_argument("--ratings_per_user", type=int, default=20,
                        help="with --scale_users: mean ratings per user (hold users x this fixed to see what "
                             "memory grows with users alone; rerun the same command for a peak without synthesis)")
    parser.add_argument("--compare_users", type=int,
                        help="with --scale_users: also run this many users with the same number of ratings (in a "
                             "fresh process) and print the peak's growth per user next to a per-user breakdown")
    parser.add_argument("--floor_rounds", type=int, help="instead of the table: FedAvg MF rounds against the "
                        "compute floor (the same batches trained centrally)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    (scale if args.scale_users else floor if args.floor_rounds else table)(args)


if __name__ == "__main__":
    main()
