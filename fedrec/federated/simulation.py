"""The round loop: sample, run clients (through a backend), aggregate, evaluate, checkpoint.

The aggregator is a ``FederatedWorker`` like any other; this class is its runtime
(``AggregatorRuntime``). When the aggregator asks its neighbours for models, the
simulation sends the round's context with the weights, hands the selected clients to the
backend in fixed blocks, and returns a ``Cohort``: the pre-reduced update (through the
server-side postprocessors), every update, or every model, as the algorithm declares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from fedrec.federated.backends import Backend, make_blocks
from fedrec.federated.client_runner import PARTITION_FILE, ClientRunner, ClientStats, build_client_runner  # noqa: F401
from fedrec.federated.config import fl_config_from
from fedrec.federated.context import RoundContext
from fedrec.federated.fedbuff import FedBuff, Flight, build_fedbuff
from fedrec.federated.fedbuff import describe as describe_fedbuff
from fedrec.federated.launch import make_backend
from fedrec.federated.postprocessors import chain_broadcast, run_server_chain
from fedrec.federated.resume import check_fingerprint, simulation_fingerprint
from fedrec.federated.topology import Topology, build_topology, check_run_features, star_link_metrics
from fedrec.federated.update import sum_updates
from fedrec.federated.virtual_clock import (DeviceSampler, RoundAbandoned, VirtualClock, append_record, build_clock,
                                            save_profiles, truncate_records)
from fedrec.federated_worker import Cohort, FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.utilities.checkpoint import LoadedCheckpoint
from fedrec.utilities.config import ConfigError
from fedrec.utilities.console import progress_bar
from fedrec.utilities.divergence import check_round
from fedrec.utilities.logger import BaseLogger, NullLogger

log = logging.getLogger("fedrec")


@dataclasses.dataclass
class RoundRecord:
    """What the backend reported for the round in progress (the metrics line's source)."""

    stats: List[ClientStats]
    plan: Any = None  # the round policy's RoundPlan (runs with fl.devices), or FedBuff's Outcome


def check_topology(fl: Any) -> Topology:
    """The round loop's own config: ``fl.topology`` from the registry, laid out and checked."""
    return build_topology(fl)


def final_round(runner: ClientRunner) -> int:
    """The last round a run does: ``fl.num_rounds``, or fewer where a postprocessor's
    budget (a privacy budget) ends sooner."""
    limits = [p.max_rounds() for p in runner.postprocessors]
    return min([runner.fl.num_rounds] + [int(n) for n in limits if n is not None])


def build_aggregator(runner: ClientRunner, runtime: Any, persistent_storage: Optional[str]) -> FederatedWorker:
    """The aggregator worker over every client; its server state (the server optimizer)
    is built now, so that a bad value fails before round 1, naming ``fl.fl_algo``."""
    fl = runner.fl
    try:
        aggregator = runner.algorithm(
            worker_index=fl.num_workers,
            roles=["aggregator"],
            in_neighbours=NeighbourTable(range(fl.num_workers), runner.partition.sizes),
            runtime=runtime,
            client_num_per_round=fl.client_num_per_round,
            persistent_storage=persistent_storage,
            **runner.algorithm_kwargs,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"fl.fl_algo {fl.fl_algo.get('name')!r}: {err}") from None
    aggregator.role = "aggregator"
    return aggregator


class _DryRuntime:
    """Just enough of an aggregator's runtime to build the aggregator once, as a check
    (the replica's weights stand in for the global model; nothing is changed)."""

    def __init__(self, runner: ClientRunner, sampler: Any) -> None:
        self.seed, self.per_row_embeddings, self.sampler = runner.seed, runner.per_row_embeddings, sampler
        self._weights = runner.replica

    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        return self._weights


def check_simulation(runner: ClientRunner) -> Optional[VirtualClock]:
    """What ``Simulation`` builds beyond a process's runner, checked with no side effects
    (``fedrec simulate`` calls this before it touches the logdir); returns the virtual
    clock (device profiles loaded and checked), None without ``fl.devices``."""
    topology = check_topology(runner.fl)
    check_run_features(runner.fl, topology, runner.private_names)
    topology.check_algorithm(runner.algorithm, runner.fl.fl_algo.get("name"))
    clock = build_clock(runner)
    build_fedbuff(runner, clock)
    if topology.name == "star":
        build_aggregator(runner, _DryRuntime(runner, runner.sampler), None)
    else:
        topology.check_workers(runner, _DryRuntime(runner, runner.sampler))
    return clock


def devices_digest(clock: Optional[VirtualClock]) -> Optional[str]:
    """The profiles' part of the resume fingerprint (None without devices)."""
    return clock.profiles.digest() if clock is not None else None


class Simulation:
    """A federated simulation over ``fl.num_workers`` simulated trainers, on the star or
    on another ``fl.topology`` (whose runtime then drives the round)."""

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
        self.topology = check_topology(self.fl)

        start = time.perf_counter()
        self.runner = runner or build_client_runner(config, self.logdir, config_path, new_partition=True)
        self.runner.attach_logdir(self.logdir)
        self.trainer = trainer = self.runner.trainer
        self.sampler = self.runner.sampler
        self.partition = self.runner.partition
        labels = np.asarray(trainer.dataset.split("train").label)
        took = "" if runner is not None else f" in {time.perf_counter() - start:.2f}s"
        self.logger.info(f"data, model and partition ({self.fl.partitioner.get('name')}) ready{took}: "
                         f"{self.partition.describe(labels=labels)}")
        self.seed = self.fl.seed
        self.clock = build_clock(self.runner)
        if self.clock is not None:  # the aggregator samples among online clients, over-committed
            self.sampler = DeviceSampler(self.sampler, self.clock)
            save_profiles(self.clock, self.logdir)
            self.logger.info(self.clock.profiles.describe())
        # fl.async: FedBuff's event queue replaces the synchronous rounds (docs/devices.md)
        self.fedbuff: Optional[FedBuff] = build_fedbuff(self.runner, self.clock)
        if self.fedbuff is not None:
            self.logger.info(describe_fedbuff(self.fedbuff.config))
        self.target: Optional[Dict[str, Any]] = None  # when fl.target_auc was first reached
        # checked on --resume
        self.fingerprint = simulation_fingerprint(config, trainer.dataset, self.runner.postprocessors,
                                                  devices=devices_digest(self.clock))
        self.per_row_embeddings = self.runner.per_row_embeddings
        if self.runner.dense_path_note:
            self.logger.info(self.runner.dense_path_note)
        if self.runner.engine_note:
            self.logger.info(self.runner.engine_note)
        self.postprocessors = self.runner.postprocessors
        for line in filter(None, (p.describe() for p in self.postprocessors)):
            self.logger.info(line)
        self.final_round = final_round(self.runner)
        # the global model: everything but the users' private rows (they stay on clients)
        private = set(self.runner.private_names)
        self.global_state: Dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in trainer.model.state_dict().items() if k not in private
        }
        check_run_features(self.fl, self.topology, self.runner.private_names)
        self.topology.check_algorithm(self.runner.algorithm, self.fl.fl_algo.get("name"))
        # beyond the star, the topology's runtime holds the other aggregators (edges) or the
        # peers, and its ``aggregator`` stands where the star's aggregator stands here
        self.topology_runtime = self.topology.runtime(self)
        if self.topology_runtime is None:
            self.aggregator = build_aggregator(self.runner, self, str(self.logdir / "aggregator"))
        else:
            self.logger.info(self.topology.describe())
            self.aggregator = self.topology_runtime.aggregator
        if self.fedbuff is not None:
            self.fedbuff.server_values = self.aggregator.server_values
        self.backend = backend or make_backend(self.fl.backend, self.runner, config, self.logdir,
                                               processes=self.fl.mpi_processes, config_path=config_path)
        from fedrec.utilities.checkpoint import CheckpointManager

        self.saver = CheckpointManager(self.logdir / "checkpoints", keep_last=self.fl.keep_checkpoints)
        self.round_idx = 0
        self.checkpointed_round = 0
        self.last_round = RoundRecord([])
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
        return self.train_cohort(worker, ids, self.global_state)

    def train_cohort(self, worker: FederatedWorker, ids: Sequence[int], weights: Dict[str, torch.Tensor],
                     round_idx: Optional[int] = None, checkpointed_round: Optional[int] = None,
                     aggregator_id: Optional[int] = None) -> Cohort:
        """Train aggregator ``worker``'s trainers ``ids`` from ``weights`` through the
        backend; the returned cohort carries what the algorithm's aggregation needs. An
        edge aggregator (``aggregator_id``) passes its own weights and round index."""
        unknown = [i for i in ids if i not in worker.in_neighbours]
        if unknown:
            raise InvalidStateError(f"aggregator asked non-neighbours {unknown[:5]} for models")
        round_idx = self.round_idx if round_idx is None else round_idx
        context = RoundContext(round_idx, self.seed, server_values=worker.server_values(),
                               postprocessor_values=chain_broadcast(self.postprocessors),
                               checkpointed_round=self.checkpointed_round if checkpointed_round is None
                               else checkpointed_round, cohort=sorted(int(i) for i in ids),
                               aggregator_id=aggregator_id)
        if self.clock is not None:  # the round policy decides who counts, before anyone trains
            plan = self.clock.plan(self.round_idx, ids, self.runner.planned_costs(context.cohort, context,
                                                                                  self.clock.samples))
            self.last_round.plan = plan
            if plan.abandoned:
                raise RoundAbandoned()
            ids = context.cohort = plan.kept
        blocks = make_blocks(ids, self.fl.reduce_blocks)
        results = self.backend.run_round(context, blocks, weights)
        stats = sorted((s for r in results for s in r.stats), key=lambda s: s.client_id)
        self.last_round = RoundRecord(stats, self.last_round.plan)
        reduced = None
        if self.runner.mode == "sum":
            block_updates = sorted((u for r in results for u in r.block_updates), key=lambda bu: bu[0])
            reduced = run_server_chain(self.postprocessors, sum_updates(u for _, u in block_updates), context)
        updates = {cid: update for r in results for cid, update in r.updates}
        models = {cid: (n, m) for r in results for cid, n, m in r.models}
        out = []
        for stat in stats:
            neighbour = worker.in_neighbours[stat.client_id]
            neighbour.sample_num = stat.sample_num
            neighbour.last_sync = round_idx
            if stat.client_id in models:
                neighbour.model = models[stat.client_id][1]
            out.append(neighbour)
        return Cohort(out, reduced=reduced, updates=dict(sorted(updates.items())))

    def _train_async(self, version: int, flights: List[Flight]) -> Dict[int, Any]:
        """FedBuff: train ``flights`` (ascending ids, every one started on the global model,
        now at ``version``) through the backend, one block per client so that each update
        comes back on its own; each client's data order follows its launch."""
        ids = [f.client for f in flights]
        context = RoundContext(version, self.seed, server_values=self.aggregator.server_values(),
                               checkpointed_round=self.checkpointed_round, cohort=ids,
                               client_rounds={f.client: f.launch for f in flights})
        blocks = [(b, [cid]) for b, cid in enumerate(ids)]
        results = self.backend.run_round(context, blocks, self.global_state)
        updates = {ids[b]: update for r in results for b, update in r.block_updates}
        stats = {s.client_id: s for r in results for s in r.stats}
        return {cid: (updates[cid], stats[cid]) for cid in ids}

    def _step_async(self, update: Any, server_lr: float) -> None:
        """FedBuff's server step: the aggregator's server optimizer, scaled by ``server_lr``."""
        self.aggregator.server_optimizer.step(update, per_row=self.per_row_embeddings, scale=server_lr)

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None):
        raise InvalidStateError("the aggregator does not train in a star topology")

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.evaluate()

    # -- rounds ---------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        """Metrics of the global model on the validation split (a rec model: per user,
        with each user's own private rows, as each client would evaluate on its device)."""
        from fedrec.utilities.metrics import compute_metrics

        if hasattr(self.trainer, "evaluate_federated"):
            return self._evaluate_per_user()

        self.trainer.model.load_state_dict(self.global_state)
        labels, probs = self.trainer.predict(self.trainer.dataloaders["val"], self.fl.num_eval_batches)
        return compute_metrics(labels, probs)

    def _evaluate_per_user(self) -> Dict[str, float]:
        before = self.round_idx + 1  # the private rows as stored after this round
        metrics, per_user = self.trainer.evaluate_federated(
            self.global_state, lambda users: self.runner.private_rows_and_stored(users, before))
        if len(per_user["user"]) <= self.trainer.train_config.client_records_max_users:
            keys = [k for k in per_user if k != "user"]
            for k, user in enumerate(per_user["user"].tolist()):  # one record per client
                self.logger.log_metrics("client", before, {key: float(per_user[key][k]) for key in keys},
                                        round=before, client=int(user))
        return metrics

    def run_round(self) -> Dict[str, Any]:
        start = time.perf_counter()
        self.aggregator.round_idx = self.round_idx
        self.last_round = RoundRecord([])
        if self.fedbuff is not None:  # one server step of FedBuff (buffer_size arrivals)
            outcome = self.fedbuff.next_update(self._train_async, self._step_async)
            self.last_round = RoundRecord(outcome.stats, outcome)
        else:
            try:  # the topology's runtime, if any, gathers every worker's stats into last_round
                self._loop.run_until_complete(self.aggregator.run())
            except RoundAbandoned:  # too few reports: the model and the server state stay as they are
                pass
        self.aggregator.in_neighbours.release_models()  # type: ignore[attr-defined]
        seconds = time.perf_counter() - start
        stats = self.last_round.stats
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
        for stat in stats:  # what the algorithm's hooks and the postprocessors counted
            for key, value in stat.metrics.items():
                row[key] = row.get(key, 0.0) + value
        for postprocessor in self.postprocessors:  # e.g. epsilon spent so far
            row.update(postprocessor.round_metrics(self.round_idx + 1))
            for key, extra in postprocessor.round_byte_corrections().items():
                row[key] += extra
        # bytes per link: the topology's own (edge-cloud, gossip) links added to the clients'
        links = (star_link_metrics(stats) if self.topology_runtime is None
                 else self.topology_runtime.round_metrics(stats))
        for key, value in links.items():
            row[key] = row.get(key, 0) + value
        for key in ("bytes_down", "bytes_up", "samples", "clients"):
            self.totals[key] += row[key]
        if self.fedbuff is not None:
            row.update(self.last_round.plan.metrics)
        elif self.clock is not None:
            plan = self.last_round.plan or self.clock.plan(self.round_idx, [], np.zeros((0, 3)))
            row.update(self.clock.settle(plan, stats))
            self.last_round.plan = plan
        check_round(row, self.round_idx + 1)  # nan: stop before evaluating and saving
        if (self.round_idx + 1) % self.fl.eval_every_n_rounds == 0 or self.round_idx + 1 >= self.final_round:
            eval_start = time.perf_counter()
            row.update(self.evaluate())
            row["eval_seconds"] = time.perf_counter() - eval_start
            self._check_target(row)
        self.round_idx += 1
        return row

    def run(self) -> List[Dict[str, Any]]:
        last = self.final_round
        if last < self.fl.num_rounds:
            self.logger.warning(f"the privacy budget allows {last} of fl.num_rounds {self.fl.num_rounds} rounds: "
                                f"the run stops after round {last} with a checkpoint")
        bar = progress_bar(self.fl.progress_bar, total=last, initial=min(self.round_idx, last), unit="round",
                           desc="fl", dynamic_ncols=True)
        try:
            while self.round_idx < last:
                row = self.run_round()
                self.history.append(row)
                self.logger.log_metrics("fl", row["round"], row)
                if self.clock is not None:
                    append_record(self.logdir, self._clock_record(row["round"]))
                if self.round_idx % self.fl.checkpoint_every_n_rounds == 0 or self.round_idx == last:
                    self.save_checkpoint()
                bar.update(1)
                if "roc_auc" in row:
                    extra = {"eps": f"{row['epsilon']:.3g}"} if "epsilon" in row else {}
                    bar.set_postfix(auc=f"{row['roc_auc']:.4f}", s=f"{row['round_seconds']:.2f}", **extra)
        finally:
            bar.close()
        self._write_summary()
        return self.history

    def _clock_record(self, round_number: int) -> Dict[str, Any]:
        """The round's line in ``virtual_clock.jsonl`` (FedBuff: the step's arrivals)."""
        if self.fedbuff is not None:
            return self.last_round.plan.record(round_number)
        return VirtualClock.record(round_number, self.last_round.plan)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The run's state at a round boundary (per-client state lives in the state store,
        whose versions make it consistent with this checkpoint)."""
        return {
            "global": self.global_state,
            "round": self.round_idx,
            "aggregator": self.aggregator.state_dict(),
            "postprocessors": [p.state_dict() for p in self.postprocessors],
            "totals": dict(self.totals),
            "fingerprint": dict(self.fingerprint),
            "clock": self.clock.state_dict() if self.clock is not None else None,
            "target": self.target,
            "fedbuff": self.fedbuff.state_dict() if self.fedbuff is not None else None,
            "topology": self.topology_runtime.state_dict() if self.topology_runtime is not None else None,
        }

    def save_checkpoint(self) -> None:
        self.saver.save(self.round_idx, self.state_dict())
        self.checkpointed_round = self.round_idx

    def resume(self, checkpoint: Optional[LoadedCheckpoint] = None) -> bool:
        """Continue from ``checkpoint`` (already checked, as ``find_resume_point`` gives it)
        or the newest intact one (an unreadable newer file is skipped with a warning; one
        of another config is refused)."""
        if checkpoint is None:
            checkpoint = self.saver.load_newest_intact(on_skip=self.logger.warning)
            if checkpoint is None:
                return False
            check_fingerprint(checkpoint, self.fingerprint)
        path, state = checkpoint.path, checkpoint.state
        self.update_model(self.aggregator, state["global"])
        self.round_idx = self.checkpointed_round = int(state["round"])
        self.aggregator.load_state_dict(state.get("aggregator", {"extra": state.get("aggregator_extra", {})}))
        for postprocessor, saved in zip(self.postprocessors, state.get("postprocessors", [])):
            postprocessor.load_state_dict(saved)
        self.totals = dict(state["totals"])
        self.target = state.get("target")
        if self.clock is not None:
            self.clock.load_state_dict(state["clock"])
            truncate_records(self.logdir, self.round_idx)
        if self.fedbuff is not None:
            self.fedbuff.load_state_dict(state["fedbuff"])
        if self.topology_runtime is not None:
            self.topology_runtime.load_state_dict(state.get("topology") or {})
        self.logger.info(f"resumed from {path} at round {self.round_idx}")
        return True

    def _check_target(self, row: Mapping[str, Any]) -> None:
        """Record the first evaluated round whose AUC reaches ``fl.target_auc``."""
        target = self.fl.target_auc
        if target is None or self.target is not None or not row.get("roc_auc", 0.0) >= target:
            return
        self.target = {"auc": float(row["roc_auc"]), "round": int(row["round"]),
                       "virtual_time": row.get("virtual_time")}

    def _write_summary(self) -> None:
        final = self.history[-1] if self.history else {}
        # "finished": every round this config asks for is done (a sweep skips such a run)
        summary: Dict[str, Any] = {"rounds": self.round_idx, "num_rounds": self.fl.num_rounds,
                                   "finished": self.round_idx >= self.final_round, "totals": self.totals,
                                   "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
        if self.fl.target_auc is not None:  # None values: not reached
            reached = self.target or {}
            summary["target"] = {"auc": self.fl.target_auc, "reached_auc": reached.get("auc"),
                                 "rounds": reached.get("round"), "virtual_time": reached.get("virtual_time")}
        if self.clock is not None:
            summary["devices"] = {"virtual_time": self.clock.now, **self.clock.totals,
                                  "participation_file": "participation.json"}
            part = self.logdir / "participation.json.tmp"
            part.write_text(json.dumps(self.clock.participation()))
            part.replace(self.logdir / "participation.json")
        tmp = self.logdir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        tmp.replace(self.logdir / "summary.json")

    def close(self) -> None:
        self.backend.close()
        self._loop.close()
