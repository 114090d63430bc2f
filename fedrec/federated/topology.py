"""Who talks to whom: the ``topology`` registry kind (``fl.topology``).

A topology turns ``fl.num_workers`` trainers into positions and neighbours, so that a
worker's ``in_neighbours`` and ``out_neighbours`` mean what the tutorial says:

* ``star``: one aggregator (id ``num_workers``) over every trainer (today's default);
* ``hierarchical``: trainers report to edge aggregators (ids ``num_workers ..
  num_workers + num_edges - 1``), whose out-neighbour is the cloud aggregator (the next
  id); an edge runs ``edge_rounds`` aggregations of its clients per cloud round (HierFAVG,
  Liu et al. 2020); clients are assigned in contiguous blocks, round robin, at random
  (seeded), or by an assignment file;
* ``graph``: no server; every worker is a peer, trainer and aggregator of its neighbours
  (ring, 2-D torus, random k-regular or Erdos-Renyi by seed, or an edge-list file), for
  gossip averaging and D-PSGD.

The graph is held as arrays (CSR adjacency), so 10,000 workers cost memory in proportion
to the edges. Everything here is checked before round 1: unknown workers in a file (by
file and line), a worker whose algorithm gives it no role its position needs, and a
disconnected graph (a warning with the component count: gossip cannot reach consensus
across components).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import pydantic

from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError

log = logging.getLogger("fedrec")

PositiveInt = Annotated[int, pydantic.Field(ge=1)]
#: numpy's generators take only seeds >= 0
Seed = Annotated[int, pydantic.Field(ge=0)]

#: the roles a worker needs in each position (FederatedWorker.roles)
POSITION_NEEDS: Dict[str, Tuple[str, ...]] = {
    "server": ("aggregator",), "client": ("trainer",),
    "cloud": ("aggregator",), "edge": ("aggregator",),
    "peer": ("trainer", "aggregator"),
}
#: what an algorithm that declares nothing gives each position (the star's FedAvg family)
DEFAULT_POSITION_ROLES: Dict[str, Tuple[str, ...]] = {"server": ("aggregator",), "client": ("trainer",)}


@dataclasses.dataclass
class Graph:
    """A directed graph over ``n`` workers as CSR arrays: ``in_neighbours(i)`` are the
    workers ``i`` receives from (an undirected graph lists each edge both ways)."""

    n: int
    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [edges], ascending within each row

    @classmethod
    def from_edges(cls, n: int, src: np.ndarray, dst: np.ndarray, undirected: bool = True) -> "Graph":
        """Edges ``src -> dst``; self-loops and duplicates dropped."""
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        if undirected:
            src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        keep = src != dst
        pairs = np.unique(np.stack([dst[keep], src[keep]], axis=1), axis=0) if keep.any() \
            else np.zeros((0, 2), np.int64)
        counts = np.bincount(pairs[:, 0], minlength=n) if len(pairs) else np.zeros(n, np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(n, indptr, pairs[:, 1].astype(np.int64).copy())

    def in_neighbours(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i]:self.indptr[i + 1]]

    def in_degrees(self) -> np.ndarray:
        return np.diff(self.indptr)

    def out_lists(self) -> "Graph":
        """The reversed graph: row ``i`` lists the workers ``i`` sends to."""
        dst = np.repeat(np.arange(self.n, dtype=np.int64), self.in_degrees())
        return Graph.from_edges(self.n, dst, self.indices, undirected=False)

    @property
    def num_edges(self) -> int:
        return len(self.indices)

    def components(self) -> int:
        """Weakly connected components (scipy's, on the CSR arrays as they are)."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import connected_components

        matrix = csr_matrix((np.ones(self.num_edges), self.indices, self.indptr), shape=(self.n, self.n))
        return int(connected_components(matrix, directed=True, connection="weak", return_labels=False))

    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes)


class Topology:
    """A built topology: positions, neighbours, and the checks a run needs."""

    name = "topology"
    #: positions of this topology (keys of POSITION_NEEDS)
    positions: Tuple[str, ...] = ()

    def build(self, num_workers: int) -> None:
        """Lay out ``num_workers`` trainers (raises ``ConfigError`` on bad input)."""

    def describe(self) -> str:
        return f"topology {self.name}"

    def runtime(self, sim: Any) -> Any:
        """The runtime that drives a round over this topology (None: the star's own loop)."""
        return None

    def check_workers(self, runner: Any, runtime: Any) -> None:
        """Build every worker once against a dry ``runtime``, as a check (a bad server
        optimizer, a missing role), before anything is written."""

    def check_algorithm(self, algorithm: type, algo_name: str) -> None:
        """Every position must be one the algorithm's workers can play, with the roles it
        needs (``position_roles`` on the FederatedWorker class)."""
        offered: Mapping[str, Sequence[str]] = getattr(algorithm, "position_roles", DEFAULT_POSITION_ROLES)
        for position in self.positions:
            needs = POSITION_NEEDS[position]
            if position not in offered:
                have = ", ".join(f"{p} {list(r)}" for p, r in offered.items())
                raise ConfigError(
                    f"fl.topology {self.name!r} needs {position} workers with roles {list(needs)}, but fl.fl_algo "
                    f"{algo_name!r} has no {position} position (its workers: {have}); "
                    f"use {suggest(self.name)}")
            missing = [r for r in needs if r not in offered[position]]
            if missing:
                raise ConfigError(
                    f"fl.topology {self.name!r}: a {position} worker needs the role(s) {missing}, but fl.fl_algo "
                    f"{algo_name!r} gives its {position} workers only {list(offered[position])}")


def suggest(topology: str) -> str:
    return {"star": "an algorithm of the star (fed_avg, ...)", "hierarchical": "fl_algo {name: hier_favg}",
            "graph": "fl_algo {name: gossip} or {name: dpsgd}"}.get(topology, "another fl_algo")


def make_worker(runner: Any, **kwargs: Any) -> Any:
    """One worker of ``fl.fl_algo`` at a position; the algorithm's own check of its
    config keys (a bad server optimizer) becomes a one-line config error."""
    try:
        return runner.algorithm(**kwargs, **runner.algorithm_kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"fl.fl_algo {runner.fl.fl_algo.get('name')!r}: {err}") from None


def check_worker_roles(worker: Any, position: str, where: str) -> None:
    """A built worker must hold every role its position needs (a user subclass may drop
    one): a clear error before round 1 instead of a failure inside a round."""
    missing = [r for r in POSITION_NEEDS[position] if r not in worker.roles]
    if missing:
        raise ConfigError(f"worker {worker.worker_index} ({where}) lacks the role(s) {missing} that a {position} "
                          f"needs; it has {list(worker.roles)}")


@registry.load("topology", "star")
class StarTopology(Topology):
    """One aggregator over every trainer."""

    name = "star"
    positions = ("server", "client")


@registry.load("topology", "hierarchical")
class HierarchicalTopology(Topology):
    """Client -> edge -> cloud (two levels of aggregation).

    ``num_edges`` edges, or ``clients_per_edge`` (the fan-out), or an ``assignment_file``
    (one ``client,edge`` pair per line, ``#`` comments; edges numbered 0..E-1).
    """

    name = "hierarchical"
    positions = ("cloud", "edge", "client")

    def __init__(self, num_edges: Optional[PositiveInt] = None, clients_per_edge: Optional[PositiveInt] = None,
                 edge_rounds: PositiveInt = 1, assign: Literal["contiguous", "round_robin", "random"] = "contiguous",
                 assignment_file: Optional[str] = None, seed: Seed = 0) -> None:
        if clients_per_edge is not None and (num_edges is not None or assignment_file is not None):
            raise ConfigError("fl.topology: give clients_per_edge, or num_edges and/or assignment_file, not both")
        self.num_edges, self.clients_per_edge, self.edge_rounds = num_edges, clients_per_edge, int(edge_rounds)
        self.assign, self.assignment_file, self.seed = assign, assignment_file, int(seed)

    def build(self, num_workers: int) -> None:
        if self.assignment_file is not None:
            edge_of = read_assignment(self.assignment_file, num_workers, self.num_edges)
        else:
            edges = self.num_edges or (-(-num_workers // self.clients_per_edge) if self.clients_per_edge else 1)
            if edges > num_workers:
                raise ConfigError(f"fl.topology.num_edges is {edges}, more than fl.num_workers ({num_workers}): "
                                  "every edge needs a client")
            edge_of = assign_edges(num_workers, edges, self.assign, self.seed)
        self.edge_of = edge_of
        self.num_workers = num_workers
        # num_edges given with a file: edges the file never names are empty (an error below)
        self.edges = max(int(edge_of.max()) + 1, self.num_edges or 0)
        empty = np.flatnonzero(np.bincount(edge_of, minlength=self.edges) == 0)
        if len(empty):
            where = f"fl.topology.assignment_file {self.assignment_file}" if self.assignment_file else "fl.topology"
            raise ConfigError(f"{where}: edge(s) {empty[:5].tolist()} have no client (edges are numbered "
                              f"0..{self.edges - 1} without gaps)")
        # clients of each edge, ascending (CSR)
        order = np.argsort(edge_of, kind="stable")
        self.members_indptr = np.concatenate([[0], np.cumsum(np.bincount(edge_of, minlength=self.edges))])
        self.members = order.astype(np.int64)

    def runtime(self, sim: Any) -> Any:
        from fedrec.federated.hierarchical import HierarchicalRuntime

        return HierarchicalRuntime(sim, self)

    def check_workers(self, runner: Any, runtime: Any) -> None:
        from fedrec.federated.hierarchical import build_workers

        build_workers(runner, self, runtime=runtime)

    def clients_of(self, edge: int) -> np.ndarray:
        return self.members[self.members_indptr[edge]:self.members_indptr[edge + 1]]

    def edge_id(self, edge: int) -> int:
        return self.num_workers + edge

    @property
    def cloud_id(self) -> int:
        return self.num_workers + self.edges

    def describe(self) -> str:
        sizes = np.diff(self.members_indptr)
        return (f"topology hierarchical: {self.edges} edge aggregator(s) of {int(sizes.min())}-{int(sizes.max())} "
                f"clients, {self.edge_rounds} edge round(s) per cloud round")


def assign_edges(num_workers: int, edges: int, how: str, seed: int) -> np.ndarray:
    ids = np.arange(num_workers, dtype=np.int64)
    if how == "contiguous":
        return (ids * edges // num_workers).astype(np.int64)
    if how == "round_robin":
        return ids % edges
    perm = np.random.default_rng(seed).permutation(num_workers)
    out = np.empty(num_workers, np.int64)
    out[perm] = ids * edges // num_workers
    return out


def _data_lines(path: Path, key: str):
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}: {path} is not a UTF-8 text file (byte {err.start}); expected lines of "
                          "integers") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            yield number, line


def _int_fields(path: Path, number: int, line: str, count: int, what: str) -> List[int]:
    parts = [p for p in line.replace(",", " ").split() if p]
    try:
        if len(parts) != count:
            raise ValueError
        return [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{path}:{number}: expected {what}, got {line!r}") from None


def read_assignment(path_text: str, num_workers: int, num_edges: Optional[int]) -> np.ndarray:
    """``client,edge`` lines: every client in 0..num_workers-1 exactly once."""
    path = Path(path_text)
    edge_of = np.full(num_workers, -1, np.int64)
    seen_line: Dict[int, int] = {}
    for number, line in _data_lines(path, "fl.topology.assignment_file"):
        client, edge = _int_fields(path, number, line, 2, "'client,edge' (two integers)")
        if not 0 <= client < num_workers:
            raise ConfigError(f"{path}:{number}: unknown worker {client}: clients are 0..{num_workers - 1} "
                              f"(fl.num_workers {num_workers})")
        if edge < 0 or (num_edges is not None and edge >= num_edges):
            top = "" if num_edges is None else f"0..{num_edges - 1} (fl.topology.num_edges {num_edges})"
            raise ConfigError(f"{path}:{number}: unknown edge aggregator {edge}: edges are numbered {top or 'from 0'}")
        if client in seen_line:
            raise ConfigError(f"{path}:{number}: client {client} is already assigned on line {seen_line[client]}")
        seen_line[client] = number
        edge_of[client] = edge
    missing = np.flatnonzero(edge_of < 0)
    if len(missing):
        raise ConfigError(f"{path}: {len(missing)} client(s) have no edge, e.g. {missing[:5].tolist()}; "
                          f"assign every worker 0..{num_workers - 1}")
    return edge_of


@registry.load("topology", "graph")
class GraphTopology(Topology):
    """Peers on a graph: ``kind`` ring | torus | k_regular | erdos_renyi | file."""

    name = "graph"
    positions = ("peer",)

    def __init__(self, kind: Literal["ring", "torus", "k_regular", "erdos_renyi", "file"] = "ring",
                 degree: Optional[PositiveInt] = None,
                 p: Optional[Annotated[float, pydantic.Field(gt=0, le=1)]] = None,
                 edge_list_file: Optional[str] = None, directed: bool = False, seed: Seed = 0,
                 placement: Literal["auto", "spectral", "rcm", "identity"] = "auto") -> None:
        if (kind == "file") != (edge_list_file is not None):
            raise ConfigError("fl.topology: kind: file needs edge_list_file, and edge_list_file needs kind: file")
        for key, value, needs in (("degree", degree, "k_regular"), ("p", p, "erdos_renyi")):
            if value is not None and kind != needs:  # a key that would be ignored
                raise ConfigError(f"fl.topology.{key} applies to kind: {needs} only, not kind: {kind}")
        # degree: k_regular (default 4); p: erdos_renyi (default 2 ln n / n)
        self.kind, self.degree, self.p = kind, 4 if degree is None else int(degree), p
        self.edge_list_file, self.directed, self.seed = edge_list_file, bool(directed), int(seed)
        # the peers' order over MPI processes (fedrec.federated.placement): auto is the id
        # order for ring and torus, recursive spectral bisection otherwise; rcm: reverse
        # Cuthill-McKee; identity: the id order
        self.placement = placement

    def build(self, num_workers: int) -> None:
        self.graph = make_graph(self, num_workers)
        self.num_workers = num_workers
        self.num_components = self.graph.components()
        if self.num_components > 1:
            log.warning(f"fl.topology graph ({self.kind}) is disconnected: {self.num_components} components; "
                        "gossip averages within each component only, so the workers' models cannot reach consensus")

    def runtime(self, sim: Any) -> Any:
        from fedrec.federated.gossip import GossipNetwork

        return GossipNetwork(sim, self)

    def check_workers(self, runner: Any, runtime: Any) -> None:
        from fedrec.federated.gossip import build_peers

        build_peers(runner, self, runtime=runtime)

    def describe(self) -> str:
        degrees = self.graph.in_degrees()
        return (f"topology graph ({self.kind}): {self.num_workers:,} peers, {self.graph.num_edges:,} directed links, "
                f"degree {int(degrees.min())}-{int(degrees.max())}, {self.num_components} component(s)")


def make_graph(spec: GraphTopology, n: int) -> Graph:
    rng = np.random.default_rng(spec.seed)
    ids = np.arange(n, dtype=np.int64)
    if spec.kind == "ring":
        return Graph.from_edges(n, ids, (ids + 1) % n)
    if spec.kind == "torus":
        rows = int(np.floor(np.sqrt(n)))
        while n % rows:
            rows -= 1
        cols = n // rows
        r, c = ids // cols, ids % cols
        right = r * cols + (c + 1) % cols
        down = ((r + 1) % rows) * cols + c
        return Graph.from_edges(n, np.concatenate([ids, ids]), np.concatenate([right, down]))
    if spec.kind == "k_regular":
        return random_regular(n, spec.degree, rng)
    if spec.kind == "erdos_renyi":
        p = spec.p if spec.p is not None else min(1.0, 2 * np.log(max(n, 2)) / n)
        src, dst = [], []
        for i in range(n - 1):  # one row of the upper triangle at a time: memory ~ edges
            hits = np.flatnonzero(rng.random(n - i - 1) < p) + i + 1
            src.append(np.full(len(hits), i, np.int64))
            dst.append(hits)
        cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return Graph.from_edges(n, cat(src), cat(dst))
    return read_edge_list(Path(spec.edge_list_file or ""), n, spec.directed)


def random_regular(n: int, degree: int, rng: np.random.Generator) -> Graph:
    """A random ``degree``-regular simple graph: a circulant one (each worker linked to
    its ``degree // 2`` nearest on either side, plus the opposite one for odd degrees),
    then ``10 x edges`` random degree-preserving double-edge swaps (a Markov chain that
    keeps the graph simple)."""
    if degree >= n or (n * degree) % 2:
        raise ConfigError(f"fl.topology: no {degree}-regular graph on {n} workers "
                          f"(needs degree < num_workers and degree * num_workers even)")
    ids = np.arange(n, dtype=np.int64)
    src = [ids] * (degree // 2)
    dst = [(ids + k) % n for k in range(1, degree // 2 + 1)]
    if degree % 2:
        src.append(ids[: n // 2])
        dst.append(ids[: n // 2] + n // 2)
    a, b = np.concatenate(src), np.concatenate(dst)
    edges = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    present = set((edges[:, 0] * n + edges[:, 1]).tolist())
    count = len(edges)
    picks = rng.integers(0, count, size=(10 * count, 2))
    flips = rng.random(10 * count) < 0.5
    for (e, f), flip in zip(picks.tolist(), flips.tolist()):
        if e == f:
            continue
        (p, q), (r, t) = edges[e].tolist(), edges[f].tolist()
        if flip:
            r, t = t, r
        if p == t or r == q:  # the new pairs (p, t), (r, q) would be self-loops
            continue
        new1, new2 = min(p, t) * n + max(p, t), min(r, q) * n + max(r, q)
        if new1 in present or new2 in present or new1 == new2:
            continue
        present.difference_update((p * n + q, min(r, t) * n + max(r, t)))
        present.update((new1, new2))
        edges[e] = (min(p, t), max(p, t))
        edges[f] = (min(r, q), max(r, q))
    return Graph.from_edges(n, edges[:, 0], edges[:, 1])


def read_edge_list(path: Path, n: int, directed: bool) -> Graph:
    src, dst = [], []
    for number, line in _data_lines(path, "fl.topology.edge_list_file"):
        a, b = _int_fields(path, number, line, 2, "an edge 'a b' (two worker ids)")
        for worker in (a, b):
            if not 0 <= worker < n:
                raise ConfigError(f"{path}:{number}: unknown worker {worker}: workers are 0..{n - 1} "
                                  f"(fl.num_workers {n})")
        src.append(a)
        dst.append(b)
    if not src:
        raise ConfigError(f"{path}: no edges")
    # a directed line 'a b': a sends to b, so a is one of b's in-neighbours
    return Graph.from_edges(n, np.asarray(src), np.asarray(dst), undirected=not directed)


def build_topology(fl: Any) -> Topology:
    """``fl.topology`` from the registry, laid out over ``fl.num_workers``; unknown names
    list the known ones, bad keys and files are one-line errors."""
    spec = dict(fl.topology)
    cls = registry.lookup("topology", spec)
    topology = registry.instantiate(cls, spec, kind="fl.topology")
    topology.build(fl.num_workers)
    return topology


def check_run_features(fl: Any, topology: Topology, private_names: Sequence[str]) -> None:
    """Beyond the star, what the round loop does not (yet) combine with other topologies."""
    if topology.name == "star":
        return
    features = [(fl.devices is not None, "fl.devices (the virtual clock)"), (fl.async_ is not None, "fl.async"),
                (bool(fl.postprocessors), "fl.postprocessors"), (bool(private_names), "private user embeddings")]
    for present, what in features:
        if present:
            raise ConfigError(f"fl.topology {topology.name!r} does not support {what} yet; use topology star")


def star_link_metrics(stats: Sequence[Any]) -> Dict[str, int]:
    """A star's links: each client's to the server. The busiest node is the server."""
    per_client = [s.bytes_down + s.bytes_up for s in stats]
    return {"bytes_max_link": max(per_client, default=0), "bytes_max_node": sum(per_client)}
