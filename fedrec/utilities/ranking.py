"""Ranking metrics of the leave-one-out protocol: HR@k and NDCG@k per user.

Each user has one held-out item scored against sampled negatives (column 0 of ``scores``
is the held-out item). Its rank is the number of negatives scored at least as high: ties
count against the model, so a constant model scores HR@k = 0 unless k exceeds the
negatives, never a flattering 1.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 among each row's columns (ties counted against it)."""
    scores = np.asarray(scores)
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def hit_and_ndcg(rank: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per user: HR@k (1 if rank < k) and NDCG@k (``1 / log2(rank + 2)`` if rank < k)."""
    rank = np.asarray(rank)
    hit = (rank < k).astype(np.float64)
    return hit, np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)


def summarize(hit: np.ndarray, ndcg: np.ndarray, k: int = 10) -> Dict[str, float]:
    """Mean HR@k and NDCG@k over users, and NDCG's spread (how badly some users are served)."""
    if not len(hit):
        return {}
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean()),
            f"ndcg@{k}_std": float(ndcg.std()), f"ndcg@{k}_p25": float(np.quantile(ndcg, 0.25)),
            f"ndcg@{k}_p75": float(np.quantile(ndcg, 0.75)), "users": float(len(hit))}


def full_ranks(scores: torch.Tensor, held: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of item ``held[b]`` among all of row b's items (``scores`` [B, I]),
    leaving out the row's ``excluded`` items (bool [B, I]: what the user rated in train)
    and the held-out item itself; ties count against it, as in :func:`ranks`."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    target = scores[rows, held].unsqueeze(1)
    beats = (scores >= target) & ~excluded
    beats[rows, held] = False
    return beats.sum(dim=1)


def rated_mask(keys: np.ndarray, users: np.ndarray, num_items: int) -> torch.Tensor:
    """bool [len(users), num_items]: True where ``keys`` (sorted ``user * num_items + item``)
    holds the pair; vectorised, without a Python loop over users."""
    users = np.asarray(users, np.int64)
    lo = np.searchsorted(keys, users * num_items)
    hi = np.searchsorted(keys, (users + 1) * num_items)
    counts = hi - lo
    mask = torch.zeros(len(users), num_items, dtype=torch.bool)
    if counts.sum():
        row = np.repeat(np.arange(len(users)), counts)
        pos = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        mask[torch.from_numpy(row), torch.from_numpy(keys[pos] - users[row] * num_items)] = True
    return mask
