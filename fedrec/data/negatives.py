"""Which items each user has rated, and negatives sampled from the items they have not.

``RatedItems`` keeps every (user, item) pair of all splits as one sorted int64 key array
(``user * num_items + item``), so "has u rated i" is a vectorised binary search and the
memory is 8 bytes per rating, whatever the number of users.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fedrec.data.errors import DataError


class RatedItems:
    """The set of (user, item) pairs a user has rated, in any split."""

    def __init__(self, users: Iterable[np.ndarray], items: Iterable[np.ndarray], num_items: int) -> None:
        self.num_items = int(num_items)
        keys = [np.asarray(u, np.int64) * self.num_items + np.asarray(i, np.int64) for u, i in zip(users, items)]
        self.keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        counts = np.bincount(self.keys // self.num_items) if len(self.keys) else np.zeros(0, np.int64)
        full = np.flatnonzero(counts >= self.num_items)
        if len(full):
            raise DataError(f"user {int(full[0])} has rated every item, so no negatives can be sampled for it")

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        key = np.asarray(users, np.int64) * self.num_items + np.asarray(items, np.int64)
        pos = np.searchsorted(self.keys, key)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == key if len(self.keys) else np.zeros(key.shape, bool)

    def sample(self, users: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """int64 [len(users), count]: items each user has not rated, uniformly (with
        replacement across a row, as NCF samples), by rejection."""
        users = np.asarray(users, np.int64)
        out = rng.integers(0, self.num_items, size=(len(users), count), dtype=np.int64)
        grid = np.broadcast_to(users[:, None], out.shape)
        bad = self.contains(grid, out)
        while bad.any():
            out[bad] = rng.integers(0, self.num_items, size=int(bad.sum()), dtype=np.int64)
            bad[bad] = self.contains(grid[bad], out[bad])
        return out

    def sample_distinct(self, users: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Like :meth:`sample`, but the ``count`` items of a row are distinct (evaluation's
        99 negatives); a user with fewer than ``count`` unrated items is a DataError."""
        out = self.sample(users, count, rng)
        for _ in range(1000):
            ordered = np.sort(out, axis=1)
            dup_sorted = np.zeros(out.shape, bool)
            dup_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
            if not dup_sorted.any():
                return out
            # redraw the later copies of each repeated item
            order = np.argsort(out, axis=1, kind="stable")
            dup = np.zeros(out.shape, bool)
            np.put_along_axis(dup, order, dup_sorted, axis=1)
            rows = np.flatnonzero(dup.any(axis=1))
            redraw = self.sample(np.repeat(users[rows], dup[rows].sum(axis=1)), 1, rng)[:, 0]
            out[dup] = redraw
        raise DataError(f"cannot draw {count} distinct unrated items for some users: they have rated almost "
                        f"every one of the {self.num_items} items")
