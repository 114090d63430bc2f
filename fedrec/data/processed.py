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

from fedrec.data.criteo import FORMAT_VERSION, NUM_DENSE, NUM_SPARSE, SPLIT_NAMES
from fedrec.data.errors import DataError

_PREPROCESS_HINT = "run `fedrec preprocess --config <config>` (it writes model.preproc.output_file)"


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
                                f"{_PREPROCESS_HINT}") from None
            except ValueError as err:
                raise DataError(f"{path} is not a valid .npy file ({err}); {_PREPROCESS_HINT}") from None
            if array.dtype != dtype or array.shape != shape:
                raise DataError(f"{path}: expected {np.dtype(dtype)} {shape}, found {array.dtype} "
                                f"{array.shape}; {_PREPROCESS_HINT}")
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
            raise DataError(f"processed dataset {path} does not exist; {_PREPROCESS_HINT}")
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing, so {path} is not a finished processed dataset; "
                            f"{_PREPROCESS_HINT}")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path} is not valid JSON ({err}); {_PREPROCESS_HINT}") from None
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
            self._splits[name] = ProcessedSplit.open(self.path, name, self.splits[name], self.has_users)
        return self._splits[name]

    def __repr__(self) -> str:
        return f"ProcessedDataset({str(self.path)!r}, splits={self.splits})"


def _check_metadata(metadata: Any, meta_path: Path) -> None:
    """Refuse metadata from another format version or with missing keys."""
    if not isinstance(metadata, dict):
        raise DataError(f"{meta_path}: expected a JSON object; {_PREPROCESS_HINT}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format_version {version!r}, but this fedrec reads version "
                        f"{FORMAT_VERSION}; re-create it: {_PREPROCESS_HINT}")
    missing = [k for k in ("num_dense", "num_sparse", "table_sizes", "splits") if k not in metadata]
    if missing:
        raise DataError(f"{meta_path}: missing key(s) {missing}; {_PREPROCESS_HINT}")
    if metadata["num_dense"] != NUM_DENSE or metadata["num_sparse"] != NUM_SPARSE:
        raise DataError(f"{meta_path}: expected {NUM_DENSE} dense and {NUM_SPARSE} sparse features, "
                        f"found {metadata['num_dense']} and {metadata['num_sparse']}")
    if len(metadata["table_sizes"]) != NUM_SPARSE:
        raise DataError(f"{meta_path}: expected {NUM_SPARSE} table_sizes, found {len(metadata['table_sizes'])}")
    absent = [s for s in SPLIT_NAMES if s not in metadata["splits"]]
    if absent:
        raise DataError(f"{meta_path}: splits lack {absent}; {_PREPROCESS_HINT}")
