"""Where a graph's peers run under MPI: neighbours in the same process.

A decentralized round sends every peer's model to its neighbours. Peers in the same MPI
process read each other's models from that process's stores; a model crosses a process
boundary only for an edge between two processes. So the peers are placed to cut few edges:

1. an **order** of the peers that puts neighbours close together, fixed by the graph alone
   (never by the number of processes): ring and torus ids are already laid out that way
   (a ring's contiguous ids are a path; a torus's are rows); any other graph is ordered by
   recursive spectral bisection: the peers sorted by an approximate Fiedler vector of the
   graph's Laplacian (the smoothest non-constant function on the graph) and split in
   halves, each half ordered the same way, six levels deep. Any contiguous run of the
   order is then a set of well-connected peers, for any number of processes. On a random
   4-regular graph of 10,000 peers it cuts 17% of the links between 2 processes and 30%
   between 4, where id blocks cut 50% and 75% (reverse Cuthill-McKee, ``placement: rcm``,
   cuts 30% and 62%: it keeps neighbours close in the order, but a random graph's
   neighbourhoods grow too fast for a narrow band). The vector comes from 200 power
   iterations in plain numpy (a sparse product, sums; no BLAS, whose threads may change the
   last bits): 0.2 s for 10,000 peers. A min-cut partitioner (METIS) would cut a little
   less but depends on the number of processes, and is not a dependency here;
2. the order cut into ``fl.reduce_blocks`` contiguous **blocks**: the fixed reduction blocks.
   The peers' mean and the consensus distance are summed per block and then over blocks
   in block order, so they are the same bits for any number of processes;
3. each process takes a contiguous run of blocks, balanced by peer count (within one block).

The order is computed once, on rank 0, and kept in the run folder (``peer_order.npz``):
every MPI process reads the same order, and a resumed run keeps it. ``placement: identity``
keeps the id order (the naive placement of id blocks), for comparison; :func:`cut_fraction`
and :func:`interprocess_models` measure any assignment, including a round-robin one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import numpy as np

from fedrec.federated.topology import Graph

PlacementName = Literal["auto", "spectral", "rcm", "identity"]
#: levels of bisection and power iterations per level of the spectral order
SPECTRAL_LEVELS = 6
SPECTRAL_ITERATIONS = 200


def peer_order(graph: Graph, kind: str, how: PlacementName = "auto") -> np.ndarray:
    """Peers in an order that keeps neighbours close (position -> peer id)."""
    if how == "identity" or (how == "auto" and kind in ("ring", "torus")):
        return np.arange(graph.n, dtype=np.int64)
    adjacency = _symmetric_adjacency(graph)
    if how == "rcm":
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        return np.asarray(reverse_cuthill_mckee(adjacency, symmetric_mode=True), dtype=np.int64)
    return _bisect(adjacency, np.arange(graph.n, dtype=np.int64), SPECTRAL_LEVELS)


ORDER_FILE = "peer_order.npz"


def graph_digest(graph: Graph, how: str) -> str:
    """What an order was computed from: the graph's links and the placement setting."""
    digest = hashlib.sha256(how.encode())
    digest.update(np.ascontiguousarray(graph.indptr, np.int64).tobytes())
    digest.update(np.ascontiguousarray(graph.indices, np.int64).tobytes())
    return digest.hexdigest()


def stored_order(logdir: Path, graph: Graph, kind: str, how: PlacementName) -> np.ndarray:
    """The run's order: the one in ``logdir`` if it was computed from this graph and
    setting (a resumed run, another process), else computed now and written there."""
    path = Path(logdir) / ORDER_FILE
    digest = graph_digest(graph, how)
    order = read_order(path, digest)
    if order is None:
        order = peer_order(graph, kind, how)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as handle:
            np.savez(handle, order=order, digest=np.array(digest))
        os.replace(tmp, path)
    return order


def read_order(path: Path, digest: str) -> Optional[np.ndarray]:
    """The order stored at ``path`` for ``digest``, or None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["digest"]) != digest:
                return None
            return np.asarray(data["order"], np.int64)
    except (OSError, KeyError, ValueError):
        return None


def _symmetric_adjacency(graph: Graph) -> Any:
    """The graph's links in both directions (a cut link costs a message whichever way it
    points), as a float64 CSR matrix of ones."""
    from scipy.sparse import csr_matrix

    matrix = csr_matrix((np.ones(graph.num_edges), graph.indices, graph.indptr), shape=(graph.n, graph.n))
    return ((matrix + matrix.T) > 0).astype(np.float64).tocsr()


def _bisect(adjacency: Any, peers: np.ndarray, levels: int) -> np.ndarray:
    """``peers`` sorted by the Fiedler vector of their subgraph, each half in turn (ties by id)."""
    if levels == 0 or len(peers) < 4:
        return peers
    ordered = peers[np.lexsort((peers, _fiedler(adjacency[peers][:, peers].tocsr(), peers)))]
    half = len(ordered) // 2
    return np.concatenate([_bisect(adjacency, ordered[:half], levels - 1),
                           _bisect(adjacency, ordered[half:], levels - 1)])


def _fiedler(sub: Any, ids: np.ndarray) -> np.ndarray:
    """An approximate Fiedler vector: power iterations on ``c I - L``, orthogonal to the
    constant vector, from a fixed start (deterministic numpy: pairwise sums, no BLAS)."""
    count = len(ids)
    degree = np.asarray(sub.sum(axis=1)).ravel()
    shift = 2 * float(degree.max(initial=0.0)) + 1
    x = np.cos(np.arange(count) * 4.3262379212) + np.sin(ids * 0.37)
    x -= x.sum() / count
    for _ in range(SPECTRAL_ITERATIONS):
        y = (shift - degree) * x + sub @ x
        y -= y.sum() / count
        norm = np.sqrt(np.sum(y * y))
        if norm == 0:
            break
        x = y / norm
    return x


@dataclasses.dataclass
class Placement:
    """The peers' order, blocks and processes (``parts``)."""

    order: np.ndarray  # position -> peer id
    block_starts: np.ndarray  # int64 [blocks + 1]: block b is order[starts[b]:starts[b + 1]]
    part_blocks: np.ndarray  # int64 [parts + 1]: part k holds blocks part_blocks[k]:part_blocks[k + 1]
    part_of: np.ndarray  # int64 [n]: peer id -> part
    block_index: np.ndarray  # int64 [n]: peer id -> block

    def block_of(self, peer: int) -> int:
        return int(self.block_index[peer])

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1

    @property
    def num_parts(self) -> int:
        return len(self.part_blocks) - 1

    def blocks_of(self, part: int) -> range:
        return range(int(self.part_blocks[part]), int(self.part_blocks[part + 1]))

    def peers_of_block(self, block: int) -> np.ndarray:
        return self.order[self.block_starts[block]:self.block_starts[block + 1]]

    def peers_of(self, part: int) -> np.ndarray:
        """The part's peers, in placement order (its blocks one after another)."""
        blocks = self.blocks_of(part)
        if not len(blocks):
            return np.zeros(0, np.int64)
        return self.order[self.block_starts[blocks.start]:self.block_starts[blocks.stop]]


def place(order: np.ndarray, num_blocks: int, parts: int) -> Placement:
    """``order`` cut into ``num_blocks`` contiguous blocks (sizes differ by at most one),
    and the blocks into ``parts`` contiguous runs balanced by peer count. A part may be
    empty when there are more parts than blocks."""
    n = len(order)
    count = max(1, min(int(num_blocks), n))
    sizes = np.full(count, n // count, np.int64)
    sizes[: n % count] += 1
    block_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # part k starts at the block boundary nearest to k * n / parts (monotone, first and last fixed)
    targets = np.arange(parts + 1, dtype=np.float64) * n / parts
    part_blocks = np.abs(block_starts[None, :] - targets[:, None]).argmin(axis=1).astype(np.int64)
    part_blocks[0], part_blocks[-1] = 0, count
    part_blocks = np.maximum.accumulate(part_blocks)
    part_of = np.empty(n, np.int64)
    for k in range(parts):
        part_of[order[block_starts[part_blocks[k]]:block_starts[part_blocks[k + 1]]]] = k
    block_index = np.empty(n, np.int64)
    block_index[order] = np.repeat(np.arange(count, dtype=np.int64), sizes)
    return Placement(order.astype(np.int64), block_starts, part_blocks, part_of, block_index)


def directed_links(graph: Graph) -> tuple:
    """(receiver, sender) of every link ``sender -> receiver``."""
    receiver = np.repeat(np.arange(graph.n, dtype=np.int64), graph.in_degrees())
    return receiver, graph.indices


def cut_fraction(graph: Graph, part_of: np.ndarray) -> float:
    """The fraction of the graph's links whose ends are in different processes."""
    receiver, sender = directed_links(graph)
    return float(np.mean(part_of[receiver] != part_of[sender])) if len(sender) else 0.0


def send_lists(graph: Graph, part_of: np.ndarray) -> Dict[tuple, np.ndarray]:
    """``(from part, to part) -> peers`` of the sender whose model the receiver's peers
    may ask for (their in-neighbours in the other part), ascending: the boundary."""
    receiver, sender = directed_links(graph)
    crossing = part_of[receiver] != part_of[sender]
    if not crossing.any():
        return {}
    pairs = np.unique(np.stack([part_of[sender[crossing]], part_of[receiver[crossing]],
                                sender[crossing]], axis=1), axis=0)
    out: Dict[tuple, List[int]] = {}
    for src, dst, peer in pairs.tolist():
        out.setdefault((src, dst), []).append(peer)
    return {key: np.asarray(peers, np.int64) for key, peers in out.items()}


def interprocess_models(graph: Graph, part_of: np.ndarray) -> int:
    """Models that cross a process boundary per round: one per boundary peer and other
    process that holds one of its out-neighbours (what the exchange sends)."""
    return int(sum(len(peers) for peers in send_lists(graph, part_of).values()))


def round_robin(n: int, parts: int) -> np.ndarray:
    """Peer ``i`` on process ``i % parts``: the naive placement that ignores the graph."""
    return np.arange(n, dtype=np.int64) % parts
