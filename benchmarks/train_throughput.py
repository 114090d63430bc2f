"""Training throughput: ``DLRMTrainer.train()`` against a bare PyTorch loop.

Both run the same model (built from the same config, with the same initial weights),
the same optimizer, the same batch size and the very same batches: contiguous blocks
sliced from the memory-mapped training split, turned into tensors with
``torch.from_numpy``, then forward, loss, backward, optimizer step. The trainer runs as
a user would have it (progress bar on, a ``train`` line to metrics.jsonl and TensorBoard
every ``report_every_n`` steps); evaluation and checkpoints are off, since the bare loop
does neither. Runs alternate (trainer, bare, bare, trainer, ...) and repeat, so that
drifting machine load hits both alike; the ratio is taken per adjacent pair, and the
median is reported, with the ratio of the fastest runs and of samples per CPU-second
of the process (the machine may be shared: other processes only ever slow a run down).

Data: ``--rows`` synthetic rows (default 300k, 80% train), generated and preprocessed
into ``--workdir`` (a temporary folder by default; reused when given and present).

    .venv/bin/python benchmarks/train_throughput.py [--models small large] [--repeats 7]

Prints one JSON line per timed run, then one summary line per model with
``ratio`` = trainer samples/s / bare samples/s (median over pairs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from fedrec.runner import build_trainer, run_preprocess  # noqa: E402
from fedrec.utilities import registry  # noqa: E402
from fedrec.utilities.config import load_config  # noqa: E402
from fedrec.utilities.logger import RunLogger  # noqa: E402

# model sizes: the demo DLRM (configs/dlrm_small.yml) and the reference recipe's
# (configs/dlrm.yml: 13-512-256-64-16 bottom, 512-256-1 top, sparse embedding gradients)
MODELS = {"small": "configs/dlrm_small.yml", "large": "configs/dlrm.yml"}


def prepare_data(workdir: Path, rows: int) -> Dict[str, Any]:
    from fedrec.data import synthesize

    datafile, processed = workdir / "synthetic.txt", workdir / "processed"
    meta_path = workdir / "synthetic.txt.meta.json"
    if not (processed / "metadata.json").is_file() or json.loads(meta_path.read_text())["rows"] != rows:
        workdir.mkdir(parents=True, exist_ok=True)
        synthesize(rows, str(datafile), seed=0)
        config = load_config(PROJECT_ROOT / MODELS["small"])
        config["model"]["preproc"].update(datafile=str(datafile), output_file=str(processed))
        run_preprocess(config, progress=False)
    return {"datafile": str(datafile), "processed": str(processed)}


def make_config(model: str, data: Dict[str, Any], batch_size: int, batches: int,
                report_every_n: int) -> Dict[str, Any]:
    config = load_config(PROJECT_ROOT / MODELS[model])
    config["model"]["preproc"].update(datafile=data["datafile"], output_file=data["processed"])
    config["train"]["config"].update(
        batch_size=batch_size, num_epochs=None, num_batches=batches, shuffle=False,
        no_eval_on_val=True, eval_on_train=False, progress_bar=True, report_every_n=report_every_n,
    )
    return config


def time_trainer(config: Dict[str, Any], logroot: Path, run: int) -> Dict[str, Any]:
    logdir = logroot / f"trainer-{run}"
    with RunLogger(logdir, console=False) as logger:
        trainer = build_trainer(copy.deepcopy(config), logdir=None, logger=logger)
        steps = config["train"]["config"]["num_batches"]
        cpu, start = time.process_time(), time.perf_counter()
        trainer.train()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert trainer.progress.step == steps
    return {"seconds": seconds, "cpu_seconds": cpu,
            "samples": steps * config["train"]["config"]["batch_size"], "model": trainer.model}


def time_bare(config: Dict[str, Any]) -> Dict[str, Any]:
    # the same model and initial weights, built the same way (nothing of the trainer runs
    # in the timed loop)
    model = build_trainer(copy.deepcopy(config)).model
    optimizer = registry.construct("optimizer", config["train"]["optimizer"], model=model)
    from fedrec.data import ProcessedDataset

    split = ProcessedDataset.open(config["model"]["preproc"]["output_file"]).split("train")
    dense, sparse, label = split.dense, split.sparse, split.label
    batch_size = config["train"]["config"]["batch_size"]
    steps = config["train"]["config"]["num_batches"]
    model.train()
    cpu, start = time.process_time(), time.perf_counter()
    for b in range(steps):
        lo, hi = b * batch_size, (b + 1) * batch_size
        x = torch.from_numpy(np.array(dense[lo:hi]))
        ids = torch.from_numpy(sparse[lo:hi].astype(np.int64))
        y = torch.from_numpy(np.array(label[lo:hi]))
        loss = model.loss(model(x, ids), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "samples": steps * batch_size, "model": model}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def bench_model(model: str, data: Dict[str, Any], args: argparse.Namespace, logroot: Path) -> Dict[str, Any]:
    batches = args.batches or (600 if model == "small" else 250)
    config = make_config(model, data, args.batch_size, batches, args.report_every_n)
    rows = len(np.load(Path(data["processed"]) / "train" / "label.npy", mmap_mode="r"))
    if batches * args.batch_size > rows:
        raise SystemExit(f"{batches} batches of {args.batch_size} need more than the {rows} training rows")
    # warm-up: page in the arrays, first-call allocations, thread pools
    warm = make_config(model, data, args.batch_size, 20, args.report_every_n)
    time_trainer(warm, logroot, -1)
    time_bare(warm)

    rates: Dict[str, List[float]] = {"trainer": [], "bare": []}
    cpu_rates: Dict[str, List[float]] = {"trainer": [], "bare": []}
    ratios: List[float] = []
    cpu_ratios: List[float] = []
    identical = []
    for rep in range(args.repeats):
        order = ("trainer", "bare") if rep % 2 == 0 else ("bare", "trainer")
        results = {}
        for runner in order:
            result = time_trainer(config, logroot, rep) if runner == "trainer" else time_bare(config)
            rate = result["samples"] / result["seconds"]
            rates[runner].append(rate)
            cpu_rates[runner].append(result["samples"] / result["cpu_seconds"])
            results[runner] = result
            print(json.dumps({"model": model, "repeat": rep, "runner": runner, "batches": batches,
                              "batch_size": args.batch_size, "seconds": round(result["seconds"], 4),
                              "cpu_seconds": round(result["cpu_seconds"], 4),
                              "samples_per_second": round(rate, 1)}), flush=True)
        ratios.append(rates["trainer"][-1] / rates["bare"][-1])
        cpu_ratios.append(cpu_rates["trainer"][-1] / cpu_rates["bare"][-1])
        identical.append(same_weights(results["trainer"]["model"], results["bare"]["model"]))
    params = sum(p.numel() for p in results["bare"]["model"].parameters())
    summary = {
        "summary": model, "config": MODELS[model], "parameters": params,
        "batch_size": args.batch_size, "batches": batches, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "trainer_samples_per_second": round(statistics.median(rates["trainer"]), 1),
        "bare_samples_per_second": round(statistics.median(rates["bare"]), 1),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
        "ratio_of_medians": round(statistics.median(rates["trainer"]) / statistics.median(rates["bare"]), 4),
        # the least disturbed run of each (a shared machine only ever slows a run down)
        "trainer_best_samples_per_second": round(max(rates["trainer"]), 1),
        "bare_best_samples_per_second": round(max(rates["bare"]), 1),
        "ratio_of_best": round(max(rates["trainer"]) / max(rates["bare"]), 4),
        # samples per CPU-second of this process (less sensitive to other processes)
        "cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "same_final_weights": all(identical),
    }
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--workdir", help="data folder (kept); default: a temporary folder")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, help="batches per timed run (default 600 small, 250 large)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each loop per model")
    parser.add_argument("--report_every_n", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp) / "data"
        start = time.perf_counter()
        data = prepare_data(workdir, args.rows)
        print(json.dumps({"data": str(workdir), "rows": args.rows,
                          "prepare_seconds": round(time.perf_counter() - start, 2)}), flush=True)
        for model in args.models:
            bench_model(model, data, args, Path(tmp) / "logs" / model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
