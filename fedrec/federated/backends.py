"""Backends say how client work is scheduled: in this process, or on MPI worker ranks.

Algorithms never import MPI and backends never know FedAvg: a backend takes a round's
blocks of client ids and the global weights, and returns ``JobResult``s from
``ClientRunner.run_job``. The blocks are fixed by the cohort alone, so the sums are the
same whether one process runs them all or several share them.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

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


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` torch threads, then restore the previous count.

    Client training runs at ``fl.client_threads`` in every backend: a matmul's float
    sums may depend on how many threads split it, and the local backend must give the
    same bits as MPI worker processes (which run at that count all the time).
    """
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


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

    def __init__(self, runner: ClientRunner, threads: int = 1) -> None:
        self.runner = runner
        self.threads = threads

    def run_round(self, round_idx, blocks, global_state, client_states):
        job = RoundJob(round_idx, list(blocks), global_state,
                       {c: client_states[c] for _, ids in blocks for c in ids if c in client_states})
        with torch_threads(self.threads):
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


def launcher_world_size() -> int:
    """How many processes an MPI launcher (mpiexec/mpirun/srun) started, from its environment."""
    for var in ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def check_launch() -> None:
    """Refuse a plain ``mpiexec -n K python train_fl.py``: every rank would run its own
    copy of the whole simulation into the same logdir."""
    if launcher_world_size() > 1 and "mpi4py.futures" not in sys.modules:
        from fedrec.utilities.registry import RegistryError

        raise RegistryError(
            f"this process is one of {launcher_world_size()} started by an MPI launcher without "
            "mpi4py.futures; run `mpiexec -n K python -m mpi4py.futures train_fl.py ...` "
            "(rank 0 runs the simulation, the other ranks its clients)")


def make_backend(name: str, runner: ClientRunner, config: Dict[str, Any], logdir: Path,
                 processes: Optional[int] = None, config_path: Optional[str] = None) -> Backend:
    if name not in ("auto", "local", "mpi"):
        raise ValueError(f"unknown fl.backend {name!r}; known: local, mpi, auto")
    check_launch()
    if name == "auto":
        name = "mpi" if launched_under_mpi_futures() else "local"
    if name == "local":
        from fedrec.federated.mpi_backend import report_crashed_workers

        for message in report_crashed_workers(Path(logdir)):  # an earlier MPI run's
            log.warning(message)
        return LocalBackend(runner, threads=runner.fl.client_threads)
    from fedrec.federated.mpi_backend import MPIBackend

    # Sparse mode: each process downloads the MLPs and only its clients' embedding rows.
    rows_for = runner.rows_of_clients if runner.sparse_mode else None
    return MPIBackend(config, logdir, runner.partition.sizes, processes=processes, config_path=config_path,
                      rows_for=rows_for)
