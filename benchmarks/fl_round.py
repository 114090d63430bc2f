"""Simulator round time against the compute floor, and memory/start-up against workers.

    .venv/bin/python benchmarks/fl_round.py [--rows 200000] [--rounds 6]

Prints JSON lines:
* ``round_ratio``: the demo DLRM (configs/dlrm_fl.yml), 1,000 workers, 100 per round:
  simulator seconds per round against training the same samples with the same batches
  centrally in the same process (the compute floor), alternated in one run. Aim <= 1.15.
* ``scale``: peak RSS and start-up seconds at 1,000 / 10,000 / 100,000 workers (each in a
  fresh process, one round of 100 clients), and the RSS ratio 10k / 1k (aim <= 1.2).
* ``engines`` (``--engines``): the vectorized client engine against the sequential one and
  the compute floor, rounds of the two simulations and the floor alternated in one
  process: the demo DLRM with 1 and 5 local epochs, dense and sparse updates, and the
  Kaggle-sized DLRM (13-512-256-64-16, 512-256-1, 26 hashed tables of 10,000 rows) in
  sparse mode; each with the default 12 reduction blocks and with one (on the CPU a
  chunk packs a process's blocks; the torch.func path and a GPU batch one block at a
  time); ``--threads`` (default: every core) sets the floor's torch threads and the
  simulations' ``fl.client_threads`` and ``fl.vectorize_threads``; ``--device cuda:0`` runs the simulations on a GPU
  (``train.config.devices``; the floor stays the CPU's, so compare seconds per round with
  a CPU run of the same settings). Also the achieved GFLOP/s of the matmuls (counted with
  ``torch.utils.flop_counter``) against this machine's measured sgemm peak at ``--threads``.
* ``engine_memory`` (``--engine-memory``): peak RSS of one vectorized round (fresh process
  each) at ``fl.vectorize_memory_mb`` 64 / 256 / 1,024, and the chunks the budget made;
  ``budget_mib`` 0 is the sequential engine's round, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, compare_with_floor, emit, floor_round, make_data, peak_rss_mib


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


ENGINE_SETTINGS = {
    "demo_1_epoch": ({}, {}),
    "demo_5_epochs": ({"local_epochs": 5}, {}),
    "demo_sparse": ({"embedding_updates": "sparse"}, {}),
    "kaggle_sparse": ({"embedding_updates": "sparse"},
                      {"arch_mlp_bot": [13, 512, 256, 64, 16], "arch_mlp_top": [512, 256, 1]}),
}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Single-thread float32 sgemm throughput (the best of a few runs)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def flops_per_sample(sim) -> float:
    """Forward + backward matmul FLOPs of one sample of the model (a batch of 32 counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    trainer = sim.trainer
    loader = trainer.client_loader(sim.partition.indices_of(0), 32, seed=0)
    batch = next(iter(loader))
    with FlopCounterMode(display=False) as counter:
        loss = trainer.model.loss(trainer.model(batch.dense, batch.sparse), batch.label)
        loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    torch.set_grad_enabled(True)
    return counter.get_total_flops() / len(batch)


def engines(workdir: Path, rows: int, rounds: int, settings: list, blocks: list, threads: int,
            device: str = "cpu") -> None:
    import copy
    import shutil

    import torch

    from fedrec.federated.simulation import Simulation

    torch.set_num_threads(threads)
    peak = matmul_peak_gflops()
    emit(bench="matmul_peak", gflops=peak, threads=threads)
    for name in settings:
        fl_extra, model_extra = ENGINE_SETTINGS[name]
        max_ind_range = 10_000 if name.startswith("kaggle") else -1
        base = make_data(workdir, rows, max_ind_range=max_ind_range)
        base["model"].update(model_extra)
        base["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "num_rounds": 10_000,
                           "local_epochs": 1, "partitioner": {"name": "dirichlet", "alpha": 0.5},
                           "eval_every_n_rounds": 10_000, **fl_extra})
        base["train"]["config"]["devices"] = [device]
        for reduce_blocks in blocks:
            sims = {}
            for engine in ("sequential", "vectorized"):
                config = copy.deepcopy(base)
                config["fl"].update({"client_engine": engine, "reduce_blocks": reduce_blocks,
                                     "client_threads": threads, "vectorize_threads": threads})
                logdir = workdir / f"engines-{name}-{reduce_blocks}-{engine}"
                shutil.rmtree(logdir, ignore_errors=True)
                sims[engine] = Simulation(config, logdir)
            flops = flops_per_sample(sims["sequential"])
            seconds = {"sequential": [], "vectorized": [], "floor": []}
            samples = []
            for r in range(rounds):
                for engine, sim in sims.items():
                    row = sim.run_round()
                    if r:
                        seconds[engine].append(row["round_seconds"])
                if r:
                    samples.append(row["samples"])
                    seconds["floor"].append(floor_round(sims["sequential"], r))
            for sim in sims.values():
                sim.close()
            ratios = sorted(v / f for v, f in zip(seconds["vectorized"], seconds["floor"]))
            seq_ratios = sorted(q / f for q, f in zip(seconds["sequential"], seconds["floor"]))
            vec_seconds = sum(seconds["vectorized"]) / len(ratios)
            per_round = sum(samples) / len(samples)
            emit(bench="engines", setting=name, device=device, reduce_blocks=reduce_blocks, threads=threads,
                 rounds=len(ratios), seconds_per_round_vectorized=vec_seconds,
                 seconds_per_round_sequential=sum(seconds["sequential"]) / len(ratios),
                 samples_per_round=per_round,
                 floor_us_per_sample=1e6 * sum(seconds["floor"]) / sum(samples),
                 sequential_us_per_sample=1e6 * sum(seconds["sequential"]) / sum(samples),
                 vectorized_us_per_sample=1e6 * sum(seconds["vectorized"]) / sum(samples),
                 vectorized_over_floor=ratios[len(ratios) // 2],
                 sequential_over_floor=seq_ratios[len(seq_ratios) // 2],
                 speedup_over_floor=1 / ratios[len(ratios) // 2],
                 mflop_per_sample=flops / 1e6,
                 vectorized_gflops=flops * per_round / vec_seconds / 1e9,
                 fraction_of_matmul_peak=flops * per_round / vec_seconds / 1e9 / peak)


def engine_memory_child(workdir: Path, rows: int, setting: str, budget_mb: int) -> None:
    """One vectorized round in this (fresh) process: peak RSS, chunks and their sizes."""
    import torch

    from fedrec.federated.simulation import Simulation

    torch.set_num_threads(1)
    fl_extra, model_extra = ENGINE_SETTINGS[setting]
    config = make_data(workdir, rows, max_ind_range=10_000 if setting.startswith("kaggle") else -1)
    config["model"].update(model_extra)
    config["fl"].update({"num_workers": 1000, "client_num_per_round": 100, "num_rounds": 1, "local_epochs": 1,
                         "partitioner": {"name": "dirichlet", "alpha": 0.5}, "eval_every_n_rounds": 10_000,
                         "client_engine": "vectorized" if budget_mb else "sequential",
                         "vectorize_memory_mb": budget_mb or 1024, "reduce_blocks": 1, **fl_extra})
    sim = Simulation(config, workdir / f"engine-memory-{setting}-{budget_mb}")
    before = peak_rss_mib()
    engine = sim.runner.engine
    cohort = sorted(int(c) for c in sim.aggregator.sample_neighbours(0, 100))
    chunks = engine.chunks(cohort) if engine is not None else [[c] for c in cohort]
    row = sim.run_round()
    sim.close()
    print(json.dumps({"setting": setting, "budget_mib": budget_mb, "chunks": len(chunks),
                      "largest_chunk": max(len(c) for c in chunks), "round_seconds": row["round_seconds"],
                      "peak_rss_mib_before_round": before, "peak_rss_mib": peak_rss_mib()}))


def engine_memory(workdir: Path, rows: int) -> None:
    for setting in ("demo_1_epoch", "kaggle_sparse"):
        for budget in (0, 64, 256, 1024):  # 0: the sequential engine, for comparison
            out = subprocess.run([sys.executable, __file__, "--child-engine-memory", setting, str(budget),
                                  "--rows", str(rows), "--workdir", str(workdir)],
                                 capture_output=True, text=True, cwd=ROOT, check=True)
            emit(bench="engine_memory", **json.loads(out.stdout.strip().splitlines()[-1]))


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (else argparse's one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _device(text: str) -> str:
    """An argparse type: a device this machine has (a bad one is argparse's one-line error)."""
    from fedrec.trainers.base_trainer import resolve_device
    from fedrec.utilities.config import ConfigError

    try:
        resolve_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_at_least(1), default=200_000)
    # the first round warms up and is not timed: at least one more
    parser.add_argument("--rounds", type=_at_least(2), default=6)
    # default: 1 for round_ratio (its aim is set at one thread), the whole machine for
    # --engines (the floor's torch threads and the simulations' client and lane threads)
    parser.add_argument("--threads", type=_at_least(1))
    parser.add_argument("--workdir")
    parser.add_argument("--child-scale", type=int)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--engines", nargs="*", choices=sorted(ENGINE_SETTINGS),
                        help="only the client-engine comparison, for these settings (none named: all)")
    parser.add_argument("--reduce-blocks", type=_at_least(1), nargs="+", default=[12, 1])
    parser.add_argument("--device", default="cpu", type=_device, help="where the simulations train (cpu, cuda:0)")
    parser.add_argument("--engine-memory", action="store_true",
                        help="only the vectorized engine's peak memory at a few fl.vectorize_memory_mb budgets")
    parser.add_argument("--child-engine-memory", nargs=2, metavar=("SETTING", "BUDGET_MB"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.child_scale:
            scale_child(workdir, args.rows, args.child_scale)
            return
        if args.child_engine_memory:
            engine_memory_child(workdir, args.rows, args.child_engine_memory[0], int(args.child_engine_memory[1]))
            return
        if args.engine_memory:
            engine_memory(workdir, args.rows)
            return
        if args.engines is not None:
            engines(workdir, args.rows, args.rounds, args.engines or list(ENGINE_SETTINGS), args.reduce_blocks,
                    len(os.sched_getaffinity(0)) if args.threads is None else args.threads, args.device)
            return
        round_ratio(workdir, args.rows, args.rounds, 1 if args.threads is None else args.threads)
        if not args.skip_scale:
            scale(workdir, args.rows)


if __name__ == "__main__":
    main()
