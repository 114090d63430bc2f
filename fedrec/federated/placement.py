"""Where a graph's peers run under MPI: neighbours in the same process.

A decentralized round sends every peer's model to its neighbours. Peers in the same MPI
process read each other's models from that process's stores; a model crosses a process
boundary only for an edge between two processes. So the peers are placed to cut few edges:

1. an **order** of the peers that puts neighbours close together, fixed by the graph alone
   (never by the number of processes): ring and torus ids are already laid out that way
   (a ring's contiguous ids are a path; a torus's are rows); any other graph is ordered by
   reverse Cuthill-McKee (scipy), which lowers the adjacency matrix's bandwidth, i.e. the
   distance in the order between neighbours. It is deterministic, runs in time and memory
   linear in the edges (10,000 peers: milliseconds), and needs no tuning; a min-cut
   partitioner (METIS) cuts fewer edges of a random graph but depends on the number of
   processes and is not a dependency here.
2. the order cut into ``fl.reduce_blocks`` contiguous **blocks**: the fixed reduction blocks.
   The peers' mean and the consensus distance are summed per block and then over blocks
   in block order, so they are the same bits for any number of processes;
3. each process takes a contiguous run of blocks, balanced by peer count (within one block).

``placement: identity`` keeps the id order (the naive placement of id blocks), for
comparison; :func:`cut_fraction` and :func:`interprocess_models` measure any assignment,
including a round-robin one.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Literal

import numpy as np

from fedrec.federated.topology import Graph

PlacementName = Literal["auto", "rcm", "identity"]


def peer_order(graph: Graph, kind: str, how: PlacementName = "auto") -> np.ndarray:
    """Peers in an order that keeps neighbours close (position -> peer id)."""
    if how == "identity" or (how == "auto" and kind in ("ring", "torus")):
        return np.arange(graph.n, dtype=np.int64)
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    # symmetric pattern (a directed graph's peers exchange models in one direction, but
    # a cut edge costs a message whichever way it points)
    data = np.ones(graph.num_edges, dtype=np.int8)
    matrix = csr_matrix((data, graph.indices, graph.indptr), shape=(graph.n, graph.n))
    matrix = (matrix + matrix.T).tocsr()
    return np.asarray(reverse_cuthill_mckee(matrix, symmetric_mode=True), dtype=np.int64)


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
