"""Hierarchical FedAvg (HierFAVG, Liu et al. 2020): clients -> edge aggregators -> cloud.

Written through the tutorial's worker API, as a user would write it: an edge aggregator is
a worker with the aggregator role whose out-neighbour is the cloud. In a cloud round the
cloud asks its edges for their models; each edge first takes the cloud's model, then runs
``edge_rounds`` rounds of FedAvg over its own clients (sampling, training through the
backend, its server step), and answers with its model; the cloud averages the edges'
models weighted by their data. With one edge holding every client and one edge round,
that is star FedAvg bit for bit (the edge's round is the star's round; the cloud's average
of one model is the model itself).

``HierarchicalRuntime`` is the runtime these workers call into: it holds one model per
edge (the cloud's model is the simulation's global model), trains an edge's cohort through
the simulation's backend (local or MPI) and counts bytes per link: client <-> edge from the
clients' own counts, edge <-> cloud one whole model each way per cloud round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.topology import HierarchicalTopology, check_worker_roles, make_worker
from fedrec.federated.update import weighted_model_sum
from fedrec.federated_worker import Cohort, FederatedWorker, InvalidStateError, Neighbour, NeighbourTable
from fedrec.utilities import registry


@registry.load("fl_algo", "hier_favg")
class HierFAVGWorker(FedAvgWorker):
    """Edges run FedAvg over their clients (any ``server_optimizer``, as ``fed_avg``);
    the cloud averages the edges' models by data size."""

    position_roles = {"cloud": ("aggregator",), "edge": ("aggregator",), "client": ("trainer",)}
    #: set from ``fl.topology`` when the workers are built
    edge_rounds: int = 1
    edge_index: int = 0
    num_edges: int = 1

    async def run(self) -> None:
        role = self.role
        if role not in self.roles:
            raise InvalidStateError(f"worker {self.worker_index} has no role {role!r}")
        if role == "trainer":  # a client: take its edge's model, train
            edges = list(self.out_neighbours.values())
            models = await self.request_models_suspendable(edges)
            self.update_model(models[0])
            await self.train(model_dir=self.persistent_storage)
            self.round_idx += 1
        elif self.out_neighbours:  # an edge aggregator: the cloud's model, then edge_rounds of FedAvg
            cloud = await self.request_models_suspendable(list(self.out_neighbours))
            self.update_model(cloud[0])
            for _ in range(self.edge_rounds):
                selected = self.sample_neighbours(self.round_idx, self.client_num_per_round)
                neighbours = await self.request_models_suspendable(selected)
                self.update_model(self.aggregate(neighbours))
                self.round_idx += 1
        else:  # the cloud: every edge's model, averaged
            edges = await self.request_models_suspendable(self.sample_neighbours(self.round_idx, 0))
            self.update_model(self.aggregate(edges))
            self.round_idx += 1

    def aggregate(self, neighbours: Cohort) -> Dict[str, torch.Tensor]:
        if self.out_neighbours:  # an edge: FedAvg's server step on its clients' summed update
            return super().aggregate(neighbours)
        return weighted_average(neighbours)

    def sample_neighbours(self, round_idx: int, client_num_per_round: int) -> List[int]:
        """The cloud hears every edge; an edge samples its clients with the configured
        sampler, its draw in edge round t being the sampler's round ``t * num_edges + e``
        (edges draw independently; one edge draws exactly as the star does)."""
        if not self.out_neighbours:
            return list(self.in_neighbours)
        return super().sample_neighbours(round_idx * self.num_edges + self.edge_index, client_num_per_round)


def weighted_average(neighbours: Sequence[Neighbour]) -> Dict[str, torch.Tensor]:
    """``sum_e (n_e / n) w_e`` in the neighbours' order (one neighbour: its model exactly)."""
    total = float(sum(n.sample_num for n in neighbours))
    if not neighbours or total <= 0:
        raise InvalidStateError("no edge model to average (no edge reported data)")
    return weighted_model_sum((n.model, n.sample_num / total) for n in neighbours)


def edge_cohort_size(per_round: int, members: int, num_workers: int) -> int:
    """An edge's share of ``fl.client_num_per_round``, in proportion to its clients."""
    return max(1, min(members, round(per_round * members / num_workers)))


def build_workers(runner: Any, topology: HierarchicalTopology, runtime: Any,
                  storage: Optional[str] = None) -> Tuple[FederatedWorker, List[FederatedWorker]]:
    """The cloud and the edge aggregators, their roles checked against their positions."""
    fl = runner.fl
    sizes = np.asarray(runner.partition.sizes, dtype=np.int64)
    n, edges = fl.num_workers, topology.edges
    edge_sizes = [int(sizes[topology.clients_of(e)].sum()) for e in range(edges)]
    cloud = make_worker(runner, worker_index=topology.cloud_id, roles=["aggregator"],
                  in_neighbours=NeighbourTable(range(n, n + edges), edge_sizes), runtime=runtime,
                  client_num_per_round=edges, persistent_storage=storage)
    cloud.role = "aggregator"
    check_worker_roles(cloud, "cloud", "the cloud aggregator of fl.topology hierarchical")
    out = []
    for e in range(edges):
        members = topology.clients_of(e)
        edge = make_worker(runner, worker_index=topology.edge_id(e), roles=["aggregator"],
                     in_neighbours=NeighbourTable(members, sizes[members]),
                     out_neighbours=NeighbourTable([topology.cloud_id]), runtime=runtime,
                     client_num_per_round=edge_cohort_size(fl.client_num_per_round, len(members), n),
                     persistent_storage=storage)
        edge.role = "aggregator"
        edge.sample_num = edge_sizes[e]
        edge.edge_rounds, edge.edge_index, edge.num_edges = topology.edge_rounds, e, edges
        check_worker_roles(edge, "edge", f"edge aggregator {e} of fl.topology hierarchical")
        out.append(edge)
    return cloud, out


class HierarchicalRuntime:
    """The runtime of the cloud and the edges (``Runtime``): models, requests, bytes."""

    def __init__(self, sim: Any, topology: HierarchicalTopology) -> None:
        self.sim, self.topology = sim, topology
        self.seed, self.sampler, self.per_row_embeddings = sim.seed, sim.sampler, sim.per_row_embeddings
        n = sim.fl.num_workers
        # every edge's model (its server optimizer's parameters: built before the workers)
        self.models: Dict[int, Dict[str, torch.Tensor]] = {
            n + e: {k: v.detach().clone() for k, v in sim.global_state.items()} for e in range(topology.edges)}
        self.cloud, self.edges = build_workers(sim.runner, topology, self, str(sim.logdir / "aggregator"))
        self.edge_by_id = {w.worker_index: w for w in self.edges}
        self.aggregator = self.cloud
        self.model_bytes = sum(int(v.numel()) for v in sim.global_state.values()) * sim.fl.value_bytes
        self._reset()

    def _reset(self) -> None:
        self._stats: List[Any] = []
        self._client_bytes: Dict[int, int] = {}
        self._edge_node = np.zeros(self.topology.edges, dtype=np.int64)
        self._edges_heard = 0

    # -- the runtime protocol ----------------------------------------------------------------
    def get_model(self, worker: FederatedWorker) -> Dict[str, torch.Tensor]:
        if worker.worker_index == self.topology.cloud_id:
            return self.sim.global_state
        try:
            return self.models[worker.worker_index]
        except KeyError:
            raise InvalidStateError(f"worker {worker.worker_index} is not an aggregator of this hierarchy") from None

    def update_model(self, worker: FederatedWorker, weights: Mapping[str, torch.Tensor]) -> None:
        target = self.get_model(worker)
        if weights is target:
            return
        missing = set(target) - set(weights)
        if missing:
            raise InvalidStateError(f"update_model: weights lack {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(weights[name])

    async def request_models(self, worker: FederatedWorker, ids: Sequence[int]) -> List[Neighbour]:
        ids = [int(i) for i in ids]
        if worker is self.cloud:
            return await self._hear_edges(ids)
        if worker.worker_index not in self.edge_by_id:
            raise InvalidStateError(f"worker {worker.worker_index} is neither the cloud nor an edge")
        if ids == [self.topology.cloud_id]:  # the edge downloads the cloud's model
            neighbour = worker.out_neighbours[self.topology.cloud_id]
            neighbour.model = self.sim.global_state
            neighbour.last_sync = self.sim.round_idx
            return [neighbour]
        if self.topology.cloud_id in ids:
            raise InvalidStateError(f"edge {worker.worker_index} asked the cloud and its clients at once")
        sim, rounds = self.sim, self.topology.edge_rounds
        cohort = sim.train_cohort(worker, ids, self.models[worker.worker_index], round_idx=worker.round_idx,
                                  checkpointed_round=sim.checkpointed_round * rounds,
                                  aggregator_id=worker.worker_index)
        edge = worker.worker_index - sim.fl.num_workers
        for stat in sim.last_round.stats:
            moved = stat.bytes_down + stat.bytes_up
            self._client_bytes[stat.client_id] = self._client_bytes.get(stat.client_id, 0) + moved
            self._edge_node[edge] += moved
        self._stats.extend(sim.last_round.stats)
        return cohort

    async def _hear_edges(self, ids: Sequence[int]) -> Cohort:
        """Each edge runs its edge rounds (the cloud round's work), then sends its model."""
        self._reset()
        out = []
        for eid in sorted(ids):
            edge = self.edge_by_id.get(eid)
            if edge is None:
                raise InvalidStateError(f"the cloud asked worker {eid}, which is not one of its edges")
            edge.round_idx = self.sim.round_idx * self.topology.edge_rounds
            edge.role = "aggregator"
            await edge.run()
            neighbour = self.cloud.in_neighbours[eid]
            neighbour.model = self.models[eid]
            neighbour.sample_num = edge.sample_num
            neighbour.last_sync = self.sim.round_idx
            self._edge_node[eid - self.sim.fl.num_workers] += 2 * self.model_bytes
            self._edges_heard += 1
            out.append(neighbour)
        self.sim.last_round = dataclasses.replace(self.sim.last_round, stats=sorted(
            self._stats, key=lambda s: s.client_id))
        return Cohort(out)

    def train(self, worker: FederatedWorker, model_dir: Optional[str] = None) -> Any:
        raise InvalidStateError("aggregators of a hierarchy do not train; their clients do")

    def test(self, worker: FederatedWorker) -> Dict[str, float]:
        return self.sim.evaluate()

    # -- what the round loop asks ------------------------------------------------------------
    def round_metrics(self, stats: Sequence[Any]) -> Dict[str, int]:
        """Bytes per link this cloud round: client <-> edge (the clients' counts), edge <->
        cloud (a whole model each way per edge); the most loaded link and node."""
        client_edge = int(sum(self._client_bytes.values()))
        edge_cloud = 2 * self.model_bytes * self._edges_heard
        cloud_node = edge_cloud
        return {
            "bytes_down": self.model_bytes * self._edges_heard,  # cloud -> edges, beside edges -> clients
            "bytes_up": self.model_bytes * self._edges_heard,
            "bytes_client_edge": client_edge,
            "bytes_edge_cloud": edge_cloud,
            "bytes_max_link": max(max(self._client_bytes.values(), default=0),
                                  2 * self.model_bytes if self._edges_heard else 0),
            "bytes_max_node": int(max(cloud_node, int(self._edge_node.max(initial=0)))),
        }

    def state_dict(self) -> Dict[str, Any]:
        """The edges' server state (their server optimizers); their models are the
        cloud's at the start of every cloud round, so they need no saving."""
        return {"edges": [edge.state_dict() for edge in self.edges]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for edge, saved in zip(self.edges, state.get("edges", [])):
            edge.load_state_dict(saved)
