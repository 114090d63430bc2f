"""A client's local data file: ``dense``, ``sparse`` and ``label`` in safetensors.

On a device the data are the device's own; for a loopback deployment and the tests,
``fedrec plan data`` cuts each client's rows (in the simulation's partition order) or a
held-out split out of a processed dataset. Reading checks the file against the plan's
input schema and says what does not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedrec.data.errors import DataError

_KEYS = ("dense", "sparse", "label")


@dataclasses.dataclass
class ClientData:
    """dense float32 [n, num_dense], sparse int64 [n, T], label float32 [n]."""

    dense: torch.Tensor
    sparse: torch.Tensor
    label: torch.Tensor
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])


def write_client_data(path: str | Path, dense: np.ndarray, sparse: np.ndarray, label: np.ndarray,
                      metadata: Mapping[str, Any] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"dense": torch.from_numpy(np.array(dense, np.float32, order="C")),
               "sparse": torch.from_numpy(np.array(sparse, np.int64, order="C")),
               "label": torch.from_numpy(np.array(label, np.float32, order="C"))}
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_client_data(path: str | Path, manifest: Mapping[str, Any]) -> ClientData:
    """Read ``path`` and check it against the plan's ``inputs`` schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"client data file {path} does not exist (write one with: fedrec plan data)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"client data file {path} is not a readable safetensors file ({err})") from None
    inputs = manifest["inputs"]
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise DataError(f"client data file {path} lacks {missing}; the plan needs {list(_KEYS)}")
    dense, sparse, label = tensors["dense"], tensors["sparse"], tensors["label"]
    num_dense = int(inputs["dense"]["shape"][1])
    num_sparse = int(inputs["sparse"]["shape"][1])
    n = int(label.shape[0]) if label.dim() == 1 else -1
    expected = {"dense": (torch.float32, (n, num_dense)), "sparse": (torch.int64, (n, num_sparse)),
                "label": (torch.float32, (n,))}
    for key, (dtype, shape) in expected.items():
        tensor = tensors[key]
        if tensor.dtype != dtype and not (key == "sparse" and tensor.dtype == torch.int32):
            raise DataError(f"client data file {path}: {key} is {str(tensor.dtype).split('.')[-1]}, the plan "
                            f"expects {str(dtype).split('.')[-1]}")
        if n < 0 or tuple(tensor.shape) != shape:
            want = ["rows"] + list(shape[1:])
            raise DataError(f"client data file {path}: {key} has shape {list(tensor.shape)}, the plan expects "
                            f"{want} (its schema: {num_dense} dense features, {num_sparse} categorical)")
    sparse = sparse.to(torch.int64)
    limits = torch.tensor(inputs["sparse"]["ids_below"], dtype=torch.int64)
    if len(sparse):
        bad = (sparse < 0) | (sparse >= limits)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise DataError(f"client data file {path}: row {row}, categorical column {col} holds id "
                            f"{int(sparse[row, col])}, outside the plan's table of {int(limits[col])} rows "
                            "(data preprocessed with another vocabulary?)")
    return ClientData(dense.contiguous(), sparse.contiguous(), label.contiguous(), metadata)


def export_client_data(config: dict[str, Any], logdir: str | Path | None, out: str | Path,
                       clients: list[int], splits: list[str]) -> list[Path]:
    """Write ``client-<id>.safetensors`` for each client (its rows in partition order,
    as the simulation visits them) and ``<split>.safetensors`` for each held-out split."""
    from fedrec.federated.client_runner import PARTITION_FILE, build_client_runner
    from fedrec.federated.partition import ClientPartition
    from fedrec.utilities.config import ConfigError

    runner = build_client_runner(config, None, new_partition=True)
    partition = runner.partition
    if logdir is not None and (Path(logdir) / PARTITION_FILE).is_file():
        partition = ClientPartition.load(Path(logdir) / PARTITION_FILE)
    dataset = runner.trainer.dataset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    train = dataset.split("train")
    for cid in clients:
        if not 0 <= cid < partition.num_clients:
            raise ConfigError(f"--clients: client {cid} does not exist; the split has clients 0.."
                              f"{partition.num_clients - 1}")
        rows = np.asarray(partition.indices_of(cid), np.int64)
        path = out / f"client-{cid}.safetensors"
        write_client_data(path, train.dense[rows], train.sparse[rows], train.label[rows],
                          {"client_id": cid, "rows": len(rows), "dataset": dataset.path})
        written.append(path)
    for name in splits:
        split = dataset.split(name)
        path = out / f"{name}.safetensors"
        write_client_data(path, split.dense[:], split.sparse[:], split.label[:],
                          {"split": name, "rows": len(split), "dataset": dataset.path})
        written.append(path)
    return written
