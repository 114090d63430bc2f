"""``fedrec simulate``: build the simulation from a config, run it, say where results went."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

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

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    with RunLogger(logdir) as logger:
        logger.log_config(config)
        sim = Simulation(config, logdir, logger=logger, config_path=config_path)
        try:
            if resume and not sim.resume():
                logger.info(f"--resume: no checkpoint under {logdir / 'checkpoints'}; starting fresh")
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
