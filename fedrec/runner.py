"""The jobs behind the CLI: preprocess, train, simulate, each from a resolved config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from fedrec.preprocessor import DLRMPreprocessor
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError

log = logging.getLogger("fedrec")


def make_preprocessor(config: Dict[str, Any], config_path: Optional[str] = None) -> Any:
    """The preprocessor named by ``model.preproc.name`` (``dlrm``, Criteo, by default;
    ``movielens`` for ratings)."""
    if "model" not in config:
        raise ConfigError(f"{config_path or 'config'}: needs a 'model' section with 'preproc'")
    preproc = config["model"].get("preproc") or {}
    name = preproc.get("name", "dlrm") if isinstance(preproc, Mapping) else "dlrm"
    cls = DLRMPreprocessor if name == "dlrm" else registry.lookup("preproc", name)
    return cls.from_config(config["model"], config_path=config_path)


def with_data_defaults(config: Dict[str, Any], config_path: Optional[str] = None) -> Dict[str, Any]:
    """``config`` with the FL keys its data decides when the config leaves them out
    (MovieLens: ``fl.num_workers`` = the number of users)."""
    preproc = make_preprocessor(config, config_path)
    defaults = getattr(preproc, "fl_defaults", None)
    fl = config.get("fl")
    if defaults is None or not isinstance(fl, Mapping):
        return config
    missing = {k: v for k, v in defaults().items() if fl.get(k) is None}
    return {**config, "fl": {**fl, **missing}} if missing else config


def run_preprocess(config: Dict[str, Any], config_path: Optional[str] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Preprocess ``model.preproc.datafile`` into ``model.preproc.output_file``."""
    preproc = make_preprocessor(config, config_path)
    meta = preproc.preprocess_data(progress=progress)
    if hasattr(preproc, "describe"):
        for line in preproc.describe(meta):
            print(line)
        return meta
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


def run_train(config: Dict[str, Any], logdir: str | Path, resume: bool = False,
              config_path: Optional[str] = None) -> Dict[str, float]:
    """Standard training: validate as configured, then test; everything under ``logdir``.

    The config, data, model and optimizer are all checked before the logdir is touched;
    then the logdir is locked against a second writer. With ``resume`` the newest
    intact checkpoint under ``logdir/checkpoints`` is restored (model, optimizer,
    scheduler, step, epoch, RNG, data position; an unreadable newer file is skipped with
    a warning) and the lines of ``metrics.jsonl`` after its step are dropped, with the
    final test line and a torn last line, since the run writes them again; a fresh run
    in a folder that holds an earlier run moves that run's files to
    ``logdir/previous/<time>/`` first.
    """
    from fedrec.utilities.logger import RunLogger
    from fedrec.utilities.run_dir import LogdirLock, start_writing

    logdir = Path(logdir)
    trainer = build_trainer(config, logdir=logdir, logger=None, config_path=config_path)
    with LogdirLock(logdir):
        resumed = trainer.resume() if resume else False
        # -- everything is checked: from here on the logdir changes ----------------------
        # the test line comes after the last checkpoint: a resumed run writes it again
        notes = start_writing(logdir, trainer.progress.step if resumed else None, resume, rerun_phases=("test",))
        purge_step = trainer.progress.step + 1 if resumed else None
        with RunLogger(logdir, purge_step=purge_step) as logger:
            trainer.logger = logger
            for message in trainer.resume_notes:
                logger.warning(message)
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
    print(_summary_table(val, test))
    print(f"results in {logdir}: metrics.jsonl, TensorBoard events, checkpoints/, config.yml")
    return {**{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()}}


def _summary_table(val: Dict[str, float], test: Dict[str, float]) -> str:
    """The end-of-run table: every metric of the last validation and of the test."""
    from fedrec.report.tables import format_value
    from fedrec.utilities.console import format_table

    keys = list(dict.fromkeys([*val, *test]))
    return format_table(["metric", "val", "test"], [[k, format_value(val.get(k)), format_value(test.get(k))]
                                                     for k in keys])


def _fmt(metrics: Dict[str, float]) -> str:
    keys = ("roc_auc", "log_loss", "accuracy", "hr@10", "ndcg@10", "rmse")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
