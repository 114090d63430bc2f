"""The jobs behind the CLI: preprocess, train, simulate, each from a resolved config."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from fedrec.preprocessor import DLRMPreprocessor
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError

log = logging.getLogger("fedrec")


def make_preprocessor(config: Dict[str, Any], config_path: Optional[str] = None) -> DLRMPreprocessor:
    if "model" not in config:
        raise ConfigError(f"{config_path or 'config'}: needs a 'model' section with 'preproc'")
    return DLRMPreprocessor.from_config(config["model"], config_path=config_path)


def run_preprocess(config: Dict[str, Any], config_path: Optional[str] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Preprocess ``model.preproc.datafile`` into ``model.preproc.output_file``."""
    preproc = make_preprocessor(config, config_path)
    meta = preproc.preprocess_data(progress=progress)
    splits = ", ".join(f"{k} {v:,}" for k, v in meta["splits"].items())
    print(f"preprocessed {meta['lines']:,} lines of {preproc.datafile} -> {preproc.output_file}")
    print(f"  splits: {splits}; tables: {len(meta['table_sizes'])}, "
          f"{sum(meta['table_sizes']):,} rows in all; bad lines skipped: {meta['bad_lines_skipped']}")
    return meta


TRAIN_KEYS = ("name", "config", "optimizer", "lr_scheduler")


def _train_section(config: Dict[str, Any]) -> Dict[str, Any]:
    train = config.get("train")
    if train is None:
        return {}
    if not isinstance(train, Mapping):
        raise ConfigError(f"'train' must be a section (a mapping), got {train!r}")
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ConfigError(f"train: unknown key(s) {unknown}; it takes: {list(TRAIN_KEYS)}")
    for key in ("optimizer", "lr_scheduler"):
        value = train.get(key)
        if value is not None and not isinstance(value, (Mapping, str)):
            raise ConfigError(f"train.{key} must be a mapping with a 'name' key, got {value!r}")
    return dict(train)


def build_train_config(config: Dict[str, Any]):
    """``train.config`` validated by its registered class (``dlrm_std`` by default).

    Errors name the key (``train.config.batch_size``) and what it expects.
    """
    section = _train_section(config).get("config")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"train.config must be a mapping of training flags, got {section!r}")
    section = dict(section)
    name = section.pop("name", None) or "dlrm_std"
    if section.get("num_epochs") is not None and section.get("num_batches") is not None:
        raise ConfigError(
            "train.config: set either num_epochs or num_batches, not both (got num_epochs="
            f"{section['num_epochs']}, num_batches={section['num_batches']}); with --set, "
            "clear one with train.config.num_epochs=null"
        )
    cls = registry.lookup("train_config", name)
    return registry.instantiate(cls, section, kind="train.config")


def build_trainer(config: Dict[str, Any], logdir: Optional[str | Path] = None, logger=None,
                  config_path: Optional[str] = None):
    """The trainer named by ``train.name``, with its validated train config.

    Everything is checked here, before any training: the train section's keys and
    types, the processed data (a missing folder names the preprocess command), the
    model, the optimizer and the LR scheduler.
    """
    train = _train_section(config)
    train_config = build_train_config(config)
    trainer_cls = registry.lookup("trainer", train.get("name") or "dlrm")
    preproc = make_preprocessor(config, config_path)
    return trainer_cls(config, train_config, logger=logger, model_preproc=preproc, logdir=logdir)


# What a run leaves in its logdir (archived when a fresh run starts in the same folder).
_RUN_FILES = ("metrics.jsonl", "config.yml", "run.log", "checkpoints", "summary.json", "partition.npz")
_PREVIOUS = "previous"


def run_train(config: Dict[str, Any], logdir: str | Path, resume: bool = False,
              config_path: Optional[str] = None) -> Dict[str, float]:
    """Standard training: validate as configured, then test; everything under ``logdir``.

    The config, data, model and optimizer are all checked before anything is written.
    With ``resume`` the newest checkpoint under ``logdir/checkpoints`` is restored
    (model, optimizer, scheduler, step, epoch, RNG, data position) and the lines of
    ``metrics.jsonl`` after its step are dropped, since the run writes them again; a
    fresh run in a folder that holds an earlier run moves that run's files to
    ``logdir/previous/<time>/`` first.
    """
    from fedrec.utilities.logger import RunLogger

    logdir = Path(logdir)
    trainer = build_trainer(config, logdir=logdir, logger=None, config_path=config_path)
    resumed = trainer.resume() if resume else False
    notes = []
    if resumed:
        dropped = truncate_metrics(logdir / "metrics.jsonl", trainer.progress.step)
        if dropped:
            notes.append(f"dropped {dropped} metrics.jsonl line(s) after step {trainer.progress.step}; "
                         "the resumed run writes them again")
    else:
        if resume:
            notes.append(f"--resume: no checkpoint under {logdir / 'checkpoints'}; starting fresh")
        archived = archive_previous_run(logdir)
        if archived is not None:
            notes.append(f"{logdir} held an earlier run: moved its files to {archived} "
                         "(pass --resume to continue a run instead)")
    logdir.mkdir(parents=True, exist_ok=True)
    purge_step = trainer.progress.step + 1 if resumed else None
    with RunLogger(logdir, purge_step=purge_step) as logger:
        trainer.logger = logger
        for note in notes:
            logger.info(note)
        if resumed:
            logger.info(f"resumed from {trainer.resumed_from} at step {trainer.progress.step} "
                        f"(epoch {trainer.progress.epoch}, batch {trainer.progress.batch_in_epoch})")
        logger.log_config(config)
        val = trainer.train()
        test = trainer.test()
    print(f"val:  {_fmt(val)}")
    print(f"test: {_fmt(test)}")
    print(f"results in {logdir}: metrics.jsonl, TensorBoard events, checkpoints/, config.yml")
    return {**{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()}}


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` logged after ``step``; returns how many (atomic rewrite)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step") if line.strip() else None
        except (json.JSONDecodeError, AttributeError):
            record_step = None
        if isinstance(record_step, int) and record_step > step:
            dropped += 1
        elif line.strip():
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def archive_previous_run(logdir: Path) -> Optional[Path]:
    """Move an earlier run's files out of ``logdir`` (into ``previous/<time>``), if any."""
    if not logdir.is_dir():
        return None
    found = [logdir / name for name in _RUN_FILES if (logdir / name).exists()]
    found += sorted(logdir.glob("events.out.tfevents.*"))
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = logdir / _PREVIOUS / stamp
    n = 1
    while target.exists():
        n += 1
        target = logdir / _PREVIOUS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), str(target / path.name))
    return target


def _fmt(metrics: Dict[str, float]) -> str:
    keys = ("roc_auc", "log_loss", "accuracy")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
