"""Running simulated clients: one model replica per process, loaded per client.

Both backends use this class: the local backend in the simulator's own process, the MPI
backend in every MPI process. Given a ``RoundJob`` (the round's context, the global
weights once, and blocks of client ids) it runs each client's ``FederatedWorker.run()``
in the trainer role against the replica, through the algorithm's client hooks and the
postprocessor chain, and returns one summed update per block (``sum`` aggregation),
every client's update (``updates``) or every client's model (``models``).

``build_client_runner`` is the one place a process (rank 0 or an MPI process) sets up
its runner: data, replica, partition, algorithm, postprocessors, attack and state store.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fedrec.federated.client_state import STATE_DIR, ClientStateStore
from fedrec.federated.config import FLConfig, fl_config_from, import_modules
from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.postprocessors import Postprocessor, build_chain, run_client_chain
from fedrec.federated.update import BlockSum, WeightedUpdate, gather_rows
from fedrec.federated_worker import FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.random_state import derive_seed

PARTITION_FILE = "partition.npz"
#: client-state keys of a user's private rows: ``private/<table parameter name>``
PRIVATE_PREFIX = "private/"

#: FederatedWorker's own constructor arguments: set by the runtime, never from fl.fl_algo
_RUNTIME_KEYS = ("worker_index", "roles", "in_neighbours", "out_neighbours", "runtime", "round_idx",
                 "sample_num", "persistent_storage", "client_num_per_round", "extra")


#: ``RoundContext.aggregator_id`` of a job whose clients are peers: each its own aggregator
PEER = -1


class PeerStarts(dict):
    """``RoundJob.global_state`` when every client starts from its own model (the peers of
    a graph topology): client id -> weights. Each such client is its own aggregator."""


@dataclasses.dataclass
class RoundJob:
    """The work one process does in a round; the global weights travel once in it."""

    context: RoundContext
    blocks: List[Tuple[int, List[int]]]  # (block index, client ids ascending)
    global_state: Dict[str, Any]

    @property
    def round_idx(self) -> int:
        return self.context.round_idx


@dataclasses.dataclass
class ClientStats:
    client_id: int
    sample_num: int  # the client's data size (FedAvg weight)
    num_samples: int  # samples processed in local training
    num_steps: int
    loss_sum: float
    bytes_down: int
    bytes_up: int
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class JobResult:
    """What a process sends back: one update per block, every update, or every model."""

    block_updates: List[Tuple[int, WeightedUpdate]] = dataclasses.field(default_factory=list)
    updates: List[Tuple[int, WeightedUpdate]] = dataclasses.field(default_factory=list)
    models: List[Tuple[int, int, Dict[str, torch.Tensor]]] = dataclasses.field(default_factory=list)
    stats: List[ClientStats] = dataclasses.field(default_factory=list)


class ClientError(RuntimeError):
    """A client's local work failed; names the round and the client."""


def quiet_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config with the trainer's own progress bar off (the simulator has one)."""
    import copy

    config = copy.deepcopy(config)
    train = config.setdefault("train", {})
    section = train.setdefault("config", {"name": "dlrm_std"})
    section["progress_bar"] = False
    return config


def build_partition(trainer: Any, fl: FLConfig):
    from fedrec.trainers.base_trainer import _config_errors

    train = trainer.dataset.split("train")
    if fl.num_workers > len(train):
        raise ConfigError(f"fl.num_workers is {fl.num_workers:,}, but the training split of {trainer.dataset.path} "
                          f"has only {len(train):,} rows and every worker needs one; use at most {len(train):,}")
    with _config_errors("fl.partitioner"):  # a bad alpha, a natural split without user ids
        partitioner = registry.construct("partitioner", fl.partitioner)
        return partitioner.split(train, fl.num_workers, fl.seed)


def build_client_runner(config: Dict[str, Any], logdir: Optional[Path], config_path: Optional[str] = None,
                        new_partition: bool = False) -> "ClientRunner":
    """A process's trainer replica, data and partition (rank 0 and every MPI process).

    Rank 0 splits the data (``new_partition``) and saves the split into ``logdir``
    (``logdir=None``: only builds, and so checks, everything; nothing is written); the
    MPI processes load that file rather than splitting again.
    """
    from fedrec.federated.partition import ClientPartition
    from fedrec.runner import build_trainer

    fl = fl_config_from(config)
    import_modules(fl.imports)  # user algorithms must be registered on every process
    trainer = build_trainer(quiet_config(config), logdir=None, logger=None, config_path=config_path)
    if new_partition:
        partition = build_partition(trainer, fl)
        if logdir is not None:
            partition.save(Path(logdir) / PARTITION_FILE)
    else:
        partition = ClientPartition.load(Path(logdir) / PARTITION_FILE)
    return ClientRunner(config, fl, trainer, partition, aggregator_id=fl.num_workers, logdir=logdir)


def algorithm_config(algorithm: type, fl_algo: Mapping[str, Any]) -> Dict[str, Any]:
    """``fl.fl_algo``'s keys for ``algorithm``, checked: unknown keys and bad values are
    config errors naming the key, before any round runs."""
    values = {k: v for k, v in fl_algo.items() if k != "name"}
    return registry.check_class_config(algorithm, values, f"fl.fl_algo {fl_algo.get('name')!r}",
                                       reserved=_RUNTIME_KEYS)


class ClientRunner:
    """The per-process runtime of trainer workers (the ``Runtime`` they call into)."""

    def __init__(self, config: Dict[str, Any], fl: FLConfig, trainer: Any, partition: Any,
                 aggregator_id: int, logdir: Optional[Path] = None) -> None:
        # per-client work kept for the next ask (see _local_optimizer, _client_seed, _client_users)
        self._last_optimizer: Optional[torch.optim.Optimizer] = None
        self._optimizer_settings: Optional[List[Dict[str, Any]]] = None
        self._seed_memo: Optional[Tuple[Tuple[int, int], int]] = None
        self._users_of: Optional[Tuple[int, torch.Tensor]] = None
        self.config = config
        self.fl = fl
        self.trainer = trainer
        self.partition = partition
        self.aggregator_id = aggregator_id
        self.logdir = logdir
        self.seed = fl.seed
        self.per_row_embeddings = fl.embedding_aggregation == "per_row"
        self.algorithm = registry.lookup("fl_algo", fl.fl_algo)
        self.algorithm_kwargs = algorithm_config(self.algorithm, fl.fl_algo)
        self.mode = self.algorithm.aggregation_mode()
        self.model = trainer.model
        # Live views of the replica's tensors (they share storage with the parameters).
        self.replica: Dict[str, torch.Tensor] = dict(self.model.state_dict())
        # user-side parameters (rec models): kept in each client's state, never sent
        self.private_names: List[str] = list(getattr(self.model, "private_tables", lambda: [])())
        self.table_names = [n for n in self._embedding_table_names() if n not in self.private_names]
        self.sparse_mode = fl.embedding_updates == "sparse"
        self.dense_names = [n for n in self.replica if n not in self.private_names
                            and not (self.sparse_mode and n in self.table_names)]
        self.sampler = registry.construct("sampler", fl.sampler)
        self.postprocessors = build_chain(fl.postprocessors, fl, self.sampler, sparse=self.sparse_mode,
                                          tables={n: int(self.replica[n].shape[0]) for n in self.table_names
                                                  if n in self.replica},
                                          client_sizes=[int(n) for n in partition.sizes])
        self._check_mode()
        self._check_private()
        from fedrec.federated.attacks import build_attack

        self.attack = build_attack(fl.attack, fl.num_workers, fl.seed)
        self.store = self._state_store(Path(logdir)) if logdir is not None else None
        self._make_optimizer = registry.prepare("optimizer", fl.optimizer_config)
        try:  # bad local optimizer values (lr < 0, ...) fail here, not in the first client
            self._make_optimizer(model=self.model)
        except (ValueError, TypeError) as err:
            key = "fl.local_optimizer" if fl.local_optimizer else "fl.local_lr"
            raise ConfigError(f"{key}: the local optimizer {fl.optimizer_config} fails: {err}") from None
        self._local_momentum = float(fl.optimizer_config.get("momentum", 0.0) or 0.0)
        self._local_lr = float(fl.optimizer_config.get("lr", fl.local_lr))  # fl.local_optimizer's own lr wins
        self._has_objective = self.algorithm.local_objective is not FederatedWorker.local_objective
        self._dense_bytes = sum(self.replica[n].numel() for n in self.dense_names) * fl.value_bytes
        # dense mode with sparse internals where provably identical (dense_fast_path.py):
        # clients load and upload only their rows, the bytes still count as dense
        from fedrec.federated import dense_fast_path

        self.dense_fast, self.dense_path_note = dense_fast_path.choose(self)
        #: what each client loads and uploads whole (dense_names less the tables on the fast path)
        self.whole_names = ([n for n in self.dense_names if n not in self.table_names] if self.dense_fast
                            else self.dense_names)
        from fedrec.federated import client_engine

        #: trains blocks of clients at once (None: one client after another)
        self.engine, self.engine_note = client_engine.choose(self)
        self._trained: Dict[int, Any] = {}  # the engine's results for the clients of the current block

    @property
    def row_updates(self) -> bool:
        """Whether clients load and upload embedding rows (sparse mode, or the dense fast path)."""
        return self.sparse_mode or self.dense_fast

    def attach_logdir(self, logdir: Path) -> None:
        """Where the run's files go (a runner built to check a config has none yet)."""
        self.logdir = Path(logdir)
        self.store = self._state_store(self.logdir)

    def _state_store(self, logdir: Path) -> ClientStateStore:
        """The run's client state store; a user's private rows (one per client: the
        natural split) in its fixed-size row slots."""
        rows = {f"{PRIVATE_PREFIX}{name}": ((1, int(self.replica[name].shape[1])), self.replica[name].dtype)
                for name in self.private_names}
        return ClientStateStore(logdir / STATE_DIR, fixed_rows=rows or None)

    def _check_private(self) -> None:
        """Private user embeddings need one user per client: the natural split, every user."""
        if not self.private_names:
            return
        users = getattr(self.trainer.dataset, "num_users", None)
        if self.fl.partitioner.get("name") != "natural" or (users is not None and self.partition.num_clients != users):
            raise ConfigError(
                f"every user is one client (its embedding {self.private_names[0]} stays on it), so fl.partitioner "
                f"must be {{name: natural}} and fl.num_workers the number of users ({users:,}); got partitioner "
                f"{self.fl.partitioner.get('name')!r} and num_workers {self.fl.num_workers:,} (leave num_workers "
                "out to get the number of users)")
        if self.mode == "models":
            raise ConfigError(f"fl.fl_algo {self.fl.fl_algo.get('name')!r} aggregates whole client models; with "
                              "private user embeddings use an algorithm that aggregates updates")

    def _check_mode(self) -> None:
        name = self.fl.fl_algo.get("name")
        if self.mode == "models" and self.sparse_mode:
            raise ConfigError(
                f"fl.fl_algo {name!r} aggregates whole client models, which "
                "fl.embedding_updates: sparse does not send (a client has only its rows); use "
                "embedding_updates: dense, or an algorithm that aggregates updates "
                "(linear_aggregation = True, or aggregation = 'updates')")
        server_side = [type(p).__name__ for p in self.postprocessors
                       if type(p).postprocess_server is not Postprocessor.postprocess_server]
        if self.mode == "updates" and server_side:
            raise ConfigError(f"fl.postprocessors {server_side} transform the reduced sum on the server, but "
                              f"fl.fl_algo {name!r} aggregates every client's update (there is no sum)")
        if self.mode == "models" and self.postprocessors:
            raise ConfigError(f"fl.postprocessors transform client updates, but fl.fl_algo {name!r} "
                              "aggregates whole models; drop fl.postprocessors or use an update-based algorithm")

    # -- the runtime protocol (what FederatedWorker calls) -----------------------------
    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        return self.replica

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        context: Optional[ClientContext] = worker.context
        if context is not None and weights is context.start:
            self._download(weights, context.touched_rows)
            if self.private_names:  # the user's own rows come from its state, not the server
                self._load_private(context)
        else:
            self.model.load_state_dict(weights, strict=not self.private_names)

    async def request_models(self, worker: FederatedWorker, ids: Sequence[int]) -> List[Neighbour]:
        context: Optional[ClientContext] = worker.context
        if context is None:
            raise InvalidStateError("no round in progress")
        out = []
        parent = self._parent(context.round, worker.worker_index)
        for nid in ids:
            if nid != parent:
                raise InvalidStateError(
                    f"trainer {worker.worker_index} asked worker {nid} for a model; in this round "
                    f"it talks only to the aggregator that asked it to train ({parent})"
                )
            neighbour = worker.out_neighbours[nid]
            neighbour.model = context.start
            neighbour.last_sync = context.round.round_idx
            out.append(neighbour)
        return out

    def _parent(self, context: RoundContext, cid: int) -> int:
        """Client ``cid``'s aggregator this round: the star's, the one the context names,
        or (``PEER``) the client itself."""
        if context.aggregator_id is None:
            return self.aggregator_id
        return cid if context.aggregator_id == PEER else int(context.aggregator_id)

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None) -> LocalTrainResult:
        context: ClientContext = worker.context
        cid = worker.worker_index
        worker.begin_local_training(context)
        if cid in self._trained:  # trained with its block by the vectorized engine
            return self._load_trained(context, self._trained.pop(cid))
        optimizer = self._local_optimizer()
        seed = self._client_seed(worker.round_idx, cid)
        loader = self.trainer.client_loader(self.partition.indices_of(cid), self.fl.local_batch_size, seed=seed)
        if self.attack is not None and self.attack.is_malicious(cid):
            loader = self.attack.poison_data(loader)
        objective = functools.partial(worker.local_objective, context=context) if self._has_objective else None
        total = train_locally(self.trainer, loader, optimizer, self.fl, objective=objective)
        context.train_result = total
        return total

    def _local_optimizer(self) -> Any:
        """A fresh local optimizer, or the last client's where that is the same thing: a
        torch optimizer that kept no state (plain SGD), has no hooks and whose settings
        nothing changed. (Building one costs more than a small client's Python overhead.)"""
        last = self._last_optimizer
        if (last is not None and not last.state and not last._optimizer_step_pre_hooks
                and not last._optimizer_step_post_hooks and _same(_group_settings(last), self._optimizer_settings)):
            return last
        optimizer = self._make_optimizer(model=self.model)
        self._last_optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self._optimizer_settings = _group_settings(optimizer) if self._last_optimizer is not None else None
        return optimizer

    def _client_seed(self, round_idx: int, cid: int) -> int:
        """``derive_seed(seed, round, client)``, kept for the client's next ask (its touched
        rows and its loader both draw from it)."""
        memo = self._seed_memo
        if memo is None or memo[0] != (round_idx, cid):
            memo = self._seed_memo = ((round_idx, cid), derive_seed(self.seed, round_idx, cid))
        return memo[1]

    def _load_trained(self, context: ClientContext, trained: Any) -> LocalTrainResult:
        """Leave the replica as the client's own local training would have."""
        with torch.no_grad():
            for name, value in trained.dense.items():
                self.replica[name].copy_(value)
            for name, (ids, values) in trained.rows.items():
                self.replica[name].index_copy_(0, ids.to(self.replica[name].device), values)
        context.train_result = trained.result
        return trained.result

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.trainer.evaluate("val", log=False)

    # -- running a job ------------------------------------------------------------------
    def run_job(self, job: RoundJob) -> JobResult:
        """Run every client of ``job``; sum each block's updates in client-id order."""
        if self.private_names and self.store is not None:
            # the clients' private rows read up front and written at the end, one pass per shard
            with self.store.batch([c for _, block in job.blocks for c in block], job.round_idx):
                return self._run_job(job)
        return self._run_job(job)

    def _run_job(self, job: RoundJob) -> JobResult:
        result = JobResult()
        # peers (PeerStarts) each start from their own model: the engine batches clients
        # that share one start, so they train one after another
        engine = self.engine if not isinstance(job.global_state, PeerStarts) else None
        if engine is not None and engine.sums_uploads:
            return self._run_job_summed(job, result)
        trained = self._engine_chunks(job) if engine is not None else None
        for block_index, clients in job.blocks:
            block = BlockSum()
            for cid in clients:
                if trained is not None and cid not in self._trained:
                    self._trained = next(trained)  # the vectorized engine's next chunk
                try:
                    upload = self._run_client(cid, job, result)
                finally:
                    self._trained.pop(cid, None)
                if self.mode == "sum":
                    block.add(upload)
                elif self.mode == "updates":
                    result.updates.append((cid, upload))
                else:
                    result.models.append((cid, result.stats[-1].sample_num, upload))
            if self.mode == "sum":
                result.block_updates.append((block_index, block.result()))
        return result

    def _run_job_summed(self, job: RoundJob, result: JobResult) -> JobResult:
        """The vectorized engine's FedAvg uploads: each part of a block summed by the
        engine, a block's parts added in order."""
        rounds = self._client_rounds(job)
        chunks = self.engine.pack(job.blocks)
        summed = self.engine.map_chunks(lambda chunk: self._engine_call(self.engine.train_sum, chunk, rounds, job),
                                        chunks)
        blocks: Dict[int, WeightedUpdate] = {}
        for chunk, part_sums in zip(chunks, summed):
            for (block_index, _), (update, stats) in zip(chunk, part_sums, strict=True):
                blocks.setdefault(block_index, WeightedUpdate()).add_(update)
                result.stats.extend(stats)
        result.block_updates.extend((b, blocks.get(b, WeightedUpdate())) for b, _ in job.blocks)
        return result

    def _engine_chunks(self, job: RoundJob):
        """With the vectorized engine: the job's clients trained chunk by chunk (the
        engine's :meth:`~VectorizedEngine.pack`), in block and client order."""
        if self.engine is None:
            return None
        rounds = self._client_rounds(job)
        def train(parts: List[Tuple[int, List[int]]], round_of: Dict[int, int], state: Any) -> Any:
            return self.engine.train(_clients_of(parts), round_of, state)

        return self.engine.map_chunks(lambda chunk: self._engine_call(train, chunk, rounds, job),
                                      self.engine.pack(job.blocks))

    @staticmethod
    def _client_rounds(job: RoundJob) -> Dict[int, int]:
        """Each client's own round (FedBuff clients launched earlier; else the job's)."""
        return {int(c): job.context.client_rounds.get(c, job.round_idx) for _, block in job.blocks for c in block}

    @staticmethod
    def _engine_call(method: Callable, chunk: List[Tuple[int, List[int]]], rounds: Dict[int, int],
                     job: RoundJob) -> Any:
        """The vectorized engine's work on ``chunk`` (its parts ``(block, clients)``); a
        failure names the round and clients."""
        try:
            return method(chunk, rounds, job.global_state)
        except Exception as err:
            ids = _clients_of(chunk)
            raise ClientError(f"round {job.round_idx}, clients {ids[0]}-{ids[-1]} (vectorized engine): "
                              f"{type(err).__name__}: {err}") from err

    def client_context(self, cid: int, job: RoundJob) -> ClientContext:
        """Client ``cid``'s view of the round, its stored state loaded."""
        state, extra = self.store.get(cid, job.round_idx) if self.store is not None else ({}, {})
        context = ClientContext(
            round=job.context, client_id=cid, sample_num=int(self.partition.sizes[cid]), model=self.model,
            weights=self.replica, dense_names=self.whole_names,
            start=job.global_state[cid] if isinstance(job.global_state, PeerStarts) else job.global_state,
            touched_rows=self._rows_of(cid, job.round_idx) if self.row_updates else {}, local_lr=self._local_lr,
            local_momentum=self._local_momentum, state=state, extra=extra, private_names=self.private_names)
        context.evaluate_loss = functools.partial(self._client_loss, cid)
        context.rows_of_client = functools.partial(self._rows_of, cid, job.round_idx)
        return context

    def _run_client(self, cid: int, job: RoundJob, result: JobResult) -> Any:
        context = self.client_context(cid, job)
        worker = self.algorithm(
            worker_index=cid,
            roles=["trainer"],
            out_neighbours=NeighbourTable([self._parent(job.context, cid)]),
            runtime=self,
            round_idx=job.context.client_rounds.get(cid, job.round_idx),
            sample_num=context.sample_num,
            # (a plain string: pathlib would intern every client id it is given)
            persistent_storage=os.path.join(self.logdir, "workers", str(cid)) if self.logdir else None,
            client_num_per_round=self.fl.client_num_per_round,
            extra=context.extra,
            **self.algorithm_kwargs,
        )
        worker.role = "trainer"
        worker.context = context
        try:
            drive(worker.run())
            upload, bytes_up = self._upload(worker, context)
            self._save_state(worker, context)
        except Exception as err:
            raise ClientError(f"round {job.round_idx}, client {cid}: {type(err).__name__}: {err}") from err
        finally:
            worker.context = None
        train = context.train_result or LocalTrainResult(0, 0, 0.0)
        bytes_down = self._download_bytes(context) + context.extra_bytes_down
        result.stats.append(ClientStats(cid, int(worker.sample_num), train.num_samples, train.num_steps,
                                        train.loss_sum, bytes_down, bytes_up, dict(context.metrics)))
        return upload

    def _upload(self, worker: FederatedWorker, context: ClientContext) -> Tuple[Any, int]:
        """The client's upload after its attack (if malicious) and the postprocessors."""
        if self.mode == "models":
            model = {k: v.detach().clone() for k, v in self.replica.items() if k not in self.private_names}
            return model, self._download_bytes(context, with_values=False)
        update = worker.client_update(context)
        if self.attack is not None and self.attack.is_malicious(context.client_id):
            update = self.attack.poison_update(update, context)
        update = run_client_chain(self.postprocessors, update, context)
        value_bytes = context.upload_value_bytes or self.fl.value_bytes
        nbytes = update.nbytes(value_bytes)
        if self.dense_fast:  # counted as the dense path sends it: each table whole, no row ids
            nbytes += sum(int(self.replica[n].numel()) * value_bytes - row.nbytes(value_bytes)
                          for n, row in update.rows.items())
        return update, nbytes + context.extra_bytes_up

    def _save_state(self, worker: FederatedWorker, context: ClientContext) -> None:
        unchanged = context.new_state is None and worker.extra == context.extra  # all but private rows
        if unchanged and not self.private_names:
            return
        if self.store is None:
            raise InvalidStateError("client state needs a logdir (the state store lives there)")
        tensors = dict(context.new_state if context.new_state is not None else context.state)
        tensors.update(self._private_state(context))
        self.store.put(context.client_id, context.round.round_idx, tensors, worker.extra,
                       context.round.checkpointed_round, rest_unchanged=unchanged)

    # -- download and sparse rows ---------------------------------------------------------
    def _download(self, global_state: Mapping[str, torch.Tensor], touched: Mapping[str, torch.Tensor]) -> None:
        """Load the global weights into the replica: all of them, or in sparse mode the
        dense parameters and only the embedding rows this client will touch (also on the
        dense fast path: the other rows cannot change, and are never read)."""
        names = self.whole_names
        with torch.no_grad():
            torch._foreach_copy_([self.replica[n] for n in names], [global_state[n] for n in names])
            for name, ids in touched.items():
                self.replica[name].index_copy_(0, ids, gather_rows(global_state[name], ids))

    def _download_bytes(self, context: ClientContext, with_values: bool = True) -> int:
        """Bytes a client downloads: the model (sparse mode: MLPs and its rows), plus the
        server values it is sent (cut to its rows the same way)."""
        value = self.fl.value_bytes
        touched = {} if self.dense_fast else context.touched_rows  # the fast path counts as dense
        dim_of = {n: self.replica[n].shape[1] for n in touched}
        rows = sum(ids.numel() * (8 + dim_of[n] * value) for n, ids in touched.items())
        total = self._dense_bytes + rows
        if with_values:
            for name, tensor in context.round.server_values.items():
                ids = touched.get(name)
                total += (ids.numel() * dim_of[name] if ids is not None else tensor.numel()) * value
        return int(total)

    @property
    def dense_bytes(self) -> int:
        """Bytes of the parameters every client downloads and uploads whole."""
        return int(self._dense_bytes)

    def planned_costs(self, client_ids: Sequence[int], context: RoundContext, samples: np.ndarray) -> np.ndarray:
        """float64 [n, 3]: each client's bytes down, samples and bytes up, known before it
        trains (the round policy decides on them): the download as ``_download_bytes``
        counts it, the upload of its model delta (MLPs whole, its touched rows with ids),
        ``samples[cid]`` from ``local_samples``. A sparse client's row counts come from its
        data once and are cached (a client's data never change)."""
        value = self.fl.value_bytes
        out = np.zeros((len(client_ids), 3), dtype=np.float64)
        for k, cid in enumerate(client_ids):
            rows = self._row_counts(int(cid)) if self.sparse_mode else {}
            row_bytes = sum(n * (8 + self.replica[name].shape[1] * value) for name, n in rows.items())
            down = self._dense_bytes + row_bytes
            for name, tensor in context.server_values.items():
                down += (rows[name] * self.replica[name].shape[1] if name in rows else tensor.numel()) * value
            out[k] = (down, samples[int(cid)], self._dense_bytes + row_bytes)
        return out

    def _row_counts(self, cid: int) -> Dict[str, int]:
        cache = self.__dict__.setdefault("_row_count_cache", {})
        if cid not in cache:
            cache[cid] = {name: int(ids.numel()) for name, ids in self._rows_of(cid).items()}
        return cache[cid]

    def _client_loss(self, cid: int) -> float:
        """The mean loss of the current replica on client ``cid``'s data (no training)."""
        loader = self.trainer.client_loader(self.partition.indices_of(cid), self.fl.local_batch_size, seed=0)
        labels, probs = self.trainer.predict(loader)
        if len(labels) == 0:
            return 0.0
        with torch.no_grad():
            return float(self.model.loss(torch.from_numpy(np.asarray(probs)), torch.from_numpy(np.asarray(labels))))

    # -- private user embeddings ------------------------------------------------------------
    def _client_users(self, cid: int) -> torch.Tensor:
        cached = self._users_of  # the last client's (read when it loads and saves)
        if cached is None or cached[0] != cid:
            cached = self._users_of = (cid, torch.from_numpy(self.trainer.client_users(self.partition.indices_of(cid))))
        return cached[1]

    def _load_private(self, context: ClientContext) -> None:
        """Put the client's own rows (stored, or their seeded start) into the replica."""
        users = self._client_users(context.client_id)
        rows = self.private_rows_from(context.state, users)
        with torch.no_grad():
            for name, values in rows.items():
                self.replica[name].index_copy_(0, users, values.to(self.replica[name].dtype))

    def private_rows_from(self, state: Mapping[str, torch.Tensor], users: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The rows of ``users`` in ``state`` (a client's stored state), else their start."""
        out = {}
        for name in self.private_names:
            stored = state.get(f"{PRIVATE_PREFIX}{name}")
            out[name] = stored if stored is not None else self.model.initial_rows(name, users, self.seed)
        return out

    def _private_state(self, context: ClientContext) -> Dict[str, torch.Tensor]:
        if not self.private_names:
            return {}
        users = self._client_users(context.client_id)
        return {f"{PRIVATE_PREFIX}{name}": self.replica[name].index_select(0, users).detach().clone()
                for name in self.private_names}

    def private_rows(self, users: np.ndarray, before_round: int) -> Dict[str, torch.Tensor]:
        """Every user's private rows as stored before round ``before_round`` (their seeded
        start where never selected): what each client would evaluate with on its device."""
        return self.private_rows_and_stored(users, before_round)[0]

    def private_rows_and_stored(self, users: np.ndarray,
                                before_round: int) -> Tuple[Dict[str, torch.Tensor], np.ndarray]:
        """:meth:`private_rows` and, per user, whether its rows came from the store (False:
        never selected, so the seeded start; FedRecon-style evaluation re-fits those).
        The row slots are read once per 1,000 users, files only for users with a folder
        (stateful algorithms), seeded starts drawn only for the users found in neither."""
        users = np.asarray(users, np.int64)
        found, rows = (self.store.get_rows(users, before_round) if self.store is not None and len(users)
                       else (np.zeros(len(users), dtype=bool), {}))
        stored = found.copy()
        out = {}
        for name in self.private_names:
            table = self.replica[name]
            values = rows.get(f"{PRIVATE_PREFIX}{name}")
            values = (values[:, 0].to(table.dtype) if values is not None
                      else torch.empty(len(users), table.shape[1], dtype=table.dtype))
            if not found.all():
                start = self.model.initial_rows(name, torch.from_numpy(users[~found]), self.seed)
                values[torch.from_numpy(np.flatnonzero(~found))] = start.to(table.dtype)
            out[name] = values
        if self.store is None or not len(users):
            return out, stored
        for k in np.flatnonzero(self.store.has_files(users)).tolist():  # files: stateful algorithms
            state = self.store.get(int(users[k]), before_round)[0]
            for name in self.private_names:
                values = state.get(f"{PRIVATE_PREFIX}{name}")
                if values is not None:
                    stored[k] = True
                    out[name][k] = values[0]
        return out, stored

    def _embedding_table_names(self) -> List[str]:
        tables = getattr(self.model, "sparse_tables", None)
        if callable(tables):
            return [name for name, _ in tables()]
        return [name for name, module in self.model.named_modules()
                if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                for name in [f"{name}.weight"]]

    def _rows_of(self, cid: int, round_idx: int = 0) -> Dict[str, torch.Tensor]:
        """Embedding rows client ``cid``'s data touches, per table parameter (for a rec
        model: its items and the negatives it draws in round ``round_idx``)."""
        custom = getattr(self.trainer, "client_touched_rows", None)
        if custom is not None:
            return custom(self.partition.indices_of(cid), self._client_seed(round_idx, cid))
        return self.rows_of_clients([cid])

    def rows_of_clients(self, client_ids: Sequence[int], round_idx: int = 0) -> Dict[str, torch.Tensor]:
        """The union of embedding rows these clients' data touch (a process's submodel)."""
        if getattr(self.trainer, "client_touched_rows", None) is not None:
            parts_rows = [self._rows_of(int(c), round_idx) for c in client_ids]
            return {name: torch.unique(torch.cat([p[name] for p in parts_rows])) if parts_rows
                    else torch.zeros(0, dtype=torch.int64) for name in self.table_names}
        parts = [self.partition.indices_of(c) for c in client_ids]
        indices = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        sparse = np.asarray(self.trainer.dataset.split("train").sparse[indices])
        return touched_rows(self.model, sparse)


def _group_settings(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """An optimizer's settings per parameter group (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _same(a: Any, b: Any) -> bool:
    """``a == b``, False where the comparison has no single truth value (tensor settings)."""
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):
        return False


def train_locally(trainer: Any, loader: Any, optimizer: Any, fl: FLConfig,
                  objective: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> LocalTrainResult:
    """A client's local training: ``local_epochs`` passes over its data, or as many passes
    as ``local_steps`` needs (the compute-floor benchmark runs exactly this too).
    ``objective`` maps each step's loss to what is minimised (the algorithm's hook)."""
    total = LocalTrainResult(0, 0, 0.0)
    epochs = itertools.count() if fl.local_steps is not None else range(fl.local_epochs or 1)
    for epoch in epochs:
        remaining = None if fl.local_steps is None else fl.local_steps - total.num_steps
        if remaining == 0:
            break
        loader.set_epoch(epoch)
        result = (trainer.local_train(loader, optimizer, max_steps=remaining) if objective is None
                  else trainer.local_train(loader, optimizer, max_steps=remaining, objective=objective))
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


def _clients_of(parts: List[Tuple[int, List[int]]]) -> List[int]:
    """The clients of a chunk's parts ``(block, clients)``, in order."""
    return [c for _, clients in parts for c in clients]
