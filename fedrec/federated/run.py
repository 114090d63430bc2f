"""``fedrec simulate``: build the simulation from a config, run it, say where results went."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fedrec.federated.simulation import PARTITION_FILE, Simulation


def format_round(row: Dict[str, Any]) -> str:
    auc = row.get("roc_auc")
    auc_text = f"auc {auc:.4f}  log_loss {row['log_loss']:.4f}" if auc is not None and not math.isnan(auc) else "auc -"
    if "hr@10" in row:  # a rec model: ranking metrics (and RMSE for ratings)
        auc_text = f"hr@10 {row['hr@10']:.4f}  ndcg@10 {row['ndcg@10']:.4f}" + (
            f"  rmse {row['rmse']:.4f}" if "rmse" in row else "")
    eps_text = f"  epsilon {row['epsilon']:.3g}" if "epsilon" in row else ""
    clock_text = f"  device time {row['virtual_time']:,.0f}s" if "virtual_time" in row else ""
    return (f"round {row['round']:3d}: {auc_text}  clients {row['clients']}  samples {row['samples']:,}  "
            f"{row['round_seconds']:.2f}s  up {row['bytes_up'] / 1e6:,.1f} MB{eps_text}{clock_text}")


def summary_table(history: List[Dict[str, Any]], totals: Dict[str, Any]) -> str:
    """The end-of-run table: each quality metric's final and best value (with its round),
    then what the run cost."""
    from fedrec.report.tables import direction, format_value
    from fedrec.utilities.console import format_table

    rows = []
    for key in ("roc_auc", "log_loss", "accuracy", "hr@10", "ndcg@10", "rmse", "train_loss", "epsilon"):
        points = [(r["round"], r[key]) for r in history
                  if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        if not points:
            continue
        sign = direction(key)
        best = max(points, key=lambda p: sign * p[1]) if sign else None
        rows.append([key, format_value(points[-1][1]),
                     f"{format_value(best[1])} (round {best[0]})" if best else "-"])
    seconds = sum(r.get("round_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in history)
    cost = (f"{len(history)} round(s) run in {seconds:.1f}s; in all: {totals.get('clients', 0):,} client runs, "
            f"{totals.get('samples', 0):,} samples, {totals.get('bytes_up', 0) / 1e6:,.1f} MB up, "
            f"{totals.get('bytes_down', 0) / 1e6:,.1f} MB down")
    return (format_table(["metric", "final", "best"], rows) + "\n" if rows else "") + cost


def _check_backend(config: Dict[str, Any]) -> None:
    """What making the backend would refuse, checked before the logdir is touched."""
    from fedrec.federated.config import fl_config_from
    from fedrec.federated.launch import check_launch
    from fedrec.federated.mpi_env import launched_under_mpi_futures
    from fedrec.federated.mpi_backend import require_mpi4py

    check_launch()
    backend = fl_config_from(config).backend
    if backend == "mpi" or (backend == "auto" and launched_under_mpi_futures()):
        require_mpi4py()


def run_simulation(config: Dict[str, Any], logdir: str | Path, resume: bool = False,
                   config_path: Optional[str] = None, print_rounds: bool = True) -> List[Dict[str, Any]]:
    """Run a federated simulation; metrics.jsonl, TensorBoard and checkpoints go to ``logdir``.

    The order keeps an earlier run safe: first everything is built and so checked (the
    config, data, model, optimizers, the client split, the backend); then the logdir is
    locked against a second writer; then, with ``resume``, the newest intact checkpoint
    is read and its config fingerprint compared with this config's. Only after all of
    that do files change: the metrics written after the checkpoint are dropped (resume)
    or the earlier run moves to ``logdir/previous/<time>/`` (fresh run).
    """
    from fedrec.federated.resume import find_resume_point, saved_partition_matches, simulation_fingerprint
    from fedrec.federated.simulation import build_client_runner, check_simulation, devices_digest, final_round
    from fedrec.utilities.divergence import NonFinitePredictions
    from fedrec.utilities.logger import RunLogger, read_metrics
    from fedrec.utilities.run_dir import LogdirLock, start_writing

    logdir = Path(logdir)
    started = time.perf_counter()
    _check_backend(config)
    from fedrec.runner import with_data_defaults

    config = with_data_defaults(config, config_path)  # e.g. one client per MovieLens user
    runner = build_client_runner(config, None, config_path, new_partition=True)  # checks; writes nothing
    clock = check_simulation(runner)
    fingerprint = simulation_fingerprint(config, runner.trainer.dataset, runner.postprocessors,
                                         devices=devices_digest(clock))
    skipped: List[str] = []
    notes = [f"config, data, model and client split built and checked in {time.perf_counter() - started:.2f}s"]
    with LogdirLock(logdir):
        start = find_resume_point(logdir, fingerprint, on_skip=skipped.append) if resume else None
        keep_partition = start is not None and saved_partition_matches(logdir / PARTITION_FILE, runner.partition)
        last = final_round(runner)
        if start is not None and start.step >= last:  # a finished run: leave it as it is
            why = ("" if last == runner.fl.num_rounds else
                   f", or {last} within the privacy budget")
            print(f"nothing to do: {logdir} already holds {start.step} rounds (fl.num_rounds is "
                  f"{runner.fl.num_rounds}{why}); raise --num_rounds to run more")
            return [r for r in read_metrics(logdir) if r.get("phase") == "fl"]
        # -- everything is checked: from here on the logdir changes ----------------------
        # rounds logged after the checkpoint are run (and logged) again
        notes += start_writing(logdir, None if start is None else start.step, resume, unit="round")
        if not keep_partition:
            runner.partition.save(logdir / PARTITION_FILE)
        purge_step = None if start is None else start.step + 1
        with RunLogger(logdir, purge_step=purge_step) as logger:
            for message in skipped:
                logger.warning(message)
            for note in notes:
                logger.info(note)
            logger.log_config(config)
            sim = Simulation(config, logdir, logger=logger, config_path=config_path, runner=runner)
            try:
                if start is not None:
                    sim.resume(start)
                history = sim.run()
            except NonFinitePredictions as err:
                raise NonFinitePredictions(f"the simulation diverged in round {sim.round_idx + 1}: {err}; "
                                           "lower fl.local_lr and start a fresh run") from None
            finally:
                sim.close()
    if print_rounds:
        for row in history:
            print(format_round(row))
        print(f"{sim.backend.name} backend, {sim.fl.num_workers:,} workers, "
              f"{sim.fl.client_num_per_round} per round, fl_algo {sim.fl.fl_algo.get('name')}")
        print(summary_table(history, sim.totals))
        print(f"results in {logdir}: metrics.jsonl (one line per round), summary.json, "
              f"TensorBoard events, checkpoints/")
    return history
