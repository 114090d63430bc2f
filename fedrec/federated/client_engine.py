"""The vectorized client engine: a chunk of clients' local training as one computation.

The sequential engine trains the round's clients one after another on one replica, so a
round costs its clients' steps times the per-step overhead of a small batch (Python,
autograd, dispatch, and in dense mode table-sized gradients). This engine trains K
clients' step ``s`` together:

* each client's copy of the dense parameters is one slice of a stacked tensor
  ``[K, ...]`` (batched matmuls: :mod:`fedrec.federated.batched_models`);
* each client's embedding rows are its own rows of one *block table* (the rows its data
  read, remapped: :mod:`fedrec.federated.cohort`), so K clients cost their rows, not K
  tables;
* the local optimizer runs for all of them at once (:mod:`fedrec.federated.stacked_optim`),
  and clients that have finished (fewer batches, or a last partial batch) are outside
  the active prefix, so neither their weights nor their optimizer state move.

What it produces per client (its trained dense weights and rows, and its
``LocalTrainResult``) is loaded into the runner's replica in place of sequential local
training; every client's ``client_update``, postprocessors, state store and byte
accounting then run exactly as before, so aggregation, MPI and the algorithms above do
not change. :func:`choose` decides once per run, with a line for the run log.

A chunk is what fits ``fl.vectorize_memory_mb``: on the CPU with the DLRM path, several of
a process's reduction blocks at once (:meth:`VectorizedEngine.pack`). That keeps every
backend's bits the same because a client's floats do not depend on the clients trained
with it: its batch is padded to :data:`BATCH_ALIGN` samples, its stacked weights and
their gradients start on 64-byte boundaries (``batched_models.client_stacked``), and a
client left alone in its lane is paired with a copy of itself (:func:`_step`); each
block's sum is then taken over its own clients only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from fedrec.federated.batched_models import client_stacked
from fedrec.federated.cohort import _ID_BITS, Cohort, build_cohort, client_visits
from fedrec.federated.stacked_optim import OptimizerSpec, StackedOptimizer, spec_of
from fedrec.federated.update import RowSubset, RowUpdate, WeightedUpdate, gather_rows
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities.config import ConfigError
from fedrec.utilities.random_state import derive_seed
from fedrec.utilities.threads import torch_threads

MIB = 1 << 20
#: a client's batch is padded to a multiple of this many samples, so that every per-sample
#: tensor of a step gives each client a whole number of 32-float runs: CPU elementwise
#: kernels take a vector path for full runs and a scalar one for a tensor's tail, and some
#: (``sigmoid``, ``binary_cross_entropy``) round the two differently; aligned, a client's
#: elements take the vector path whoever it is batched with (AVX-512 steps 32 floats,
#: AVX2 16)
BATCH_ALIGN = 32

#: one part of a chunk: (reduction block, clients), a piece of a block cut by the budget
Part = Tuple[int, List[int]]


@dataclasses.dataclass
class TrainedClient:
    """One client's local training, as the sequential engine would have left the replica."""

    dense: Dict[str, Tensor]  # trained values of the stacked (non-table) parameters
    rows: Dict[str, Tuple[Tensor, Tensor]]  # table name -> (row ids, trained rows)
    result: LocalTrainResult


class VectorizationError(ConfigError):
    """``fl.client_engine: vectorized`` asked for what the engine cannot do."""


def choose(runner: Any) -> Tuple[Optional["VectorizedEngine"], str]:
    """(the engine or None, a line for the run log) for ``fl.client_engine``."""
    setting = runner.fl.client_engine
    if setting == "sequential":
        return None, ""
    reason, forward = _blocker(runner)
    if reason is None:
        engine = VectorizedEngine(runner, forward)
        engine.check_budget()
        sums = ("uploads summed per block" if engine.sums_uploads else
                f"uploads client by client: {engine.per_client_reason}")
        packing = "several reduction blocks" if engine.packs_blocks else "one reduction block"
        return engine, (f"client engine: vectorized ({forward.name} path; chunks of up to "
                        f"{runner.fl.vectorize_memory_mb:,} MiB of {packing}, {engine.spec.kind} local steps, "
                        f"lanes on {engine.threads} thread(s); {sums})")
    if setting == "vectorized":
        raise VectorizationError(f"fl.client_engine: vectorized cannot run this config: {reason}; "
                                 "use fl.client_engine: auto (falls back to sequential) or sequential")
    return None, f"client engine: sequential ({reason})"


def _blocker(runner: Any) -> Tuple[Optional[str], Any]:
    """Why the engine cannot train this runner's clients (None: it can), and its forward."""
    from fedrec.federated.batched_models import BatchedDLRM, FuncBatched
    from fedrec.federated_worker import FederatedWorker

    fl, model, algorithm = runner.fl, runner.model, runner.algorithm
    name = fl.fl_algo.get("name")
    if proximal_mu(algorithm, fl) is None and (
            algorithm.begin_local_training is not FederatedWorker.begin_local_training
            or algorithm.local_objective is not FederatedWorker.local_objective):
        return f"fl_algo {name!r} has its own local training hooks", None
    if getattr(algorithm, "train", None) is not FederatedWorker.train:
        return f"fl_algo {name!r} trains in its own way", None
    if runner.mode == "models":
        return f"fl_algo {name!r} aggregates whole models", None
    if fl.attack is not None:
        return "fl.attack poisons clients' data", None
    if fl.async_ is not None:
        return "fl.async (FedBuff) runs clients as they arrive", None
    if runner.private_names or getattr(runner.trainer, "client_touched_rows", None) is not None:
        return "the trainer draws rows per client (private user rows, sampled negatives)", None
    if not hasattr(runner.trainer, "client_loader") or not hasattr(model, "sparse_tables"):
        return f"{type(model).__name__} has no sparse_tables() (DLRM's interface)", None
    spec = spec_of(runner._make_optimizer(model=model))
    if isinstance(spec, str):
        return spec, None
    if spec.weight_decay and fl.embedding_updates == "dense":
        return ("local weight decay moves embedding rows a client never reads, which dense "
                "updates send"), None
    for module_name, module in model.named_modules():
        if getattr(module, "max_norm", None) is not None:
            return f"embedding {module_name} has max_norm (rows change in forward)", None
        row_parameters = getattr(module, "row_parameters", None)
        if row_parameters is not None and (tuple(row_parameters) != ("weight",) or not _identity_rows(module)):
            return f"embedding {module_name} ({type(module).__name__}) maps ids to rows itself", None
        if getattr(module, "sparse", False) and not (spec.stateless or spec.kind == "Adagrad"):
            return f"embedding {module_name} has sparse gradients, which {spec.kind} treats lazily", None
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)):
            return f"module {module_name} ({type(module).__name__}) behaves per batch", None
    tables = dict(model.sparse_tables())
    if not tables or len(set(tables.values())) != len(tables):
        return "the model's sparse_tables() do not name one parameter per table column", None
    persistent = [n for n in model.state_dict() if n not in dict(model.named_parameters())]
    if persistent:
        return f"the model has persistent buffers ({persistent[0]}) training might change", None
    if BatchedDLRM.blocker(model) is None:
        return None, BatchedDLRM(model)
    return None, FuncBatched(model, list(tables))


def lane_threads(fl: Any) -> int:
    """``fl.vectorize_threads``, or by default every core this process may use when it runs
    alone, and ``fl.client_threads`` in one of several MPI processes (its peers share the
    node's cores)."""
    if fl.vectorize_threads is not None:
        return int(fl.vectorize_threads)
    if _one_of_several_mpi_processes():
        return int(fl.client_threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(int(fl.client_threads), cores)


def _one_of_several_mpi_processes() -> bool:
    """Started by an MPI launcher with others, or spawned by a simulation (spawn mode)."""
    from fedrec.federated.mpi_env import launcher_world_size

    if launcher_world_size() > 1:
        return True
    mpi = sys.modules.get("mpi4py.MPI")  # (never imported here: a plain run stays MPI-free)
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return False
    return mpi.COMM_WORLD.Get_size() > 1 or mpi.Comm.Get_parent() != mpi.COMM_NULL


def proximal_mu(algorithm: type, fl: Any) -> Optional[float]:
    """FedProx's ``mu`` when ``algorithm`` is FedProx with its own hooks unchanged (its
    local term, ``mu/2 ||w - w_start||^2`` over the MLPs and the rows the client reads, is
    one more gradient term the engine adds per client), else None."""
    import inspect

    from fedrec.federated.fedprox import FedProxWorker

    if not (isinstance(algorithm, type) and issubclass(algorithm, FedProxWorker)
            and algorithm.begin_local_training is FedProxWorker.begin_local_training
            and algorithm.local_objective is FedProxWorker.local_objective):
        return None
    default = inspect.signature(FedProxWorker.__init__).parameters["mu"].default
    return float(fl.fl_algo.get("mu", default))


def _per_client_reason(runner: Any) -> Optional[str]:
    """Why each client's upload must go through its worker (None: the block's sum of
    ``sample_num * (trained - start)`` is every client's FedAvg upload summed)."""
    from fedrec.federated.fed_avg import FedAvgWorker
    from fedrec.federated_worker import FederatedWorker

    algorithm, name = runner.algorithm, runner.fl.fl_algo.get("name")
    if not issubclass(algorithm, FedAvgWorker) or algorithm.run is not FedAvgWorker.run or runner.mode != "sum":
        return f"fl_algo {name!r} is not FedAvg or a FedAvg server-optimizer preset"
    if (algorithm.client_update is not FederatedWorker.client_update
            or algorithm.server_values is not FederatedWorker.server_values):
        return f"fl_algo {name!r} uploads or receives values of its own"
    if runner.postprocessors:
        return "fl.postprocessors transform each upload"
    if runner.fl.local_steps is not None:
        return "fl.local_steps (a client may not visit every row it uploads)"
    return None


def _identity_rows(module: torch.nn.Module) -> bool:
    from fedrec.modules.embeddings import TorchBagEmbedding

    return isinstance(module, TorchBagEmbedding)


class VectorizedEngine:
    """Trains blocks of a runner's clients together (see the module docstring)."""

    def __init__(self, runner: Any, forward: Any) -> None:
        self.runner = runner
        self.forward = forward
        self.fl = runner.fl
        self.model = runner.model
        self.device = next(self.model.parameters()).device
        columns = dict(self.model.sparse_tables())
        self.table_names = sorted(columns, key=lambda n: columns[n])
        self.table_set = set(self.table_names)
        self.param_names = [n for n, _ in self.model.named_parameters() if n not in self.table_set]
        self.dim = int(dict(self.model.named_parameters())[self.table_names[0]].shape[1])
        self.spec: OptimizerSpec = spec_of(runner._make_optimizer(model=self.model))
        self.budget = int(self.fl.vectorize_memory_mb) * MIB
        self.split = runner.trainer.dataset.split("train")
        self.num_dense = int(self.split.dense.shape[1])
        self.width = sum(int(p.shape[0]) for n, p in self.model.named_parameters() if n.endswith("bias"))
        # chunks take several reduction blocks (:meth:`pack`) where a client's floats do not
        # depend on its batch-mates: the DLRM path on the CPU, batches padded to BATCH_ALIGN
        # samples where that wastes at most a third (a batch of 50 trains as 64, one of 20
        # as 20, one block at a time)
        batch = int(self.fl.local_batch_size)
        aligned = -(-batch // BATCH_ALIGN) * BATCH_ALIGN
        self.packs_blocks = (self.device.type == "cpu" and getattr(forward, "batch_independent", False)
                             and 3 * aligned <= 4 * batch)
        self.batch = aligned if self.packs_blocks else batch  # a batch's width, padding included
        #: clients trained in one forward/backward: about 4 MiB of activations, which
        #: stays in this machine's caches (measured: 8-16 demo clients of 32 samples train
        #: at 5-6 us a sample, 100 at once at 12)
        self.micro_clients = max(1, (4 * MIB) // (self.batch * self._activation_bytes_per_sample()))
        self.prox_mu = proximal_mu(runner.algorithm, self.fl) or 0.0  # FedProx's term (0: none)
        self.per_client_reason = _per_client_reason(runner)
        self.sums_uploads = self.per_client_reason is None
        self.param_elements = sum(int(p.numel()) for n, p in self.model.named_parameters() if n in self.param_names)
        #: lane threads (``fl.vectorize_threads``): a client's floats are the same on any number
        self.threads = lane_threads(self.fl)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_threads = 0
        self._thread_local = threading.local()  # a pool thread's marker and forward copy

    # -- memory budget --------------------------------------------------------------------
    def client_bytes(self, steps: int) -> int:
        """An upper bound of the memory a client of ``steps`` steps adds to a chunk: its
        batches (features, ids, block positions and their staging), its rows (with
        optimizer state and gradients), its stacked parameters and its activations."""
        batch, tables = self.batch, len(self.table_names)
        spec = self.spec
        state = 4 * (1 + spec.state_elements)  # the value and its optimizer state
        data = steps * batch * (4 * self.num_dense + 8 * tables * 3 + 16)
        rows = steps * batch * tables * self.dim * (state + 8 + (0 if spec.stateless else 4))
        params = self.param_elements * (state + 8)
        activations = batch * 4 * self._activation_bytes_per_sample()
        return int(data + rows + params + activations)

    def _activation_bytes_per_sample(self) -> int:
        """Roughly what one sample's forward and backward keep: the MLP widths, the
        interaction's products and the looked-up rows, a few copies of each."""
        tables = len(self.table_names)
        return 4 * (3 * self.width + 2 * (tables + 1) ** 2 + 3 * tables * self.dim)

    def check_budget(self) -> None:
        """Refuse, before the run starts, a budget too small for the client with most
        steps (a client's bound grows with its steps), whichever round would draw it."""
        sizes = np.asarray(self.runner.partition.sizes)
        if not len(sizes):
            return
        largest = int(np.argmax(sizes))
        need = self.client_bytes(self._steps_of(largest))
        if need > self.budget:
            raise VectorizationError(
                f"fl.vectorize_memory_mb is {self.fl.vectorize_memory_mb:,} MiB, but client {largest} alone "
                f"needs about {-(-need // MIB):,} MiB in the vectorized engine (no client needs more); raise it "
                "to at least that")

    def chunks(self, client_ids: Sequence[int]) -> List[List[int]]:
        """``client_ids`` cut, in order, into consecutive blocks that fit the budget (every
        client fits alone: :meth:`check_budget`)."""
        return self._grouped(list(client_ids), [self.client_bytes(self._steps_of(c)) for c in client_ids])

    def pack(self, blocks: Sequence[Tuple[int, Sequence[int]]]) -> List[List[Part]]:
        """A job's reduction blocks as chunks to train: each block cut by :meth:`chunks`
        into parts, consecutive parts packed together within the budget. A client's floats
        do not depend on the clients it trains with (:class:`BatchedDLRM`'s alignment), so
        a chunk may take several blocks, and lanes of clients with similar step counts,
        whichever blocks (and MPI processes) they belong to: the parts, cut within their
        block, are the same whatever the backend, and so are their sums. Forwards that
        cannot promise this (``torch.func``'s), accelerators (whose batched matmuls pick
        their algorithm by the batch's size) and batches that padding would swell by more
        than a third train one part at a time (:attr:`packs_blocks`)."""
        parts = [(int(b), piece) for b, clients in blocks for piece in self.chunks([int(c) for c in clients])]
        if not self.packs_blocks:
            return [[part] for part in parts]
        return self._grouped(parts, [self._bytes_of(clients) for _, clients in parts])

    def _grouped(self, items: Sequence[Any], needs: Sequence[int], most: Optional[int] = None) -> List[List[Any]]:
        """Consecutive ``items`` (clients, parts or chunks), each needing ``needs[i]``
        bytes, grouped within the budget, at most ``most`` to a group."""
        groups: List[List[Any]] = []
        used = 0
        for item, need in zip(items, needs, strict=True):
            if not groups or used + need > self.budget or (most is not None and len(groups[-1]) >= most):
                groups.append([])
                used = 0
            groups[-1].append(item)
            used += need
        return groups

    def _bytes_of(self, client_ids: Sequence[int]) -> int:
        """The memory bound of training ``client_ids`` together (:meth:`client_bytes`)."""
        return sum(self.client_bytes(self._steps_of(c)) for c in client_ids)

    def map_chunks(self, work: Callable[[List[Part]], Any], chunks: Sequence[List[Part]]) -> Iterator[Any]:
        """``work(chunk)`` for each chunk, in order. Several chunks (up to
        :attr:`threads`, together within ``fl.vectorize_memory_mb``) train at once,
        each on one thread, when a job has many small chunks (a torch.func model's, one
        per reduction block); a chunk's floats are the same on whichever thread it runs."""
        threads = self._threads_here()
        if threads <= 1 or len(chunks) <= 1:
            yield from (work(chunk) for chunk in chunks)
            return
        needs = [sum(self._bytes_of(clients) for _, clients in chunk) for chunk in chunks]
        for wave in self._grouped(chunks, needs, most=threads):
            # alone, a chunk's own lanes share the threads; several: a thread each
            yield from self._side_by_side([functools.partial(work, chunk) for chunk in wave])

    def _steps_of(self, cid: int) -> int:
        n = int(self.runner.partition.sizes[cid])
        if n == 0:
            return 0
        per_epoch = -(-n // self.fl.local_batch_size)
        return int(self.fl.local_steps) if self.fl.local_steps is not None else per_epoch * (self.fl.local_epochs or 1)

    # -- training ---------------------------------------------------------------------------
    def train(self, client_ids: Sequence[int], round_of: Dict[int, int],
              global_state: Dict[str, Any]) -> Dict[int, TrainedClient]:
        """Train ``client_ids`` from ``global_state``; client ``c`` shuffles with the seed
        of its round ``round_of[c]``, as the sequential engine does."""
        with torch_threads(1):  # see _run: one intra-op thread, whatever thread runs it
            cohort, params, table, _, losses = self._train_stacked(client_ids, round_of, global_state)
            return self._results(cohort, params, table, losses)

    def _train_stacked(self, client_ids: Sequence[int], round_of: Dict[int, int], global_state: Dict[str, Any],
                       keep_start: bool = False) -> Tuple[Cohort, Dict[str, Tensor], Tensor, Optional[Tensor], Tensor]:
        """(cohort, stacked trained weights, trained block table, its start if asked, losses)."""
        runner, fl = self.runner, self.fl
        visits = []
        for cid in client_ids:
            seed = derive_seed(runner.seed, round_of[cid], cid)
            loader = runner.trainer.client_loader(runner.partition.indices_of(cid), fl.local_batch_size, seed=seed)
            visits.append(client_visits(loader, fl))
        cohort = build_cohort(self.split, visits, client_ids, self.batch, len(self.table_names), self.device)
        params, table, start_rows = self._initial_weights(cohort, global_state, keep_start or bool(self.prox_mu))
        anchor = {n: global_state[n].to(self.device).unsqueeze(0) for n in params} if self.prox_mu else None
        losses = self._run(cohort, params, table, anchor, start_rows)
        return cohort, params, table, start_rows, losses

    def train_sum(self, parts: Sequence[Part], round_of: Dict[int, int],
                  global_state: Dict[str, Any]) -> List[Tuple[WeightedUpdate, List[Any]]]:
        """Train the clients of ``parts`` (a chunk of :meth:`pack`) together and return,
        per part, what its clients' FedAvg uploads add up to, with each client's
        ``ClientStats`` (only when :attr:`sums_uploads`).

        A part's sum is ``sum_k n_k * (trained_k - start)``: MLPs whole, tables as rows (a
        dense table scattered into zeros where the runner sends tables whole), the row
        weights those of the clients that read each row; the same values and bytes as the
        clients' own uploads, added up per part instead of client by client. It depends on
        the part's clients only: they are added in engine order (most steps first, then
        by id), whatever else the chunk holds.
        """
        with torch_threads(1):  # see _run: one intra-op thread, whatever thread runs it
            return self._train_sum(parts, round_of, global_state)

    def _train_sum(self, parts: Sequence[Part], round_of: Dict[int, int],
                   global_state: Dict[str, Any]) -> List[Tuple[WeightedUpdate, List[Any]]]:
        from fedrec.federated.client_runner import ClientStats

        runner, tables = self.runner, len(self.table_names)
        client_ids = [int(c) for _, clients in parts for c in clients]
        cohort, params, table, start_rows, losses = self._train_stacked(client_ids, round_of, global_state,
                                                                        keep_start=True)
        part_of = {int(c): p for p, (_, clients) in enumerate(parts) for c in clients}
        client_part = np.array([part_of[c] for c in cohort.client_ids], dtype=np.int64)  # engine order
        members = [torch.from_numpy(np.flatnonzero(client_part == p)) for p in range(len(parts))]
        if len(parts) * tables >= 1 << (63 - _ID_BITS):
            raise VectorizationError(f"a chunk of {len(parts):,} parts of {tables} tables is more than the "
                                     "engine's row keys hold; lower fl.vectorize_memory_mb")
        sizes = [float(runner.partition.sizes[c]) for c in cohort.client_ids]
        weight = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        # every row of the block table: its client's weight, its delta; summed per (part,
        # table, id) a group of tables per thread, each row's deltas added in engine order
        # (the group's rows keep it within a table), as the part's clients' own sum does
        row_client = torch.repeat_interleave(torch.arange(cohort.num_clients),
                                             torch.from_numpy(cohort.segment[:, -1] - cohort.segment[:, 0]))
        row_weight = weight[row_client.to(self.device)]
        row_part = torch.from_numpy(client_part)[row_client]
        keys = ((row_part * tables + cohort.row_table) << _ID_BITS) | cohort.row_ids

        def mlp_sums() -> Dict[str, Tensor]:
            """Each part's ``sum n_k (w_k - start)`` per MLP tensor ([parts, ...]): one
            ``index_add_`` adds every part's clients in engine order, whatever else the
            chunk holds."""
            where = torch.from_numpy(client_part).to(self.device)
            sums = {}
            for name in runner.whole_names:
                if name in params:
                    delta = params[name] - global_state[name].to(self.device).unsqueeze(0)
                    delta.mul_(weight.view((-1,) + (1,) * (delta.dim() - 1)))
                    sums[name] = delta.new_zeros((len(parts),) + tuple(delta.shape[1:])).index_add_(0, where, delta)
            return sums

        def row_sums(group: Tuple[int, int, Tensor, np.ndarray]) -> Tuple[Tensor, Tensor, Tensor]:
            where = group[2].to(self.device)
            deltas = (table.index_select(0, where) - start_rows.index_select(0, where)).mul_(
                row_weight.index_select(0, where).unsqueeze(1))
            unique, inverse = torch.unique(keys[group[2]], sorted=True, return_inverse=True)
            values = torch.zeros((unique.numel(), self.dim), dtype=table.dtype, device=self.device)
            values.index_add_(0, inverse.to(self.device), deltas)
            weights = torch.zeros(unique.numel(), dtype=torch.float64)
            weights.index_add_(0, inverse, row_weight.double().cpu()[group[2]])
            return unique, values, weights

        groups = self._table_groups(cohort)
        sums = self._side_by_side([mlp_sums] + [functools.partial(row_sums, g) for g in groups])
        unique = torch.cat([group[0] for group in sums[1:]])
        order = torch.argsort(unique, stable=True)  # the groups' keys, part by part
        unique = unique[order]
        # (each (part, table)'s rows copied out: a view would carry the whole chunk's
        # rows wherever the update is pickled to)
        sizes = torch.diff(torch.searchsorted(unique, torch.arange(len(parts) * tables + 1) << _ID_BITS)).tolist()
        ids = (unique & ((1 << _ID_BITS) - 1)).split(sizes)
        values = torch.cat([group[1] for group in sums[1:]])[order.to(self.device)].split(sizes)
        weights = torch.cat([group[2] for group in sums[1:]])[order].split(sizes)
        # bytes as each client's own download and upload count them (ClientRunner)
        rows = (cohort.segment[:, -1] - cohort.segment[:, 0]) * (8 + self.dim * runner.fl.value_bytes)
        traffic = (runner.dense_bytes + (rows if runner.sparse_mode else 0 * rows)).tolist()
        samples = cohort.counts.sum(dim=0).tolist()
        out = []
        for p, (_, clients) in enumerate(parts):
            update = WeightedUpdate(weight=float(sum(float(runner.partition.sizes[c]) for c in sorted(clients))),
                                    num_clients=len(clients))
            update.dense.update({name: part_sums[p] if len(parts) == 1 else part_sums[p].clone()
                                 for name, part_sums in sums[0].items()})
            for t, name in enumerate(self.table_names):
                i = p * tables + t
                if name in runner.whole_names:  # dense updates on the full-table path: the table whole
                    full = torch.zeros_like(runner.replica[name], device=self.device)
                    update.dense[name] = full.index_add_(0, ids[i].to(self.device), values[i])
                else:
                    update.rows[name] = RowUpdate(ids[i].clone(), values[i].clone(), weights[i].clone())
            stats = [ClientStats(cohort.client_ids[k], int(runner.partition.sizes[cohort.client_ids[k]]),
                                 int(samples[k]), int(cohort.steps[k]), float(losses[k]), int(traffic[k]),
                                 int(traffic[k])) for k in members[p].tolist()]
            out.append((update, stats))
        return out

    def _initial_weights(self, cohort: Cohort, global_state: Dict[str, Any],
                         keep_start: bool) -> Tuple[Dict[str, Tensor], Tensor, Optional[Tensor]]:
        """(stacked weights, block table, a copy of its start if ``keep_start``), the
        tables' rows gathered a group of tables per thread (:meth:`_table_groups`)."""
        k = cohort.num_clients
        rows = int(cohort.row_ids.numel())
        table = torch.empty((rows, self.dim), dtype=torch.float32, device=self.device)
        start = torch.empty_like(table) if keep_start else None
        params: Dict[str, Tensor] = {}

        def stack() -> None:
            for name in self.param_names:
                value = global_state[name].to(self.device)
                # a copy per client (never a view of the global weights), each aligned
                params[name] = client_stacked(k, tuple(value.shape), value).copy_(value.unsqueeze(0))

        def gather(group: Tuple[int, int, Tensor, np.ndarray]) -> None:
            first, stop, order, bounds = group
            for t in range(first, stop):
                where = order[bounds[t] - bounds[first]:bounds[t + 1] - bounds[first]]
                if where.numel():
                    source = global_state[self.table_names[t]]
                    device = source.values.device if isinstance(source, RowSubset) else source.device
                    values = gather_rows(source, cohort.row_ids[where].to(device)).to(self.device, table.dtype)
                    table[where.to(self.device)] = values
                    if start is not None:
                        start[where.to(self.device)] = values

        self._side_by_side([stack] + [functools.partial(gather, g) for g in self._table_groups(cohort)])
        return params, table, start

    def _table_groups(self, cohort: Cohort) -> List[Tuple[int, int, Tensor, np.ndarray]]:
        """The tables cut into :attr:`threads` consecutive groups of about equal
        rows: (first table, stop, the group's block-table rows ordered by table (client
        order kept within a table), each table's start in that order). A group's work is
        the same whoever runs it, so the results do not depend on the thread count."""
        if cohort.table_groups is None:
            tables = len(self.table_names)
            # block-table rows grouped by table (a stable counting sort: client order kept)
            order = torch.from_numpy(np.argsort(cohort.row_table.numpy().astype(np.int16), kind="stable"))
            bounds = np.concatenate([[0], np.cumsum(np.bincount(cohort.row_table.numpy(), minlength=tables))])
            parts = max(1, min(self._threads_here(), tables))
            cuts = [0] + [int(np.searchsorted(bounds, bounds[-1] * i / parts)) for i in range(1, parts)] + [tables]
            cuts = sorted(set(min(max(c, 0), tables) for c in cuts))
            cohort.table_groups = [(a, b, order[bounds[a]:bounds[b]], bounds) for a, b in zip(cuts, cuts[1:])]
        return cohort.table_groups

    def _threads_here(self) -> int:
        """Threads this chunk may use: :attr:`threads`, or 1 on a pool thread."""
        if self.device.type != "cpu" or getattr(self._thread_local, "on_pool", False):
            return 1
        return self.threads

    def _side_by_side(self, work: List[Callable[[], Any]]) -> List[Any]:
        """Each of ``work``'s independent pieces, on the lane threads when there are several
        (each piece's kernels on one thread); their results in order."""
        threads = self._threads_here()
        if threads <= 1 or len(work) <= 1:
            return [piece() for piece in work]
        pool = self._lane_pool(threads)
        futures = [pool.submit(self._piece_on_one_thread, piece) for piece in work]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def _piece_on_one_thread(self, piece: Callable[[], Any]) -> Any:
        """``piece()`` on a pool thread: its kernels on this one thread, and any work it
        would spread (a chunk's lanes, its table groups) run here too."""
        torch.set_num_threads(1)  # this thread's kernels (the setting is per thread)
        self._thread_local.on_pool = True
        return piece()

    def _run(self, cohort: Cohort, params: Dict[str, Tensor], table: Tensor,
             anchor: Optional[Dict[str, Tensor]] = None, start_rows: Optional[Tensor] = None) -> Tensor:
        """Every step of the cohort's clients; returns each client's summed loss.

        The clients are cut into *lanes* of :attr:`micro_clients` consecutive clients (a
        batch that stays in cache trains faster per sample than all of them at once:
        benchmarks/fl_round.py). A lane's clients share nothing with another lane's (their
        weights, rows and optimizer state are disjoint slices), so the lanes run on
        :attr:`threads` threads at once, each lane's kernels on one thread. All of a
        chunk's work runs on one intra-op thread (``train``, ``train_sum``), so a client's
        floats are the same whatever the thread count and whichever thread ran them.
        ``anchor`` and ``start_rows`` (the start of the weights and of the block table) are
        FedProx's: its term's gradient ``mu (w - start)`` joins each step's.
        """
        names = list(params)
        optimizer = StackedOptimizer(self.spec, [params[n] for n in names] + [table])
        # each step's mean loss per client, weighted by its samples at the end (no
        # per-step host round trip on an accelerator)
        losses = torch.zeros((len(cohort.active), cohort.num_clients), dtype=torch.float32, device=self.device)
        row_start = np.concatenate([cohort.segment[:, 0], cohort.segment[-1:, -1]]) if cohort.num_clients else [0]
        if self.device.type != "cpu":  # one lane: the accelerator batches every client itself
            self._run_lane(cohort, params, table, optimizer, losses, row_start, 0, cohort.num_clients,
                           anchor, start_rows)
            return self._loss_sums(cohort, losses)
        micro = self.micro_clients
        lanes = range(0, cohort.num_clients, micro)
        # the lanes with most steps come first, so the threads finish together
        self._side_by_side([functools.partial(self._run_lane, cohort, params, table, optimizer, losses, row_start,
                                              a, min(a + micro, cohort.num_clients), anchor, start_rows)
                            for a in lanes])
        return self._loss_sums(cohort, losses)

    @staticmethod
    def _loss_sums(cohort: Cohort, losses: Tensor) -> Tensor:
        """Each client's summed loss (its steps' mean losses times their samples)."""
        return (losses.to("cpu", torch.float64) * cohort.counts).sum(dim=0)

    def _lane_pool(self, threads: int) -> concurrent.futures.ThreadPoolExecutor:
        """The threads lanes and chunks run on (kept: their forward copies live on them)."""
        if self._pool is None or self._pool_threads != threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fedrec-lane")
            self._pool_threads = threads
        return self._pool

    def _forward_here(self) -> Any:
        """The forward this thread uses: the engine's own, or on a pool thread a copy of its
        own (threads cannot share a ``torch.func`` model: see ``for_another_thread``)."""
        if not getattr(self._thread_local, "on_pool", False):
            return self.forward
        if not hasattr(self._thread_local, "forward"):
            self._thread_local.forward = self.forward.for_another_thread()
        return self._thread_local.forward

    def _run_lane(self, cohort: Cohort, params: Dict[str, Tensor], table: Tensor, optimizer: StackedOptimizer,
                  losses: Tensor, row_start: Any, first: int, stop: int,
                  anchor: Optional[Dict[str, Tensor]] = None, start_rows: Optional[Tensor] = None) -> None:
        """Every step of clients ``first``..``stop - 1`` (engine order), those still
        training at each step (a prefix: the cohort's clients come most steps first)."""
        names, tables, mu, forward = list(params), len(self.table_names), self.prox_mu, self._forward_here()
        for s, active in enumerate(cohort.active):
            b = min(active, stop)
            if b <= first:
                break
            a = first
            rows = (int(row_start[a]), int(row_start[b]))
            dense, positions, label, weight = cohort.batch(s, a, b)  # positions [k, B, T]
            lookups = table.index_select(0, positions.reshape(-1)).view(b - a, -1, tables, self.dim)
            weights = {n: params[n][a:b] for n in names}
            step_losses, grads, lookup_grads = _step(forward, weights, lookups, dense, label, weight)
            row_term = None
            if mu:  # FedProx: + mu (w - start), on the MLPs and on every row the clients read
                grads = {n: grads[n].add(weights[n] - anchor[n], alpha=mu) for n in names}
                row_term = (table[rows[0]:rows[1]] - start_rows[rows[0]:rows[1]]).mul_(mu)
            optimizer.apply(s + 1, [grads[n] for n in names] + [None], [(a, b)] * len(names) + [rows],
                            row_grads={len(names): (positions.reshape(-1) - rows[0],
                                                    lookup_grads.reshape(-1, self.dim), row_term)})
            losses[s, a:b] = step_losses

    def _results(self, cohort: Cohort, params: Dict[str, Tensor], table: Tensor,
                 losses: Tensor) -> Dict[int, TrainedClient]:
        counts = cohort.counts.sum(dim=0)
        out = {}
        for k, cid in enumerate(cohort.client_ids):
            rows = {}
            for t, name in enumerate(self.table_names):
                where = cohort.rows_of(k, t)
                rows[name] = (cohort.row_ids[where], table[where])
            result = LocalTrainResult(int(counts[k]), int(cohort.steps[k]), float(losses[k]))
            out[cid] = TrainedClient({n: params[n][k] for n in params}, rows, result)
        return out


def _step(forward: Any, weights: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
          weight: Tensor) -> Tuple[Tensor, Dict[str, Tensor], Tensor]:
    """``forward.step``, a lone client paired with a copy of itself: a batched matmul of
    one matrix-vector product goes to BLAS's gemv, whose sums round differently from the
    batched gemm that two or more clients take, so a client's floats would depend on
    whether its lane still had company at that step."""
    if dense.shape[0] != 1:
        return forward.step(weights, lookups, dense, label, weight)

    def pair(tensor: Tensor) -> Tensor:
        return torch.cat((tensor, tensor))

    losses, grads, lookup_grads = forward.step({n: pair(w) for n, w in weights.items()}, pair(lookups),
                                               pair(dense), pair(label), pair(weight))
    return losses[:1], {n: g[:1] for n, g in grads.items()}, lookup_grads[:1]
