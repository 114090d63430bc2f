"""Choosing a run's backend: local, MPI under ``mpi4py.futures``, or spawned MPI processes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from fedrec.federated.backends import Backend, LocalBackend
from fedrec.federated.client_runner import ClientRunner
from fedrec.federated.mpi_env import launched_under_mpi_futures, launcher_world_size

log = logging.getLogger("fedrec")


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
    from fedrec.federated.mpi_backend import MPIBackend, report_crashed_processes

    if name == "local":
        for message in report_crashed_processes(Path(logdir)):  # an earlier MPI run's
            log.warning(message)
        return LocalBackend(runner, threads=runner.fl.client_threads)
    # Sparse mode (and the dense fast path): each process downloads the MLPs and only its
    # clients' embedding rows.
    rows_for = runner.rows_of_clients if runner.row_updates else None
    return MPIBackend(config, logdir, runner.partition.sizes, processes=processes, config_path=config_path,
                      rows_for=rows_for)
