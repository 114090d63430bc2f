"""Running trainer workers: one model replica per process, loaded per client.

Both backends use this class: the local backend in the simulator's own process, the MPI
backend in every worker process. Given a ``RoundJob`` (the round, the global weights once,
and blocks of client ids) it runs each client's ``FederatedWorker.run()`` in the trainer
role against the replica and returns either one summed update per block (linear
algorithms) or every client's model.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fedrec.federated.config import FLConfig
from fedrec.federated.update import WeightedUpdate, gather_rows
from fedrec.federated_worker import FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed


@dataclasses.dataclass
class RoundJob:
    """The work one process does in a round; the global weights travel once in it."""

    round_idx: int
    blocks: List[Tuple[int, List[int]]]  # (block index, client ids ascending)
    global_state: Dict[str, torch.Tensor]
    client_states: Dict[int, Dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClientStats:
    client_id: int
    sample_num: int  # the client's data size (FedAvg weight)
    num_samples: int  # samples processed in local training
    num_steps: int
    loss_sum: float
    bytes_down: int
    bytes_up: int


@dataclasses.dataclass
class JobResult:
    """What a process sends back: one update per block, or every model."""

    block_updates: List[Tuple[int, WeightedUpdate]] = dataclasses.field(default_factory=list)
    models: List[Tuple[int, int, Dict[str, torch.Tensor]]] = dataclasses.field(default_factory=list)
    stats: List[ClientStats] = dataclasses.field(default_factory=list)
    client_states: Dict[int, Dict[str, Any]] = dataclasses.field(default_factory=dict)


class ClientError(RuntimeError):
    """A client's local work failed; names the round and the client."""


class ClientRunner:
    """The per-process runtime of trainer workers (the ``runtime`` they call into)."""

    def __init__(self, config: Dict[str, Any], fl: FLConfig, trainer: Any, partition: Any,
                 aggregator_id: int, logdir: Optional[Path] = None) -> None:
        self.config = config
        self.fl = fl
        self.trainer = trainer
        self.partition = partition
        self.aggregator_id = aggregator_id
        self.logdir = logdir
        self.seed = fl.seed
        self.per_row_embeddings = fl.embedding_aggregation == "per_row"
        self.algorithm = registry.lookup("fl_algo", fl.fl_algo)
        self.algorithm_kwargs = {k: v for k, v in fl.fl_algo.items() if k != "name"}
        self.model = trainer.model
        # Live views of the replica's tensors (they share storage with the parameters).
        self.replica: Dict[str, torch.Tensor] = dict(self.model.state_dict())
        self.table_names = self._embedding_table_names()
        self.sparse_mode = fl.embedding_updates == "sparse"
        self.dense_names = [n for n in self.replica if not (self.sparse_mode and n in self.table_names)]
        self._job: Optional[RoundJob] = None
        self._touched: Dict[str, torch.Tensor] = {}
        self._make_optimizer = registry.prepare("optimizer", fl.optimizer_config)
        self._dense_bytes = sum(self.replica[n].numel() for n in self.dense_names) * fl.value_bytes
        self._last_train: Optional[LocalTrainResult] = None

    # -- the runtime protocol (what FederatedWorker calls) -----------------------------
    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        return self.replica

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        if self._job is not None and weights is self._job.global_state:
            self._download(weights)
        else:
            self.model.load_state_dict(weights)

    async def request_models(self, worker: FederatedWorker, ids: Sequence[int]) -> List[Neighbour]:
        if self._job is None:
            raise InvalidStateError("no round in progress")
        out = []
        for nid in ids:
            if nid != self.aggregator_id:
                raise InvalidStateError(
                    f"trainer {worker.worker_index} asked worker {nid} for a model; in a star "
                    f"topology trainers only talk to the aggregator ({self.aggregator_id})"
                )
            neighbour = worker.out_neighbours[nid]
            neighbour.model = self._job.global_state
            neighbour.last_sync = self._job.round_idx
            out.append(neighbour)
        return out

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None) -> LocalTrainResult:
        cid = worker.worker_index
        indices = self.partition.indices_of(cid)
        fl = self.fl
        optimizer = self._make_optimizer(model=self.model)
        seed = derive_seed(self.seed, worker.round_idx, cid)
        loader = self.trainer.client_loader(indices, fl.local_batch_size, seed=seed)
        total = train_locally(self.trainer, loader, optimizer, fl)
        self._last_train = total
        return total

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.trainer.evaluate("val", log=False)

    # -- running a job ------------------------------------------------------------------
    def run_job(self, job: RoundJob) -> JobResult:
        """Run every client of ``job``; sum each block's updates in client-id order."""
        self._job = job
        result = JobResult()
        linear = self.algorithm.linear_aggregation
        try:
            for block_index, clients in job.blocks:
                block = WeightedUpdate()
                for cid in clients:
                    update, model = self._run_client(cid, job, result, linear)
                    if linear:
                        block.add_(update)
                    else:
                        result.models.append((cid, result.stats[-1].sample_num, model))
                if linear:
                    result.block_updates.append((block_index, block))
        finally:
            self._job = None
        return result

    def _run_client(self, cid: int, job: RoundJob, result: JobResult, linear: bool):
        sample_num = int(self.partition.sizes[cid])
        worker = self.algorithm(
            worker_index=cid,
            roles=["trainer"],
            out_neighbours=NeighbourTable([self.aggregator_id]),
            runtime=self,
            round_idx=job.round_idx,
            sample_num=sample_num,
            persistent_storage=str(self.logdir / "workers" / str(cid)) if self.logdir else None,
            client_num_per_round=self.fl.client_num_per_round,
            extra=job.client_states.get(cid),
            **self.algorithm_kwargs,
        )
        worker.role = "trainer"
        self._touched = self._rows_of(cid) if self.sparse_mode else {}
        self._last_train = None
        try:
            drive(worker.run())
        except Exception as err:
            raise ClientError(f"round {job.round_idx}, client {cid}: {type(err).__name__}: {err}") from err
        train = self._last_train or LocalTrainResult(0, 0, 0.0)
        weight = float(worker.sample_num)
        update = model = None
        if linear:
            update = WeightedUpdate.from_client(self.replica, job.global_state, weight,
                                                self.dense_names, self._touched)
            bytes_up = update.nbytes(self.fl.value_bytes)
        else:
            model = {k: v.detach().clone() for k, v in self.replica.items()}
            bytes_up = self._model_bytes()
        if worker.extra:
            result.client_states[cid] = dict(worker.extra)
        result.stats.append(ClientStats(cid, int(worker.sample_num), train.num_samples, train.num_steps,
                                        train.loss_sum, self._model_bytes(), bytes_up))
        return update, model

    # -- download and sparse rows ---------------------------------------------------------
    def _download(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Load the global weights into the replica: all of them, or in sparse mode the
        dense parameters and only the embedding rows this client will touch."""
        names = self.dense_names
        with torch.no_grad():
            torch._foreach_copy_([self.replica[n] for n in names], [global_state[n] for n in names])
            for name, ids in self._touched.items():
                self.replica[name].index_copy_(0, ids, gather_rows(global_state[name], ids))

    def _model_bytes(self) -> int:
        """Bytes of the model a client downloads (sparse mode: only its rows)."""
        value = self.fl.value_bytes
        dense = self._dense_bytes
        dim_of = {n: self.replica[n].shape[1] for n in self._touched}
        rows = sum(ids.numel() * (8 + dim_of[n] * value) for n, ids in self._touched.items())
        return int(dense + rows)

    def _embedding_table_names(self) -> List[str]:
        tables = getattr(self.model, "sparse_tables", None)
        if callable(tables):
            return [name for name, _ in tables()]
        return [name for name, module in self.model.named_modules()
                if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                for name in [f"{name}.weight"]]

    def _rows_of(self, cid: int) -> Dict[str, torch.Tensor]:
        """Embedding rows client ``cid``'s data touches, per table parameter."""
        return self.rows_of_clients([cid])

    def rows_of_clients(self, client_ids: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The union of embedding rows these clients' data touch (a process's submodel)."""
        parts = [self.partition.indices_of(c) for c in client_ids]
        indices = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        sparse = np.asarray(self.trainer.dataset.split("train").sparse[indices])
        return touched_rows(self.model, sparse)


def train_locally(trainer: Any, loader: Any, optimizer: Any, fl: FLConfig) -> LocalTrainResult:
    """A client's local training: ``local_epochs`` passes over its data, or as many passes
    as ``local_steps`` needs (the compute-floor benchmark runs exactly this too)."""
    total = LocalTrainResult(0, 0, 0.0)
    epochs = itertools.count() if fl.local_steps is not None else range(fl.local_epochs or 1)
    for epoch in epochs:
        remaining = None if fl.local_steps is None else fl.local_steps - total.num_steps
        if remaining == 0:
            break
        loader.set_epoch(epoch)
        result = trainer.local_train(loader, optimizer, max_steps=remaining)
        total = LocalTrainResult(total.num_samples + result.num_samples,
                                 total.num_steps + result.num_steps, total.loss_sum + result.loss_sum)
        if result.num_steps == 0:  # no data: more passes would not add steps
            break
    return total


def drive(coroutine: Any) -> Any:
    """Run a trainer's coroutine to completion without an event loop.

    Everything a trainer awaits in the simulation (``request_models_suspendable``,
    ``train``) completes at once, so the coroutine never suspends; stepping it directly
    lets the aggregator's own event loop call into clients without nesting loops.
    """
    try:
        yielded = coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise InvalidStateError(
        f"a trainer's run() awaited {yielded!r}, which the simulation cannot wait for; "
        "trainer roles may await only the worker's own methods"
    )


def touched_rows(model: torch.nn.Module, sparse: np.ndarray) -> Dict[str, torch.Tensor]:
    """``{table parameter name: unique rows}`` that categorical ids ``sparse`` [n, T] read."""
    if not hasattr(model, "rows_touched"):
        raise InvalidStateError(
            f"fl.embedding_updates 'sparse' needs a model with rows_touched(sparse); "
            f"{type(model).__name__} has none (use embedding_updates: dense)")
    return model.rows_touched(torch.from_numpy(np.asarray(sparse, dtype=np.int64)))
