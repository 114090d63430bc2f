"""Console output: a progress bar on a terminal only, plain log lines in files and pipes,
and the end-of-run summary table."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import yaml
from conftest import PROJECT_ROOT

from fedrec.utilities.console import format_table, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("FEDREC_PROGRESS", raising=False)
    assert progress_enabled(True, _Terminal())
    assert not progress_enabled(True, io.StringIO())
    assert not progress_enabled(False, _Terminal())
    monkeypatch.setenv("FEDREC_PROGRESS", "1")
    assert progress_enabled(True, io.StringIO())
    monkeypatch.setenv("FEDREC_PROGRESS", "0")
    assert not progress_enabled(True, _Terminal())


def test_format_table_aligns_columns():
    text = format_table(["metric", "final"], [["roc_auc", "0.75"], ["log_loss", "0.5123"]])
    assert text.splitlines() == ["metric     final", "--------  ------", "roc_auc     0.75", "log_loss  0.5123"]


def _simulate_command(config, tmp_path: Path):
    config["fl"]["progress_bar"] = True
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "FEDREC_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "fedrec.cli", "simulate", "--config", str(cfg), "--logdir",
            str(tmp_path / "run")], env


def test_piped_output_has_plain_lines_and_a_summary_table(config, tmp_path):
    command, env = _simulate_command(config, tmp_path)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "round/s" not in result.stderr  # no bar fragments
    lines = result.stderr.strip().splitlines()
    assert sum(" INFO fl step " in line for line in lines) == 3
    assert all(line[:2].isdigit() or line.startswith("  ") for line in lines), lines
    out = result.stdout
    assert "metric" in out and "best" in out and "roc_auc" in out and "(round " in out
    assert "3 round(s) run in" in out and "MB up" in out


def test_a_terminal_keeps_the_bar_with_log_lines_above_it(config, tmp_path):
    command, env = _simulate_command(config, tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=PROJECT_ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "round/s" in text or "s/round" in text  # the bar was drawn
    # each log line starts on a line of its own (tqdm.write clears the bar first)
    for line in text.replace("\r", "\n").splitlines():
        if " INFO fl step " in line:
            assert line.lstrip()[:2].isdigit(), line
