"""Criteo preprocessing: counts, values, encodings, splits, bad input and atomicity."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest

from fedrec.data import DataError, preprocess
from fedrec.data.criteo import (
    FILE_ORDER,
    REFERENCE_LINES,
    _line_problem,
    _split_method,
    fraction_split_sizes,
    reference_split_sizes,
)

CRITEO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo"
FIELD_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


@pytest.fixture
def kaggle_train() -> Path:
    path = CRITEO_DIR / "kaggle-train-head.txt"
    if not path.is_file():
        pytest.skip(f"real Criteo sample not found at {path} (expected ../shared/data/criteo)")
    return path


@pytest.fixture
def kaggle_test() -> Path:
    path = CRITEO_DIR / "kaggle-test-head.txt"
    if not path.is_file():
        pytest.skip(f"real Criteo sample not found at {path} (expected ../shared/data/criteo)")
    return path


def make_line(label: str = "0", dense: Optional[Dict[int, str]] = None,
              sparse: Optional[Dict[int, str]] = None) -> str:
    """A valid line with some fields overridden (keys: 0-based column within the group)."""
    d = ["1"] * 13
    s = ["68fd1e64"] * 26
    for k, v in (dense or {}).items():
        d[k] = v
    for k, v in (sparse or {}).items():
        s[k] = v
    return "\t".join([label, *d, *s])


def write_lines(path: Path, lines: Sequence[str], end: str = "\n") -> Path:
    path.write_text("".join(line + end for line in lines))
    return path


def load_rows(folder: Path) -> Dict[str, np.ndarray]:
    """All rows in source order (train, then test, then val)."""
    out = {}
    for key in ("dense", "sparse", "label", "user"):
        parts = [folder / split / f"{key}.npy" for split in FILE_ORDER]
        if parts[0].exists():
            out[key] = np.concatenate([np.load(p) for p in parts])
    return out


def reference_rows(lines: Sequence[str], max_ind_range: int) -> Dict[str, np.ndarray]:
    """Slow, obvious Python version of the transform, to check the fast one against."""
    fields = [line.split("\t") for line in lines]
    return {
        "label": np.array([float(f[0]) for f in fields], dtype=np.float32),
        "dense": np.array([[math.log(max(int(v), 0) + 1) if v else 0.0 for v in f[1:14]] for f in fields]),
        "sparse": np.array([[int(v, 16) % max_ind_range if v else 0 for v in f[14:]] for f in fields]),
    }


def reference_compact(sparse: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The reference DLRM's renumbering: each column's distinct hashed values -> 0..k-1."""
    out = np.empty_like(sparse)
    sizes = []
    for j in range(sparse.shape[1]):
        distinct = sorted(set(sparse[:, j].tolist()))
        index = {value: i for i, value in enumerate(distinct)}
        out[:, j] = [index[v] for v in sparse[:, j].tolist()]
        sizes.append(len(distinct))
    return out, sizes


def no_leftovers(parent: Path) -> bool:
    return not any(".tmp-" in p.name or ".old-" in p.name for p in parent.iterdir())


# ---------------------------------------------------------------------------- real sample


@pytest.mark.parametrize("hash_table_size", ["fixed", "occurring"])
def test_real_sample_rows_values_and_metadata(kaggle_train: Path, tmp_path: Path,
                                              hash_table_size: str) -> None:
    out = tmp_path / "processed"
    meta = preprocess(kaggle_train, out, max_ind_range=1000, hash_table_size=hash_table_size,
                      chunk_bytes=300_000, progress=False)
    lines = kaggle_train.read_text().split("\n")[:-1]
    assert meta["lines"] == len(lines) == 10109
    assert sum(meta["splits"].values()) == len(lines)
    assert meta["splits"] == {"train": 9099, "val": 505, "test": 505}
    assert meta["split_method"] == "fraction"
    expected = reference_rows(lines, 1000)
    if hash_table_size == "fixed":
        assert meta["table_sizes"] == [1000] * 26
    else:  # the reference DLRM: a row per hashed value that occurs, ids renumbered 0..k-1
        expected["sparse"], sizes = reference_compact(expected["sparse"])
        assert meta["table_sizes"] == sizes and max(sizes) < 1000 and min(sizes) < 10
    assert meta["max_index"] == expected["sparse"].max(axis=0).tolist()
    assert meta["source"]["sha256"] == hashlib.sha256(kaggle_train.read_bytes()).hexdigest()
    assert meta["source"]["bytes"] == kaggle_train.stat().st_size
    assert meta["bad_lines_skipped"] == 0 and meta["has_users"] is False
    assert json.loads((out / "metadata.json").read_text()) == meta

    rows = load_rows(out)
    assert rows["dense"].dtype == np.float32 and rows["sparse"].dtype == np.int32
    assert rows["label"].dtype == np.float32
    np.testing.assert_array_equal(rows["label"], expected["label"])
    np.testing.assert_allclose(rows["dense"], expected["dense"], rtol=1e-6)
    np.testing.assert_array_equal(rows["sparse"], expected["sparse"])
    for split in ("train", "val", "test"):  # every array opens memory-mapped
        assert np.load(out / split / "sparse.npy", mmap_mode="r").shape == (meta["splits"][split], 26)


def test_gzip_and_small_blocks_give_the_same_rows(kaggle_train: Path, tmp_path: Path) -> None:
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress(kaggle_train.read_bytes()))
    plain = preprocess(kaggle_train, tmp_path / "plain", progress=False)
    meta = preprocess(gz, tmp_path / "gz", chunk_bytes=64 << 10, progress=False)
    assert meta["lines"] == plain["lines"] == 10109
    assert meta["source"]["sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert meta["table_sizes"] == plain["table_sizes"]
    a, b = load_rows(tmp_path / "plain"), load_rows(tmp_path / "gz")
    for key in ("dense", "sparse", "label"):
        np.testing.assert_array_equal(a[key], b[key])


def test_unlabeled_test_file_is_recognized(kaggle_test: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unlabeled"):
        preprocess(kaggle_test, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    meta = preprocess(kaggle_test, tmp_path / "out", has_label=False, max_ind_range=100, progress=False)
    assert meta["lines"] == sum(meta["splits"].values()) == 10000
    assert not load_rows(tmp_path / "out")["label"].any()


# ---------------------------------------------------------------------------- values


def test_dense_transform_hand_checked(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "tiny.txt", [
        make_line("1", dense={0: "0", 1: "-3", 2: "", 3: "5", 4: "1000", 5: "007", 12: "-0"}),
        make_line("0", dense={0: "", 1: "2", 12: "123456789012345678"}),
    ])
    preprocess(src, tmp_path / "out", split="fraction", val_fraction=0, test_fraction=0,
               max_ind_range=10, progress=False)
    rows = load_rows(tmp_path / "out")
    dense = rows["dense"]
    assert dense.dtype == np.float32 and dense.shape == (2, 13)
    np.testing.assert_allclose(dense[0, :6], np.float32([0, 0, 0, math.log(6), math.log(1001), math.log(8)]))
    np.testing.assert_allclose(dense[0, 6:12], math.log(2))
    assert dense[0, 12] == 0
    np.testing.assert_allclose(dense[1, :2], np.float32([0, math.log(3)]))
    np.testing.assert_allclose(dense[1, 12], math.log(123456789012345678 + 1), rtol=1e-6)
    np.testing.assert_array_equal(rows["label"], [1, 0])


def test_hashing_indices(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "h.txt", [
        make_line(sparse={0: "", 1: "0000000a", 2: "ffffffff", 3: "FFFFFFFFFFFFFFFF", 4: "7"}),
    ])
    meta = preprocess(src, tmp_path / "out", max_ind_range=7, hash_table_size="fixed", progress=False)
    sparse = load_rows(tmp_path / "out")["sparse"][0]
    assert meta["table_sizes"] == [7] * 26
    assert list(sparse[:5]) == [0, 10 % 7, 0xFFFFFFFF % 7, 0xFFFFFFFFFFFFFFFF % 7, 0]
    assert sparse[5] == 0x68FD1E64 % 7


def test_vocabulary_with_and_without_threshold(tmp_path: Path) -> None:
    # Column C1 values: 'b' x3, 'a' x2, 'c' x1, missing x1 (also 'A' == 'a': same hex value).
    c1 = ["b", "b", "a", "", "c", "A", "b"]
    src = write_lines(tmp_path / "v.txt", [make_line(sparse={0: v}) for v in c1])
    kw = {"split": "fraction", "val_fraction": 0, "test_fraction": 0, "progress": False}

    meta = preprocess(src, tmp_path / "all", threshold=0, **kw)
    assert meta["table_sizes"][0] == 4  # missing + a, b, c
    assert meta["table_sizes"][1] == 2  # missing + 68fd1e64
    assert list(load_rows(tmp_path / "all")["sparse"][:, 0]) == [2, 2, 1, 0, 3, 1, 2]

    meta = preprocess(src, tmp_path / "thr", threshold=2, **kw)
    assert meta["table_sizes"][0] == 4  # missing, rare, a, b
    assert meta["table_sizes"][1] == 3
    assert list(load_rows(tmp_path / "thr")["sparse"][:, 0]) == [3, 3, 2, 0, 1, 2, 3]

    meta = preprocess(src, tmp_path / "high", threshold=100, **kw)
    assert meta["table_sizes"][0] == 2  # everything is rare
    assert list(load_rows(tmp_path / "high")["sparse"][:, 0]) == [1, 1, 1, 0, 1, 1, 1]


def test_vocabulary_on_real_sample_is_consistent(kaggle_train: Path, tmp_path: Path) -> None:
    meta = preprocess(kaggle_train, tmp_path / "out", threshold=3, chunk_bytes=100_000, progress=False)
    sparse = load_rows(tmp_path / "out")["sparse"]
    assert (sparse >= 0).all() and (sparse < np.array(meta["table_sizes"])).all()
    # Each kept value's index is unique and the index order follows the hex value order.
    values = [[int(v, 16) if v else -1 for v in line.split("\t")[14:]]
              for line in kaggle_train.read_text().split("\n")[:-1]]
    column = np.array(values)[:, 2]
    idx = sparse[:, 2]
    kept = idx >= 2
    pairs = sorted(set(zip(column[kept].tolist(), idx[kept].tolist())))
    assert [i for _, i in pairs] == list(range(2, 2 + len(pairs)))


# ---------------------------------------------------------------------------- bad input

BAD_LINES = [
    ("fields", make_line() + "\textra", "line 3: expected 40 tab-separated fields, got 41"),
    ("dense", make_line(dense={3: "3.5"}), "line 3: field 5 (I4): expected an integer, got '3.5'"),
    ("long int", make_line(dense={0: "9" * 19}), "line 3: field 2 (I1): expected an integer of at most 18"),
    ("hex", make_line(sparse={1: "xyz"}), "line 3: field 16 (C2): expected a hex string, got 'xyz'"),
    ("long hex", make_line(sparse={0: "1" * 17}), "line 3: field 15 (C1): expected at most 16 hex digits"),
    ("label", make_line(label="2"), "line 3: field 1 (label): expected 0 or 1, got '2'"),
    ("empty", "", "line 3: empty line"),
]


@pytest.mark.parametrize("kind,bad,message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
@pytest.mark.parametrize("max_ind_range", [-1, 100])
def test_bad_line_stops_and_leaves_nothing(tmp_path: Path, kind: str, bad: str, message: str,
                                           max_ind_range: int) -> None:
    src = write_lines(tmp_path / "train.txt", [make_line(), make_line(), bad, make_line()])
    with pytest.raises(DataError) as err:
        preprocess(src, tmp_path / "out", max_ind_range=max_ind_range, progress=False)
    assert str(src) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path)


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    good = write_lines(tmp_path / "good.txt", [make_line()] * 5)
    bad = write_lines(tmp_path / "bad.txt", [make_line()] * 5 + [make_line(dense={0: "x"})])
    out = tmp_path / "out"
    first = preprocess(good, out, progress=False)
    with pytest.raises(DataError, match="line 6: field 2 \\(I1\\)"):
        preprocess(bad, out, progress=False)
    assert json.loads((out / "metadata.json").read_text()) == first
    assert no_leftovers(tmp_path)
    second = preprocess(bad, out, skip_bad_lines=True, progress=False)  # replaced on success
    assert second["bad_lines_skipped"] == 1 and json.loads((out / "metadata.json").read_text()) == second
    assert no_leftovers(tmp_path)


def test_bad_line_number_is_global_across_blocks(tmp_path: Path) -> None:
    lines = [make_line()] * 300
    lines[256] = make_line(sparse={25: "ghij"})
    src = write_lines(tmp_path / "t.txt", lines)
    with pytest.raises(DataError, match=r"line 257: field 40 \(C26\)"):
        preprocess(src, tmp_path / "out", chunk_bytes=4096, max_ind_range=10, progress=False)


@pytest.mark.parametrize("max_ind_range", [-1, 1000])
def test_skip_bad_lines_counts_exactly_and_keeps_users_aligned(tmp_path: Path, max_ind_range: int) -> None:
    lines, bad = [], {3, 7, 8, 60, 119}
    for i in range(120):
        if i == 3:
            lines.append("1\t2\t3")
        elif i == 7:
            lines.append("")
        elif i in bad:
            lines.append(make_line(dense={i % 13: "1.5"}))
        else:
            lines.append(make_line(label=str(i % 2), dense={0: str(i)}))
    src = write_lines(tmp_path / "skip.txt", lines)
    np.save(tmp_path / "skip.txt.users.npy", np.arange(120, dtype=np.int64) * 10)
    meta = preprocess(src, tmp_path / "out", skip_bad_lines=True, chunk_bytes=2048,
                      max_ind_range=max_ind_range, progress=False)
    good = [i for i in range(120) if i not in bad]
    assert meta["bad_lines_skipped"] == len(bad)
    assert meta["lines"] == 120 and sum(meta["splits"].values()) == len(good)
    assert meta["splits"] == fraction_split_sizes(len(good), 0.05, 0.05)
    rows = load_rows(tmp_path / "out")
    np.testing.assert_allclose(rows["dense"][:, 0], np.log1p(np.array(good, dtype=np.float64)), rtol=1e-6)
    np.testing.assert_array_equal(rows["user"], np.array(good) * 10)
    assert meta["has_users"] is True


@pytest.mark.parametrize("value,ok", [
    ("+5", False), (" 5", False), ("5 ", False), ("0x10", False), ("1e3", False), ("-", False),
    ("--1", False), ("5-", False), ("-0", True), ("007", True), ("9" * 18, True), ("9" * 19, False),
    ("-" + "9" * 18, True), ("\u0663", False),
])
def test_fast_and_line_checks_agree_on_dense(tmp_path: Path, value: str, ok: bool) -> None:
    assert (_line_problem(make_line(dense={4: value}).encode(), FIELD_NAMES) is None) == ok
    _check_both_paths_agree(tmp_path, make_line(dense={4: value}), ok)


@pytest.mark.parametrize("value,ok", [
    ("0x1f", False), ("g", False), ("ABCDEF", True), ("abcdef0123456789", True),
    ("abcdef01234567890", False), (" ab", False), ("-1", False), ("0", True),
])
def test_fast_and_line_checks_agree_on_hex(tmp_path: Path, value: str, ok: bool) -> None:
    assert (_line_problem(make_line(sparse={7: value}).encode(), FIELD_NAMES) is None) == ok
    _check_both_paths_agree(tmp_path, make_line(sparse={7: value}), ok)


def _check_both_paths_agree(tmp_path: Path, line: str, ok: bool) -> None:
    """Skipped counts match with the vectorized path and the line-by-line path."""
    fast = write_lines(tmp_path / "fast.txt", [make_line(), line, make_line()])
    slow = write_lines(tmp_path / "slow.txt", [make_line(), line, "1\t2", make_line()])  # forces slow path
    for src, extra in ((fast, 0), (slow, 1)):
        meta = preprocess(src, tmp_path / src.stem, skip_bad_lines=True, max_ind_range=50, progress=False)
        assert meta["bad_lines_skipped"] == (0 if ok else 1) + extra, src.name


def test_blank_lines_and_line_endings(tmp_path: Path) -> None:
    lines = [make_line(dense={0: str(i)}) for i in range(5)]
    trailing = tmp_path / "trailing.txt"
    trailing.write_text("\n".join(lines) + "\n\n\n")
    assert preprocess(trailing, tmp_path / "a", progress=False)["lines"] == 5
    no_newline = tmp_path / "no_newline.txt"
    no_newline.write_text("\n".join(lines))
    assert preprocess(no_newline, tmp_path / "b", progress=False)["lines"] == 5
    crlf = write_lines(tmp_path / "crlf.txt", lines, end="\r\n")
    preprocess(crlf, tmp_path / "c", max_ind_range=97, progress=False)
    preprocess(no_newline, tmp_path / "d", max_ind_range=97, progress=False)
    for key in ("dense", "sparse", "label"):
        np.testing.assert_array_equal(load_rows(tmp_path / "c")[key], load_rows(tmp_path / "d")[key])
    interior = tmp_path / "interior.txt"
    interior.write_text(lines[0] + "\n\n" + lines[1] + "\n")
    with pytest.raises(DataError, match="line 2: empty line"):
        preprocess(interior, tmp_path / "e", progress=False)


def test_missing_empty_and_corrupt_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        preprocess(tmp_path / "nope.txt", tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no data lines"):
        preprocess(tmp_path / "empty.txt", tmp_path / "out", progress=False)
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"0\t1\n" * 1000)[:-20])
    with pytest.raises(DataError, match="gzip"):
        preprocess(tmp_path / "broken.gz", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_users_file_length_must_match(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "u.txt", [make_line()] * 4)
    np.save(tmp_path / "ids.npy", np.arange(3))
    with pytest.raises(DataError, match="3 ids but the data file has 4 lines"):
        preprocess(src, tmp_path / "out", users_file=tmp_path / "ids.npy", progress=False)


# ---------------------------------------------------------------------------- splits


def test_reference_split_arithmetic() -> None:
    sizes = reference_split_sizes(REFERENCE_LINES)
    base, extras = divmod(REFERENCE_LINES, 7)
    assert (base, extras) == (6_548_659, 4)
    days = [len(a) for a in np.array_split(np.empty(REFERENCE_LINES, dtype=np.uint8), 7)]
    assert days == [base + 1] * 4 + [base] * 3
    assert sizes["train"] == sum(days[:6]) == 39_291_958
    assert sizes["test"] == 3_274_330 and sizes["val"] == 3_274_329  # day 6: first half is test
    assert sum(sizes.values()) == REFERENCE_LINES
    assert _split_method("auto", REFERENCE_LINES) == "reference_7day"
    assert _split_method("fraction", REFERENCE_LINES) == "fraction"
    assert _split_method("auto", REFERENCE_LINES - 1) == "fraction"


def test_fraction_split_sizes() -> None:
    assert fraction_split_sizes(1000, 0.05, 0.05) == {"train": 900, "val": 50, "test": 50}
    assert fraction_split_sizes(3, 0.05, 0.05) == {"train": 1, "val": 1, "test": 1}
    assert fraction_split_sizes(10, 0.0, 0.1) == {"train": 9, "val": 0, "test": 1}
    assert fraction_split_sizes(2, 0.05, 0.05) == {"train": 2, "val": 0, "test": 0}


def test_splits_are_contiguous_tail_test_then_val(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "s.txt", [make_line(dense={0: str(i)}) for i in range(100)])
    meta = preprocess(src, tmp_path / "out", val_fraction=0.1, test_fraction=0.2, progress=False)
    assert meta["splits"] == {"train": 70, "val": 10, "test": 20}
    first = {s: np.expm1(np.load(tmp_path / "out" / s / "dense.npy")[:, 0]).round().astype(int)
             for s in ("train", "val", "test")}
    assert list(first["train"]) == list(range(70))
    assert list(first["test"]) == list(range(70, 90))
    assert list(first["val"]) == list(range(90, 100))


def test_option_validation(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "o.txt", [make_line()])
    with pytest.raises(ValueError, match="split"):
        preprocess(src, tmp_path / "out", split="days", progress=False)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        preprocess(src, tmp_path / "out", val_fraction=0.5, test_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="max_ind_range"):
        preprocess(src, tmp_path / "out", max_ind_range=2**31, progress=False)
