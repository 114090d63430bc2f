"""Per-client state that outlives a round (SCAFFOLD's control variates, ``worker.extra``).

100,000 clients with model-sized state fit neither in rank 0's memory nor in every job,
so the state lives on disk under ``<logdir>/client_state/``, one safetensors file per
client and version, written atomically by whichever process ran the client (MPI ranks
share the logdir's file system, as they share the data). Nothing of it is held in rank 0
or shipped with a job. Per-row state (an embedding table's rows) is stored as the rows'
ids and values, so a client's file is the size of what it touched.

Versions make resume exact: a client that runs in round ``r`` writes ``r<r>.safetensors``
and reads the newest version older than ``r``. A run killed mid-round leaves versions
that the resumed run either ignores (they are not older than the round it reads for) or
overwrites with the same values, since cohorts depend on (seed, round) only. A version is
pruned once a newer one exists and a checkpoint no longer needs it.

Tensors of a fixed shape that every client rewrites each time it runs (private user
rows: ``fixed_rows``) go to two versioned records per client in one file per shard
instead (``row_slots.py``): the same versions, no new file per client and round.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from fedrec.federated.row_slots import RowSlots

STATE_DIR = "client_state"
_VERSION_RE = re.compile(r"^r(\d{6,})\.safetensors$")
_EXTRA_KEY = "fedrec_extra"
_SHARD = 1000  # clients per shard folder


class ClientStateStore:
    """Versioned per-client tensors (and JSON-safe extras) in a sharded folder.

    Paths are plain strings: ``pathlib`` interns every path component, so touching
    100,000 clients' folders would leave a 100,000-entry table of interned names behind.
    """

    #: write a copy of the caller's tensors (False: the caller never changes them after)
    copy_tensors = True

    def __init__(self, root: str | Path,
                 fixed_rows: Optional[Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]] = None) -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)
        #: ``fixed_rows`` (key -> (shape, dtype)): kept in the shards' row slots, not in the files
        self.slots = RowSlots(fixed_rows, self._shard_dir, _SHARD) if fixed_rows else None
        self._batch: Optional[Dict[str, Any]] = None  # see batch()

    def _shard_dir(self, shard: int) -> str:
        return os.path.join(self._root, f"{shard:05d}")

    def _client_dir(self, client_id: int) -> str:
        return os.path.join(self._shard_dir(client_id // _SHARD), str(client_id))

    def _versions(self, client_id: int) -> List[Tuple[int, str]]:
        folder = self._client_dir(client_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _VERSION_RE.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(folder, name)))
        return sorted(found)

    def written(self, client_ids: np.ndarray) -> np.ndarray:
        """bool per client id: whether state was written for it in some round (a folder,
        or rows in its slots). One listing and one read per 1,000 clients."""
        found = self.has_files(client_ids)
        if self.slots is not None:
            found |= self.slots.any_written(client_ids)
        return found

    def has_files(self, client_ids: np.ndarray) -> np.ndarray:
        """bool per client id: whether it has a folder of versioned files (so that a
        caller can skip the clients that have none). One listing per 1,000 clients."""
        client_ids = np.asarray(client_ids, np.int64)
        found: List[int] = []
        for shard in np.unique(client_ids // _SHARD).tolist():
            try:
                found.extend(int(n) for n in os.listdir(self._shard_dir(shard)) if n.isdigit())
            except FileNotFoundError:
                continue
        return np.isin(client_ids, np.asarray(found, np.int64))

    def get(self, client_id: int, round_idx: int) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """The client's newest state written before round ``round_idx``: (tensors, extra)."""
        read = self._batch["read"].get(client_id) if self._batch is not None and self._batch["round"] == round_idx \
            else None
        if read is None:
            listed = self._versions(client_id)
            rows_version, rows = self.slots.get(client_id, round_idx) if self.slots is not None else (None, {})
        else:  # read up front by batch()
            rows_version, rows, has_files = read
            listed = self._versions(client_id) if has_files else []
        older = [(version, path) for version, path in listed if version < round_idx]
        tensors: Dict[str, Tensor] = {}
        extra: Dict[str, Any] = {}
        if older:
            tensors, metadata = read_state_file(older[-1][1])
            extra = json.loads(metadata.get(_EXTRA_KEY, "{}"))
        # a file's own copy of the slots' keys (written before they had slots) wins if newer
        if rows and (not older or rows_version > older[-1][0] or not set(rows) & set(tensors)):
            tensors.update(rows)
        return tensors, extra

    def get_rows(self, client_ids: np.ndarray, round_idx: int) -> Tuple[np.ndarray, Dict[str, Tensor]]:
        """The ``fixed_rows`` of many clients as written before round ``round_idx``:
        (found [n] bool, {key: [n, *shape]}); one read per shard."""
        if self.slots is None:
            return np.zeros(len(client_ids), dtype=bool), {}
        versions, rows = self.slots.get_many(client_ids, round_idx)
        return versions >= 0, rows

    @property
    def batching(self) -> bool:
        """Whether a :meth:`batch` is open."""
        return self._batch is not None

    @contextlib.contextmanager
    def batch(self, client_ids: Sequence[int], round_idx: int) -> Iterator[None]:
        """Within it, the ``fixed_rows`` of ``client_ids`` are read for round ``round_idx``
        up front and written at its end, one read and one write pass per shard instead of
        an open, a read and writes per client (which, run between two clients' training
        with cold caches, cost far more than in a tight loop). A client's writes are kept
        until the end: nothing in a round reads a version of that round, and a run killed
        before the end resumes from a checkpoint older than the round. An exception
        discards them (the run stops; its resume reruns the round)."""
        if self._batch is not None:
            yield
            return
        read: Dict[int, Any] = {}
        if self.slots is not None:  # (without slots nothing is read up front or kept: files as ever)
            ids = np.asarray(list(client_ids), dtype=np.int64)
            versions, rows = self.slots.get_many(ids, round_idx)
            files = self.has_files(ids)
            for k, client_id in enumerate(ids.tolist()):
                found = versions[k] >= 0
                read[client_id] = (int(versions[k]) if found else None,
                                   {key: value[k] for key, value in rows.items()} if found else {}, bool(files[k]))
        self._batch = {"round": round_idx, "writes": [], "read": read}
        try:
            yield
            if self._batch["writes"]:
                self.slots.put_many(self._batch["writes"])
        finally:
            self._batch = None

    def put(self, client_id: int, round_idx: int, tensors: Mapping[str, Tensor],
            extra: Optional[Mapping[str, Any]] = None, checkpointed_round: int = 0,
            rest_unchanged: bool = False) -> int:
        """Write the client's state after round ``round_idx``; returns the bytes written.

        Older versions are removed except the newest one before ``checkpointed_round``
        (what a resume from the newest checkpoint would read). ``fixed_rows`` keys go to
        the row slots; the rest to a file, unless the caller says it is what the client
        read (``rest_unchanged``) or it is empty and no file was ever written.
        """
        if self.slots is not None and any(k in self.slots.shapes for k in tensors):
            rows = {k: v for k, v in tensors.items() if k in self.slots.shapes}
            tensors = {k: v for k, v in tensors.items() if k not in self.slots.shapes}
            if self._batch is not None:  # written at the batch's end (as bytes: the caller may reuse its tensors)
                self._batch["writes"].append((client_id, round_idx, self.slots.encode(rows), checkpointed_round))
                written = self.slots.payload
            else:
                written = self.slots.put(client_id, round_idx, rows, checkpointed_round)
            if rest_unchanged or (not tensors and not extra and not self._versions(client_id)):
                return written
        return self._put_file(client_id, round_idx, tensors, extra, checkpointed_round)

    def _put_file(self, client_id: int, round_idx: int, tensors: Mapping[str, Tensor],
                  extra: Optional[Mapping[str, Any]], checkpointed_round: int) -> int:
        folder = self._client_dir(client_id)
        if not os.path.isdir(folder):  # (a stat; a failing mkdir costs more, once per client and round)
            os.makedirs(folder, exist_ok=True)
        name = f"r{round_idx:06d}.safetensors"
        path = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.copy_tensors:
            plain = {k: v.clone() for k, v in plain.items()}
        _save(plain, tmp, {_EXTRA_KEY: json.dumps(dict(extra or {}))})
        os.replace(tmp, path)
        self._prune(client_id, round_idx, checkpointed_round)
        return os.path.getsize(path)

    def _prune(self, client_id: int, newest: int, checkpointed_round: int) -> None:
        versions = [(v, p) for v, p in self._versions(client_id) if v < newest]
        needed = [v for v, _ in versions if v < checkpointed_round]
        keep = max(needed) if needed else None
        for version, path in versions:
            if version != keep:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def nbytes(self) -> int:
        """Bytes on disk (for reports; walks the folder)."""
        if not self.root.exists():
            return 0
        files = sum(p.stat().st_size for p in self.root.rglob("r*.safetensors"))
        return files + (self.slots.file_bytes(self._root) if self.slots is not None else 0)


def read_state_file(path: "str | Path") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """A safetensors file's tensors and metadata, read whole. Not through ``safe_open``:
    safetensors 0.8's ``get_tensor`` keeps about 56 bytes per call for the life of the
    process, which a store read every round turns into a leak
    (``benchmarks/fl_topology.py --memory``)."""
    from safetensors.torch import load

    data = Path(path).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return load(data), dict(header.get("__metadata__") or {})


def split_rows(name: str, ids: Tensor, values: Tensor) -> Dict[str, Tensor]:
    """Per-row state of table ``name`` as two plain tensors (safetensors keys)."""
    return {f"{name}@ids": ids, f"{name}@rows": values}


def rows_of(state: Mapping[str, Tensor], name: str) -> Optional[Tuple[Tensor, Tensor]]:
    """``(ids, values)`` stored by :func:`split_rows`, or None."""
    ids = state.get(f"{name}@ids")
    return None if ids is None else (ids, state[f"{name}@rows"])


def _save(tensors: Dict[str, Tensor], path: str, metadata: Dict[str, str]) -> None:
    """``safetensors.torch.save_file``, through safetensors' own ``serialize_file`` where
    it takes tensor pointers (0.8+): the same bytes, without save_file's checks for
    shared or sparse tensors (these are fresh dense clones), which cost as much as the
    write itself for a user's one-row state."""
    import safetensors

    spec = getattr(safetensors, "TensorSpec", None)
    if spec is None or sys.byteorder != "little":
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=metadata)
        return
    specs = {k: spec(dtype=str(v.dtype).split(".")[-1], shape=list(v.shape), data_ptr=v.data_ptr(),
                     data_len=v.numel() * v.element_size()) for k, v in tensors.items()}
    safetensors.serialize_file(specs, path, metadata=metadata)  # ``tensors`` keeps the memory alive
