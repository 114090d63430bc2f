"""Hashing mode with the reference DLRM's table sizes: one row per hashed value that occurs.

The reference (facebookresearch/dlrm, ``data_utils.py`` / ``dlrm_data_pytorch.py``) hashes
each categorical to ``value % max_ind_range``, renumbers the hashed values of each column
that occur to 0..k-1 and gives the table ``k`` rows. Since the embedding init is
uniform(+-sqrt(1/rows)), the table size sets the initial scale, so it matters beyond memory.

The write pass streams, so the final ids are known only at its end: each column's hashed
values are recorded as they are written (:class:`OccurringValues`), then the written
``sparse.npy`` files are renumbered in place, block by block (:func:`renumber_sparse`).
Ids are ranks among the occurring values (ascending hashed value), so the order of the
hashed values, and the missing value's id 0 whenever value 0 occurs, are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedrec.data.errors import DataError

MERGE_AT = 1 << 16  # distinct values waiting before they are merged into the sorted set
HASH_LOOKUP_MAX = 1 << 18  # sorted sets up to this size are looked up by hash, larger by bisection


class Ranks(Protocol):
    count: int

    def __call__(self, hashed: np.ndarray) -> np.ndarray:  # int32 ranks
        ...


class OccurringValues:
    """Which hashed values ``0 <= v < modulus`` occur in one column, in bounded memory.

    A sorted array of the distinct values while it is smaller than a bitmap of
    ``modulus`` bits, that bitmap afterwards: memory stays near
    min(4 bytes per distinct value, modulus / 8 bytes), whatever the file length.
    """

    def __init__(self, modulus: int) -> None:
        self.modulus = int(modulus)
        self.values: Optional[np.ndarray] = np.zeros(0, np.int32)
        self.pending: List[np.ndarray] = []
        self.pending_size = 0
        self.bits: Optional[np.ndarray] = None  # uint64 words: bit v % 64 of word v // 64

    def add(self, hashed: np.ndarray) -> None:
        """Record the values of one block of the column (int32, already hashed)."""
        if self.bits is not None:
            _set_bits(self.bits, hashed)
            return
        distinct = pc.unique(pa.array(hashed)).to_numpy(zero_copy_only=False)
        self.pending.append(distinct)
        self.pending_size += len(distinct)
        if self.pending_size > max(len(self.values), MERGE_AT):
            self._merge()

    def _merge(self) -> None:
        if self.values is None:
            return
        self.values = np.unique(np.concatenate([self.values, *self.pending])).astype(np.int32)
        self.pending, self.pending_size = [], 0
        words = _words(self.modulus)
        if self.values.nbytes > words * 8:  # the bitmap is smaller from here on
            self.bits = np.zeros(words, np.uint64)
            _set_bits(self.bits, self.values)
            self.values = None

    def ranks(self) -> Ranks:
        """hashed value -> its id 0..k-1 (rank among the occurring values); ``.count`` = k."""
        self._merge()
        if self.bits is not None:
            return BitmapRanks(self.bits)
        return SortedRanks(self.values)


class SortedRanks:
    """Ranks from the sorted distinct values: a hash lookup, or bisection for large sets."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.count = len(values)
        self.lookup = pa.array(values) if len(values) <= HASH_LOOKUP_MAX else None

    def __call__(self, hashed: np.ndarray) -> np.ndarray:
        if self.lookup is None:
            return np.searchsorted(self.values, hashed).astype(np.int32)
        found = pc.index_in(pa.array(hashed), value_set=self.lookup)
        if found.null_count:
            raise DataError("the data file changed while it was being preprocessed "
                            "(a hashed value the write pass did not record)")
        return found.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


class BitmapRanks:
    """Ranks from a bitmap: set bits in the words before, plus those below in the word."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        counts = _popcount(bits).astype(np.int64)
        self.before = (np.cumsum(counts) - counts).astype(np.int32)
        self.count = int(counts.sum())

    def __call__(self, hashed: np.ndarray) -> np.ndarray:
        word = hashed >> 6
        below = np.left_shift(np.uint64(1), (hashed & 63).astype(np.uint64)) - np.uint64(1)
        return self.before[word] + _popcount(self.bits[word] & below).astype(np.int32)


def renumber_sparse(path: Path, ranks: Sequence[Ranks], block_rows: int) -> None:
    """Replace each column's hashed values in ``path`` (int32 [n, 26] .npy) by their ranks.

    In place, one block of rows at a time, with plain reads and writes (a writable memmap
    would count every page written in the process RSS).
    """
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _fortran_order, dtype = read_header(f)
        if dtype != np.int32 or len(shape) != 2 or shape[1] != len(ranks):
            raise AssertionError(f"{path}: expected int32 [n, {len(ranks)}], found {dtype} {shape}")
        offset, rows = f.tell(), shape[0]
        row_bytes = shape[1] * 4
        buffer = np.empty((max(1, min(block_rows, rows)), shape[1]), dtype=np.int32)
        for start in range(0, rows, len(buffer)):
            block = buffer[:min(len(buffer), rows - start)]
            f.seek(offset + start * row_bytes)
            if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                raise DataError(f"{path} was truncated while it was being written")
            for j, rank in enumerate(ranks):  # one column at a time: a small copy each
                block[:, j] = rank(np.ascontiguousarray(block[:, j]))
            f.seek(offset + start * row_bytes)
            f.write(memoryview(block).cast("B"))


def _words(modulus: int) -> int:
    return (modulus + 63) // 64


def _set_bits(bits: np.ndarray, values: np.ndarray) -> None:
    values = np.asarray(values)
    np.bitwise_or.at(bits, values >> 6, np.left_shift(np.uint64(1), (values & 63).astype(np.uint64)))


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 word (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return _POPCOUNT8[np.ascontiguousarray(words).view(np.uint8)].reshape(len(words), 8).sum(
        axis=1, dtype=np.uint8)
