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

``GossipNetwork`` is the peers' runtime, and it stands where the star's aggregator stands
in the round loop. Peers' ``run()`` coroutines are driven in supersteps: every peer's
``train()`` is collected and run, then every peer's request for models is served, one
peer at a time, so that only one neighbourhood of models is in memory at once. The
models themselves live on disk, in two versioned client-state stores under the logdir
(``peer_models``: each peer's model after mixing; ``peer_sent``: after training), read
through safetensors' memory map: 10,000 peers cost memory in proportion to the graph's
edges, not 10,000 models. The evaluated global model is the peers' mean; the metric
``consensus_distance`` is ``sqrt(mean_i ||x_i - mean||^2)``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from fedrec.federated.client_runner import PEER, PeerStarts
from fedrec.federated.client_state import ClientStateStore
from fedrec.federated.context import RoundContext
from fedrec.federated.topology import GraphTopology, check_worker_roles
from fedrec.federated.update import weighted_model_sum
from fedrec.federated_worker import FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError


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
    written once and never changed after (the base class copies, for callers that do)."""

    copy_tensors = False


class _Suspend:
    """What a peer's coroutine yields to the network's scheduler (a barrier)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __await__(self):
        return (yield self)


def build_peers(runner: Any, topology: GraphTopology, runtime: Any) -> List[FederatedWorker]:
    """One worker per graph node, roles trainer and aggregator, neighbours from the graph."""
    fl = runner.fl
    sizes = np.asarray(runner.partition.sizes, dtype=np.int64)
    graph = topology.graph
    outgoing = graph.out_lists() if topology.directed else graph
    peers = []
    for i in range(graph.n):
        ins, outs = graph.in_neighbours(i), outgoing.in_neighbours(i)
        try:
            peer = runner.algorithm(worker_index=i, roles=["trainer", "aggregator"],
                                    in_neighbours=NeighbourTable(ins, sizes[ins]),
                                    out_neighbours=NeighbourTable(outs, sizes[outs]), runtime=runtime,
                                    sample_num=int(sizes[i]), client_num_per_round=fl.client_num_per_round,
                                    **runner.algorithm_kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"fl.fl_algo {fl.fl_algo.get('name')!r}: {err}") from None
        peer.role = "aggregator"
        check_worker_roles(peer, "peer", f"peer {i} of fl.topology graph")
        peers.append(peer)
    return peers


class GossipNetwork:
    """The peers' runtime (``Runtime``) and the round loop's driver of a decentralized round."""

    #: peers trained per backend call: their start models are in memory together
    train_chunk = 16

    def __init__(self, sim: Any, topology: GraphTopology) -> None:
        self.sim, self.topology, self.graph = sim, topology, topology.graph
        self.seed, self.sampler, self.per_row_embeddings = sim.seed, sim.sampler, sim.per_row_embeddings
        self.peers = build_peers(sim.runner, topology, self)
        self.degrees = self.graph.in_degrees()
        self.models = PeerModelStore(sim.logdir / "peer_models")
        self.sent = PeerModelStore(sim.logdir / "peer_sent")
        # every peer starts from the same model (rebuilt identically on resume)
        self.initial = {k: v.detach().clone() for k, v in sim.global_state.items()}
        self.model_bytes = sum(int(v.numel()) for v in self.initial.values()) * sim.fl.value_bytes
        # what the round loop reads of "its aggregator"
        self.aggregator = self
        self.round_idx = 0
        self.in_neighbours = NeighbourTable()
        self._current: Optional[tuple] = None  # (peer, round, its trained model) during mixing
        self._reset()

    def _reset(self) -> None:
        self._stats: List[Any] = []
        self._node_bytes = np.zeros(self.graph.n, dtype=np.int64)
        self._link_bytes: Dict[tuple, int] = {}
        self._trained: set = set()
        self._sum: Optional[Dict[str, torch.Tensor]] = None
        self._sum_sq = 0.0
        self._mixed = 0

    # -- what the round loop calls -------------------------------------------------------
    def server_values(self) -> Dict[str, torch.Tensor]:
        return {}

    async def run(self) -> None:
        """One round of every peer, driven in supersteps (train all, then mix one by one)."""
        self._reset()
        r = self.sim.round_idx
        coroutines = {}
        for peer in self.peers:
            peer.round_idx, peer.role = r, "aggregator"
            coroutines[peer.worker_index] = peer.run()
        waiting: Dict[int, _Suspend] = {}

        def step(i: int, value: Any) -> None:
            try:
                yielded = coroutines[i].send(value)
            except StopIteration:
                self.peers[i].in_neighbours.release_models()
                return
            if not isinstance(yielded, _Suspend):
                raise InvalidStateError(f"peer {i}'s run() awaited {yielded!r}; peers may await only "
                                        "their own train() and request_models_suspendable()")
            waiting[i] = yielded

        for i in sorted(coroutines):
            step(i, None)
        while waiting:
            trainers = sorted(i for i, s in waiting.items() if s.kind == "train")
            if trainers:  # a barrier: every peer that trains this round trains first
                results = self._train_peers(trainers, r)
                for i in trainers:
                    del waiting[i]
                    step(i, results[i])
                continue
            for i in sorted(waiting):  # every peer has trained: serve the requests one by one
                del waiting[i]
                step(i, None)
        self._current = None
        self._finish_round(r)

    def _train_peers(self, ids: Sequence[int], r: int) -> Dict[int, LocalTrainResult]:
        """Local training of ``ids`` from their own models, through the backend, in chunks
        of ``train_chunk`` peers (one block each, so MPI processes share a chunk); each
        trained model goes to ``peer_sent`` (what its neighbours may ask for)."""
        out = {}
        for first in range(0, len(ids), self.train_chunk):
            chunk = list(ids[first:first + self.train_chunk])
            starts = PeerStarts({i: self._stored(self.models, i, r) or self.initial for i in chunk})
            context = RoundContext(r, self.seed, checkpointed_round=self.sim.checkpointed_round, cohort=chunk,
                                   aggregator_id=PEER)
            results = self.sim.backend.run_round(context, [(k, [i]) for k, i in enumerate(chunk)], starts)
            updates = {chunk[b]: update for res in results for b, update in res.block_updates}
            stats = {s.client_id: s for res in results for s in res.stats}
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

    def _finish_round(self, r: int) -> None:
        """The peers' mean becomes the evaluated global model; consensus distance."""
        sim = self.sim
        if self._sum is not None and self._mixed:
            with torch.no_grad():
                mean = {k: (v / self._mixed) for k, v in self._sum.items()}
                sq_mean = sum(float(v.pow(2).sum()) for v in mean.values())
                for name, tensor in sim.global_state.items():
                    tensor.copy_(mean[name].to(tensor.dtype))
            self._consensus = float(np.sqrt(max(self._sum_sq / self._mixed - sq_mean, 0.0)))
        else:
            self._consensus = 0.0
        sim.last_round = type(sim.last_round)(sorted(self._stats, key=lambda s: s.client_id))

    # -- the runtime protocol (what a peer calls) ---------------------------------------------
    def degree(self, i: int) -> int:
        """Peer ``i``'s number of in-neighbours (Metropolis-Hastings weights need it)."""
        return int(self.degrees[i])

    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        """The peer's current model: after training, the trained one; else its start."""
        i, r = worker.worker_index, self.sim.round_idx
        if self._current is not None and self._current[0] == i:
            return self._current[1]
        model = (self._stored(self.sent, i, r + 1) if i in self._trained else None) \
            or self._stored(self.models, i, r) or self.initial
        self._current = (i, model)
        return model

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        """The peer's model after mixing: stored (version = this round), and summed for
        the mean and the consensus distance."""
        i, r = worker.worker_index, self.sim.round_idx
        missing = set(self.initial) - set(weights)
        if missing:
            raise InvalidStateError(f"update_model: peer {i}'s weights lack {sorted(missing)[:5]}")
        model = {k: weights[k].detach().to(self.initial[k].dtype) for k in self.initial}
        self.models.put(i, r, model, checkpointed_round=self.sim.checkpointed_round)
        with torch.no_grad():
            if self._sum is None:
                self._sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in model.items()}
            for name, value in model.items():  # in float64, without a float64 copy of the model
                self._sum[name].add_(value)
                self._sum_sq += float(torch.linalg.vector_norm(value, dtype=torch.float64)) ** 2
        self._mixed += 1
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
        r = self.sim.round_idx
        out = []
        for j in sorted({int(x) for x in ids}):
            if type(worker).shares == "start":
                model = self._stored(self.models, j, r) or self.initial
            else:
                model = (self._stored(self.sent, j, r + 1) if j in self._trained else None) \
                    or self._stored(self.models, j, r) or self.initial
            if j == i:
                neighbour = Neighbour(i, model=model, sample_num=worker.sample_num, last_sync=r)
            else:
                neighbour = worker.in_neighbours[j]
                neighbour.model, neighbour.last_sync = model, r
                self._node_bytes[i] += self.model_bytes
                self._node_bytes[j] += self.model_bytes
                link = (min(i, j), max(i, j))
                self._link_bytes[link] = self._link_bytes.get(link, 0) + self.model_bytes
            out.append(neighbour)
        return out

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.sim.evaluate()

    # -- metrics and checkpoints -----------------------------------------------------------------
    def round_metrics(self, stats: Sequence[Any]) -> Dict[str, float]:
        moved = int(sum(self._link_bytes.values()))
        return {"bytes_down": moved, "bytes_up": moved,
                "bytes_max_link": max(self._link_bytes.values(), default=0),
                "bytes_max_node": int(self._node_bytes.max(initial=0)),
                "consensus_distance": self._consensus}

    def state_dict(self) -> Dict[str, Any]:
        return {}  # the peers' models are in the stores, versioned by round

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
