"""The round loop: sample, run clients (through a backend), aggregate, evaluate, checkpoint.

The aggregator is a ``FederatedWorker`` like any other; this class is its runtime. When
the aggregator asks its neighbours for models, the simulation hands the selected clients
to the backend in fixed blocks and gives the algorithm either the pre-reduced update
(linear algorithms) or every client's model.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedrec.federated.backends import Backend, make_backend, make_blocks
from fedrec.federated.client_runner import ClientRunner, ClientStats
from fedrec.federated.config import FLConfig, fl_config_from, import_modules
from fedrec.federated.resume import check_fingerprint, simulation_fingerprint
from fedrec.federated.update import sum_updates
from fedrec.federated_worker import FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.utilities import registry
from fedrec.utilities.checkpoint import LoadedCheckpoint
from fedrec.utilities.divergence import check_round
from fedrec.utilities.logger import BaseLogger, NullLogger

log = logging.getLogger("fedrec")

PARTITION_FILE = "partition.npz"


def _quiet_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config with the trainer's own progress bar off (the simulator has one)."""
    config = copy.deepcopy(config)
    train = config.setdefault("train", {})
    section = train.setdefault("config", {"name": "dlrm_std"})
    section["progress_bar"] = False
    return config


def build_partition(trainer: Any, fl: FLConfig):
    from fedrec.trainers.base_trainer import _config_errors
    from fedrec.utilities.config import ConfigError

    train = trainer.dataset.split("train")
    if fl.num_workers > len(train):
        raise ConfigError(f"fl.num_workers is {fl.num_workers:,}, but the training split of {trainer.dataset.path} "
                          f"has only {len(train):,} rows and every worker needs one; use at most {len(train):,}")
    with _config_errors("fl.partitioner"):  # a bad alpha, a natural split without user ids
        partitioner = registry.construct("partitioner", fl.partitioner)
        return partitioner.split(train, fl.num_workers, fl.seed)


def build_client_runner(config: Dict[str, Any], logdir: Optional[Path], config_path: Optional[str] = None,
                        new_partition: bool = False) -> ClientRunner:
    """A process's trainer replica, data and partition (rank 0 and every MPI worker).

    Rank 0 splits the data (``new_partition``) and saves the split into ``logdir``
    (``logdir=None``: only builds, and so checks, everything; nothing is written); the
    MPI worker processes load that file rather than splitting again.
    """
    from fedrec.federated.partition import ClientPartition
    from fedrec.runner import build_trainer

    fl = fl_config_from(config)
    import_modules(fl.imports)  # user algorithms must be registered on every process
    trainer = build_trainer(_quiet_config(config), logdir=None, logger=None, config_path=config_path)
    if new_partition:
        partition = build_partition(trainer, fl)
        if logdir is not None:
            partition.save(Path(logdir) / PARTITION_FILE)
    else:
        partition = ClientPartition.load(Path(logdir) / PARTITION_FILE)
    return ClientRunner(config, fl, trainer, partition, aggregator_id=fl.num_workers, logdir=logdir)


class Simulation:
    """A federated simulation over ``fl.num_workers`` simulated trainers (star topology)."""

    def __init__(self, config: Dict[str, Any], logdir: str | Path, logger: Optional[BaseLogger] = None,
                 config_path: Optional[str] = None, backend: Optional[Backend] = None,
                 runner: Optional[ClientRunner] = None) -> None:
        """``runner``: one built (and checked) beforehand, its partition already saved in
        ``logdir`` (``fedrec simulate`` checks everything before it touches the logdir)."""
        self.config = config
        self.fl = fl_config_from(config)
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.logger = logger or NullLogger()
        # Client training runs at fl.client_threads (the backends set it around client
        # work); evaluation here keeps the process's own thread count.
        if self.fl.topology.get("name", "star") != "star":
            raise registry.RegistryError(
                f"fl.topology {self.fl.topology.get('name')!r} is not supported; known: star")

        start = time.perf_counter()
        self.runner = runner or build_client_runner(config, self.logdir, config_path, new_partition=True)
        self.runner.logdir = self.logdir
        self.trainer = trainer = self.runner.trainer
        self.partition = self.runner.partition
        labels = np.asarray(trainer.dataset.split("train").label)
        took = "" if runner is not None else f" in {time.perf_counter() - start:.2f}s"
        self.logger.info(f"data, model and partition ({self.fl.partitioner.get('name')}) ready{took}: "
                         f"{self.partition.describe(labels=labels)}")
        self.seed = self.fl.seed
        self.fingerprint = simulation_fingerprint(config, trainer.dataset)  # checked on resume
        self.per_row_embeddings = self.runner.per_row_embeddings
        self.global_state: Dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in trainer.model.state_dict().items()
        }
        self.algorithm = self.runner.algorithm
        self.aggregator: FederatedWorker = self.algorithm(
            worker_index=self.fl.num_workers,
            roles=["aggregator"],
            in_neighbours=NeighbourTable(range(self.fl.num_workers), self.partition.sizes),
            runtime=self,
            client_num_per_round=self.fl.client_num_per_round,
            persistent_storage=str(self.logdir / "aggregator"),
            **self.runner.algorithm_kwargs,
        )
        self.aggregator.role = "aggregator"
        self.client_states: Dict[int, Dict[str, Any]] = {}
        self.backend = backend or make_backend(self.fl.backend, self.runner, config, self.logdir,
                                               processes=self.fl.mpi_processes, config_path=config_path)
        from fedrec.utilities.checkpoint import CheckpointManager

        self.saver = CheckpointManager(self.logdir / "checkpoints", keep_last=self.fl.keep_checkpoints)
        self.round_idx = 0
        self._round_stats: List[ClientStats] = []
        self._loop = asyncio.new_event_loop()
        self.history: List[Dict[str, Any]] = []
        self.totals = {"bytes_down": 0, "bytes_up": 0, "samples": 0, "clients": 0}

    # -- the aggregator's runtime ---------------------------------------------------------
    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        return self.global_state

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        if weights is self.global_state:
            return
        missing = set(self.global_state) - set(weights)
        if missing:
            raise InvalidStateError(f"update_model: weights lack {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, tensor in self.global_state.items():
                tensor.copy_(weights[name])

    async def request_models(self, worker: FederatedWorker, ids: Sequence[int]) -> List[Neighbour]:
        if worker is not self.aggregator:
            raise InvalidStateError("only the aggregator requests models from the simulation")
        unknown = [i for i in ids if i not in worker.in_neighbours]
        if unknown:
            raise InvalidStateError(f"aggregator asked non-neighbours {unknown[:5]} for models")
        blocks = make_blocks(ids, self.fl.reduce_blocks)
        results = self.backend.run_round(self.round_idx, blocks, self.global_state, self.client_states)
        stats = sorted((s for r in results for s in r.stats), key=lambda s: s.client_id)
        for result in results:
            self.client_states.update(result.client_states)
        self._round_stats = stats
        if self.algorithm.linear_aggregation:
            updates = sorted((u for r in results for u in r.block_updates), key=lambda bu: bu[0])
            worker._reduced = sum_updates(update for _, update in updates)
        models = {cid: (n, m) for r in results for cid, n, m in r.models}
        out = []
        for stat in stats:
            neighbour = worker.in_neighbours[stat.client_id]
            neighbour.sample_num = stat.sample_num
            neighbour.last_sync = self.round_idx
            if stat.client_id in models:
                neighbour.model = models[stat.client_id][1]
            out.append(neighbour)
        return out

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None):
        raise InvalidStateError("the aggregator does not train in a star topology")

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.evaluate()

    # -- rounds ---------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        """Metrics of the global model on the validation split."""
        from fedrec.utilities.metrics import compute_metrics

        self.trainer.model.load_state_dict(self.global_state)
        labels, probs = self.trainer.predict(self.trainer.dataloaders["val"], self.fl.num_eval_batches)
        return compute_metrics(labels, probs)

    def run_round(self) -> Dict[str, Any]:
        start = time.perf_counter()
        self.aggregator.round_idx = self.round_idx
        self.aggregator._reduced = None
        self._loop.run_until_complete(self.aggregator.run())
        self.aggregator.in_neighbours.release_models()  # type: ignore[attr-defined]
        self.aggregator._reduced = None
        seconds = time.perf_counter() - start
        stats = self._round_stats
        samples = sum(s.num_samples for s in stats)
        row: Dict[str, Any] = {
            "round": self.round_idx + 1,  # rounds completed, 1-based
            "clients": len(stats),
            "samples": samples,
            "round_seconds": seconds,
            "train_loss": (sum(s.loss_sum for s in stats) / samples) if samples else math.nan,
            "bytes_down": sum(s.bytes_down for s in stats),
            "bytes_up": sum(s.bytes_up for s in stats),
        }
        for key in ("bytes_down", "bytes_up", "samples", "clients"):
            self.totals[key] += row[key]
        check_round(row, self.round_idx + 1)  # nan: stop before evaluating and saving
        if (self.round_idx + 1) % self.fl.eval_every_n_rounds == 0 or self.round_idx + 1 == self.fl.num_rounds:
            eval_start = time.perf_counter()
            row.update(self.evaluate())
            row["eval_seconds"] = time.perf_counter() - eval_start
        self.round_idx += 1
        return row

    def run(self) -> List[Dict[str, Any]]:
        bar = tqdm(total=self.fl.num_rounds, initial=self.round_idx, unit="round", desc="fl",
                   disable=not self.fl.progress_bar, dynamic_ncols=True)
        try:
            while self.round_idx < self.fl.num_rounds:
                row = self.run_round()
                self.history.append(row)
                self.logger.log_metrics("fl", row["round"], row)
                if self.round_idx % self.fl.checkpoint_every_n_rounds == 0 or self.round_idx == self.fl.num_rounds:
                    self.save_checkpoint()
                bar.update(1)
                if "roc_auc" in row:
                    bar.set_postfix(auc=f"{row['roc_auc']:.4f}", s=f"{row['round_seconds']:.2f}")
        finally:
            bar.close()
        self._write_summary()
        return self.history

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "global": self.global_state,
            "round": self.round_idx,
            "aggregator_extra": dict(self.aggregator.extra),
            "client_states": {int(k): v for k, v in self.client_states.items()},
            "totals": dict(self.totals),
            "fingerprint": dict(self.fingerprint),
        }

    def save_checkpoint(self) -> None:
        self.saver.save(self.round_idx, self.state_dict())

    def resume(self, checkpoint: Optional[LoadedCheckpoint] = None) -> bool:
        """Continue from ``checkpoint`` or the newest intact one (an unreadable newer file
        is skipped with a warning); a checkpoint of another config is refused."""
        checkpoint = checkpoint or self.saver.load_newest_intact(on_skip=self.logger.warning)
        if checkpoint is None:
            return False
        check_fingerprint(checkpoint, self.fingerprint)
        path, state = checkpoint.path, checkpoint.state
        self.update_model(self.aggregator, state["global"])
        self.round_idx = int(state["round"])
        self.aggregator.extra = dict(state["aggregator_extra"])
        self.client_states = {int(k): v for k, v in state["client_states"].items()}
        self.totals = dict(state["totals"])
        self.logger.info(f"resumed from {path} at round {self.round_idx}")
        return True

    def _write_summary(self) -> None:
        final = self.history[-1] if self.history else {}
        summary = {"rounds": self.round_idx, "totals": self.totals,
                   "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
        tmp = self.logdir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        tmp.replace(self.logdir / "summary.json")

    def close(self) -> None:
        self.backend.close()
        self._loop.close()
