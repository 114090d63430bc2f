"""Synthetic ratings in MovieLens's csv format, from planted user and item factors.

For scale tests (100,000+ users) and for a known best achievable metric: each user u and
item i get factors ``p_u, q_i ~ N(0, 1/dim)`` and items a popularity ``b_i``; a user
picks ``k_u`` distinct items with probability proportional to ``exp(p_u . q_i * scale +
b_i)`` (Gumbel top-k, without replacement), in a random time order, and rates them by the
standardised affinity. ``oracle_hr@10`` / ``oracle_ndcg@10`` in the returned metadata
(also written beside the file as ``<file>.meta.json``) are what ranking by the true
affinity scores under the leave-one-out protocol with 99 sampled negatives: a model can
approach them, not beat them (up to sampling noise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np


def synthesize_ratings(path: str | Path, num_users: int, num_items: int = 2000, mean_per_user: int = 20,
                       dim: int = 16, scale: float = 4.0, seed: int = 0, chunk_users: int = 2048) -> Dict[str, Any]:
    """Write ``userId,movieId,rating,timestamp`` lines to ``path``; returns the metadata."""
    if num_users < 1 or mean_per_user < 3 or dim < 1:
        raise ValueError(f"users must be >= 1, mean ratings per user >= 3 and dim >= 1, got {num_users}, "
                         f"{mean_per_user} and {dim}")
    if num_items < 110:
        raise ValueError(f"num_items must be >= 110 (a user's items plus 99 sampled negatives), got {num_items}")
    rng = np.random.default_rng(seed)
    path = Path(path)
    partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # a killed run leaves no half-written file
    try:
        meta = _write(partial, num_users, num_items, mean_per_user, dim, scale, seed, chunk_users, rng)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    Path(f"{path}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write(path: Path, num_users: int, num_items: int, mean_per_user: int, dim: int, scale: float, seed: int,
           chunk_users: int, rng: np.random.Generator) -> Dict[str, Any]:
    items_f = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(num_items, dim)).astype(np.float32)
    popularity = rng.normal(0.0, 1.0, size=num_items).astype(np.float32)
    hits, gains, evaluated, rows = 0, 0.0, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        out.write("userId,movieId,rating,timestamp\n")
        for start in range(0, num_users, chunk_users):
            n = min(chunk_users, num_users - start)
            users_f = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(n, dim)).astype(np.float32)
            logits = (users_f @ items_f.T) * scale + popularity
            counts = np.clip(rng.poisson(mean_per_user - 3, size=n) + 3, 3, num_items - 100)
            gumbel = logits - np.log(-np.log(rng.random(logits.shape, dtype=np.float32) + 1e-12) + 1e-12)
            ranked = np.argsort(-gumbel, axis=1)
            z = (logits - logits.mean(axis=1, keepdims=True)) / (logits.std(axis=1, keepdims=True) + 1e-6)
            lines = []
            for r in range(n):
                chosen = ranked[r, :counts[r]]
                times = rng.permutation(len(chosen)) + 1_000_000
                ratings = np.clip(np.round((3.0 + 1.0 * z[r, chosen]) * 2) / 2, 0.5, 5.0)
                uid = start + r + 1
                lines.extend(f"{uid},{i + 1},{x:.1f},{t}\n" for i, x, t in zip(chosen, ratings, times))
                # the oracle on the leave-one-out protocol: the last item against 99 unrated ones
                target = chosen[int(np.argmax(times))]
                unrated = np.setdiff1d(rng.choice(num_items, size=min(num_items, 99 + 3 * len(chosen)), replace=False),
                                       chosen)[:99]
                if len(unrated) == 99:
                    rank = int((logits[r, unrated] >= logits[r, target]).sum())
                    evaluated += 1
                    if rank < 10:
                        hits += 1
                        gains += 1.0 / np.log2(rank + 2)
            out.writelines(lines)
            rows += int(counts.sum())
    return {"rows": rows, "num_users": num_users, "num_items": num_items, "dim": dim, "scale": scale, "seed": seed,
            "oracle_hr@10": hits / max(evaluated, 1), "oracle_ndcg@10": float(gains) / max(evaluated, 1)}
