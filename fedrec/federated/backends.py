"""Backends say how client work is scheduled: in this process, or on other MPI processes.

Algorithms never import MPI and backends never know FedAvg: a backend takes a round's
context, its blocks of client ids and the global weights, and returns ``JobResult``s
from ``ClientRunner.run_job``. The blocks are fixed by the cohort alone, so the sums are
the same whether one process runs them all or several share them. Choosing a backend
for a run is ``fedrec.federated.launch.make_backend``.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from fedrec.federated.client_runner import ClientRunner, JobResult, RoundJob
from fedrec.federated.context import RoundContext
from fedrec.utilities.threads import torch_threads  # noqa: F401  (also imported from here)

log = logging.getLogger("fedrec")

Block = Tuple[int, List[int]]


def make_blocks(client_ids: Sequence[int], num_blocks: int) -> List[Block]:
    """Cut the sorted cohort into ``num_blocks`` contiguous blocks (fixed reduction order)."""
    ids = sorted(int(c) for c in client_ids)
    count = max(1, min(num_blocks, len(ids)))
    return [(b, [int(c) for c in part]) for b, part in enumerate(np.array_split(np.asarray(ids, dtype=np.int64), count))]


def assign_blocks(blocks: Sequence[Block], sizes: np.ndarray, processes: int) -> List[List[Block]]:
    """Give blocks to processes so that their sample counts are balanced (greedy LPT)."""
    loads = np.zeros(processes, dtype=np.int64)
    out: List[List[Block]] = [[] for _ in range(processes)]
    weight = {b: int(sizes[ids].sum()) if ids else 0 for b, ids in blocks}
    for block in sorted(blocks, key=lambda blk: (-weight[blk[0]], blk[0])):
        target = int(np.argmin(loads))
        out[target].append(block)
        loads[target] += weight[block[0]]
    return [sorted(group) for group in out]


class Backend(abc.ABC):
    name = "backend"

    @abc.abstractmethod
    def run_round(self, context: RoundContext, blocks: List[Block], global_state: Dict[str, Any]
                  ) -> List[JobResult]:
        """Run every client in ``blocks``; results in any order (callers sort by block)."""

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Everything in this process, on its one model replica (the default)."""

    name = "local"

    def __init__(self, runner: ClientRunner, threads: int = 1) -> None:
        self.runner = runner
        self.threads = threads

    def run_round(self, context, blocks, global_state):
        job = RoundJob(context, list(blocks), global_state)
        with torch_threads(self.threads):
            return [self.runner.run_job(job)]
