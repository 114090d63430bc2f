"""Read side of the processed dataset: memory-mapped splits plus their metadata.

Nothing is loaded up front: each split's arrays are ``np.load(..., mmap_mode="r")`` views,
so every client, process and loader shares the same pages of the one dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from fedrec.data.criteo import NUM_DENSE, NUM_SPARSE, READABLE_VERSIONS, SPLIT_NAMES
from fedrec.data.errors import DataError

PREPROCESS_HINT = "run `fedrec preprocess --config <config>` (it writes model.preproc.output_file)"


class ProcessedSplit:
    """One split (train, val or test): ``dense``, ``sparse``, ``label`` and ``user`` memmaps."""

    def __init__(self, name: str, dense: np.ndarray, sparse: np.ndarray, label: np.ndarray,
                 user: Optional[np.ndarray] = None) -> None:
        self.name = name
        self.dense = dense  # float32 [n, 13]
        self.sparse = sparse  # int32 [n, 26]
        self.label = label  # float32 [n]
        self.user = user  # int64 [n] latent user ids, or None

    def __len__(self) -> int:
        return len(self.label)

    def __repr__(self) -> str:
        return f"ProcessedSplit({self.name!r}, rows={len(self)}, users={self.user is not None})"

    @classmethod
    def open(cls, folder: Path, name: str, rows: int, has_users: bool) -> "ProcessedSplit":
        """Map ``folder/name/*.npy`` and check shapes and dtypes against the metadata."""
        expected = {
            "dense": (np.float32, (rows, NUM_DENSE)),
            "sparse": (np.int32, (rows, NUM_SPARSE)),
            "label": (np.float32, (rows,)),
        }
        if has_users:
            expected["user"] = (np.int64, (rows,))
        arrays: Dict[str, np.ndarray] = {}
        for key, (dtype, shape) in expected.items():
            path = folder / name / f"{key}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise DataError(f"{path} is missing: the processed dataset {folder} is incomplete; "
                                f"{PREPROCESS_HINT}") from None
            except ValueError as err:
                raise DataError(f"{path} is not a valid .npy file ({err}); {PREPROCESS_HINT}") from None
            if array.dtype != dtype or array.shape != shape:
                raise DataError(f"{path}: expected {np.dtype(dtype)} {shape}, found {array.dtype} "
                                f"{array.shape}; {PREPROCESS_HINT}")
            arrays[key] = array
        return cls(name, arrays["dense"], arrays["sparse"], arrays["label"], arrays.get("user"))


class ProcessedDataset:
    """A preprocessed folder (see docs/architecture.md): metadata plus lazily opened splits."""

    def __init__(self, path: Path, metadata: Dict[str, Any]) -> None:
        self.path = path
        self.metadata = metadata
        self.table_sizes: List[int] = [int(t) for t in metadata["table_sizes"]]
        self.num_dense: int = int(metadata["num_dense"])
        self.num_sparse: int = int(metadata["num_sparse"])
        self.has_users: bool = bool(metadata.get("has_users", False))
        self._splits: Dict[str, ProcessedSplit] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ProcessedDataset":
        """Open a processed folder; a missing or foreign one is a DataError saying what to run."""
        path = Path(path)
        meta_path = path / "metadata.json"
        if not path.is_dir():
            raise DataError(f"processed dataset {path} does not exist; {PREPROCESS_HINT}")
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing, so {path} is not a finished processed dataset; "
                            f"{PREPROCESS_HINT}")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path} is not valid JSON ({err}); {PREPROCESS_HINT}") from None
        _check_metadata(metadata, meta_path)
        return cls(path, metadata)

    @property
    def splits(self) -> Dict[str, int]:
        """Rows per split, from the metadata."""
        return {name: int(n) for name, n in self.metadata["splits"].items()}

    def split(self, name: str) -> ProcessedSplit:
        """The memory-mapped ``"train"``, ``"val"`` or ``"test"`` split (opened once)."""
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        if name not in self._splits:
            split = ProcessedSplit.open(self.path, name, self.splits[name], self.has_users)
            if "max_index" not in self.metadata:  # format 1 did not record it: look
                _check_indices(_column_max(split.sparse), self.table_sizes, self.path / "metadata.json",
                               f"the {name} split")
            self._splits[name] = split
        return self._splits[name]

    def __repr__(self) -> str:
        return f"ProcessedDataset({str(self.path)!r}, splits={self.splits})"


def _check_metadata(metadata: Any, meta_path: Path) -> None:
    """Refuse metadata from another format version, with missing keys or wrong table sizes."""
    if not isinstance(metadata, dict):
        raise DataError(f"{meta_path}: expected a JSON object; {PREPROCESS_HINT}")
    if metadata.get("format") == "movielens":
        raise DataError(f"{meta_path.parent} holds MovieLens ratings, not Criteo-format data: use a "
                        "recommendation model and trainer (train.name: rec, see configs/movielens_mf_fl.yml)")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DataError(f"{meta_path}: format_version {version!r}, but this fedrec reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; re-create it: {PREPROCESS_HINT}")
    missing = [k for k in ("num_dense", "num_sparse", "table_sizes", "splits") if k not in metadata]
    if missing:
        raise DataError(f"{meta_path}: missing key(s) {missing}; {PREPROCESS_HINT}")
    if metadata["num_dense"] != NUM_DENSE or metadata["num_sparse"] != NUM_SPARSE:
        raise DataError(f"{meta_path}: expected {NUM_DENSE} dense and {NUM_SPARSE} sparse features, "
                        f"found {metadata['num_dense']} and {metadata['num_sparse']}")
    sizes = _int_list(metadata["table_sizes"], meta_path, "table_sizes", minimum=1)
    if "max_index" in metadata:
        max_index = _int_list(metadata["max_index"], meta_path, "max_index", minimum=-1)
        _check_indices(max_index, sizes, meta_path, "the data")
    splits = metadata["splits"]
    absent = [s for s in SPLIT_NAMES if not isinstance(splits, dict) or s not in splits]
    if absent:
        raise DataError(f"{meta_path}: splits lack {absent}; {PREPROCESS_HINT}")


def _int_list(value: Any, meta_path: Path, key: str, minimum: int) -> List[int]:
    """``value`` as NUM_SPARSE ints >= ``minimum``, or a DataError naming the key."""
    if not isinstance(value, list) or len(value) != NUM_SPARSE:
        found = f"{len(value)} entries" if isinstance(value, list) else repr(value)
        raise DataError(f"{meta_path}: expected {NUM_SPARSE} {key} (one per categorical column), "
                        f"found {found}; the metadata was edited or comes from another program: "
                        f"{PREPROCESS_HINT}")
    for j, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool) or item < minimum:
            raise DataError(f"{meta_path}: {key}[{j}] (column C{j + 1}) must be an integer >= {minimum}, "
                            f"got {item!r}; {PREPROCESS_HINT}")
    return value


def _check_indices(max_index: List[int], table_sizes: List[int], meta_path: Path, where: str) -> None:
    """Every index in the data must have a row in its table: say which table is too small."""
    for j, (largest, size) in enumerate(zip(max_index, table_sizes, strict=True)):
        if largest >= size:
            raise DataError(
                f"{meta_path}: table_sizes[{j}] (column C{j + 1}) is {size}, but {where} holds index "
                f"{largest} in that column (it needs at least {largest + 1} rows); the metadata was "
                f"edited or does not belong to these arrays: {PREPROCESS_HINT}")


def _column_max(sparse: np.ndarray, block_rows: int = 1 << 20) -> List[int]:
    """Largest index per column of a memory-mapped [n, 26] array, a block at a time."""
    largest = np.full(sparse.shape[1], -1, dtype=np.int64)
    for start in range(0, len(sparse), block_rows):
        np.maximum(largest, sparse[start:start + block_rows].max(axis=0), out=largest)
    return [int(m) for m in largest]
