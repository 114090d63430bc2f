"""Decentralized FL on a graph: gossip averaging and D-PSGD, through the worker API.

There is no server. Every worker is a peer with both roles: each round it trains from its
own model (the trainer role; the simulation runs that training through the backend, here
or on MPI processes), then asks its neighbours for their models and mixes them (the
aggregator role), with Metropolis-Hastings weights ``w_ij = 1 / (1 + max(d_i, d_j))``
(doubly stochastic on any undirected graph) or uniform ``1 / (d_i + 1)``:

* ``gossip`` (adapt then combine): ``x_i <- sum_j w_ij y_j``, ``y_j`` the neighbours'
  models after their local training;
* ``dpsgd`` (Lian et al. 2017): ``x_i <- sum_j w_ij x_j + (y_i - x_i)``: the neighbours'
  models from before the round, plus the peer's own local progress.

``GossipNetwork`` stands where the star's aggregator stands in the round loop. It places
the peers in groups, one per process (``fedrec.federated.placement``), and each group
(``PeerGroup``, the peers' runtime) drives its peers' ``run()`` coroutines in supersteps:
every peer's ``train()`` is collected and run, the groups exchange their boundary peers'
models (under MPI, between the processes: ``fedrec.federated.gossip_mpi``), then every
request for models is served, one peer at a time, so that only one neighbourhood of models
is in memory at once. The models live on disk, in two versioned client-state stores under
the logdir (``peer_models``: each peer's model after mixing; ``peer_sent``: after
training), written by the process that owns the peer: 10,000 peers cost memory in
proportion to the graph's edges, not 10,000 models. The evaluated global model is the
peers' mean; the metric ``consensus_distance`` is ``sqrt(mean_i ||x_i - mean||^2)``; both
are summed per fixed reduction block, so their bits do not depend on the processes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from fedrec.federated.client_runner import PEER, ClientStats, PeerStarts, RoundJob
from fedrec.federated.client_state import ClientStateStore, read_state_file
from fedrec.federated.context import RoundContext
from fedrec.federated.placement import Placement, cut_fraction, interprocess_models, place, send_lists, stored_order
from fedrec.federated.topology import GraphTopology, check_worker_roles, make_worker
from fedrec.federated.update import weighted_model_sum
from fedrec.federated_worker import FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities import registry
from fedrec.utilities.threads import torch_threads


@registry.load("fl_algo", "gossip")
class GossipWorker(FederatedWorker):
    """A peer: train locally, then average the neighbours' trained models."""

    position_roles = {"peer": ("trainer", "aggregator")}
    # the trainer side uploads its own delta (one client per block): the sum is the delta
    linear_aggregation = True
    #: what a peer's neighbours receive from it: its model after local training
    #: ("trained") or the one it started the round from ("start", D-PSGD)
    shares = "trained"

    def __init__(self, *args: Any, mixing: Literal["metropolis", "uniform"] = "metropolis", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixing = mixing

    async def run(self) -> None:
        role = self.role
        if role not in self.roles:
            raise InvalidStateError(f"worker {self.worker_index} has no role {role!r}")
        if role == "trainer":  # where the peer trains: from its own model, as its aggregator role keeps it
            own = await self.request_models_suspendable(list(self.out_neighbours))
            self.update_model(own[0])
            await self.train(model_dir=self.persistent_storage)
            return
        # the peer's round: local training, then its neighbours' models (and its own), mixed
        await self.train(model_dir=self.persistent_storage)
        neighbours = await self.request_models_suspendable(
            [self.worker_index] + self.sample_neighbours(self.round_idx, 0))
        self.update_model(self.aggregate(neighbours))
        self.round_idx += 1

    def client_update(self, context: Any) -> Any:
        """The peer's own local progress, unweighted (it is not averaged with others here)."""
        return context.model_delta(weight=1.0)

    def mixing_weights(self, ids: Sequence[int]) -> Dict[int, float]:
        """Row ``i`` of the mixing matrix over ``ids`` (the peer itself included)."""
        me = self.worker_index
        others = [j for j in ids if j != me]
        degree = self.runtime.degree
        if self.mixing == "uniform":
            weights = {j: 1.0 / (len(others) + 1) for j in others}
        else:
            mine = degree(me)
            weights = {j: 1.0 / (1 + max(mine, degree(j))) for j in others}
        weights[me] = 1.0 - sum(weights.values())
        return weights

    def aggregate(self, neighbours: Sequence[Neighbour]) -> Dict[str, torch.Tensor]:
        """``sum_j w_ij model_j`` in ascending id order."""
        weights = self.mixing_weights([n.id for n in neighbours])
        return weighted_model_sum((n.model, weights[n.id]) for n in sorted(neighbours, key=lambda n: n.id))


@registry.load("fl_algo", "dpsgd")
class DPSGDWorker(GossipWorker):
    """D-PSGD: mix the neighbours' models from before the round, add the own progress."""

    shares = "start"

    def aggregate(self, neighbours: Sequence[Neighbour]) -> Dict[str, torch.Tensor]:
        mixed = super().aggregate(neighbours)
        start = next(n for n in neighbours if n.id == self.worker_index).model  # x_i
        trained = self.get_model()  # y_i
        for name, value in mixed.items():
            if value.is_floating_point():
                value.add_(trained[name]).sub_(start[name])
        return mixed


def add_delta(model: Dict[str, torch.Tensor], update: Any) -> None:
    """``model += delta`` for one peer's update of weight 1 (``WeightedUpdate.apply_mean_``
    divided by 1, which is exact, without its temporary copies)."""
    if update.num_clients and float(update.weight) != 1.0:
        raise InvalidStateError(f"a peer's update has weight {update.weight}, expected 1 (client_update "
                                "must return context.model_delta(weight=1.0))")
    with torch.no_grad():
        for name, total in update.dense.items():
            model[name].add_(total)
        for name, row in update.rows.items():
            model[name].index_add_(0, row.ids, row.values)


class PeerModelStore(ClientStateStore):
    """The client-state store, writing the caller's tensors as they are: a peer's model is
    written once and never changed after (the base class copies, for callers that do).

    A model is read whole (:func:`~fedrec.federated.client_state.read_state_file`): a round
    reads each peer's model about five times, and through ``safe_open`` 10,000 peers of 34
    tensors leaked about 100 MB a round (``benchmarks/fl_topology.py --memory``).
    """

    copy_tensors = False

    def get(self, client_id: int, round_idx: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The peer's newest model written before round ``round_idx`` (no extras)."""
        older = [path for version, path in self._versions(client_id) if version < round_idx]
        if not older:
            return {}, {}
        return read_state_file(older[-1])[0], {}


class _Suspend:
    """What a peer's coroutine yields to its group's scheduler (a barrier)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __await__(self):
        return (yield self)


def build_peers(runner: Any, topology: GraphTopology, runtime: Any,
                ids: Optional[Sequence[int]] = None) -> List[FederatedWorker]:
    """One worker per graph node (``ids``: only those), roles trainer and aggregator,
    neighbours from the graph. On an undirected graph a peer's in- and out-neighbours are
    the same workers, and share one table."""
    fl = runner.fl
    sizes = np.asarray(runner.partition.sizes, dtype=np.int64)
    graph = topology.graph
    outgoing = graph.out_lists() if topology.directed else None
    peers = []
    for i in (range(graph.n) if ids is None else [int(x) for x in ids]):
        ins = graph.in_neighbours(i)
        in_table = NeighbourTable(ins, sizes[ins])
        if outgoing is None:
            out_table = in_table
        else:
            outs = outgoing.in_neighbours(i)
            out_table = NeighbourTable(outs, sizes[outs])
        peer = make_worker(runner, worker_index=i, roles=["trainer", "aggregator"], in_neighbours=in_table,
                           out_neighbours=out_table, runtime=runtime, sample_num=int(sizes[i]),
                           client_num_per_round=fl.client_num_per_round)
        peer.role = "aggregator"
        check_worker_roles(peer, "peer", f"peer {i} of fl.topology graph")
        peers.append(peer)
    return peers


@dataclasses.dataclass
class BlockSum:
    """One reduction block's share of the peers' mean and consensus distance."""

    block: int
    sums: Dict[str, torch.Tensor]  # float64: sum of the block's mixed models
    squares: float  # sum of their squared norms
    peers: int


@dataclasses.dataclass
class PartResult:
    """What one process's peers report for a round: rank 0 reduces these."""

    stats: List[ClientStats]
    blocks: List[BlockSum]
    node_bytes: np.ndarray  # int64 [n]: what each worker sent and received, as this part's peers asked
    link_keys: np.ndarray  # int64: link (a, b), a < b, as a * n + b
    link_bytes: np.ndarray  # int64, per link key
    bytes_interprocess: int  # peer models this part sent to other processes


class PeerGroup:
    """The peers one process owns (on the local backend: every peer): their runtime.

    A round runs in two halves around the exchange with the other processes:
    ``begin_round`` drives the peers' ``run()`` until every peer has trained and waits for
    models; then the models of this group's boundary peers go to the groups that hold
    their out-neighbours (``outgoing``), and the models of other groups' peers that this
    group's peers may ask for come in; ``finish_round`` serves the requests and mixes.
    The group's own peers' models never leave its stores (files under the logdir).
    """

    #: peers trained per call of the client runner: their start models are in memory together
    train_chunk = 16

    def __init__(self, runner: Any, topology: GraphTopology, placement: Placement, part: int, logdir: Path,
                 initial: Dict[str, torch.Tensor], threads: int) -> None:
        self.runner, self.topology, self.graph = runner, topology, topology.graph
        self.placement, self.part, self.threads = placement, part, threads
        self.seed, self.sampler, self.per_row_embeddings = runner.fl.seed, runner.sampler, runner.per_row_embeddings
        self.own = placement.peers_of(part)
        self.rank_in_order = np.empty(self.graph.n, np.int64)  # peer -> position in the placement order
        self.rank_in_order[placement.order] = np.arange(self.graph.n, dtype=np.int64)
        self.peers = {p.worker_index: p for p in build_peers(runner, topology, self, ids=self.own)}
        self.degrees = self.graph.in_degrees()
        self.models = PeerModelStore(Path(logdir) / "peer_models")
        self.sent = PeerModelStore(Path(logdir) / "peer_sent")
        self.initial = initial
        self.model_bytes = sum(int(v.numel()) for v in initial.values()) * runner.fl.value_bytes
        lists = send_lists(self.graph, placement.part_of)
        self.sends = {dst: peers for (src, dst), peers in sorted(lists.items()) if src == part}
        self.receives = {src: peers for (src, dst), peers in sorted(lists.items()) if dst == part}
        self.round_idx = self.checkpointed_round = 0
        self._current: Optional[tuple] = None  # (peer, its current model) while it mixes
        self._waiting: Dict[int, _Suspend] = {}
        self._coroutines: Dict[int, Any] = {}

    def _in_order(self, ids: Any) -> List[int]:
        return sorted(ids, key=lambda i: int(self.rank_in_order[i]))

    # -- a round -----------------------------------------------------------------------------
    def begin_round(self, round_idx: int, checkpointed_round: int) -> None:
        """Start every peer's ``run()``; train them at the barrier (all of them first)."""
        self.round_idx, self.checkpointed_round = round_idx, checkpointed_round
        self._stats: List[ClientStats] = []
        self._node_bytes = np.zeros(self.graph.n, dtype=np.int64)
        self._link_bytes: Dict[int, int] = {}
        self._trained: set = set()
        self._blocks: Dict[int, BlockSum] = {}
        self._remote: Dict[int, Dict[str, torch.Tensor]] = {}
        self._exchanged = False
        self.bytes_interprocess = 0
        self._coroutines, self._waiting = {}, {}
        for i in self.own.tolist():
            peer = self.peers[i]
            peer.round_idx, peer.role = round_idx, "aggregator"
            self._coroutines[i] = peer.run()
        for i in self.own.tolist():
            self._step(i, None)
        self._drive()

    def outgoing(self, part: int) -> Dict[int, Dict[str, torch.Tensor]]:
        """What this group's boundary peers share with group ``part``'s peers this round."""
        peers = self.sends.get(part, np.zeros(0, np.int64)).tolist()
        self.bytes_interprocess += len(peers) * self.model_bytes
        return {j: self.shared_model(j) for j in peers}

    def finish_round(self, incoming: Mapping[int, Dict[str, torch.Tensor]]) -> PartResult:
        """Serve the peers' requests (other groups' models from ``incoming``), mix; report."""
        expected = {int(j) for peers in self.receives.values() for j in peers.tolist()}
        if set(incoming) != expected:
            raise InvalidStateError(f"group {self.part} received the models of {len(incoming)} peers, "
                                    f"expected {len(expected)}")
        self._remote = dict(incoming)
        self._exchanged = True
        self._drive()
        self._remote, self._current = {}, None
        blocks = [self._blocks[b] for b in sorted(self._blocks)]
        keys = np.fromiter(self._link_bytes.keys(), np.int64, len(self._link_bytes))
        values = np.fromiter(self._link_bytes.values(), np.int64, len(self._link_bytes))
        result = PartResult(sorted(self._stats, key=lambda s: s.client_id), blocks, self._node_bytes, keys, values,
                            self.bytes_interprocess)
        # the block sums (float64 models) leave with the result, not kept until the next round
        self._blocks, self._stats, self._link_bytes = {}, [], {}
        return result

    def _step(self, i: int, value: Any) -> None:
        try:
            yielded = self._coroutines[i].send(value)
        except StopIteration:
            self.peers[i].in_neighbours.release_models()
            del self._coroutines[i]
            return
        if not isinstance(yielded, _Suspend):
            raise InvalidStateError(f"peer {i}'s run() awaited {yielded!r}; peers may await only "
                                    "their own train() and request_models_suspendable()")
        self._waiting[i] = yielded

    def _drive(self) -> None:
        """Run the waiting peers: trainers first (a barrier), then requests one by one, in
        placement order; before the exchange, stop at the requests."""
        waiting = self._waiting
        while waiting:
            trainers = self._in_order(i for i, s in waiting.items() if s.kind == "train")
            if trainers:
                if self._exchanged:
                    raise InvalidStateError(f"peer {trainers[0]} trains after asking for models; a peer "
                                            "trains once per round, before it asks its neighbours")
                results = self._train_peers(trainers)
                with torch_threads(self.threads):
                    for i in trainers:
                        del waiting[i]
                        self._step(i, results[i])
                continue
            if not self._exchanged:
                return
            with torch_threads(self.threads):
                for i in self._in_order(list(waiting)):
                    del waiting[i]
                    self._step(i, None)

    def _train_peers(self, ids: Sequence[int]) -> Dict[int, LocalTrainResult]:
        """Local training of ``ids`` from their own models, ``train_chunk`` at a time
        (one block each); each trained model goes to ``peer_sent``."""
        r, out = self.round_idx, {}
        for first in range(0, len(ids), self.train_chunk):
            chunk = list(ids[first:first + self.train_chunk])
            starts = PeerStarts({i: self._stored(self.models, i, r) or self.initial for i in chunk})
            context = RoundContext(r, self.seed, checkpointed_round=self.checkpointed_round, cohort=sorted(chunk),
                                   aggregator_id=PEER)
            with torch_threads(self.threads):
                result = self.runner.run_job(RoundJob(context, [(k, [i]) for k, i in enumerate(chunk)], starts))
            updates = {chunk[b]: update for b, update in result.block_updates}
            stats = {s.client_id: s for s in result.stats}
            for i in chunk:
                start = starts.pop(i)  # read from the store for this call alone: updated in place
                trained = {k: v.detach().clone() for k, v in start.items()} if start is self.initial else start
                add_delta(trained, updates[i])
                self.sent.put(i, r, trained, checkpointed_round=0)
                stat = stats[i]
                stat.bytes_down = stat.bytes_up = 0  # a peer trains on its own device: no traffic
                self._stats.append(stat)
                self._trained.add(i)
                out[i] = LocalTrainResult(stat.num_samples, stat.num_steps, stat.loss_sum)
        return out

    def _stored(self, store: ClientStateStore, i: int, before: int) -> Optional[Dict[str, torch.Tensor]]:
        tensors, _ = store.get(i, before)
        return tensors or None

    def shared_model(self, j: int) -> Dict[str, torch.Tensor]:
        """What peer ``j`` (one of this group's) shares this round: its trained model, or
        its start (D-PSGD)."""
        r = self.round_idx
        if getattr(self.runner.algorithm, "shares", "trained") != "start" and j in self._trained:
            trained = self._stored(self.sent, j, r + 1)
            if trained is not None:
                return trained
        return self._stored(self.models, j, r) or self.initial

    # -- the runtime protocol (what a peer calls) ---------------------------------------------
    def degree(self, i: int) -> int:
        """Peer ``i``'s number of in-neighbours (Metropolis-Hastings weights need it)."""
        return int(self.degrees[i])

    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        """The peer's current model: after training, the trained one; else its start."""
        i, r = worker.worker_index, self.round_idx
        if self._current is not None and self._current[0] == i:
            return self._current[1]
        model = (self._stored(self.sent, i, r + 1) if i in self._trained else None) \
            or self._stored(self.models, i, r) or self.initial
        self._current = (i, model)
        return model

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        """The peer's model after mixing: stored (version = this round), and added to its
        reduction block's sums for the mean and the consensus distance."""
        i, r = worker.worker_index, self.round_idx
        missing = set(self.initial) - set(weights)
        if missing:
            raise InvalidStateError(f"update_model: peer {i}'s weights lack {sorted(missing)[:5]}")
        model = {k: weights[k].detach().to(self.initial[k].dtype) for k in self.initial}
        self.models.put(i, r, model, checkpointed_round=self.checkpointed_round)
        block = self.placement.block_of(i)
        acc = self._blocks.get(block)
        if acc is None:
            acc = self._blocks[block] = BlockSum(block, {k: torch.zeros(v.shape, dtype=torch.float64)
                                                         for k, v in model.items()}, 0.0, 0)
        with torch.no_grad():
            # in float64, without a float64 copy of the model; names sorted: an MPI process
            # reads the first model from a file, whose names come in another order
            for name in sorted(model):
                value = model[name]
                acc.sums[name].add_(value)
                acc.squares += float(torch.linalg.vector_norm(value, dtype=torch.float64)) ** 2
        acc.peers += 1
        self._current = None

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None) -> _Suspend:
        return _Suspend("train")

    async def request_models(self, worker: FederatedWorker, ids: Sequence[int]) -> List[Neighbour]:
        """The peer's own model and its in-neighbours' (what each shares), after every
        peer has trained; counts one model over each link ``j -> i``."""
        i = worker.worker_index
        unknown = [j for j in ids if j != i and j not in worker.in_neighbours]
        if unknown:
            raise InvalidStateError(f"peer {i} asked workers {unknown[:5]}, which are not its in-neighbours")
        await _Suspend("models")
        r, n = self.round_idx, self.graph.n
        out = []
        for j in sorted({int(x) for x in ids}):
            model = self._remote.get(j)
            if model is None:
                model = self.shared_model(j)
            if j == i:
                neighbour = Neighbour(i, model=model, sample_num=worker.sample_num, last_sync=r)
            else:
                neighbour = worker.in_neighbours[j]
                neighbour.model, neighbour.last_sync = model, r
                self._node_bytes[i] += self.model_bytes
                self._node_bytes[j] += self.model_bytes
                link = min(i, j) * n + max(i, j)
                self._link_bytes[link] = self._link_bytes.get(link, 0) + self.model_bytes
            out.append(neighbour)
        return out

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        """Metrics of the peer's current model on the validation split."""
        self.runner.trainer.model.load_state_dict(self.get_model(worker), strict=False)
        return self.runner.trainer.evaluate("val", log=False)


class GossipNetwork:
    """The round loop's driver of a decentralized round (``Runtime`` of the round loop).

    It places the peers (``fedrec.federated.placement``) on the backend's processes: one
    group on the local backend, one per MPI process under MPI, where each process runs its
    own group and exchanges only boundary models with the others (``gossip_mpi``). Rank 0
    never holds a peer's model: it adds the groups' per-block sums in block order (the
    same bits for any number of processes), takes the peers' mean as the evaluated model,
    and the consensus distance.
    """

    #: groups the local backend splits the peers into (1; tests set more: the exchange of
    #: the MPI path, in one process)
    local_parts = 1

    def __init__(self, sim: Any, topology: GraphTopology) -> None:
        self.sim, self.topology, self.graph = sim, topology, topology.graph
        # computed once per run and kept in the logdir: every MPI process reads the same order
        self.order = stored_order(sim.logdir, self.graph, topology.kind, topology.placement)
        # every peer starts from the same model (rebuilt identically on resume); MPI processes read it
        self.initial = {k: v.detach().clone() for k, v in sim.global_state.items()}
        save_file({k: v.contiguous() for k, v in self.initial.items()}, str(initial_path(sim.logdir)))
        self.model_bytes = sum(int(v.numel()) for v in self.initial.values()) * sim.fl.value_bytes
        # what the round loop reads of "its aggregator"
        self.aggregator = self
        self.round_idx = 0
        self.in_neighbours = NeighbourTable()
        self.placement: Optional[Placement] = None
        self.groups: List[PeerGroup] = []
        self._metrics: Dict[str, float] = {}

    def server_values(self) -> Dict[str, torch.Tensor]:
        return {}

    def _place(self) -> None:
        backend = self.sim.backend
        parts = backend.pool_size if hasattr(backend, "run_on_every_process") else self.local_parts
        self.placement = place(self.order, self.sim.fl.reduce_blocks, parts)
        if not hasattr(backend, "run_on_every_process"):
            self.groups = [PeerGroup(self.sim.runner, self.topology, self.placement, k, self.sim.logdir,
                                     self.initial, self.sim.fl.client_threads) for k in range(parts)]
        if parts > 1:
            self.sim.logger.info(describe_placement(self.graph, self.placement, self.model_bytes))

    async def run(self) -> None:
        """One round of every peer, group by group (or on the MPI processes at once)."""
        if self.placement is None:
            self._place()
        r, checkpointed = self.sim.round_idx, self.sim.checkpointed_round
        if self.groups:
            for group in self.groups:
                group.begin_round(r, checkpointed)
            outgoing = [{dst: group.outgoing(dst) for dst in group.sends} for group in self.groups]
            results = []
            for k, group in enumerate(self.groups):
                incoming = {j: model for sent in outgoing for j, model in sent.get(k, {}).items()}
                results.append(group.finish_round(incoming))
            del outgoing
        else:
            from fedrec.federated.gossip_mpi import run_groups

            results = run_groups(self.sim.backend, self.sim.logdir, r, checkpointed)
        self._reduce(results)

    def _reduce(self, results: Sequence[PartResult]) -> None:
        """The groups' block sums added in block order: the peers' mean becomes the
        evaluated global model; consensus distance; bytes per link and node."""
        sim = self.sim
        blocks = sorted((b for result in results for b in result.blocks), key=lambda b: b.block)
        total: Optional[Dict[str, torch.Tensor]] = None
        squares, count = 0.0, 0
        with torch.no_grad(), torch_threads(sim.fl.client_threads):
            for block in blocks:
                if total is None:
                    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in block.sums.items()}
                for name, value in block.sums.items():
                    total[name].add_(value)
                squares += block.squares
                count += block.peers
            if total is not None and count:
                mean = {k: v / count for k, v in total.items()}
                sq_mean = sum(float(mean[k].pow(2).sum()) for k in sorted(mean))
                for name, tensor in sim.global_state.items():
                    tensor.copy_(mean[name].to(tensor.dtype))
                consensus = float(np.sqrt(max(squares / count - sq_mean, 0.0)))
            else:
                consensus = 0.0
        node_bytes = np.sum([result.node_bytes for result in results], axis=0)
        keys = np.concatenate([result.link_keys for result in results])
        values = np.concatenate([result.link_bytes for result in results])
        links = np.zeros(0, np.int64)
        if len(keys):
            unique, inverse = np.unique(keys, return_inverse=True)
            links = np.zeros(len(unique), np.int64)
            np.add.at(links, inverse, values)
        moved = int(links.sum())
        self._metrics = {"bytes_down": moved, "bytes_up": moved, "bytes_max_link": int(links.max(initial=0)),
                         "bytes_max_node": int(node_bytes.max(initial=0)), "consensus_distance": consensus,
                         "bytes_interprocess": int(sum(result.bytes_interprocess for result in results))}
        stats = sorted((s for result in results for s in result.stats), key=lambda s: s.client_id)
        sim.last_round = type(sim.last_round)(stats)

    # -- the runtime protocol --------------------------------------------------------------------
    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.sim.evaluate()

    # -- metrics and checkpoints -----------------------------------------------------------------
    def round_metrics(self, stats: Sequence[Any]) -> Dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> Dict[str, Any]:
        return {}  # the peers' models are in the stores, versioned by round

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def initial_path(logdir: Path) -> Path:
    """Where every peer's first model is written for the MPI processes."""
    return Path(logdir) / "peer_initial.safetensors"


def describe_placement(graph: Any, placement: Placement, model_bytes: int) -> str:
    sizes = np.bincount(placement.part_of, minlength=placement.num_parts)
    models = interprocess_models(graph, placement.part_of)
    return (f"gossip on {placement.num_parts} processes: {int(sizes.min())}-{int(sizes.max())} peers each, "
            f"{cut_fraction(graph, placement.part_of):.1%} of links cut, {models} boundary model(s) "
            f"({models * model_bytes / 2**20:.2f} MiB) cross processes per round")
