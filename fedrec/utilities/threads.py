"""Torch's thread count, set for a block of work and restored after it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` torch threads, then restore the previous count.

    Client training runs at ``fl.client_threads`` wherever it runs (the local backend,
    MPI processes, a plan runner): a matmul's float sums may depend on how many threads
    split it, so the same count gives the same bits everywhere.
    """
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
