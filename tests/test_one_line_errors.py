"""One-line errors (issue 9, item 6): what a user who makes a mistake, or meets a fault,
reads from ``fedrec train`` / ``fedrec simulate``: exit status 2 (130 for Ctrl-C), one
line naming the key or file and what was expected, no traceback; and nothing lost.
"""

from __future__ import annotations

import copy
import errno
import os
import shlex
import shutil
import signal
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from run_helpers import (
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


def simulate_error(capsys, config: Dict[str, Any], tmp_path: Path, *flags: Any) -> str:
    """Run ``fedrec simulate`` expecting a one-line error before anything is written."""
    cfg = write_config(config, tmp_path / "c.yml")
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", tmp_path / "run", *flags)
    assert status == 2, err
    line = error_line(err, "simulate")
    assert err.strip() == line and line.startswith("fedrec simulate: error: ")
    assert not (tmp_path / "run").exists()
    return line


# -- config mistakes -----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, expected", [
    ("0", "fl.partitioner: dirichlet partitioner: alpha must be a positive number, got 0"),
    ("-1", "fl.partitioner: dirichlet partitioner: alpha must be a positive number, got -1"),
    ("many", "config key 'alpha' expects float, got 'many'"),
])
def test_bad_dirichlet_alpha(config, tmp_path, capsys, alpha, expected):
    assert expected in simulate_error(capsys, fl_config(config), tmp_path, "--set", f"fl.partitioner.alpha={alpha}")


def test_a_section_that_is_not_a_mapping(config, tmp_path, capsys):
    line = simulate_error(capsys, fl_config(config), tmp_path, "--set", "fl=5")
    assert "'fl' must be a section (a mapping of keys" in line and "got 5" in line


def test_config_path_that_is_a_directory_not_utf8_or_not_yaml(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yml"
    latin1.write_bytes("fl:\n  seed: 1  # r\xe9sum\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yml"
    broken.write_text("fl:\n  num_rounds: [3\n")
    for path, needle in ((folder, f"config file {folder} is a directory"),
                         (latin1, f"config file {latin1} is not UTF-8 text (byte 0xe9 at offset 18)"),
                         (broken, f"{broken} line 3, column 1: not valid YAML: expected ',' or ']'")):
        status, _, err = cli(capsys, "simulate", "--config", path, "--logdir", tmp_path / "run")
        assert status == 2 and err.strip() == error_line(err, "simulate") and needle in err, err
    assert not (tmp_path / "run").exists()


def test_too_many_clients_for_the_data(config, tmp_path, capsys):
    line = simulate_error(capsys, fl_config(config), tmp_path, "--num_workers", 7000)
    assert "fl.num_workers is 7,000, but the training split of" in line and "only 6,400 rows" in line


@pytest.fixture(scope="module")
def data_without_users(synthetic_data, tmp_path_factory) -> Path:
    """The same synthetic rows preprocessed without their latent-user file."""
    from fedrec.runner import run_preprocess

    root = tmp_path_factory.mktemp("no-users")
    shutil.copy(synthetic_data["datafile"], root / "rows.txt")  # no rows.txt.users.npy beside it
    config = copy.deepcopy(synthetic_data["config"])
    config["model"]["preproc"].update({"datafile": str(root / "rows.txt"), "output_file": str(root / "processed")})
    run_preprocess(config, progress=False)
    return root / "processed"


def test_natural_partitioner_without_user_ids(config, tmp_path, capsys, data_without_users):
    config = fl_config(config, partitioner={"name": "natural"})
    config["model"]["preproc"]["output_file"] = str(data_without_users)
    line = simulate_error(capsys, config, tmp_path)
    assert "fl.partitioner: natural partitioner: the data has no user ids" in line


# -- faults ---------------------------------------------------------------------------------------
def test_read_only_logdir(config, tmp_path, capsys):
    cfg = write_config(train_config(config, num_batches=10), tmp_path / "c.yml")
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
        logdir, reason = locked / "run", "permission denied"
    elif Path("/sys/kernel").is_dir():  # root may write anywhere except to a pseudo file system
        logdir, reason = Path("/sys/fedrec-test-run"), "operation not permitted"
    else:
        pytest.skip("running as root without /sys: no read-only folder to test with")
    for command in ("train", "simulate"):
        status, _, err = cli(capsys, command, "--config", cfg, "--logdir", logdir)
        assert status == 2 and err.strip() == error_line(err, command), err
        assert f"cannot write {logdir}" in err and reason in err and "--logdir must be a folder you can write to" in err


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(config, tmp_path, capsys, monkeypatch):
    import fedrec.utilities.checkpoint as checkpoint_module

    real_save, calls = torch.save, []

    def save_on_a_disk_that_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = write_config(train_config(config), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module.torch, "save", save_on_a_disk_that_fills_up)
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir)
    monkeypatch.undo()
    line = error_line(err, "train")
    good = logdir / "checkpoints" / "ckpt-000000020.pt"
    assert status == 2 and f"no space left on device while writing {logdir / 'checkpoints' / 'ckpt-000000040.pt'}" in line
    assert f"the last good checkpoint, {good}, is intact" in line and "resume with: fedrec train" in line
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["best.pt", good.name]  # no half file
    assert CheckpointManager.load(good)["progress"]["step"] == 20
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert cli(capsys, *resume[1:])[0] == 0
    assert [r["step"] for r in read_metrics(logdir) if r["phase"] == "val"] == [20, 40]


def test_full_disk_while_writing_metrics_names_the_file(config, tmp_path, capsys, monkeypatch):
    import fedrec.utilities.logger as logger_module

    def open_on_a_full_disk(path, mode="r", **kwargs):
        if Path(path).name == "metrics.jsonl":
            return open("/dev/full", mode, **kwargs)  # every write fails with ENOSPC
        return open(path, mode, **kwargs)

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    monkeypatch.setattr(logger_module, "open", open_on_a_full_disk, raising=False)
    cfg = write_config(train_config(config), tmp_path / "c.yml")
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", tmp_path / "run")
    assert status == 2
    assert f"no space left on device while writing {tmp_path / 'run' / 'metrics.jsonl'}" in error_line(err, "train")


@pytest.mark.parametrize("loss, where", [("bce", "at step 22"), ("mse", "between steps 21 and 30")])
def test_training_that_diverges_says_so_and_keeps_the_last_good_checkpoint(config, tmp_path, capsys, loss, where):
    config = train_config(config, num_batches=60)
    config["model"]["loss_function"] = loss
    config["train"]["lr_scheduler"] = {"name": "step", "step_size": 20, "gamma": 1e30}  # lr 0.1, then 1e29
    cfg = write_config(config, tmp_path / "c.yml")
    logdir = tmp_path / "run"
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir)
    line = error_line(err, "train")
    assert status == 2 and f"training diverged {where} (epoch 0)" in line and "Lower train.optimizer.lr" in line
    assert f"the newest checkpoint, {logdir / 'checkpoints' / 'ckpt-000000020.pt'}, is from before it" in line
    assert CheckpointManager(logdir / "checkpoints").latest_step() == 20
    assert all(torch.isfinite(v).all() for v in final_weights(logdir, "model").values())
    assert all(r["loss"] is not None for r in read_metrics(logdir) if r["phase"] == "train")  # no nan logged


@pytest.mark.parametrize("loss, expected", [
    ("bce", "the simulation diverged: round 0, client "),  # nan probabilities stop BCE in a client
    ("mse", "the simulation diverged in round 1: the clients' mean training loss is nan"),
])
def test_simulation_that_diverges_names_the_round(config, tmp_path, capsys, loss, expected):
    config = fl_config(config, local_lr=1e30)
    config["model"]["loss_function"] = loss
    cfg = write_config(config, tmp_path / "c.yml")
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", tmp_path / "run")
    line = error_line(err, "simulate")
    assert status == 2 and expected in line and "Lower fl.local_lr" in line.replace("lower", "Lower")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_another_optimizer_type(config, tmp_path, capsys):
    cfg = write_config(train_config(config, num_batches=20), tmp_path / "c.yml")
    logdir = tmp_path / "run"
    assert cli(capsys, "train", "--config", cfg, "--logdir", logdir)[0] == 0
    before = snapshot(logdir)
    status, _, err = cli(capsys, "train", "--config", cfg, "--logdir", logdir, "--resume",
                         "--set", "train.optimizer={name: adam, lr: 0.01}")
    line = error_line(err, "train")
    assert status == 2 and err.strip() == line
    assert "it was written with optimizer SGD, but this config's train.optimizer builds Adam" in line
    assert snapshot(logdir) == before


def test_ctrl_c_says_how_to_resume(config, tmp_path, capsys):
    cfg = write_config(train_config(config, num_batches=10 ** 6, save_every_n=50, eval_every_n=10 ** 6),
                       tmp_path / "c.yml")
    logdir = tmp_path / "run"
    proc = start_fedrec("train", "--config", cfg, "--logdir", logdir)
    wait_for(lambda: CheckpointManager(logdir / "checkpoints").latest_step() is not None, proc, "a checkpoint")
    proc.send_signal(signal.SIGINT)
    status, _, err = finish(proc)
    assert status == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line == f"fedrec train: interrupted; resume with: fedrec train --config {cfg} --logdir {logdir} --resume"
    step = CheckpointManager(logdir / "checkpoints").latest_step()
    resume = shlex.split(line.split("resume with: ", 1)[1])[1:]
    status, _, err = cli(capsys, *resume, "--num_batches", step + 10)
    assert status == 0 and f"at step {step}" in err
    steps = [r["step"] for r in read_metrics(logdir) if r["phase"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == step + 10


def test_verbose_adds_the_traceback(config, tmp_path, capsys):
    cfg = write_config(fl_config(config), tmp_path / "c.yml")
    status, _, err = cli(capsys, "-v", "simulate", "--config", cfg, "--logdir", tmp_path / "run",
                         "--set", "fl.partitioner.alpha=0")
    assert status == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fedrec simulate: error:")


@pytest.mark.parametrize("command", ["synth", "synth-ratings"])
def test_synth_does_not_overwrite_a_file_it_did_not_write(tmp_path, capsys, command):
    from run_helpers import cli

    out = tmp_path / "mine.csv"
    out.write_text("my own data\n")
    size = ["--rows", 10] if command == "synth" else ["--users", 10]
    status, _, err = cli(capsys, command, *size, "--out", out)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "already exists" in err, err
    assert out.read_text() == "my own data\n"
    again = tmp_path / "again.csv"  # an earlier synthetic file is replaced
    assert cli(capsys, command, *size, "--out", again)[0] == 0
    assert cli(capsys, command, *size, "--out", again)[0] == 0


def test_a_file_where_a_folder_is_expected_is_one_line(tmp_path, capsys):
    from conftest import PROJECT_ROOT
    from run_helpers import cli

    blocker = tmp_path / "blocker"
    blocker.write_text("keep\n")
    status, _, err = cli(capsys, "sweep", "--config", PROJECT_ROOT / "configs" / "dlrm_fl.yml",
                         "--grid", "fl.local_lr=0.1", "--logdir", blocker)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "blocker is a file, where a folder was expected" in err, err
    assert blocker.read_text() == "keep\n"
    # a path below the file: the message names the file in the way, not the path asked for
    status, _, err = cli(capsys, "synth-ratings", "--users", 10, "--out", blocker / "ratings.csv")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{blocker} is a file, where a folder was expected" in err, err
    assert blocker.read_text() == "keep\n"
