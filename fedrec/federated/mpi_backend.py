"""The ``mpi`` backend: client work on MPI worker processes through ``mpi4py.futures``.

Launch with ``mpiexec -n K python -m mpi4py.futures train_fl.py ...`` (rank 0 runs the
simulation, ranks 1..K-1 serve it), or set ``fl.backend: mpi`` in a plain run to spawn
workers. Each worker process builds its own model replica and opens the memory-mapped
data once (pool initializer); a round sends each process the global weights once and its
blocks of clients, and each process replies once with its blocks' summed updates.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from fedrec.federated.backends import Backend, Block, assign_blocks
from fedrec.federated.client_runner import ClientRunner, JobResult, RoundJob

log = logging.getLogger("fedrec")

INSTALL_HINT = "pip install 'fedrec[mpi]'  (mpi4py and the mpich wheel from PyPI)"

_RUNNER: Optional[ClientRunner] = None


class WorkerProcessError(RuntimeError):
    """A client failed on an MPI worker process; names the rank, round and client."""


def _rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def _init_worker(config: Dict[str, Any], logdir: str, config_path: Optional[str]) -> None:
    """Pool initializer: one replica, the data and the partition, once per process."""
    global _RUNNER
    import torch

    from fedrec.federated.simulation import build_client_runner

    torch.set_num_threads(int(os.environ.get("FEDREC_CLIENT_THREADS", "1")))
    _RUNNER = build_client_runner(config, Path(logdir), config_path=config_path)


def _progress_path(logdir: str, rank: int) -> Path:
    return Path(logdir) / "mpi" / f"rank-{rank}.json"


def _run_job(job: RoundJob, logdir: str) -> JobResult:
    """Runs on a worker process. Records what it is doing, so a crash can be named."""
    rank = _rank()
    marker = _progress_path(logdir, rank)
    marker.parent.mkdir(parents=True, exist_ok=True)
    clients = [c for _, ids in job.blocks for c in ids]
    marker.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "round": job.round_idx, "clients": clients}))
    if _RUNNER is None:
        raise WorkerProcessError(f"rank {rank}: worker process was not initialised")
    try:
        result = _RUNNER.run_job(job)
    except Exception as err:  # re-raised on rank 0 with the rank in the message
        raise WorkerProcessError(f"rank {rank}: {err}") from None
    marker.unlink(missing_ok=True)
    return result


def report_crashed_workers(logdir: Path) -> List[str]:
    """Messages for worker processes that died mid-round in an earlier run (and clear them)."""
    messages = []
    for path in sorted((logdir / "mpi").glob("rank-*.json")):
        try:
            info = json.loads(path.read_text())
            messages.append(
                f"an earlier run's MPI rank {info['rank']} (pid {info['pid']}) stopped during round "
                f"{info['round']} while running clients {info['clients'][:10]}"
                f"{' ...' if len(info['clients']) > 10 else ''}"
            )
        except (OSError, ValueError, KeyError):
            pass
        path.unlink(missing_ok=True)
    return messages


class MPIBackend(Backend):
    name = "mpi"

    def __init__(self, config: Dict[str, Any], logdir: Path, client_sizes: np.ndarray,
                 processes: Optional[int] = None, config_path: Optional[str] = None) -> None:
        try:
            from mpi4py.futures import MPIPoolExecutor
        except ImportError as err:
            raise RuntimeError(f"fl.backend 'mpi' needs mpi4py: {INSTALL_HINT} ({err})") from None
        self.logdir = Path(logdir)
        self.sizes = np.asarray(client_sizes)
        for message in report_crashed_workers(self.logdir):
            log.warning(message)
        self.executor = MPIPoolExecutor(
            max_workers=processes,
            initializer=_init_worker,
            initargs=(config, str(self.logdir), config_path),
        )
        self.processes = self._count_workers(processes)
        log.info("mpi backend: %d worker processes", self.processes)

    def _count_workers(self, requested: Optional[int]) -> int:
        num = getattr(self.executor, "num_workers", None)
        if num is None:  # older mpi4py
            from mpi4py import MPI

            num = max(MPI.COMM_WORLD.Get_size() - 1, 1)
        num = int(num)
        return min(num, requested) if requested else num

    def run_round(self, round_idx: int, blocks: List[Block], global_state: Dict[str, Any],
                  client_states: Dict[int, Dict[str, Any]]) -> List[JobResult]:
        groups = [g for g in assign_blocks(blocks, self.sizes, self.processes) if g]
        futures = []
        for group in groups:
            states = {c: client_states[c] for _, ids in group for c in ids if c in client_states}
            futures.append(self.executor.submit(_run_job, RoundJob(round_idx, group, global_state, states),
                                                str(self.logdir)))
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as err:
                errors.append(err)
        if errors:
            raise WorkerProcessError(f"round {round_idx}: " + "; ".join(str(e) for e in errors)) from errors[0]
        return results

    def close(self) -> None:
        self.executor.shutdown(wait=True)
