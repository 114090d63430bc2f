"""Batches sliced straight from the memory-mapped split: no per-sample ``__getitem__``.

A batch is one contiguous slice (sequential order) or one fancy-index gather (shuffled
order or a client's index array), turned into tensors with ``torch.from_numpy``. That is
all a DLRM step needs, and it costs one copy per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from fedrec.utilities.random_state import derive_seed


@dataclass
class Batch:
    """dense float32 [B, 13], sparse int64 [B, 26], label float32 [B]."""

    dense: torch.Tensor
    sparse: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        return Batch(self.dense.to(device, non_blocking=non_blocking),
                     self.sparse.to(device, non_blocking=non_blocking),
                     self.label.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.label.pin_memory())


class BatchLoader:
    """Iterable of :class:`Batch` over a split (anything with ``dense``, ``sparse``, ``label``).

    ``indices`` restricts and orders the rows (e.g. one client's rows); ``shuffle`` permutes
    them with a generator seeded by ``derive_seed(seed, epoch)``, so an epoch's order is
    the same in every process and after a resume. ``start_batch`` skips that many batches
    of the first pass only (resuming mid-epoch); later passes start at batch 0.
    ``len()`` is the number of batches the next pass yields.
    """

    def __init__(self, split: Any, batch_size: int, indices: Optional[np.ndarray] = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 start_batch: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.split = split
        self.batch_size = int(batch_size)
        self.indices = None if indices is None else _check_indices(indices, len(split.label))
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.start_batch = int(start_batch)
        self.epoch = 0

    @property
    def num_rows(self) -> int:
        return len(self.split.label) if self.indices is None else len(self.indices)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full pass, ignoring ``start_batch``."""
        if self.drop_last:
            return self.num_rows // self.batch_size
        return -(-self.num_rows // self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next pass (only matters with ``shuffle``)."""
        self.epoch = int(epoch)

    def order(self) -> Optional[np.ndarray]:
        """Row indices of this epoch in visiting order; None means 0..n-1 (slices)."""
        if self.shuffle:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch))
            permutation = rng.permutation(self.num_rows)
            return permutation if self.indices is None else self.indices[permutation]
        return self.indices

    def __iter__(self) -> Iterator[Batch]:
        order = self.order()
        first, self.start_batch = self.start_batch, 0
        for b in range(first, self.batches_per_epoch):
            lo = b * self.batch_size
            hi = min(lo + self.batch_size, self.num_rows)
            yield self._batch(slice(lo, hi) if order is None else order[lo:hi])

    def _batch(self, rows: slice | np.ndarray) -> Batch:
        split = self.split
        if isinstance(rows, slice):  # a memmap slice is a view: copy it into owned memory
            dense, label = np.array(split.dense[rows]), np.array(split.label[rows])
        else:  # fancy indexing copies already
            dense, label = split.dense[rows], split.label[rows]
        sparse = split.sparse[rows].astype(np.int64)
        return Batch(torch.from_numpy(dense), torch.from_numpy(sparse), torch.from_numpy(label))


def _check_indices(indices: Any, rows: int) -> np.ndarray:
    """A 1-D integer array of valid row numbers (views are kept, not copied)."""
    array = np.asarray(indices)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"indices must be a 1-D integer array, got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= rows):
        raise ValueError(f"indices must lie in [0, {rows}), got min {array.min()} max {array.max()}")
    return array.astype(np.int64, copy=False) if array.size else np.zeros(0, dtype=np.int64)
