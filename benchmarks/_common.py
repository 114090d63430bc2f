"""Shared pieces of the FL benchmarks: data set-up, the compute floor, JSON lines."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(**fields: Any) -> None:
    """One JSON line on stdout (benchmarks print JSON lines, nothing else on stdout)."""
    print(json.dumps(fields, default=float), flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(workdir: Path, rows: int, max_ind_range: int = -1, seed: int = 0) -> Dict[str, Any]:
    """Synthetic Criteo rows, preprocessed; returns a config dict pointing at them."""
    from fedrec.data import synthesize
    from fedrec.runner import run_preprocess
    from fedrec.utilities.config import load_config

    workdir.mkdir(parents=True, exist_ok=True)
    datafile = workdir / "synthetic.txt"
    if not datafile.exists():
        synthesize(rows, str(datafile), seed=seed)
    processed = workdir / f"processed-{max_ind_range}"
    # fixed: every table gets max_ind_range rows, the table size these benchmarks ask for
    config = load_config(ROOT / "configs" / "dlrm_fl.yml", sets=[
        f"model.preproc.datafile={datafile}", f"model.preproc.output_file={processed}",
        f"model.preproc.max_ind_range={max_ind_range}", "model.preproc.hash_table_size=fixed",
        "fl.progress_bar=false", "fl.backend=local",
        # the simulator's cost is measured on FedAvg (the demo config's default is FedAdagrad)
        "fl.fl_algo={name: fed_avg}", "fl.local_lr=1.0"])
    if not (processed / "metadata.json").exists():
        run_preprocess(config, progress=False)
    return config


def floor_round(sim: Any, round_idx: int) -> float:
    """Seconds to train this round's clients' batches centrally: one model, one optimizer,
    the same batches in the same order, no weight loading and no update handling."""
    return floor_round_times(sim, round_idx)[0]


def floor_round_times(sim: Any, round_idx: int) -> tuple:
    """:func:`floor_round`'s (wall seconds, CPU seconds of this process) for the same span."""
    from fedrec.federated.client_runner import train_locally
    from fedrec.utilities import registry
    from fedrec.utilities.random_state import derive_seed

    fl = sim.fl
    trainer = sim.trainer
    clients = sim.aggregator.sample_neighbours(round_idx, fl.client_num_per_round)
    optimizer = registry.construct("optimizer", fl.optimizer_config, model=trainer.model)
    start, cpu = time.perf_counter(), time.process_time()
    for cid in sorted(clients):
        loader = trainer.client_loader(sim.partition.indices_of(cid), fl.local_batch_size,
                                       seed=derive_seed(fl.seed, round_idx, cid))
        train_locally(trainer, loader, optimizer, fl)
    return time.perf_counter() - start, time.process_time() - cpu


def compare_with_floor(sim: Any, rounds: int, warmup: int = 1) -> Dict[str, Any]:
    """Alternate simulator rounds and floor rounds; per-round seconds and their ratio."""
    sim_seconds: List[float] = []
    floor_seconds: List[float] = []
    sim_cpu: List[float] = []
    floor_cpu: List[float] = []
    rows = []
    for r in range(rounds):
        # the round's CPU seconds leave out other processes' load, but include evaluation:
        # rounds that evaluate are left out of the CPU ratio
        evaluates = (sim.round_idx + 1) % sim.fl.eval_every_n_rounds == 0 or sim.round_idx + 1 >= sim.final_round
        cpu = time.process_time()
        row = sim.run_round()
        cpu = time.process_time() - cpu
        elapsed = row["round_seconds"]  # clients + aggregation; evaluation excluded
        floor, floor_c = floor_round_times(sim, r)
        if r >= warmup:
            sim_seconds.append(elapsed)
            floor_seconds.append(floor)
            if not evaluates:
                sim_cpu.append(cpu)
                floor_cpu.append(floor_c)
        rows.append(row)
    sim_mean = sum(sim_seconds) / len(sim_seconds)
    floor_mean = sum(floor_seconds) / len(floor_seconds)
    ratios = sorted(s / f for s, f in zip(sim_seconds, floor_seconds))
    cpu_ratios = sorted(s / f for s, f in zip(sim_cpu, floor_cpu))
    cpu = {"cpu_ratio_sim_over_floor": sum(sim_cpu) / sum(floor_cpu),
           "median_round_cpu_ratio": cpu_ratios[len(cpu_ratios) // 2]} if cpu_ratios else {}
    return {"sim_seconds_per_round": sim_mean, "floor_seconds_per_round": floor_mean,
            "ratio_sim_over_floor": sim_mean / floor_mean,
            "median_round_ratio": ratios[len(ratios) // 2], **cpu, "rows": rows}
