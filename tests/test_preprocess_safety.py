"""Preprocess as a new user meets it: never lose their files, clear one-line errors (issue 9).

Every case runs through the real entry point (``fedrec.cli.main``) and checks the exit
status, the one-line message, and that nothing the user had was lost or changed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import yaml
from conftest import PROJECT_ROOT, small_config

from fedrec.cli import main
from fedrec.data import DataError, ProcessedDataset, criteo, hashing, preprocess, synthesize

VOCAB = [3, 5, 40, 200, 7, 2, 90, 11, 1, 300, 60, 25, 4, 13, 150, 30, 6, 9, 70, 2, 33, 8, 5, 120, 17, 50]


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A small synthetic Criteo file with latent users, in its own folder beside a README."""
    folder = tmp_path / "d2"
    folder.mkdir()
    synthesize(400, folder / "raw.txt", seed=3, num_users=20, vocab_sizes=VOCAB)
    (folder / "README.md").write_text("my notes about this data\n")
    return folder / "raw.txt"


@pytest.fixture
def cfg(tmp_path: Path, raw: Path) -> Path:
    """The small test config as a YAML file (datafile and output_file given as flags)."""
    config = small_config(raw, tmp_path / "processed")
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(cfg: Path, datafile: Path, output: Path, *extra: str) -> int:
    return main(["preprocess", "--config", str(cfg), "--datafile", str(datafile),
                 "--output_file", str(output), *extra])


def snapshot(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture, command: str = "preprocess") -> str:
    err = capsys.readouterr().err.strip()
    progress = re.compile(r": (scan|write): +[0-9]+%\|")  # tqdm's bars (erased on a terminal)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not progress.search(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fedrec {command}: error: ") and "Traceback" not in err
    return lines[0]


def leftovers(parent: Path) -> List[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------- item 1: output


def test_output_folder_holding_the_input_is_refused(cfg: Path, raw: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    # the reproduction: mkdir d2 && cp raw.txt d2/ && fedrec preprocess ... --output_file d2
    before = snapshot(tmp_path / "d2")
    assert run(cfg, raw, raw.parent) == 2
    line = one_error_line(capsys)
    assert f"output_file {raw.parent} contains the input {raw}" in line
    assert snapshot(tmp_path / "d2") == before and (raw.parent / "README.md").is_file()
    assert leftovers(tmp_path) == []


def test_output_that_is_the_input_file_is_refused(cfg: Path, raw: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    before = snapshot(tmp_path / "d2")
    assert run(cfg, raw, raw) == 2
    assert f"output_file {raw} is the input {raw}" in one_error_line(capsys)
    assert snapshot(tmp_path / "d2") == before


def test_output_containing_the_users_file_is_refused(cfg: Path, raw: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    users = tmp_path / "ids" / "users.npy"
    users.parent.mkdir()
    users.write_bytes((raw.parent / "raw.txt.users.npy").read_bytes())
    before = snapshot(tmp_path / "ids")
    assert run(cfg, raw, users.parent, "--set", f"model.preproc.users_file={users}") == 2
    assert f"contains the input {users}" in one_error_line(capsys)
    assert snapshot(tmp_path / "ids") == before


@pytest.mark.parametrize("kind", ["file", "folder", "foreign_metadata", "dataset_plus_notes"])
def test_existing_output_that_is_not_a_dataset_is_refused(cfg: Path, raw: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, kind: str) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("an unrelated file\n")
    elif kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
    elif kind == "foreign_metadata":
        out.mkdir()
        (out / "metadata.json").write_text('{"author": "someone else"}\n')
    else:
        assert run(cfg, raw, out) == 0
        (out / "notes.txt").write_text("keep me\n")
        capsys.readouterr()
    before = snapshot(tmp_path)
    assert run(cfg, raw, out) == 2
    line = one_error_line(capsys)
    assert f"output_file {out} " in line and "preprocess replaces only a processed dataset" in line
    expected = {"file": "is an existing file", "folder": "folder without metadata.json (holding notes.txt)",
                "foreign_metadata": "was not written by preprocess",
                "dataset_plus_notes": "also holds notes.txt"}[kind]
    assert expected in line
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_earlier_dataset_and_empty_folder_are_replaced(cfg: Path, raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty folder holds nothing to lose
    assert run(cfg, raw, out) == 0
    first = json.loads((out / "metadata.json").read_text())
    assert first["written_by"] == "fedrec preprocess"
    assert run(cfg, raw, out, "--set", "model.preproc.val_fraction=0.2") == 0  # an earlier dataset: replaced
    assert json.loads((out / "metadata.json").read_text())["splits"] != first["splits"]
    assert leftovers(tmp_path) == []


def test_something_appearing_at_the_output_during_the_run_is_kept(
        cfg: Path, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_scan = criteo._scan

    def scan_then_user_writes(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        out.mkdir()
        (out / "results.csv").write_text("a user's results\n")
        return result

    monkeypatch.setattr(criteo, "_scan", scan_then_user_writes)
    assert run(cfg, raw, out) == 2
    assert "appeared while preprocessing" in one_error_line(capsys)
    assert (out / "results.csv").read_text() == "a user's results\n"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- item 7: leftovers


def test_leftovers_of_killed_runs_are_removed(cfg: Path, raw: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    assert run(cfg, raw, out) == 0
    gone = dead_pid()
    tmp_dead = tmp_path / f"out.tmp-{gone}"
    (tmp_dead / "train").mkdir(parents=True)
    (tmp_dead / "train" / "sparse.npy").write_bytes(b"partial")
    old_dead = tmp_path / f"out.old-{gone}"
    old_dead.mkdir()
    for name in ("metadata.json", "train", "val", "test"):
        src = out / name
        (old_dead / name).write_bytes(src.read_bytes()) if src.is_file() else (old_dead / name).mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_alive = tmp_path / f"out.tmp-{alive.pid}"
        tmp_alive.mkdir()
        foreign = tmp_path / f"out.tmp-{dead_pid()}"  # the right name, but not our layout
        foreign.mkdir()
        (foreign / "thesis.tex").write_text("not preprocess output\n")
        other_output = tmp_path / f"other.tmp-{gone}"  # the pattern of another output
        other_output.mkdir()
        with caplog.at_level(logging.INFO, logger="fedrec.data.output"):
            assert run(cfg, raw, out) == 0
        assert not tmp_dead.exists() and not old_dead.exists()
        assert tmp_alive.is_dir() and (foreign / "thesis.tex").is_file() and other_output.is_dir()
        assert f"removed {tmp_dead}, left by preprocess process {gone}" in caplog.text
        assert f"removed {old_dead}" in caplog.text
        assert f"left {foreign} alone" in caplog.text
    finally:
        alive.kill()
        alive.wait()


def test_dataset_moved_aside_by_a_killed_swap_is_restored(cfg: Path, raw: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # kill -9 between "move the earlier dataset aside" and "move the new one in"
    out = tmp_path / "out"
    assert run(cfg, raw, out) == 0
    before = snapshot(out)
    aside = tmp_path / f"out.old-{dead_pid()}"
    os.replace(out, aside)
    bad = raw.parent / "bad.txt"
    bad.write_text(raw.read_text() + "1\tnot a line\n")
    assert run(cfg, bad, out) == 2  # the new run fails: the earlier dataset must be back
    assert snapshot(out) == before and not aside.exists()
    assert f"restored {aside} to {out}" in caplog.text


# ---------------------------------------------------------------------------- item 7: empty splits


def test_empty_val_split_warns(cfg: Path, raw: Path, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert run(cfg, raw, tmp_path / "out", "--set", "model.preproc.val_fraction=0") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the val split is empty (val_fraction is 0)" in warnings[0]
    assert "set model.preproc.val_fraction > 0" in warnings[0]


def test_too_few_rows_warn_for_both_held_out_splits(cfg: Path, raw: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    tiny = raw.parent / "tiny.txt"
    tiny.write_text("".join(raw.read_text().splitlines(keepends=True)[:2]))
    with caplog.at_level(logging.WARNING):
        assert run(cfg, tiny, tmp_path / "out") == 0
    text = caplog.text
    assert "the val split is empty (only 2 rows)" in text and "the test split is empty (only 2 rows)" in text


def test_no_warning_when_every_split_has_rows(cfg: Path, raw: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert run(cfg, raw, tmp_path / "out") == 0
    assert "split is empty" not in caplog.text


# ---------------------------------------------------------------------------- item 6: option errors

BAD_OPTIONS = [
    (["--set", "model.preproc.val_fraction=1.5"], "model.preproc.val_fraction must be a number in [0, 1), got 1.5"),
    (["--set", "model.preproc.test_fraction=-0.1"], "model.preproc.test_fraction must be a number in [0, 1)"),
    (["--set", "model.preproc.val_fraction=0.5", "--set", "model.preproc.test_fraction=0.5"],
     "model.preproc.val_fraction + model.preproc.test_fraction must be < 1"),
    (["--max_ind_range", str(2**31)], "model.preproc.max_ind_range must be an int below 2**31"),
    (["--max_ind_range", str(10**12)], "model.preproc.max_ind_range must be an int below 2**31"),
    (["--set", "model.preproc.split=days"], "model.preproc.split must be 'auto' or 'fraction', got 'days'"),
    (["--set", "model.preproc.hash_table_size=compact"], "model.preproc.hash_table_size must be 'occurring'"),
]


@pytest.mark.parametrize("flags,message", BAD_OPTIONS, ids=[m.split(" must")[0][14:] + str(i)
                                                             for i, (_, m) in enumerate(BAD_OPTIONS)])
def test_bad_preprocess_options_are_one_line_errors(cfg: Path, raw: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture, flags: List[str],
                                                    message: str) -> None:
    assert run(cfg, raw, tmp_path / "out", *flags) == 2
    line = one_error_line(capsys)
    assert message in line and str(cfg) in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("rows", ["0", "-5"])
def test_synth_with_no_rows_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, rows: str) -> None:
    assert main(["synth", "--rows", rows, "--out", str(tmp_path / "x.txt")]) == 2
    assert f"rows must be >= 1 (the number of lines to write), got {rows}" in one_error_line(capsys, "synth")
    assert list(tmp_path.iterdir()) == []


def test_synth_error_from_the_installed_command_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fedrec.cli", "synth", "--rows", "0", "--out",
                             str(tmp_path / "x.txt")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fedrec synth: error: synthetic data: rows must be >= 1 (the number of lines to write), got 0"]


def test_read_only_output_folder_is_a_one_line_error(cfg: Path, raw: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):  # what a read-only folder answers (root ignores modes)
        if Path(path).parent == parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    assert run(cfg, raw, parent / "out") == 2
    line = one_error_line(capsys)
    assert f"cannot write the processed dataset {parent / 'out'}: Permission denied" in line
    assert f"check the permissions of {parent}" in line
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(cfg: Path, raw: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert run(cfg, raw, parent / "out") == 2
        assert "Permission denied" in one_error_line(capsys)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_full_disk_is_a_one_line_error_and_keeps_the_earlier_dataset(
        cfg: Path, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert run(cfg, raw, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    real_write = criteo._NpyWriter.write

    def write_until_full(self, array):
        if self.path.name == "sparse.npy" and self.path.parent.name == "test":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, array)

    monkeypatch.setattr(criteo._NpyWriter, "write", write_until_full)
    assert run(cfg, raw, out) == 2
    line = one_error_line(capsys)
    assert f"cannot write the processed dataset {out}: No space left on device" in line
    assert "free some space" in line
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_unreadable_data_file_is_a_one_line_error(cfg: Path, raw: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = criteo._Source.__init__

    def refuse(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(criteo._Source, "__init__", refuse)
    assert real_open is not refuse
    assert run(cfg, raw, tmp_path / "out") == 2
    assert f"cannot read the data file {raw}: Permission denied" in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- item 6: table_sizes


def _edit_metadata(folder: Path, **changes) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    meta.update(changes)
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_wrong_table_sizes_in_metadata_stop_training_with_one_line(cfg: Path, raw: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert run(cfg, raw, out, "--max_ind_range", "1000") == 0
    sizes = json.loads((out / "metadata.json").read_text())["table_sizes"]
    _edit_metadata(out, table_sizes=sizes[:3] + [1] + sizes[4:])
    capsys.readouterr()
    code = main(["train", "--config", str(cfg), "--output_file", str(out), "--logdir", str(tmp_path / "run"),
                 "--num_batches", "2", "--set", "train.config.num_epochs=null"])
    assert code == 2
    line = one_error_line(capsys, "train")
    assert f"{out / 'metadata.json'}: table_sizes[3] (column C4) is 1, but the data holds index" in line
    assert f"run `fedrec preprocess --config {cfg}`" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("table_sizes,message", [
    ([10] * 25, "expected 26 table_sizes (one per categorical column), found 25 entries"),
    ([10] * 25 + [0], "table_sizes[25] (column C26) must be an integer >= 1, got 0"),
    ([10] * 25 + ["10"], "table_sizes[25] (column C26) must be an integer >= 1, got '10'"),
])
def test_malformed_table_sizes_name_the_metadata_file(cfg: Path, raw: Path, tmp_path: Path,
                                                      table_sizes: list, message: str) -> None:
    out = tmp_path / "out"
    assert run(cfg, raw, out) == 0
    _edit_metadata(out, table_sizes=table_sizes)
    with pytest.raises(DataError) as err:
        ProcessedDataset.open(out)
    assert str(err.value).startswith(f"{out / 'metadata.json'}: {message}")


def test_format_1_dataset_still_opens_and_its_indices_are_checked(raw: Path, tmp_path: Path) -> None:
    # a folder written before hashed tables were sized by what occurs (format 1, no max_index)
    out = tmp_path / "out"
    meta = preprocess(raw, out, max_ind_range=500, hash_table_size="fixed", progress=False)
    meta = {k: v for k, v in meta.items() if k not in ("written_by", "max_index")}
    (out / "metadata.json").write_text(json.dumps({**meta, "format_version": 1}))
    ds = ProcessedDataset.open(out)
    assert ds.table_sizes == [500] * 26 and len(ds.split("train")) == meta["splits"]["train"]
    _edit_metadata(out, table_sizes=[2] * 26)
    with pytest.raises(DataError, match=r"table_sizes\[\d+\] \(column C\d+\) is 2, but the train split holds"):
        ProcessedDataset.open(out).split("train")
    assert preprocess(raw, out, max_ind_range=500, progress=False)["format_version"] == 2  # replaceable


# ---------------------------------------------------------------------------- item 8: hashing


def _reference_dlrm(datafile: Path, max_ind_range: int) -> tuple[np.ndarray, List[int]]:
    """The reference DLRM's hashing mode, written plainly: hash, then renumber what occurs."""
    hashed = np.array([[int(v, 16) % max_ind_range if v else 0 for v in line.split("\t")[14:]]
                       for line in datafile.read_text().splitlines()])
    ids = np.empty_like(hashed)
    sizes = []
    for j in range(hashed.shape[1]):
        distinct, ids[:, j] = np.unique(hashed[:, j], return_inverse=True)
        sizes.append(min(len(distinct), max_ind_range))
    return ids, sizes


def _all_sparse(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(folder / s / "sparse.npy") for s in criteo.FILE_ORDER])


def test_hashing_sizes_tables_by_the_values_that_occur(cfg: Path, raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(cfg, raw, out, "--max_ind_range", "100") == 0
    meta = json.loads((out / "metadata.json").read_text())
    ids, sizes = _reference_dlrm(raw, 100)
    assert meta["table_sizes"] == sizes and meta["options"]["hash_table_size"] == "occurring"
    assert sum(sizes) < 26 * 100 and min(sizes) <= 3  # tiny columns get tiny tables
    np.testing.assert_array_equal(_all_sparse(out), ids)
    assert meta["max_index"] == [s - 1 for s in sizes]
    assert preprocess(raw, tmp_path / "library", max_ind_range=100, progress=False)["table_sizes"] == sizes

    fixed = tmp_path / "fixed"
    assert run(cfg, raw, fixed, "--max_ind_range", "100", "--set", "model.preproc.hash_table_size=fixed") == 0
    assert json.loads((fixed / "metadata.json").read_text())["table_sizes"] == [100] * 26


def test_vocabulary_mode_ignores_the_hash_option(raw: Path, tmp_path: Path) -> None:
    a = preprocess(raw, tmp_path / "a", hash_table_size="occurring", progress=False)
    b = preprocess(raw, tmp_path / "b", hash_table_size="fixed", progress=False)
    assert a["table_sizes"] == b["table_sizes"]
    np.testing.assert_array_equal(_all_sparse(tmp_path / "a"), _all_sparse(tmp_path / "b"))


def test_hashed_tables_train_and_simulate_downstream(raw: Path, tmp_path: Path) -> None:
    config = small_config(raw, tmp_path / "processed")
    config["model"]["preproc"]["max_ind_range"] = 1000
    config["fl"].update({"num_rounds": 1, "embedding_updates": "sparse", "num_workers": 10,
                         "client_num_per_round": 4})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["preprocess", "--config", str(path)]) == 0
    sizes = json.loads((tmp_path / "processed" / "metadata.json").read_text())["table_sizes"]
    assert max(sizes) < 1000
    assert main(["train", "--config", str(path), "--logdir", str(tmp_path / "train"), "--num_batches", "3",
                 "--set", "train.config.num_epochs=null"]) == 0
    assert main(["simulate", "--config", str(path), "--logdir", str(tmp_path / "fl")]) == 0
    from fedrec.runner import build_trainer

    trainer = build_trainer(config)
    assert [t.num_embeddings for t in trainer.model.sparse_arch.tables] == sizes


@pytest.mark.parametrize("modulus,merge_at,hash_max", [
    (1000, 1 << 16, 1 << 18),  # sets, switching to a bitmap only at the end
    (1000, 8, 1 << 18),  # switching to a bitmap mid-stream
    (2**31 - 1, 8, 1 << 18),  # huge modulus: stays a sorted set (hash lookup)
    (2**31 - 1, 8, 4),  # huge modulus, large set: bisection
])
def test_occurring_values_rank_like_np_unique(monkeypatch: pytest.MonkeyPatch, modulus: int,
                                              merge_at: int, hash_max: int) -> None:
    monkeypatch.setattr(hashing, "MERGE_AT", merge_at)
    monkeypatch.setattr(hashing, "HASH_LOOKUP_MAX", hash_max)
    rng = np.random.default_rng(0)
    blocks = [(rng.zipf(1.3, 500) * 7919 % modulus).astype(np.int32) for _ in range(6)]
    occurring = hashing.OccurringValues(modulus)
    for block in blocks:
        occurring.add(block)
    ranks = occurring.ranks()
    distinct, inverse = np.unique(np.concatenate(blocks), return_inverse=True)
    assert ranks.count == len(distinct)
    np.testing.assert_array_equal(np.concatenate([ranks(b) for b in blocks]), inverse)
    assert isinstance(ranks, hashing.BitmapRanks) == (modulus == 1000 and len(distinct) * 4 > 16 * 8)
