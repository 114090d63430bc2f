"""Run logging: metrics as JSON lines, TensorBoard scalars, the config, console messages.

``RunLogger(logdir)`` writes, under ``logdir``:

* ``metrics.jsonl``: one JSON object per :meth:`~BaseLogger.log_metrics` call, e.g.
  ``{"phase": "val", "step": 1200, "epoch": 0, "roc_auc": 0.79, ...}`` (NaN/inf as null);
* TensorBoard event files with each numeric metric as the scalar ``<phase>/<metric>``;
* ``config.yml`` (and a TensorBoard text summary) from :meth:`~BaseLogger.log_config`;
* ``run.log``: the messages of :meth:`~BaseLogger.info`, which also go to the Python
  logger ``"fedrec"`` and, with ``console=True``, to stderr.

``read_metrics`` and ``read_tensorboard_scalars`` read both back (for tests and tools).
"""

from __future__ import annotations

import abc
import json
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import yaml

__all__ = [
    "BaseLogger",
    "RunLogger",
    "NullLogger",
    "MemoryLogger",
    "read_metrics",
    "read_tensorboard_scalars",
    "LOGGER_NAME",
    "METRICS_FILE",
    "CONFIG_FILE",
]

LOGGER_NAME = "fedrec"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yml"
LOG_FILE = "run.log"

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# --------------------------------------------------------------------------------------
# value conversion


def _scalar(value: Any) -> Any:
    """A plain Python value for numpy/torch scalars (and one-element arrays/tensors)."""
    if value is None or type(value) in (bool, str, int, float):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):
            return value
    return value


def _json_value(value: Any) -> Any:
    value = _scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _json_value(tolist())
    return str(value)


def _yaml_safe(value: Any) -> Any:
    """Plain lists/dicts/scalars that ``yaml.safe_dump`` accepts."""
    value = _scalar(value)
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) else str(k)): _yaml_safe(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _yaml_safe(tolist())
    return str(value)


def _format_metrics(phase: str, step: int, metrics: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    parts = [f"{phase} step {step}"]
    parts += [f"{k} {v}" for k, v in extra.items()]
    for k, v in metrics.items():
        v = _scalar(v)
        if isinstance(v, float):
            parts.append(f"{k} {v:.4f}" if math.isfinite(v) else f"{k} {v}")
        else:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------
# loggers


class BaseLogger(abc.ABC):
    """What trainers and simulators log to. Also a context manager (``close`` on exit)."""

    @abc.abstractmethod
    def log_metrics(self, phase: str, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
        """Record ``metrics`` (name -> number) of ``phase`` ("train", "val", ...) at ``step``.

        ``extra`` holds context written alongside (``epoch=0``, ``round=3``) but not plotted.
        """

    @abc.abstractmethod
    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration."""

    @abc.abstractmethod
    def info(self, msg: str) -> None:
        """A human-readable progress message."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release files (idempotent)."""

    def warning(self, msg: str) -> None:
        """Something the user should notice (a skipped checkpoint, a repaired file)."""
        self.info(f"warning: {msg}")

    def __enter__(self) -> "BaseLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger(BaseLogger):
    """Discards everything."""

    def log_metrics(self, phase: str, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
        pass

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryLogger(BaseLogger):
    """Keeps the records in memory (``records``, ``configs``, ``messages``): for tests."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.configs: List[Dict[str, Any]] = []
        self.messages: List[str] = []

    def log_metrics(self, phase: str, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
        record = {"phase": phase, "step": int(step)}
        record.update({k: _scalar(v) for k, v in extra.items()})
        record.update({k: _scalar(v) for k, v in metrics.items()})
        self.records.append(record)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.configs.append(_yaml_safe(dict(config)))

    def info(self, msg: str) -> None:
        self.messages.append(str(msg))

    def close(self) -> None:
        pass


class _ProgressSafeHandler(logging.StreamHandler):
    """Console lines written through tqdm, so they do not break a running progress bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class RunLogger(BaseLogger):
    """Logs a run to ``logdir``: ``metrics.jsonl``, TensorBoard, ``config.yml``, ``run.log``.

    Args:
        logdir: the run folder (created if missing).
        use_tensorboard: also write TensorBoard event files into ``logdir``.
        console: also print :meth:`info` messages and metric lines to stderr.
    """

    def __init__(self, logdir: str | Path, use_tensorboard: bool = True, console: bool = True,
                 purge_step: int | None = None) -> None:
        """``purge_step``: on resume, TensorBoard hides events at or after this step that an
        interrupted run wrote, so the resumed run's values are the only ones shown."""
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.logdir / METRICS_FILE
        self.config_path = self.logdir / CONFIG_FILE
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        self._closed = False

        self._writer = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)

        self._log = logging.getLogger(LOGGER_NAME)
        if self._log.level == logging.NOTSET:
            self._log.setLevel(logging.INFO)
        self._handlers: List[logging.Handler] = []
        file_handler = logging.FileHandler(self.logdir / LOG_FILE, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler.setLevel(logging.INFO)
        self._add_handler(file_handler)
        if console and not any(getattr(h, "_fedrec_console", False) for h in self._log.handlers):
            # one console handler for the "fedrec" logger, however many RunLoggers are open
            console_handler = _ProgressSafeHandler()
            console_handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
            console_handler.setLevel(logging.INFO)
            console_handler._fedrec_console = True  # type: ignore[attr-defined]
            self._add_handler(console_handler)
            self._log.propagate = False  # the root logger would print every line again

    def _add_handler(self, handler: logging.Handler) -> None:  # noqa: D401
        self._log.addHandler(handler)
        self._handlers.append(handler)

    # -- BaseLogger ----------------------------------------------------------------------
    def log_metrics(self, phase: str, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
        self._check_open()
        step = int(step)
        record: Dict[str, Any] = {"phase": str(phase), "step": step}
        record.update({str(k): _json_value(v) for k, v in extra.items()})
        record.update({str(k): _json_value(v) for k, v in metrics.items()})
        try:
            self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
            self._metrics_file.flush()
        except OSError as err:  # e.g. a full disk: name the file
            raise OSError(err.errno, err.strerror, str(self.metrics_path)) from err

        if self._writer is not None:
            for name, value in metrics.items():
                value = _scalar(value)
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    continue
                self._writer.add_scalar(f"{phase}/{name}", float(value), global_step=step)
            self._writer.flush()
        self._log.info(_format_metrics(str(phase), step, metrics, extra))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._check_open()
        text = yaml.safe_dump(_yaml_safe(dict(config)), sort_keys=False, default_flow_style=False)
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.config_path)
        if self._writer is not None:
            # indented by 4 spaces: a code block in TensorBoard's markdown text view
            self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
            self._writer.flush()
        self._log.info(f"config written to {self.config_path}")

    def info(self, msg: str) -> None:
        self._log.info(str(msg))

    def warning(self, msg: str) -> None:
        self._log.warning(str(msg))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._metrics_file.close()
        except OSError:  # only after a write already failed (and raised), e.g. a full disk
            pass
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handler in self._handlers:
            self._log.removeHandler(handler)
            handler.close()
        self._handlers = []
        if not any(getattr(h, "_fedrec_console", False) for h in self._log.handlers):
            self._log.propagate = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.logdir} is closed")

    def __del__(self) -> None:  # best effort: do not leave handlers on the global logger
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------
# reading back


def read_metrics(path: str | Path, null_as_nan: bool = False) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``path`` may be the file or its run folder).

    NaN metrics are stored as JSON null; ``null_as_nan=True`` turns them back into nan.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records: List[Dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({err})") from None
            if null_as_nan:
                record = {k: (math.nan if v is None else v) for k, v in record.items()}
            records.append(record)
    return records


def read_tensorboard_scalars(logdir: str | Path) -> Dict[str, List[Tuple[int, float]]]:
    """All scalars of the TensorBoard event files in ``logdir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {
        tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("scalars", [])
    }
