"""compute_metrics (scikit-learn) and the run loggers (metrics.jsonl, TensorBoard, config)."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from fedrec.utilities.logger import (
    BaseLogger,
    MemoryLogger,
    NullLogger,
    RunLogger,
    read_metrics,
    read_tensorboard_scalars,
)
from fedrec.utilities.metrics import METRIC_NAMES, compute_metrics

# --------------------------------------------------------------------------------------
# metrics


def test_metric_names():
    assert METRIC_NAMES == ("roc_auc", "log_loss", "accuracy", "precision", "recall", "f1",
                            "average_precision")


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    probs = rng.random(500).astype(np.float32)
    labels = (rng.random(500) < probs).astype(np.float32)  # float labels, as in the dataset
    got = compute_metrics(labels, probs)
    assert tuple(got) == METRIC_NAMES
    assert all(type(v) is float for v in got.values())
    y = labels.astype(int)
    pred = (probs >= 0.5).astype(int)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs))
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, probs.astype(np.float64)))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert got["average_precision"] == pytest.approx(skm.average_precision_score(y, probs))


def test_threshold():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([0.2, 0.6, 0.8, 0.7])
    assert compute_metrics(labels, probs)["accuracy"] == 0.75
    assert compute_metrics(labels, probs, threshold=0.75)["accuracy"] == 0.75
    assert compute_metrics(labels, probs, threshold=0.65)["precision"] == 0.5


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_without_warnings(label):
    labels = np.full(20, label)
    probs = np.linspace(0.05, 0.95, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_metrics(labels, probs)
    assert math.isnan(got["roc_auc"]) and math.isnan(got["average_precision"])
    assert math.isfinite(got["log_loss"])
    for key in ("accuracy", "precision", "recall", "f1"):
        assert 0.0 <= got[key] <= 1.0


def test_all_negative_predictions_zero_division():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
    assert got["precision"] == 0.0 and got["recall"] == 0.0 and got["f1"] == 0.0


def test_extreme_probabilities_finite_log_loss():
    got = compute_metrics(np.array([0, 1, 0, 1]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert math.isfinite(got["log_loss"]) and got["log_loss"] > 10


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="probabilities"):
        compute_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    empty = compute_metrics(np.array([]), np.array([]))
    assert all(math.isnan(v) for v in empty.values())


# --------------------------------------------------------------------------------------
# loggers


def test_base_logger_is_abstract():
    with pytest.raises(TypeError):
        BaseLogger()  # type: ignore[abstract]
    with NullLogger() as log:
        log.log_metrics("val", 1, {"roc_auc": 0.5})
        log.log_config({"a": 1})
        log.info("hello")


def test_memory_logger():
    log = MemoryLogger()
    log.log_metrics("train", 3, {"loss": np.float32(0.5)}, epoch=1)
    assert log.records == [{"phase": "train", "step": 3, "epoch": 1, "loss": 0.5}]


def test_run_logger_jsonl_and_tensorboard_agree(tmp_path):
    rng = np.random.default_rng(0)
    written = []
    with RunLogger(tmp_path, console=False) as log:
        for step in (10, 20, 30):
            labels = (rng.random(200) < 0.3).astype(np.float32)
            metrics = compute_metrics(labels, rng.random(200))
            log.log_metrics("val", step, metrics, epoch=step // 20)
            written.append(metrics)
        log.log_metrics("train", 20, {"loss": torch.tensor(0.25), "lr": np.float64(0.1)})
        # a NaN metric: null in JSON
        log.log_metrics("test", 30, {"roc_auc": float("nan"), "accuracy": 1.0})

    records = read_metrics(tmp_path)
    assert [r["phase"] for r in records] == ["val", "val", "val", "train", "test"]
    assert records[0]["step"] == 10 and records[0]["epoch"] == 0
    assert records[3] == {"phase": "train", "step": 20, "loss": 0.25, "lr": 0.1}
    assert records[4]["roc_auc"] is None
    assert math.isnan(read_metrics(tmp_path / "metrics.jsonl", null_as_nan=True)[4]["roc_auc"])
    # every line is strict JSON (no NaN tokens)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    scalars = read_tensorboard_scalars(tmp_path)
    for name in written[0]:
        assert [s for s, _ in scalars[f"val/{name}"]] == [10, 20, 30]
    for record in records:
        for key, value in record.items():
            if key in ("phase", "step", "epoch"):
                continue
            tag = f"{record['phase']}/{key}"
            points = dict(scalars[tag])
            if value is None:
                assert math.isnan(points[record["step"]])
            else:
                assert points[record["step"]] == pytest.approx(value, rel=1e-6)
    assert "val/epoch" not in scalars  # extras are context, not plotted


def test_run_logger_appends_and_flushes_each_line(tmp_path):
    log = RunLogger(tmp_path, use_tensorboard=False, console=False)
    log.log_metrics("val", 1, {"roc_auc": 0.7})
    assert len(read_metrics(tmp_path)) == 1  # readable before close
    log.close()
    log.close()  # idempotent
    with RunLogger(tmp_path, use_tensorboard=False, console=False) as log2:
        log2.log_metrics("val", 2, {"roc_auc": 0.8})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob("events.out.tfevents*"))
    with pytest.raises(RuntimeError, match="closed"):
        log.log_metrics("val", 3, {})


def test_log_config_and_info(tmp_path, caplog):
    config = {"model": {"name": "dlrm", "arch_mlp_bot": (13, 64, 16)},
              "train": {"optimizer": {"name": "adam", "lr": np.float64(0.001)}},
              "log": {"dir": tmp_path}}
    with caplog.at_level(logging.INFO, logger="fedrec"):
        with RunLogger(tmp_path, console=False) as log:
            log.log_config(config)
            log.info("hello from the test")
    loaded = yaml.safe_load((tmp_path / "config.yml").read_text())
    assert loaded["model"] == {"name": "dlrm", "arch_mlp_bot": [13, 64, 16]}
    assert loaded["train"]["optimizer"]["lr"] == 0.001
    assert loaded["log"]["dir"] == str(tmp_path)
    assert "hello from the test" in caplog.text
    assert "hello from the test" in (tmp_path / "run.log").read_text()
    assert not list(tmp_path.glob("*.tmp"))
    # the run's handlers are removed from the global "fedrec" logger on close
    assert not any(str(tmp_path) in str(getattr(h, "baseFilename", ""))
                   for h in logging.getLogger("fedrec").handlers)


def test_console_output(tmp_path, capsys):
    with RunLogger(tmp_path, use_tensorboard=False, console=True) as log:
        log.info("to the console")
        log.log_metrics("val", 5, {"roc_auc": 0.75})
    err = capsys.readouterr().err
    assert "to the console" in err
    assert "val step 5" in err and "roc_auc 0.7500" in err
