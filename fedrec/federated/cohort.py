"""A block of clients' local training data laid out for training them all at once.

Each client visits its rows in exactly the order its sequential loader would (the same
``client_loader`` shuffles, epoch by epoch, cut at ``local_steps``), so the vectorized
engine sees the same batches as the sequential one. The block is laid out step-major with
clients ordered by how many steps they take, longest first: the clients still training
at step ``s`` are the first ``active[s]``, so a step works on contiguous prefixes, and
the batches are stored step after step for those clients only (a long client's late
steps cost no padding for the others). A batch narrower than the layout's
``batch_size`` (a last, partial one; every one where the engine pads to 32 samples) is
padded; its padding carries loss weight 0 and the real samples ``1/m``, which is the mean
loss of that smaller batch.

The categorical ids are turned into positions in one *block table*: the rows each client
reads, client by client and table by table (``(client, table, id)`` sorted), so the
clients' copies of a row are separate and the block's rows for the active clients are a
prefix too.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

_ID_BITS = 40  # ids below 2**40 (row counts far beyond any table here)


@dataclasses.dataclass
class Cohort:
    client_ids: List[int]  # in engine order: most steps first, then by id
    steps: np.ndarray  # int64 [K] steps each client takes
    active: List[int]  # [S] clients still training at each step (a prefix)
    # a batch per active client and step, step after step (no slots for finished clients):
    # step s's client k is batch step_start[s] + k
    step_start: np.ndarray  # int64 [S + 1]
    dense: Tensor  # float32 [N, B, D]
    positions: Tensor  # int64 [N, B, T] block-table row of each lookup (padding: the client's first row)
    label: Tensor  # float32 [N, B]
    weight: Tensor  # float32 [N, B] 1/m for the m real samples of a batch, else 0
    counts: Tensor  # float64 [S, K] real samples in each client's batch of each step (0: finished)
    row_ids: Tensor  # int64 [R] the table row each block-table row holds
    row_table: Tensor  # int64 [R] its table column
    segment: np.ndarray  # int64 [K, T + 1] block-table offsets: client k's table t rows
    #: the tables cut into groups for side-by-side work (set by the engine, see
    #: ``VectorizedEngine._table_groups``)
    table_groups: Optional[List[Tuple[int, int, Tensor, np.ndarray]]] = None

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def num_steps(self) -> int:
        return len(self.active)

    def batch(self, s: int, a: int, b: int) -> tuple:
        """(dense, positions, label, weight) of step ``s`` for active clients ``a..b-1``."""
        lo, hi = int(self.step_start[s]) + a, int(self.step_start[s]) + b
        return self.dense[lo:hi], self.positions[lo:hi], self.label[lo:hi], self.weight[lo:hi]

    def rows_of(self, k: int, t: int) -> slice:
        """Block-table rows of client ``k`` (engine order) in table ``t``."""
        return slice(int(self.segment[k, t]), int(self.segment[k, t + 1]))


def client_visits(loader: Any, fl: Any) -> List[np.ndarray]:
    """The row batches a client's sequential local training visits, in order.

    The same passes as ``train_locally``: ``local_epochs`` passes, or as many as
    ``local_steps`` batches need (a client without rows takes none)."""
    batches: List[np.ndarray] = []
    if loader.num_rows == 0:
        return batches
    size = loader.batch_size
    epochs = itertools.count() if fl.local_steps is not None else range(fl.local_epochs or 1)
    for epoch in epochs:
        loader.set_epoch(epoch)
        order = loader.order()
        order = np.arange(loader.num_rows) if order is None else np.asarray(order)
        for lo in range(0, loader.num_rows, size):
            if fl.local_steps is not None and len(batches) >= fl.local_steps:
                return batches
            batches.append(order[lo:lo + size])
    return batches


def build_cohort(split: Any, visits: Sequence[List[np.ndarray]], client_ids: Sequence[int], batch_size: int,
                 num_tables: int, device: torch.device) -> Cohort:
    """Lay out ``visits[k]`` (client ``client_ids[k]``'s batches) for the engine."""
    steps = np.array([len(v) for v in visits], dtype=np.int64)
    order = sorted(range(len(visits)), key=lambda k: (-steps[k], client_ids[k]))
    visits = [visits[k] for k in order]
    client_ids = [int(client_ids[k]) for k in order]
    steps = steps[order]
    num_clients, num_steps = len(visits), int(steps.max(initial=0))
    active = [int((steps > s).sum()) for s in range(num_steps)]
    step_start = np.concatenate([[0], np.cumsum(active, dtype=np.int64)]).astype(np.int64)
    rows = np.full((int(step_start[-1]), batch_size), -1, dtype=np.int64)
    for k, batches in enumerate(visits):
        for s, batch in enumerate(batches):
            rows[step_start[s] + k, :len(batch)] = batch
    step_of_batch = np.repeat(np.arange(num_steps), active)
    client_of_batch = np.arange(len(rows)) - step_start[step_of_batch]
    real = rows >= 0
    slots = np.flatnonzero(real.reshape(-1))  # [n] flat [batch, sample] of each real sample
    visited = rows.reshape(-1)[slots]  # the split's rows, as the clients visit them
    sparse_real = np.asarray(split.sparse[visited]).astype(np.int64)  # [n, T]
    dense = np.zeros((rows.size, int(split.dense.shape[1])), dtype=np.float32)
    dense[slots] = split.dense[visited]
    label = np.zeros(rows.size, dtype=np.float32)
    label[slots] = split.label[visited]
    batch_counts = real.sum(axis=1)
    weight = np.where(real, 1.0 / np.maximum(batch_counts, 1)[:, None], 0.0).astype(np.float32)
    counts = np.zeros((num_steps, num_clients), dtype=np.float64)
    counts[step_of_batch, client_of_batch] = batch_counts

    # block table: one copy of each (client, table, id) a client reads, sorted
    client_of = client_of_batch[slots // batch_size]
    keys = ((client_of[:, None] * num_tables + np.arange(num_tables)[None, :]) << _ID_BITS) | sparse_real
    block_keys, block_inverse = np.unique(keys, return_inverse=True)
    groups = np.arange(num_clients * num_tables + 1, dtype=np.int64) << _ID_BITS
    starts = np.searchsorted(block_keys, groups).astype(np.int64)  # start of each (client, table)
    segment = starts[np.arange(num_clients)[:, None] * num_tables + np.arange(num_tables + 1)[None, :]]
    # padding reads (with loss weight 0) the client's own first row: every lookup of a
    # client stays within its rows, whichever clients a step takes together
    client_of_slot = np.repeat(client_of_batch, batch_size)
    positions = np.repeat(segment[client_of_slot, 0][:, None], num_tables, axis=1) if rows.size else \
        np.zeros((0, num_tables), dtype=np.int64)
    positions[slots] = block_inverse.reshape(-1, num_tables)
    row_ids = block_keys & ((1 << _ID_BITS) - 1)
    row_table = (block_keys >> _ID_BITS) % max(num_tables, 1)
    shape = rows.shape
    dense, positions, label = (dense.reshape(shape + (-1,)), positions.reshape(shape + (num_tables,)),
                               label.reshape(shape))

    def to(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    return Cohort(client_ids, steps, active, step_start, to(dense), to(positions), to(label), to(weight),
                  torch.from_numpy(counts), torch.from_numpy(row_ids),
                  torch.from_numpy(row_table), segment)
