"""Helpers for the tests of run safety and one-line errors: run ``fedrec`` in this
process or as a subprocess, snapshot a logdir, small configs."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch
import yaml
from conftest import PROJECT_ROOT

from fedrec.cli import main
from fedrec.utilities.checkpoint import CheckpointManager

TIMEOUT = 240


# -- helpers ----------------------------------------------------------------------------------
def write_config(config: Dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(capsys, *argv: Any) -> Tuple[int, str, str]:
    """``fedrec <argv>`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_simulate_refuses(config: Dict[str, Any], tmp_path: Path, capsys, key: str) -> str:
    """``fedrec simulate`` with ``config`` ends with exit 2 and one line naming ``key``,
    before it creates the logdir; returns the line."""
    path = write_config(config, tmp_path / "refused.yml")
    status, _, err = cli(capsys, "simulate", "--config", path, "--logdir", tmp_path / "run")
    err = err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    return err


def snapshot(logdir: Path) -> Dict[str, bytes]:
    """Every file under ``logdir`` (path -> bytes)."""
    return {str(p.relative_to(logdir)): p.read_bytes() for p in sorted(logdir.rglob("*")) if p.is_file()}


def error_line(err: str, command: str) -> str:
    """The one error line; there must be no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"fedrec {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def fl_config(config: Dict[str, Any], **fl: Any) -> Dict[str, Any]:
    config = copy.deepcopy(config)
    config["fl"].update({"num_rounds": 2, "client_num_per_round": 4, "keep_checkpoints": 5})
    config["fl"].update(fl)
    return config


def train_config(config: Dict[str, Any], **train: Any) -> Dict[str, Any]:
    config = copy.deepcopy(config)
    config["train"]["config"].update({"num_epochs": None, "num_batches": 40, "save_every_n": 20,
                                      "eval_every_n": 20, "report_every_n": 10, "keep_every_n": 5})
    config["train"]["config"].update(train)
    return config


def final_weights(logdir: Path, key: str) -> Dict[str, torch.Tensor]:
    return CheckpointManager.load(CheckpointManager(logdir / "checkpoints").latest())[key]


def assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def subprocess_env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))


def start_fedrec(*argv: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedrec.cli", *map(str, argv)], cwd=PROJECT_ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    """Poll until ``condition()`` holds (no timing assertion: the deadline only bounds a hang)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> Tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"did not finish:\n{err[-3000:]}")
    return proc.returncode, out, err
