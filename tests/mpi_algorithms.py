"""FedAvg variants that fail on purpose, for tests/test_mpi.py.

A config names this module in ``fl.imports: [tests.mpi_algorithms]`` so that every MPI
MPI process imports it (and registers the algorithms) before it looks one up. Both
do FedAvg's maths unchanged when they do not fail.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.utilities import registry


@registry.load("fl_algo", "test_raise_in_client")
class RaiseInClient(FedAvgWorker):
    """Raises in trainer ``fail_client`` during round ``fail_round`` (0-based)."""

    def __init__(self, *args: Any, fail_client: int = 0, fail_round: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_client, self.fail_round = fail_client, fail_round

    async def run(self) -> None:
        if self.role == "trainer" and (self.worker_index, self.round_idx) == (self.fail_client, self.fail_round):
            raise RuntimeError("disk full")
        await super().run()


@registry.load("fl_algo", "test_kill_in_round")
class KillInRound(FedAvgWorker):
    """The first trainer to run in round ``kill_round`` (0-based) kills its own process (``kill -9``),
    once: it first creates ``once_file`` holding its client id, and does nothing if the
    file exists, so that a resumed run goes through."""

    def __init__(self, *args: Any, kill_round: int = 1, once_file: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round, self.once_file = kill_round, once_file

    async def run(self) -> None:
        if self.role == "trainer" and self.round_idx == self.kill_round and self.once_file:
            try:
                fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(self.worker_index).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        await super().run()
