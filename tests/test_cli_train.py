"""`python train.py` and `fedrec train` from the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import PROJECT_ROOT

from fedrec.cli import main
from fedrec.utilities.logger import read_metrics
from fedrec.utilities.metrics import METRIC_NAMES


def _write_config(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    return env


def test_train_script_runs(config, tmp_path):
    cfg = _write_config(config, tmp_path / "cfg.yml")
    logdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(cfg), "--logdir", str(logdir),
         "--num_batches", "20", "--set", "train.config.num_epochs=null", "--eval_every_n", "10",
         "--batch_size", "32"],
        cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "val:  roc_auc" in result.stdout
    records = read_metrics(logdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["phase"] == "val"] == [10, 20]
    assert set(METRIC_NAMES) <= set(records[-1]) and records[-1]["phase"] == "test"
    written = yaml.safe_load((logdir / "config.yml").read_text())
    assert written["train"]["config"]["batch_size"] == 32  # flags land in the saved config
    assert written["train"]["config"]["num_batches"] == 20


def test_fedrec_train_bad_config_exits_2_with_one_line(config, tmp_path):
    config["train"]["optimizer"] = {"name": "sgdd", "lr": 0.1}
    cfg = _write_config(config, tmp_path / "cfg.yml")
    exe = shutil.which("fedrec", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "fedrec.cli"]
    result = subprocess.run([*command, "train", "--config", str(cfg), "--logdir", str(tmp_path / "run")],
                            cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedrec train: error: ") and "unknown optimizer 'sgdd'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_fedrec_train_errors(config, tmp_path, capsys):
    logdir = tmp_path / "run"
    cases = [
        ({"num_batches": 5}, "not both"),  # the YAML already sets num_epochs
        ({"batch_size": "many"}, "batch_size"),
        ({"num_epochs": 0}, "num_epochs"),
    ]
    for train_flags, needle in cases:
        bad = yaml.safe_load(yaml.safe_dump(config))
        bad["train"]["config"].update(train_flags)
        cfg = _write_config(bad, tmp_path / "bad.yml")
        assert main(["train", "--config", str(cfg), "--logdir", str(logdir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not logdir.exists()


def test_fedrec_train_missing_data_names_preprocess(config, tmp_path, capsys):
    config["model"]["preproc"]["output_file"] = str(tmp_path / "not-there")
    cfg = _write_config(config, tmp_path / "cfg.yml")
    assert main(["train", "--config", str(cfg), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"fedrec preprocess --config {cfg}" in err
    assert not (tmp_path / "run").exists()


def test_fedrec_train_resume_flag(config, tmp_path, capsys):
    config["train"]["config"].update(num_epochs=None, num_batches=10, eval_every_n=5, save_every_n=5)
    cfg = _write_config(config, tmp_path / "cfg.yml")
    logdir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--logdir", str(logdir)]) == 0
    # longer run, continued from step 10
    assert main(["train", "--config", str(cfg), "--logdir", str(logdir), "--resume",
                 "--num_batches", "15"]) == 0
    vals = [r["step"] for r in read_metrics(logdir / "metrics.jsonl") if r["phase"] == "val"]
    assert vals == [5, 10, 15]
    assert "resumed from" in (logdir / "run.log").read_text()


def test_a_length_flag_replaces_its_alternative_from_the_file():
    from fedrec.cli import _config_from, build_parser
    from fedrec.utilities.config import FLAG_PATHS

    args = build_parser().parse_args(["train", "--config", "configs/dlrm_small.yml", "--logdir", "x",
                                      "--num_batches", "7"])
    config = _config_from(args, FLAG_PATHS)
    assert config["train"]["config"]["num_batches"] == 7
    assert config["train"]["config"]["num_epochs"] is None
