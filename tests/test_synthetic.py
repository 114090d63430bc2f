"""Synthetic Criteo-format generator: layout, determinism, non-IID users, planted labels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedrec.data import preprocess, synthesize
from fedrec.data.synthetic import BLOCK_ROWS, PREFERENCE_COLUMNS


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("synth") / "synthetic.txt"
    meta = synthesize(20_000, out, seed=3, num_users=200)
    return {"path": out, "meta": meta, "lines": out.read_text().split("\n")[:-1]}


def test_layout_matches_criteo(sample: dict) -> None:
    lines = sample["lines"]
    assert len(lines) == 20_000
    fields = [line.split("\t") for line in lines[:2000]]
    assert all(len(f) == 40 for f in fields)
    assert {f[0] for f in fields} == {"0", "1"}
    dense = [v for f in fields for v in f[1:14]]
    sparse = [v for f in fields for v in f[14:]]
    assert "" in dense and "" in sparse  # missing values are empty fields
    assert all(v == "" or int(v) >= -1 for v in dense)
    assert any(v.startswith("-") for v in dense)  # I2 has small negatives, like Kaggle's
    assert all(v == "" or (len(v) == 8 and int(v, 16) >= 0) for v in sparse)


def test_meta_and_users_file(sample: dict) -> None:
    meta, path = sample["meta"], sample["path"]
    assert json.loads(path.with_name(path.name + ".meta.json").read_text()) == meta
    for key in ("rows", "seed", "ctr", "optimal_auc"):
        assert key in meta
    assert meta["rows"] == 20_000 and meta["seed"] == 3
    labels = np.array([int(line[0]) for line in sample["lines"]])
    assert meta["ctr"] == pytest.approx(labels.mean())
    assert 0.2 < meta["ctr"] < 0.3  # target_ctr 0.25
    assert 0.7 < meta["optimal_auc"] < 1.0  # learnable, not trivial
    users = np.load(path.with_name(path.name + ".users.npy"))
    assert users.dtype == np.int64 and users.shape == (20_000,)
    assert 0 <= users.min() and users.max() < 200


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = synthesize(3000, tmp_path / "a.txt", seed=7)
    b = synthesize(3000, tmp_path / "b.txt", seed=7)
    c = synthesize(3000, tmp_path / "c.txt", seed=8)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert (tmp_path / "a.txt").read_bytes() != (tmp_path / "c.txt").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "a.txt.users.npy"), np.load(tmp_path / "b.txt.users.npy"))
    assert a == {**b, "users_file": a["users_file"]}
    assert a["ctr"] != c["ctr"] or a["optimal_auc"] != c["optimal_auc"]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_longer_file_starts_with_the_complete_blocks_of_a_shorter_one(tmp_path: Path) -> None:
    synthesize(BLOCK_ROWS + 3, tmp_path / "short.txt", seed=1, num_users=50)
    synthesize(BLOCK_ROWS + 40, tmp_path / "long.txt", seed=1, num_users=50)
    short_lines = (tmp_path / "short.txt").read_bytes().split(b"\n")[:-1]
    long_lines = (tmp_path / "long.txt").read_bytes().split(b"\n")[:-1]
    assert (len(short_lines), len(long_lines)) == (BLOCK_ROWS + 3, BLOCK_ROWS + 40)
    assert long_lines[:BLOCK_ROWS] == short_lines[:BLOCK_ROWS]
    users_short = np.load(tmp_path / "short.txt.users.npy")
    users_long = np.load(tmp_path / "long.txt.users.npy")
    np.testing.assert_array_equal(users_short[:BLOCK_ROWS], users_long[:BLOCK_ROWS])


def test_users_are_non_iid(tmp_path: Path) -> None:
    """Heavy users' category histograms differ from the global one far more than chance."""
    path = tmp_path / "niid.txt"
    synthesize(20_000, path, seed=5, num_users=100, vocab_sizes=[20] * 26)
    users = np.load(tmp_path / "niid.txt.users.npy")
    column = 14 + PREFERENCE_COLUMNS[0]
    values = np.array([line.split("\t")[column] for line in path.read_text().split("\n")[:-1]])
    _, codes = np.unique(values, return_inverse=True)
    overall = np.bincount(codes) / len(codes)

    def distance(user_ids: np.ndarray) -> float:
        heavy = np.argsort(np.bincount(user_ids))[-20:]
        tv = []
        for u in heavy:
            hist = np.bincount(codes[user_ids == u], minlength=len(overall)) / (user_ids == u).sum()
            tv.append(0.5 * np.abs(hist - overall).sum())
        return float(np.mean(tv))

    shuffled = np.random.default_rng(0).permutation(users)  # same user sizes, IID rows
    assert distance(users) > 1.5 * distance(shuffled)


def test_parameters_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_sizes"):
        synthesize(10, tmp_path / "x.txt", vocab_sizes=[10] * 3)
    with pytest.raises(ValueError, match="missing_rate"):
        synthesize(10, tmp_path / "x.txt", missing_rate=0.9)
    assert not list(tmp_path.iterdir())


def test_gzip_output_goes_through_preprocess(tmp_path: Path) -> None:
    out = tmp_path / "s.txt.gz"
    meta = synthesize(5000, out, seed=2, vocab_sizes=[5] * 26)
    assert len(gzip.decompress(out.read_bytes()).split(b"\n")) == 5001
    processed = preprocess(out, tmp_path / "processed", progress=False)
    assert processed["lines"] == sum(processed["splits"].values()) == meta["rows"]
    assert processed["has_users"] is True
    assert all(size <= 6 for size in processed["table_sizes"])  # 5 values + missing
