"""Backends say how client work is scheduled: in this process, or on MPI worker ranks.

Algorithms never import MPI and backends never know FedAvg: a backend takes a round's
blocks of client ids and the global weights, and returns ``JobResult``s from
``ClientRunner.run_job``. The blocks are fixed by the cohort alone, so the sums are the
same whether one process runs them all or several share them.
"""

from __future__ import annotations

import abc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedrec.federated.client_runner import ClientRunner, JobResult, RoundJob

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
    def run_round(self, round_idx: int, blocks: List[Block], global_state: Dict[str, Any],
                  client_states: Dict[int, Dict[str, Any]]) -> List[JobResult]:
        """Run every client in ``blocks``; results in any order (callers sort by block)."""

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Everything in this process, on its one model replica (the default)."""

    name = "local"

    def __init__(self, runner: ClientRunner) -> None:
        self.runner = runner

    def run_round(self, round_idx, blocks, global_state, client_states):
        job = RoundJob(round_idx, list(blocks), global_state,
                       {c: client_states[c] for _, ids in blocks for c in ids if c in client_states})
        return [self.runner.run_job(job)]


def launched_under_mpi_futures() -> bool:
    """True inside ``mpiexec -n K python -m mpi4py.futures script.py`` with K > 1.

    ``python -m mpi4py.futures`` imports the package before it runs the script, and
    MPI then reports more than one process in the world.
    """
    if "mpi4py.futures" not in sys.modules:
        return False
    try:
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_size() > 1
    except Exception:
        return False


def make_backend(name: str, runner: ClientRunner, config: Dict[str, Any], logdir: Path,
                 processes: Optional[int] = None) -> Backend:
    if name == "auto":
        name = "mpi" if launched_under_mpi_futures() else "local"
    if name == "local":
        return LocalBackend(runner)
    if name == "mpi":
        from fedrec.federated.mpi_backend import MPIBackend

        return MPIBackend(config, logdir, runner.partition.sizes, processes=processes)
    raise ValueError(f"unknown fl.backend {name!r}; known: local, mpi, auto")
