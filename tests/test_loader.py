"""ProcessedDataset and BatchLoader: opening, errors, batch contents, order, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.data import (
    Batch,
    BatchLoader,
    DataError,
    ProcessedDataset,
    ProcessedSplit,
    preprocess,
    synthesize,
)
from fedrec.utilities.random_state import derive_seed


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    synthesize(2_000, root / "data.txt", seed=11, num_users=30)
    preprocess(root / "data.txt", root / "processed", max_ind_range=500, hash_table_size="fixed",
               val_fraction=0.1,
               test_fraction=0.1, progress=False)
    return root / "processed"


@pytest.fixture(scope="module")
def train(processed: Path) -> ProcessedSplit:
    return ProcessedDataset.open(processed).split("train")


def collect(loader: BatchLoader) -> Batch:
    batches = list(loader)
    return Batch(torch.cat([b.dense for b in batches]), torch.cat([b.sparse for b in batches]),
                 torch.cat([b.label for b in batches]))


def assert_rows(batch: Batch, split: ProcessedSplit, rows: np.ndarray | slice) -> None:
    np.testing.assert_array_equal(batch.dense.numpy(), split.dense[rows])
    np.testing.assert_array_equal(batch.sparse.numpy(), split.sparse[rows])
    np.testing.assert_array_equal(batch.label.numpy(), split.label[rows])


# ---------------------------------------------------------------------------- dataset


def test_open_dataset(processed: Path) -> None:
    ds = ProcessedDataset.open(processed)
    assert ds.splits == {"train": 1600, "val": 200, "test": 200}
    assert ds.table_sizes == [500] * 26 and ds.num_dense == 13 and ds.has_users
    for name, rows in ds.splits.items():
        split = ds.split(name)
        assert len(split) == rows and split.user is not None
        assert split.dense.shape == (rows, 13) and split.sparse.shape == (rows, 26)
        assert isinstance(split.dense, np.memmap)  # shared pages, not a copy
    assert ds.split("train") is ds.split("train")
    users = np.concatenate([ds.split(s).user for s in ("train", "test", "val")])
    np.testing.assert_array_equal(users, np.load(processed.parent / "data.txt.users.npy"))
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.split("dev")


def test_open_missing_names_the_preprocess_command(tmp_path: Path, processed: Path) -> None:
    with pytest.raises(DataError, match="fedrec preprocess --config") as err:
        ProcessedDataset.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="metadata.json is missing.*fedrec preprocess"):
        ProcessedDataset.open(tmp_path / "half")


def test_open_refuses_other_format_versions_and_broken_folders(tmp_path: Path, processed: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(processed, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        ProcessedDataset.open(copy)
    (copy / "metadata.json").write_text(json.dumps(meta))
    (copy / "val" / "label.npy").unlink()
    ds = ProcessedDataset.open(copy)
    with pytest.raises(DataError, match="label.npy is missing"):
        ds.split("val")


# ---------------------------------------------------------------------------- batches


def test_sequential_batches_are_slices(train: ProcessedSplit) -> None:
    loader = BatchLoader(train, batch_size=300)
    assert len(loader) == 6  # 1600 = 5 * 300 + 100
    batches = list(loader)
    assert [len(b) for b in batches] == [300] * 5 + [100]
    b = batches[2]
    assert b.dense.dtype == torch.float32 and b.sparse.dtype == torch.int64 and b.label.dtype == torch.float32
    assert b.dense.shape == (300, 13) and b.sparse.shape == (300, 26) and b.label.shape == (300,)
    assert_rows(b, train, slice(600, 900))
    assert_rows(collect(loader), train, slice(None))
    dropped = BatchLoader(train, batch_size=300, drop_last=True)
    assert len(dropped) == 5 and [len(x) for x in dropped] == [300] * 5


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch(train: ProcessedSplit) -> None:
    loader = BatchLoader(train, batch_size=256, shuffle=True, seed=4)
    first = collect(loader)
    order = np.random.default_rng(derive_seed(4, 0)).permutation(len(train))
    assert_rows(first, train, order)
    assert torch.equal(collect(loader).dense, first.dense)  # same epoch, same order
    loader.set_epoch(1)
    second = collect(loader)
    assert not torch.equal(second.label, first.label) or not torch.equal(second.dense, first.dense)
    assert_rows(second, train, np.random.default_rng(derive_seed(4, 1)).permutation(len(train)))
    other_seed = collect(BatchLoader(train, batch_size=256, shuffle=True, seed=5))
    assert not torch.equal(other_seed.dense, first.dense)


def test_client_indices(train: ProcessedSplit) -> None:
    indices = np.array([5, 3, 1000, 7, 1599, 0, 42])
    batches = list(BatchLoader(train, batch_size=3, indices=indices))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert_rows(collect(BatchLoader(train, batch_size=3, indices=indices)), train, indices)
    shuffled = BatchLoader(train, batch_size=4, indices=indices, shuffle=True, seed=1)
    shuffled.set_epoch(3)
    perm = np.random.default_rng(derive_seed(1, 3)).permutation(len(indices))
    assert_rows(collect(shuffled), train, indices[perm])
    assert len(BatchLoader(train, batch_size=4, indices=np.zeros(0, dtype=np.int64))) == 0


def test_start_batch_resumes_mid_epoch(train: ProcessedSplit) -> None:
    full = list(BatchLoader(train, batch_size=100, shuffle=True, seed=2))
    resumed = BatchLoader(train, batch_size=100, shuffle=True, seed=2, start_batch=13)
    assert len(resumed) == 3
    tail = list(resumed)
    assert len(tail) == 3
    for a, b in zip(full[13:], tail):
        assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse)
    assert len(resumed) == 16 and len(list(resumed)) == 16  # the next pass is a full epoch


def test_bad_arguments(train: ProcessedSplit) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(train, batch_size=0)
    with pytest.raises(ValueError, match="indices must lie in"):
        BatchLoader(train, batch_size=4, indices=np.array([0, len(train)]))
    with pytest.raises(ValueError, match="1-D integer"):
        BatchLoader(train, batch_size=4, indices=np.array([0.5]))


def test_batch_to_device(train: ProcessedSplit) -> None:
    batch = next(iter(BatchLoader(train, batch_size=8)))
    moved = batch.to("cpu")
    assert torch.equal(moved.dense, batch.dense) and moved.sparse.dtype == torch.int64
    batch.dense[0, 0] = 123.0  # batches own their memory: the memmap is read-only
    assert train.dense[0, 0] != 123.0
