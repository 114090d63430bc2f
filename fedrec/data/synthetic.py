"""Synthetic Criteo-format data with a planted click model, for tests and demos.

The file has exactly the Kaggle layout (label, 13 integers, 26 hex categoricals,
tab-separated, missing values as empty fields), so it goes through the same
preprocessing as the real data. What makes it useful for federated experiments:

* category popularity is Zipf-distributed, like real ad logs;
* every row belongs to a latent user (saved beside the file as ``<out>.users.npy``);
  users differ in activity, in the categories they see (each user shifts the popularity
  ranking of some columns) and in their integer features, so a per-user split is non-IID;
* labels come from a known logistic model (per-category weights, integer features, a
  user bias partly visible through a user-segment column), so the best achievable AUC
  is known: ``<out>.meta.json`` records it as ``optimal_auc``.

Rows are generated in fixed blocks of ``BLOCK_ROWS``, each from its own seed derived from
``seed`` and the block number, so the output depends only on ``seed`` and the parameters,
and a longer file starts with the complete blocks of a shorter one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from fedrec.data.criteo import DENSE_NAMES, NUM_DENSE, NUM_SPARSE, SPARSE_NAMES
from fedrec.data.errors import DataError

GENERATOR_VERSION = 1
BLOCK_ROWS = 100_000  # fixed: the output must not depend on how it was cut into blocks

# Cardinalities loosely shaped like Kaggle Criteo's (a few tiny columns, most in the
# thousands), scaled down so that DLRM trains on 100k-200k rows in about a minute.
DEFAULT_VOCAB_SIZES = (
    1000, 500, 3000, 2000, 200, 20, 1500, 300, 3, 4000, 2500, 3500, 1200,
    25, 2200, 3300, 10, 800, 400, 4, 3700, 8, 15, 2800, 60, 1800,
)
USER_SEGMENT_COLUMN = 1  # C2 shows the user's segment: the observable part of the user bias
PREFERENCE_COLUMNS = (2, 3, 6, 9, 10, 11, 14, 15, 20, 23)  # users shift these rankings
NOISE_COLUMNS = (4, 12, 17, 24)  # carry no signal, like many real features


def synthesize(
    rows: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    num_users: int = 1000,
    vocab_sizes: Optional[Sequence[int]] = None,
    zipf_a: float = 1.2,
    missing_rate: float = 0.1,
    target_ctr: float = 0.25,
    user_share: float = 0.5,
    progress: bool = False,
) -> Dict[str, Any]:
    """Write ``rows`` Criteo-format lines to ``out`` (gzip if it ends in .gz).

    Also writes ``<out>.users.npy`` (int64 user id per line) and ``<out>.meta.json``,
    whose content is returned: at least rows, seed, ctr and optimal_auc. ``user_share``
    is the chance that a preference column follows the user's own ranking rather than
    the global one (0 gives IID users apart from activity and bias).
    """
    _check(rows, num_users, zipf_a, missing_rate, target_ctr, user_share)
    sizes = tuple(int(v) for v in (vocab_sizes if vocab_sizes is not None else DEFAULT_VOCAB_SIZES))
    if len(sizes) != NUM_SPARSE or min(sizes) < 1:
        raise DataError(f"synthetic data: vocab_sizes needs {NUM_SPARSE} positive ints, got {vocab_sizes!r}")
    world = _World.create(seed, num_users, sizes, zipf_a, missing_rate, user_share)
    world.calibrate(target_ctr, np.random.default_rng([seed, 2]))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    users_path = out.with_name(out.name + ".users.npy")
    meta_path = out.with_name(out.name + ".meta.json")
    tmp = {p: p.with_name(f"{p.name}.tmp-{os.getpid()}") for p in (out, users_path, meta_path)}
    try:
        users, labels, probs = _write_rows(world, rows, seed, tmp[out], out.suffix == ".gz", progress)
        with open(tmp[users_path], "wb") as f:
            np.save(f, users)
        meta = {
            "rows": rows,
            "seed": seed,
            "ctr": float(labels.mean()) if rows else 0.0,
            "optimal_auc": _auc(labels, probs),
            "mean_click_probability": float(probs.mean()) if rows else 0.0,
            "num_users": num_users,
            "vocab_sizes": list(sizes),
            "zipf_a": zipf_a,
            "missing_rate": missing_rate,
            "target_ctr": target_ctr,
            "user_share": user_share,
            "user_segment_column": SPARSE_NAMES[USER_SEGMENT_COLUMN],
            "users_file": users_path.name,
            "generator_version": GENERATOR_VERSION,
        }
        tmp[meta_path].write_text(json.dumps(meta, indent=2) + "\n")
        for final in (users_path, meta_path, out):  # the data file last: it is what callers look for
            os.replace(tmp[final], final)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    return meta


def _check(rows: int, num_users: int, zipf_a: float, missing_rate: float, target_ctr: float,
           user_share: float) -> None:
    """Refuse parameters that cannot make a usable file (DataError: one line on the CLI)."""
    problems = [
        (rows >= 1, f"rows must be >= 1 (the number of lines to write), got {rows}"),
        (num_users >= 1, f"num_users must be >= 1, got {num_users}"),
        (zipf_a > 0, f"zipf_a must be > 0, got {zipf_a}"),
        (0 <= missing_rate < 0.5, f"missing_rate must be in [0, 0.5), got {missing_rate}"),
        (0 < target_ctr < 1, f"target_ctr must be in (0, 1), got {target_ctr}"),
        (0 <= user_share <= 1, f"user_share must be in [0, 1], got {user_share}"),
    ]
    for ok, message in problems:
        if not ok:
            raise DataError(f"synthetic data: {message}")


@dataclass
class _World:
    """The planted generative model: populations, users and the true click model."""

    hex_ids: List[pa.Array]  # per column: the 8-digit hex string of each category
    category_cdf: List[np.ndarray]  # per column: Zipf popularity CDF over categories
    category_weight: List[np.ndarray]  # per column: logit weight of each category
    sparse_missing: np.ndarray  # [26] missing probability per column
    dense_mu: np.ndarray  # [13] log-scale mean of each integer feature
    dense_sigma: np.ndarray  # [13]
    dense_weight: np.ndarray  # [13] logit weight of log1p(feature) - mu
    dense_missing: np.ndarray  # [13]
    user_cdf: np.ndarray  # activity: how many rows each user has
    user_bias: np.ndarray  # latent logit bias (not visible in the features)
    user_segment: np.ndarray  # the category each user shows in the segment column
    user_offset: np.ndarray  # [users, 26] rotation of the popularity ranking per column
    user_dense_shift: np.ndarray  # [users, 13]
    user_share: float
    intercept: float = 0.0

    @classmethod
    def create(cls, seed: int, num_users: int, sizes: Sequence[int], zipf_a: float,
               missing_rate: float, user_share: float) -> "_World":
        rng = np.random.default_rng([seed, 0])
        hex_ids, cdfs, weights = [], [], []
        for j, size in enumerate(sizes):
            ids = rng.choice(1 << 32, size=size, replace=False)
            hex_ids.append(pa.array([f"{int(v):08x}" for v in ids], pa.string()))
            popularity = 1.0 / np.arange(1, size + 1) ** zipf_a
            cdfs.append(np.cumsum(popularity) / popularity.sum())
            scale = 0.0 if j in NOISE_COLUMNS else rng.uniform(0.2, 0.8)
            weights.append(rng.normal(0.0, scale, size))
        user_segment = rng.integers(0, sizes[USER_SEGMENT_COLUMN], num_users)
        activity = rng.lognormal(0.0, 1.0, num_users)
        return cls(
            hex_ids=hex_ids,
            category_cdf=cdfs,
            category_weight=weights,
            sparse_missing=np.clip(rng.uniform(0.0, 2.0 * missing_rate, NUM_SPARSE), 0.0, 0.95),
            dense_mu=rng.uniform(0.5, 4.0, NUM_DENSE),
            dense_sigma=rng.uniform(0.5, 1.5, NUM_DENSE),
            dense_weight=rng.normal(0.0, 0.25, NUM_DENSE),
            dense_missing=np.clip(rng.uniform(0.0, 2.0 * missing_rate, NUM_DENSE), 0.0, 0.95),
            user_cdf=np.cumsum(activity) / activity.sum(),
            user_bias=rng.normal(0.0, 0.4, num_users),
            user_segment=user_segment,
            user_offset=np.stack([rng.integers(0, s, num_users) for s in sizes], axis=1),
            user_dense_shift=rng.normal(0.0, 0.5, (num_users, NUM_DENSE)),
            user_share=user_share,
        )

    def calibrate(self, target_ctr: float, rng: np.random.Generator, rows: int = 50_000) -> None:
        """Pick the intercept so that the mean click probability is ``target_ctr``."""
        logits = self.sample(rows, rng)["logit"]
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if _sigmoid(logits + mid).mean() < target_ctr:
                lo = mid
            else:
                hi = mid
        self.intercept = (lo + hi) / 2

    def sample(self, n: int, rng: np.random.Generator) -> Dict[str, Any]:
        """``n`` rows: users, category indices, integer features, true logits."""
        users = np.minimum(np.searchsorted(self.user_cdf, rng.random(n)), len(self.user_cdf) - 1)
        logit = self.user_bias[users] + self.intercept
        categories, sparse_missing = [], []
        for j, cdf in enumerate(self.category_cdf):
            size = len(cdf)
            k = np.minimum(np.searchsorted(cdf, rng.random(n)), size - 1)
            if j == USER_SEGMENT_COLUMN:
                k = self.user_segment[users]
            elif j in PREFERENCE_COLUMNS:
                personal = rng.random(n) < self.user_share
                k = np.where(personal, (k + self.user_offset[users, j]) % size, k)
            missing = rng.random(n) < self.sparse_missing[j]
            logit = logit + np.where(missing, 0.0, self.category_weight[j][k])
            categories.append(k)
            sparse_missing.append(missing)
        log_rate = rng.normal(self.dense_mu + self.user_dense_shift[users], self.dense_sigma)
        dense = rng.poisson(np.exp(log_rate)).astype(np.int64)
        dense[:, 1] -= 1  # like Kaggle's I2, the one feature with small negative values
        dense_missing = rng.random((n, NUM_DENSE)) < self.dense_missing
        features = np.log1p(np.maximum(dense, 0)) - self.dense_mu
        logit = logit + np.where(dense_missing, 0.0, features) @ self.dense_weight
        return {"users": users, "categories": categories, "sparse_missing": sparse_missing,
                "dense": dense, "dense_missing": dense_missing, "logit": logit}


def _write_rows(world: _World, rows: int, seed: int, path: Path, compress: bool,
                progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate and write the TSV block by block; returns users, labels and true probabilities."""
    names = ["label", *DENSE_NAMES, *SPARSE_NAMES]
    schema = pa.schema([("label", pa.int8())] + [(n, pa.int64()) for n in DENSE_NAMES]
                       + [(n, pa.string()) for n in SPARSE_NAMES])
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    users = np.empty(rows, dtype=np.int64)
    labels = np.empty(rows, dtype=np.int8)
    probs = np.empty(rows, dtype=np.float32)
    sink = pa.CompressedOutputStream(str(path), "gzip") if compress else pa.OSFile(str(path), "wb")
    blocks = range(0, rows, BLOCK_ROWS)
    if progress:
        from fedrec.utilities.console import progress_bar

        blocks = progress_bar(True, iterable=blocks, desc=f"{path.name}: synthesize", unit="block", leave=False)
    with sink, pacsv.CSVWriter(sink, schema, write_options=options) as writer:
        for start in blocks:
            n = min(BLOCK_ROWS, rows - start)
            rng = np.random.default_rng([seed, 1, start // BLOCK_ROWS])
            sample = world.sample(n, rng)
            p = _sigmoid(sample["logit"])
            label = (rng.random(n) < p).astype(np.int8)
            columns = [pa.array(label)]
            columns += [pa.array(sample["dense"][:, d], mask=sample["dense_missing"][:, d])
                        for d in range(NUM_DENSE)]
            columns += [ids.take(pa.array(k, mask=m)) for ids, k, m in
                        zip(world.hex_ids, sample["categories"], sample["sparse_missing"], strict=True)]
            writer.write_table(pa.Table.from_arrays(columns, names=names))
            users[start:start + n] = sample["users"]
            labels[start:start + n] = label
            probs[start:start + n] = p
    return users, labels, probs


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _auc(labels: np.ndarray, probs: np.ndarray) -> Optional[float]:
    """AUC of the true probabilities: the ceiling any model can reach on this file."""
    if len(labels) == 0 or labels.min() == labels.max():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))
