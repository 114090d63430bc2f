"""Fixed-size per-client rows (private user embeddings) in one file per 1,000 clients.

Why not the client state store's one safetensors file per client and version: every
new file is a new inode, and on a loaded ext4 creating one costs 0.1 to 1 ms of CPU,
more than training a user's batch costs in Python. A user selected for the first time
paid two (its folder and its file), every later selection one (the temporary file that
the rename makes atomic). A user's private rows have the same size every round, so
they get two fixed slots in a shared file instead, rewritten in place.

Layout of ``<shard>/rows.slots``: a 4,096-byte header (a magic line and the layout as
JSON: a file of another layout is refused, not misread), then two records per client of
the shard, each the rows' bytes (keys in sorted order) followed by an int64 tag: the
round + 1 of the version the record holds, 0 for none. The file is made at its full size
(sparse: unwritten records take no disk and read as 0), so a shorter one is truncated and
refused rather than read as clients never written.

Versions follow the store's rules (see ``client_state.py``): round ``r`` reads the
newest version older than ``r``; a write keeps the newest version older than the
checkpointed round (what a resume reads) and overwrites the other record. Writing zeroes
the record's tag, then writes the rows, then the new tag, so a process killed mid-write
leaves an empty record, never rows under a wrong round. Every access opens and closes the
file (the close-to-open consistency shared file systems give across hosts), and each
client's records are written only by the process that runs it (disjoint byte ranges).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from fedrec.utilities.checkpoint import CheckpointError

HEADER_BYTES = 4096
FILE_NAME = "rows.slots"
_MAGIC = b"fedrec row slots v1\n"
_EMPTY_TAG = bytes(8)


class RowSlotError(CheckpointError):
    """A slot file that does not hold the rows this run writes (another layout, truncated,
    not a file): like a bad checkpoint, the run's saved state cannot be resumed from."""


class RowSlots:
    """Two versioned records per client for tensors of a fixed shape and dtype.

    ``layout``: key -> (shape, dtype) of what each client stores; ``shard_dir(shard)``
    gives the folder of a shard of ``shard_size`` clients (the store's shard folders).
    """

    def __init__(self, layout: Mapping[str, Tuple[Sequence[int], torch.dtype]], shard_dir, shard_size: int) -> None:
        self.keys: List[str] = sorted(layout)
        self.shapes = {k: tuple(int(d) for d in layout[k][0]) for k in self.keys}
        self.dtypes = {k: layout[k][1] for k in self.keys}
        self.nbytes = {k: int(np.prod(self.shapes[k], dtype=np.int64)) * self.dtypes[k].itemsize for k in self.keys}
        self.payload = sum(self.nbytes.values())
        self.record = -(-(self.payload + 8) // 8) * 8  # rows, padding, then the tag
        self.shard_dir, self.shard_size = shard_dir, int(shard_size)
        description = {"shard_size": self.shard_size, "record_bytes": self.record,
                       "keys": [[k, list(self.shapes[k]), str(self.dtypes[k])] for k in self.keys]}
        header = _MAGIC + json.dumps(description, sort_keys=True).encode() + b"\n"
        if len(header) > HEADER_BYTES:
            raise ValueError(f"the row layout's description is longer than {HEADER_BYTES} bytes")
        self.header = header.ljust(HEADER_BYTES, b"\0")
        self.file_size = HEADER_BYTES + self.shard_size * 2 * self.record
        self._checked: set = set()  # shards whose header this object has verified

    # -- files ---------------------------------------------------------------------------
    def _path(self, shard: int) -> str:
        return os.path.join(self.shard_dir(shard), FILE_NAME)

    def _open(self, shard: int, create: bool) -> Optional[int]:
        """A descriptor of the shard's file (``create``: made first if missing), or None."""
        path = self._path(shard)
        try:
            fd = os.open(path, os.O_RDWR if create else os.O_RDONLY)
        except FileNotFoundError:
            if not create:
                return None
            self._create(shard, path)
            fd = os.open(path, os.O_RDWR)
        if shard not in self._checked:
            try:
                self._check_header(fd, path)
            except BaseException:
                os.close(fd)
                raise
            self._checked.add(shard)
        return fd

    def _create(self, shard: int, path: str) -> None:
        """The file with its header, appearing whole: written aside, then hard-linked into
        place (a process that loses the race finds the winner's file: the same header)."""
        folder = self.shard_dir(shard)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{FILE_NAME}.tmp-{os.getpid()}")
        with open(tmp, "wb") as handle:
            handle.write(self.header)
            handle.truncate(self.file_size)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, header first
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                os.write(fd, self.header)
                os.ftruncate(fd, self.file_size)
                os.close(fd)
        finally:
            os.unlink(tmp)

    def _check_header(self, fd: int, path: str) -> None:
        try:
            found, size = os.pread(fd, HEADER_BYTES, 0), os.fstat(fd).st_size
        except OSError as err:  # a folder in its place, say
            raise RowSlotError(f"{path} cannot be read as a row-slot file ({err.strerror}): "
                               "start the run in a fresh logdir") from None
        if not found.startswith(_MAGIC) or len(found) < HEADER_BYTES:
            raise RowSlotError(f"{path} is not a whole row-slot file (its {len(found):,}-byte header is missing "
                               "or cut short): start the run in a fresh logdir")
        if found != self.header:
            raise RowSlotError(f"{path} holds rows of another layout ({_described(found)}); this run stores "
                               f"{_described(self.header)}: start it in a fresh logdir")
        if size < self.file_size:
            raise RowSlotError(f"{path} is truncated ({size:,} bytes of {self.file_size:,}): its clients' rows "
                               "are lost; start the run in a fresh logdir")

    def _offset(self, client_id: int) -> int:
        return HEADER_BYTES + (client_id % self.shard_size) * 2 * self.record

    def _tags(self, pair: bytes) -> List[Optional[int]]:
        """The versions (rounds) the two records of ``pair`` hold, None where empty."""
        out = []
        for slot in range(2):
            end = (slot + 1) * self.record
            tag = int.from_bytes(pair[end - 8:end], "little", signed=True) if len(pair) >= end else 0
            out.append(tag - 1 if tag > 0 else None)
        return out

    # -- one client ------------------------------------------------------------------------
    def get(self, client_id: int, round_idx: int) -> Tuple[Optional[int], Dict[str, Tensor]]:
        """(version, tensors) of the client's newest version older than ``round_idx``, or (None, {})."""
        versions, rows = self.get_many(np.array([client_id], dtype=np.int64), round_idx)
        return (None, {}) if versions[0] < 0 else (int(versions[0]), {k: v[0] for k, v in rows.items()})

    def put(self, client_id: int, round_idx: int, tensors: Mapping[str, Tensor], checkpointed_round: int) -> int:
        """Write the client's rows after round ``round_idx``; returns the bytes written."""
        return self.put_many([(client_id, round_idx, self.encode(tensors), checkpointed_round)])

    @staticmethod
    def _target(versions: List[Optional[int]], round_idx: int, checkpointed_round: int) -> int:
        """The record to overwrite: one holding this round already (a resumed run writes
        the same values again), else an empty one, else one from a round not run yet (left
        by a killed run), else the older one that a resume does not need."""
        keep = max((v for v in versions if v is not None and v < min(checkpointed_round, round_idx)), default=None)

        def rank(slot: int) -> Tuple[int, int]:
            v = versions[slot]
            if v == round_idx:
                return 0, 0
            if v is None:
                return 1, 0
            if v > round_idx:
                return 2, 0
            return (4 if v == keep else 3), v

        return min(range(2), key=rank)

    # -- many clients ------------------------------------------------------------------------
    def get_many(self, client_ids: np.ndarray, round_idx: int) -> Tuple[np.ndarray, Dict[str, Tensor]]:
        """(version [n] int64, -1 where none; {key: [n, *shape]}, zeros where none) of each
        client's newest version older than ``round_idx``: one read per shard."""
        ids = np.asarray(client_ids, np.int64)
        versions = np.full(len(ids), -1, dtype=np.int64)
        raw = np.zeros((len(ids), self.payload), dtype=np.uint8)
        for shard in np.unique(ids // self.shard_size).tolist():
            here = np.flatnonzero(ids // self.shard_size == shard)
            span, first = self._read_span(shard, ids[here] % self.shard_size)
            if span is None:
                continue
            rows = ids[here] % self.shard_size - first
            tags = span[:, self.record - 8:].copy().view("<i8").reshape(-1, 2)[rows]  # [clients, 2]
            version = np.where((tags > 0) & (tags - 1 < round_idx), tags - 1, -1)
            slot = np.argmax(version, axis=1)  # a client's two records never hold the same round
            versions[here] = version[np.arange(len(here)), slot]
            hit = versions[here] >= 0
            raw[here[hit]] = span[(rows * 2 + slot)[hit], :self.payload]
        return versions, self._decode_many(raw)

    def _read_span(self, shard: int, local: np.ndarray) -> Tuple[Optional[np.ndarray], int]:
        """The records [2 per client, record bytes] of the shard's clients ``local``'s span
        (from the lowest to the highest), with the lowest; (None, 0) without a file."""
        fd = self._open(shard, create=False)
        if fd is None:
            return None, 0
        first, count = int(local.min()), int(local.max()) - int(local.min()) + 1
        try:
            data = os.pread(fd, count * 2 * self.record, HEADER_BYTES + first * 2 * self.record)
        finally:
            os.close(fd)
        span = np.zeros((count * 2, self.record), dtype=np.uint8)
        span.reshape(-1)[:len(data)] = np.frombuffer(data, dtype=np.uint8)  # unwritten bytes: zeros
        return span, first

    def put_many(self, entries: Sequence[Tuple[int, int, bytes, int]]) -> int:
        """:meth:`put` of many ``(client id, round, encoded rows, checkpointed round)``
        (rows as :meth:`encode` gives them): one open and one read of the tags per shard,
        then every record's writes (tags zeroed first, rows, new tags). Returns the bytes
        written."""
        by_shard: Dict[int, List[Tuple[int, int, bytes, int]]] = {}
        for client_id, round_idx, payload, checkpointed in entries:
            if len(payload) != self.payload:
                raise ValueError(f"row slots hold {self.payload} bytes a client, got {len(payload)}")
            by_shard.setdefault(int(client_id) // self.shard_size, []).append(
                (int(client_id), int(round_idx), bytes(payload), int(checkpointed)))
        written = 0
        for shard, items in by_shard.items():
            fd = self._open(shard, create=True)
            try:
                local = np.array([c % self.shard_size for c, _, _, _ in items], dtype=np.int64)
                first = int(local.min())
                pairs = os.pread(fd, (int(local.max()) - first + 1) * 2 * self.record,
                                 HEADER_BYTES + first * 2 * self.record)
                starts = []
                for (client_id, round_idx, _, checkpointed), at in zip(items, local.tolist()):
                    pair = pairs[(at - first) * 2 * self.record:(at - first + 1) * 2 * self.record]
                    slot = self._target(self._tags(pair), round_idx, checkpointed)
                    starts.append(self._offset(client_id) + slot * self.record)
                for start in starts:  # killed from here on: empty records, never wrong ones
                    os.pwrite(fd, _EMPTY_TAG, start + self.record - 8)
                for (_, _, payload, _), start in zip(items, starts):
                    os.pwrite(fd, payload, start)
                    written += len(payload)
                for (_, round_idx, _, _), start in zip(items, starts):
                    os.pwrite(fd, int(round_idx + 1).to_bytes(8, "little", signed=True), start + self.record - 8)
            finally:
                os.close(fd)
        return written

    def any_written(self, client_ids: np.ndarray) -> np.ndarray:
        """bool per client: whether either of its records holds a version."""
        return self.get_many(client_ids, np.iinfo(np.int64).max)[0] >= 0

    # -- bytes ---------------------------------------------------------------------------------
    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """A client's rows as one record's bytes (keys in sorted order); checks the layout."""
        if sorted(tensors) != self.keys:
            raise ValueError(f"row slots store exactly {self.keys}, got {sorted(tensors)}")
        parts = []
        for key in self.keys:
            value = tensors[key]
            if tuple(value.shape) != self.shapes[key] or value.dtype != self.dtypes[key]:
                raise ValueError(f"row slots store {key} as {list(self.shapes[key])} {self.dtypes[key]}, got "
                                 f"{list(value.shape)} {value.dtype}")
            parts.append(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return b"".join(parts)

    def _decode_many(self, raw: np.ndarray) -> Dict[str, Tensor]:
        out, at = {}, 0
        for key in self.keys:
            size = self.nbytes[key]
            block = torch.from_numpy(np.ascontiguousarray(raw[:, at:at + size]))
            out[key] = block.view(self.dtypes[key]).reshape(len(raw), *self.shapes[key])
            at += size
        return out

    def file_bytes(self, root: str) -> int:
        """Bytes every shard's slot file under ``root`` takes on disk (for reports: the
        blocks allocated, not the sparse files' full length)."""
        total = 0
        for folder, _, names in os.walk(root):
            if FILE_NAME in names:
                total += os.stat(os.path.join(folder, FILE_NAME)).st_blocks * 512
        return total


def _described(header: bytes) -> str:
    """A header's layout on one line (for errors)."""
    text = header.split(b"\0", 1)[0].removeprefix(_MAGIC)
    return " ".join(text.decode("utf-8", "replace").split())

