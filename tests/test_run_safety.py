"""Never lose or mix a user's runs (issue 9): the logdir lock, resume that checks its
config, checkpoint fallback, validate-before-touch, and metrics repair.

Everything goes through the real entry point, ``fedrec.cli.main`` (in this process, with
``capsys``) or ``python -m fedrec.cli`` in a subprocess where a process must die or be
interrupted. Each test asserts the message the user reads and that nothing was lost or
mixed: earlier files byte-identical, the earlier run still resumable, results equal to
an uninterrupted run.
"""

from __future__ import annotations

import copy
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT
from run_helpers import (
    assert_same_weights,
    cli,
    error_line,
    final_weights,
    finish,
    fl_config,
    snapshot,
    start_fedrec,
    train_config,
    wait_for,
    write_config,
)

from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.logger import read_metrics
from fedrec.utilities.run_dir import LOCK_FILE, LogdirLock


# -- 2. one writer per logdir -------------------------------------------------------------------
def test_second_run_into_a_busy_logdir_is_refused_and_a_killed_runs_lock_does_not_block(config, tmp_path, capsys):
    cfg = write_config(fl_config(config, num_rounds=100000, checkpoint_every_n_rounds=1), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    first = start_fedrec("simulate", "--config", cfg, "--logdir", logdir)
    try:
        wait_for(lambda: (logdir / "checkpoints").is_dir() and any((logdir / "checkpoints").iterdir()),
                 first, "the first run's first checkpoint")
        for command in ("simulate", "train"):  # any second writer, fresh or resuming
            status, _, err = cli(capsys, command, "--config", cfg, "--logdir", logdir, "--resume")
            line = error_line(err, command)
            assert status == 2, err
            assert f"{logdir} is in use by another fedrec run (pid {first.pid} on " in line
            assert "fedrec simulate --config" in line and "started 20" in line
        assert not (logdir / "previous").exists()  # the running run's files were not moved
        assert first.poll() is None  # and it is still running
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9: its lock file stays behind
        first.communicate()
    assert (logdir / LOCK_FILE).is_file()
    rounds_done = CheckpointManager(logdir / "checkpoints").latest_step()
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume",
                         "--num_rounds", rounds_done + 1)
    assert status == 0, err
    assert f"resumed from {logdir / 'checkpoints'}" in err
    rounds = [r["round"] for r in read_metrics(logdir) if r["phase"] == "fl"]
    assert rounds == list(range(1, rounds_done + 2))
    assert not (logdir / LOCK_FILE).exists()  # released at the end
    assert not list(logdir.rglob("*.tmp*"))  # a checkpoint the kill cut short is gone


def test_partial_files_of_a_killed_run_are_removed_by_the_next_run(config, tmp_path, capsys):
    cfg = write_config(train_config(config, num_batches=20), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    partial = [logdir / "checkpoints" / ".ckpt-000000040.pt.k2j3.tmp", logdir / "metrics.jsonl.tmp"]
    for path in partial:
        path.write_bytes(b"half written when the run was killed")
    mine = logdir / "notes.tmp"  # not ours: left alone
    mine.write_text("keep me")
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0 and f"removed 2 partial file(s) that a killed run left in {logdir}" in err
    assert not any(p.exists() for p in partial) and mine.read_text() == "keep me"


def test_lock_names_the_holder_and_only_mpi_rank_0_takes_it(config, tmp_path, capsys, monkeypatch):
    cfg = write_config(train_config(config, num_batches=10), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    before = snapshot(logdir)
    with LogdirLock(logdir, command="fedrec train --config mine.yml"):
        status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir)
        assert status == 2
        assert f"(pid {os.getpid()} on " in error_line(err, "train") and "fedrec train --config mine.yml" in err
    assert snapshot(logdir) == before
    # another rank of an MPI job leaves the lock to rank 0
    monkeypatch.setenv("PMI_RANK", "2")
    with LogdirLock(tmp_path / "other"):
        assert not (tmp_path / "other" / LOCK_FILE).exists()


# -- 3. simulate --resume checks its config -----------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--num_workers", "30"], "fl.num_workers 40 -> 30"),
    (["--set", "fl.partitioner={name: iid}"], "fl.partitioner.alpha 0.5 -> <unset>; fl.partitioner.name 'dirichlet' -> 'iid'"),
    (["--seed", "7"], "fl.seed 0 -> 7"),
    (["--local_lr", "0.5"], "fl.local_lr 0.1 -> 0.5"),
])
def test_simulate_resume_refuses_a_changed_config_before_touching_anything(config, tmp_path, capsys, flags, named):
    cfg = write_config(fl_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", logdir)[0] == 0
    (logdir / "checkpoints" / "ckpt-000000002.pt").unlink()  # as if it stopped after round 1
    before = snapshot(logdir)
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume", *flags)
    line = error_line(err, "simulate")
    assert status == 2 and err.strip() == line  # one line, nothing else
    assert "cannot resume from" in line and named in line and "fl.num_rounds" in line  # the allow-list
    assert snapshot(logdir) == before  # partition.npz, config.yml, metrics.jsonl, ... byte-identical
    # the original config still resumes, and finishes like an uninterrupted run
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume")[0] == 0
    assert [r["round"] for r in read_metrics(logdir) if r["phase"] == "fl"] == [1, 2]


def test_simulate_resume_accepts_the_allowed_changes_with_identical_results(config, tmp_path, capsys):
    cfg = write_config(fl_config(config, num_rounds=3), tmp_path / "c.yml")
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", tmp_path / "straight")[0] == 0
    cut = write_config(fl_config(config, num_rounds=2), tmp_path / "cut.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "simulate", "--config", cut, "--logdir", logdir)[0] == 0
    partition = (logdir / "partition.npz").read_bytes()
    status, _, err = cli(capsys, "simulate", "--config", cut, "--logdir", logdir, "--resume",
                         "--num_rounds", 3, "--eval_every_n_rounds", 2, "--set", "fl.keep_checkpoints=1",
                         "--set", "fl.progress_bar=false", "--set", "fl.checkpoint_every_n_rounds=3")
    assert status == 0, err
    assert (logdir / "partition.npz").read_bytes() == partition  # not rewritten
    assert_same_weights(final_weights(tmp_path / "straight", "global"), final_weights(logdir, "global"))


# -- 4. checkpoint fallback and silent deaths ---------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_simulate_resume_falls_back_past_a_truncated_checkpoint(config, tmp_path, capsys):
    cfg = write_config(fl_config(config, num_rounds=3), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", logdir)[0] == 0
    newest = logdir / "checkpoints" / "ckpt-000000003.pt"
    expected = CheckpointManager.load(newest)["global"]
    _truncate(newest)  # the disk filled up while it was written
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0, err
    warning = f"WARNING skipped unreadable checkpoint {newest}"
    assert warning in err and warning in (logdir / "run.log").read_text()
    assert f"resumed from {logdir / 'checkpoints' / 'ckpt-000000002.pt'} at round 2" in err
    assert [r["round"] for r in read_metrics(logdir) if r["phase"] == "fl"] == [1, 2, 3]
    assert_same_weights(expected, CheckpointManager.load(newest)["global"])


def test_train_resume_falls_back_past_a_truncated_checkpoint_and_says_so(config, tmp_path, capsys):
    cfg = write_config(train_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    newest = logdir / "checkpoints" / "ckpt-000000040.pt"
    expected = CheckpointManager.load(newest)["model"]
    _truncate(newest)
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0, err
    warning = f"WARNING skipped unreadable checkpoint {newest}"
    assert warning in err and warning in (logdir / "run.log").read_text()
    assert_same_weights(expected, CheckpointManager.load(newest)["model"])
    assert [r["step"] for r in read_metrics(logdir) if r["phase"] == "val"] == [20, 40]
    assert len([r for r in read_metrics(logdir) if r["phase"] == "test"]) == 1


def _mpi_missing() -> str:
    if not (Path(sys.executable).parent / "mpiexec").exists():
        return "no mpiexec beside this Python (pip install 'fedrec[mpi]')"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'fedrec[mpi]')"
    return ""


@pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "mpi")
def test_spawn_mode_worker_killed_is_reported_and_resume_finishes_identically(config, tmp_path):
    """``--backend mpi`` without mpiexec: MPI kills the whole job when a worker dies; the
    watcher says which worker was running which clients, and how to resume."""
    from fedrec.federated.run import run_simulation

    reference = fl_config(config, backend="local", imports=["tests.mpi_algorithms"])
    run_simulation(copy.deepcopy(reference), tmp_path / "local", print_rounds=False)
    once = tmp_path / "killed-client.txt"
    killing = copy.deepcopy(reference)
    killing["fl"]["fl_algo"] = {"name": "test_kill_in_round", "kill_round": 1, "once_file": str(once)}
    cfg = write_config(killing, tmp_path / "kill.yml")
    logdir = tmp_path / "run"
    status, _, err = finish(start_fedrec("simulate", "--config", cfg, "--logdir", logdir,
                                         "--backend", "mpi", "--set", "fl.mpi_processes=1"))
    assert status == 1 and "Traceback" not in err, err
    killed = int(once.read_text())  # the client whose MPI process killed itself
    assert "an MPI process died during round 1 (0-based) and MPI stopped the whole job (SIGKILL)" in err
    named = err.split("workers mid-round: rank 0 (pid ", 1)[1].split("clients [", 1)[1].split("]")[0]
    assert killed in [int(c) for c in named.split(",")]
    resume = (f"resume with: fedrec simulate --config {cfg} --logdir {logdir} --backend mpi "
              "--set fl.mpi_processes=1 --resume")
    assert resume in err and "ckpt-000000001.pt, is intact" in err
    status, _, err = finish(start_fedrec(*shlex.split(resume.split(": ", 1)[1])[1:]))
    assert status == 0, err
    assert "an earlier run stopped while MPI rank 0" in err  # the next run names it too
    def rows(logdir: Path):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")}
                for r in read_metrics(logdir) if r["phase"] == "fl"]
    assert rows(logdir) == rows(tmp_path / "local")
    assert_same_weights(final_weights(tmp_path / "local", "global"), final_weights(logdir, "global"))


# -- 5. validate everything first; touch the logdir last ----------------------------------------
@pytest.mark.parametrize("flags", [
    ["--set", "fl.num_round=3"],  # a typo
    ["--set", "fl.partitioner.alpha=0"],
    ["--set", "train.optimizer={name: sgdd, lr: 0.1}"],
    ["--set", "model.arch_mlp_bot=[12, 8]"],
    ["--output_file", "/nonexistent/processed"],
    ["--num_workers", "100000"],
])
def test_fresh_simulate_with_a_bad_config_leaves_the_earlier_run_resumable(config, tmp_path, capsys, flags):
    cfg = write_config(fl_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", logdir)[0] == 0
    (logdir / "checkpoints" / "ckpt-000000002.pt").unlink()  # it stopped after round 1
    before = snapshot(logdir)
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, *flags)
    assert status == 2 and err.startswith("fedrec simulate: error: ") and "Traceback" not in err, err
    assert snapshot(logdir) == before and not (logdir / "previous").exists()
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0 and "at round 1" in err
    assert [r["round"] for r in read_metrics(logdir) if r["phase"] == "fl"] == [1, 2]


def test_fresh_train_with_a_bad_config_leaves_the_earlier_run_untouched(config, tmp_path, capsys):
    cfg = write_config(train_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    before = snapshot(logdir)
    for flags in (["--batch_size", "0"], ["--set", "train.optimizer.lr=fast"]):
        status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, *flags)
        assert status == 2 and err.strip() == error_line(err, "train")
    assert snapshot(logdir) == before


# -- 7. small things ----------------------------------------------------------------------------
def test_resume_drops_a_torn_metrics_line_instead_of_gluing_it(config, tmp_path, capsys):
    cfg = write_config(train_config(config), tmp_path / "c.yml")
    assert cli(capsys, "train", "--config", cfg, "--logdir", tmp_path / "straight")[0] == 0
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    (logdir / "checkpoints" / "ckpt-000000040.pt").unlink()  # killed after step 20's checkpoint ...
    with open(logdir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"phase": "train", "step": 50, "lo')  # ... while writing a line
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0, err
    assert "dropped the torn last line of" in err and "dropped the torn last line" in (logdir / "run.log").read_text()
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_second"} for r in records]  # noqa: E731
    assert strip(read_metrics(logdir)) == strip(read_metrics(tmp_path / "straight"))


def test_resume_of_a_finished_training_run_adds_no_second_test_record(config, tmp_path, capsys):
    cfg = write_config(train_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    before = read_metrics(logdir)
    status, out, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0, err
    assert "test: roc_auc" in out
    assert read_metrics(logdir) == before  # the one test record, rewritten with the same values
    assert len([r for r in before if r["phase"] == "test"]) == 1


def test_resume_of_a_finished_simulation_changes_nothing(config, tmp_path, capsys):
    cfg = write_config(fl_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "simulate", "--config", cfg, "--logdir", logdir)[0] == 0
    before = snapshot(logdir)
    status, out, err = cli(capsys, "simulate", "--config", cfg, "--logdir", logdir, "--resume")
    assert status == 0, err
    assert f"nothing to do: {logdir} already holds 2 rounds" in out
    assert snapshot(logdir) == before  # summary.json keeps its final metrics


@pytest.mark.parametrize("text, needle", [
    ("data:\n  path: x\n", "unknown top-level section(s) ['data']"),
    ("log:\n  dir: x\n", "unknown top-level section(s) ['log']"),
    ("fl:\n  num_rounds: 3\nfl:\n  num_rounds: 5\n", "line 3, column 1: duplicate key 'fl' (first given on line 1)"),
    ("fl:\n  num_rounds: 3\n  num_rounds: 5\n", "line 3, column 3: duplicate key 'num_rounds'"),
])
def test_unknown_and_duplicate_sections_are_errors(config, tmp_path, capsys, text, needle):
    base = {name: section for name, section in config.items() if name != "fl"}
    bad = tmp_path / "bad.yml"
    bad.write_text(text + yaml.safe_dump(base))
    status, _, err = cli(capsys, "simulate", "--config", bad, "--logdir", tmp_path / "run")
    assert status == 2 and err.strip() == error_line(err, "simulate") and needle in err
    assert not (tmp_path / "run").exists()


# -- the documented allow-list is the one in the code -------------------------------------------
def test_resume_allow_list_is_documented():
    from fedrec.federated.resume import RESUME_MAY_CHANGE

    for doc in ("README.md", "docs/architecture.md"):
        text = (PROJECT_ROOT / doc).read_text()
        missing = [key for key in RESUME_MAY_CHANGE if f"`{key}`" not in text]
        assert not missing, f"{doc} does not list {missing}"
