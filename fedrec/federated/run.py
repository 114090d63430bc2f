"""``fedrec simulate``: build the simulation from a config, run it, say where results went."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from fedrec.federated.preflight import check_simulation_config
from fedrec.federated.simulation import Simulation


def format_round(row: Dict[str, Any]) -> str:
    auc = row.get("roc_auc")
    auc_text = f"auc {auc:.4f}  log_loss {row['log_loss']:.4f}" if auc is not None and not math.isnan(auc) else "auc -"
    return (f"round {row['round']:3d}: {auc_text}  clients {row['clients']}  samples {row['samples']:,}  "
            f"{row['round_seconds']:.2f}s  up {row['bytes_up'] / 1e6:,.1f} MB")


def run_simulation(config: Dict[str, Any], logdir: str | Path, resume: bool = False,
                   config_path: Optional[str] = None, print_rounds: bool = True) -> List[Dict[str, Any]]:
    """Run a federated simulation; metrics.jsonl, TensorBoard and checkpoints go to ``logdir``."""
    from fedrec.utilities.logger import RunLogger

    from fedrec.runner import archive_previous_run, truncate_metrics
    from fedrec.utilities.checkpoint import CheckpointManager

    check_simulation_config(config)  # a bad config leaves the logdir untouched
    logdir = Path(logdir)
    resume_round = CheckpointManager(logdir / "checkpoints").latest_step() if resume else None
    notes = []
    if resume_round is not None:
        # rounds logged after the checkpoint are run (and logged) again
        truncate_metrics(logdir / "metrics.jsonl", resume_round)
    else:
        if resume:
            notes.append(f"--resume: no checkpoint under {logdir / 'checkpoints'}; starting fresh")
        archived = archive_previous_run(logdir)
        if archived is not None:
            notes.append(f"{logdir} held an earlier run: moved its files to {archived}")
    logdir.mkdir(parents=True, exist_ok=True)
    purge_step = None if resume_round is None else resume_round + 1
    with RunLogger(logdir, purge_step=purge_step) as logger:
        for note in notes:
            logger.info(note)
        logger.log_config(config)
        sim = Simulation(config, logdir, logger=logger, config_path=config_path)
        try:
            if resume_round is not None:
                sim.resume()
            history = sim.run()
        finally:
            sim.close()
    if print_rounds:
        for row in history:
            print(format_round(row))
        print(f"{sim.backend.name} backend, {sim.fl.num_workers:,} workers, "
              f"{sim.fl.client_num_per_round} per round, fl_algo {sim.fl.fl_algo.get('name')}")
        print(f"results in {logdir}: metrics.jsonl (one line per round), summary.json, "
              f"TensorBoard events, checkpoints/")
    return history
