"""The client split of a simulation, from the partition it saved (``partition.npz``):
how many rows each client holds, how skewed its labels are, and how many distinct
embedding rows it touches (what a sparse-mode client uploads). These say how hard the
federated problem is, so the report shows them beside the curves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from fedrec.report.charts import Chart, Series, safe_key
from fedrec.report.runs import Run

__all__ = ["client_split_charts", "per_client_charts"]

# Above this many partitioned rows, rows touched are counted on a random subset of clients.
_TOUCHED_MAX_ROWS = 2_000_000


def _train_split(run: Run, notes: List[str]):
    """The processed train split the run used (its labels and categorical columns), if readable."""
    from fedrec.data.processed import ProcessedDataset

    folder = run.config.get("model", {}).get("preproc", {}).get("output_file") if run.config else None
    if not folder:
        notes.append(f"{run.name}: the config names no processed data; label skew and rows touched left out")
        return None
    try:
        return ProcessedDataset.open(Path(folder)).split("train")
    except Exception as err:  # noqa: BLE001 - any unreadable dataset is a note, not a failure
        notes.append(f"{run.name}: processed data {folder} unreadable ({str(err).splitlines()[0][:160]}); "
                     "label skew and rows touched left out")
        return None


def _rows_touched(partition, sparse: np.ndarray, seed: int = 0) -> Tuple[np.ndarray, str]:
    """Distinct (column, value) pairs per client; on large data, a sample of clients."""
    sizes = partition.sizes
    clients = np.arange(partition.num_clients)
    note = ""
    if partition.num_rows > _TOUCHED_MAX_ROWS:
        rng = np.random.default_rng(seed)
        order = rng.permutation(clients)
        keep = np.searchsorted(np.cumsum(sizes[order]), _TOUCHED_MAX_ROWS)
        clients = np.sort(order[:max(1, keep)])
        note = f" (a random {clients.size:,} of {partition.num_clients:,} clients)"
    rows = np.concatenate([partition.indices_of(c) for c in clients]) if clients.size else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(clients.size, dtype=np.int64), sizes[clients])
    block = np.asarray(sparse[np.sort(rows)] if rows.size else np.zeros((0, sparse.shape[1]), np.int64), dtype=np.int64)
    # rows sorted for a sequential read; put the owners in the same order
    owner = owner[np.argsort(rows, kind="stable")]
    width = int(block.max()) + 1 if block.size else 1
    keys = owner[:, None] * (block.shape[1] * width) + np.arange(block.shape[1]) * width + block
    distinct = np.unique(keys.ravel())
    counts = np.bincount(distinct // (block.shape[1] * width), minlength=clients.size)
    return counts.astype(float), note


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def client_split_charts(runs: Sequence[Run], notes: List[str]) -> List[Chart]:
    """Client sizes, label skew and rows touched per client, once per distinct saved split."""
    from fedrec.federated.partition import ClientPartition

    charts: List[Chart] = []
    seen: dict = {}  # partition digest -> (its charts, the runs that share it)
    fl_runs = [run for run in runs if run.kind == "fl"]
    for run in fl_runs:
        path = run.partition_path
        if path is None:
            notes.append(f"{run.name}: no saved client split ({run.path / 'partition.npz'}); client split left out")
            continue
        digest = _digest(path)
        if digest in seen:
            seen[digest][1].append(run.name)
            continue
        try:
            partition = ClientPartition.load(path)
        except (OSError, ValueError) as err:
            notes.append(f"{run.name}: {path} unreadable ({err}); client split left out")
            continue
        seen[digest] = (_split_charts(run, partition, notes), [run.name])
    for split_charts, names in seen.values():
        for chart in split_charts:
            if len(names) > 1:
                chart.note = f"the same split in: {', '.join(names)}. " + chart.note
        charts.extend(split_charts)
    return charts


def _split_charts(run: Run, partition, notes: List[str]) -> List[Chart]:
    how = partition.info.get("partitioner", "?")
    label = f"{how} split of {run.name}"
    sizes = partition.sizes.astype(float)
    out = [Chart(key=safe_key(f"clients-{run.name}-sizes"), title=f"rows per client ({label})", y_label="clients",
                 series=[Series(name=run.name, y=sizes.tolist())], kind="hist", section="Client split",
                 note=f"{partition.num_clients:,} clients, {partition.num_rows:,} rows; median "
                      f"{float(np.median(sizes)) if sizes.size else 0:g}, max {int(sizes.max()) if sizes.size else 0:,}")]
    train = _train_split(run, notes)
    if train is None:
        return out
    labels = np.asarray(train.label)
    if partition.num_rows and int(partition.indices.max()) >= labels.shape[0]:
        notes.append(f"{run.name}: the processed data has fewer rows than the saved split; label skew left out")
        return out
    nonempty = partition.sizes > 0
    client = np.repeat(np.arange(partition.num_clients), partition.sizes)
    positives = np.bincount(client, weights=labels[partition.indices], minlength=partition.num_clients)
    rate = positives[nonempty] / partition.sizes[nonempty]
    overall = float(labels[partition.indices].mean()) if partition.num_rows else 0.0
    tv = partition.stats(labels).get("label_tv", float("nan"))
    out.append(Chart(key=safe_key(f"clients-{run.name}-label-skew"), title=f"click rate per client ({label})",
                     y_label="clients", series=[Series(name=run.name, y=rate.tolist())], kind="hist",
                     section="Client split", reference=overall,
                     note=f"dashed: the click rate over all clients ({overall:.3f}); mean total-variation "
                          f"distance of a client's labels to all labels {tv:.3f}"))
    touched, sampled = _rows_touched(partition, train.sparse)
    out.append(Chart(key=safe_key(f"clients-{run.name}-rows-touched"),
                     title=f"embedding rows touched per client ({label})", y_label="clients",
                     series=[Series(name=run.name, y=touched.tolist())], kind="hist", section="Client split",
                     note="distinct categorical values over the 26 columns: the rows a client uploads with "
                          f"fl.embedding_updates: sparse{sampled}"))
    return out


def per_client_charts(runs: Sequence[Run], notes: List[str]) -> List[Chart]:
    """Distributions of per-client quality (records of phase ``client``, one per client and
    round, e.g. ``{"phase": "client", "round": 20, "client": 7, "roc_auc": 0.71}``): the last
    round each run recorded. Runs that record none are named in a note."""
    from fedrec.report.runs import numeric_keys

    charts: List[Chart] = []
    keys: dict = {}
    for run in runs:
        records = run.phases.get("client", [])
        if not records:
            continue
        last = max(r.get("round", r.get("step", 0)) for r in records)
        latest = [r for r in records if r.get("round", r.get("step", 0)) == last]
        for key in numeric_keys(latest):
            if key == "client":
                continue
            values = [float(r[key]) for r in latest if isinstance(r.get(key), (int, float))]
            keys.setdefault(key, []).append(Series(name=f"{run.name} (round {last})", y=values))
    for key, series in keys.items():
        charts.append(Chart(key=safe_key(f"per-client-{key}"), title=f"per-client {key}", y_label="clients",
                            series=series, kind="hist", section="Per-client quality"))
    missing = [run.name for run in runs if run.kind == "fl" and not run.phases.get("client")]
    if missing:
        notes.append(f"per-client quality is not recorded by: {', '.join(missing)}")
    return charts
