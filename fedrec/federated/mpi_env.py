"""How this process was started: by an MPI launcher, under ``mpi4py.futures`` or not."""

from __future__ import annotations

import os
import sys


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
