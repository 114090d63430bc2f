"""``BaseTrainer``: what every trainer shares, so subclasses only say what differs.

A trainer owns the model (built through the registry), its optimizer and LR scheduler,
checkpoints and seeds. Subclasses implement ``dataloaders`` (a dict with ``train``,
``train_eval`` and ``val`` loaders), ``train`` and ``test`` (and may implement
``validate``). The same trainer is the unit federated clients run: ``local_train`` trains
the one model replica on any loader with a fresh optimizer, cheaply, again and again.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.logger import BaseLogger, NullLogger
from fedrec.utilities.random_state import seed_everything


@dataclasses.dataclass
class TrainProgress:
    """Where training stands: enough to resume at the exact next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: Optional[float] = None
    # the open report window (summed loss, samples) so the first train line after a
    # resume averages over the same batches as in an uninterrupted run
    window_loss_sum: float = 0.0
    window_samples: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LocalTrainResult:
    """What one round of local training did (federated clients report this)."""

    num_samples: int
    num_steps: int
    loss_sum: float

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.num_samples if self.num_samples else math.nan


def optimizer_kind(optimizer: Any) -> str:
    """The optimizer's type, e.g. ``SGD`` or ``split(sparse=RowWiseAdagrad, dense=Adam)``."""
    parts = getattr(optimizer, "optimizers", None)
    if isinstance(parts, Mapping):
        return "split(" + ", ".join(f"{k}={optimizer_kind(v)}" for k, v in parts.items()) + ")"
    return type(optimizer).__name__


# A callback sees the trainer after every optimizer step (``on_step(trainer, step)``).
StepCallback = Callable[["BaseTrainer", int], None]


def resolve_device(devices: Iterable[str] | str | None) -> torch.device:
    """The device to train on: CPU by default, CUDA only when asked for and present."""
    if devices is None:
        return torch.device("cpu")
    if isinstance(devices, str):
        devices = [devices]
    devices = list(devices) or ["cpu"]
    name = str(devices[0])
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.config.devices asks for {name!r} but CUDA is not available here; use ['cpu']"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.config.devices: {name!r} is not a device (try 'cpu' or 'cuda:0')") from None


@contextlib.contextmanager
def _config_errors(section: str):
    """Prefix a component's config errors with the section they come from; turn its
    ValueError/TypeError (e.g. an impossible MLP size) into a ConfigError."""
    from fedrec.utilities.registry import ConfigTypeError, RegistryError

    try:
        yield
    except (ConfigError, ConfigTypeError, RegistryError) as err:
        if str(err).startswith(section):
            raise
        raise type(err)(f"{section}: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}") from err


class BaseTrainer(abc.ABC):
    """The abstract trainer of the tutorial: subclass it and implement the data parts."""

    def __init__(
        self,
        config_dict: Dict[str, Any],
        train_config: Any,
        logger: Optional[BaseLogger] = None,
        model_preproc: Any = None,
        logdir: Optional[str | Path] = None,
    ) -> None:
        self.config_dict = config_dict
        self.train_config = train_config
        self.logger: BaseLogger = logger or NullLogger()
        self.model_preproc = model_preproc
        self.logdir = Path(logdir) if logdir is not None else None
        self.device = resolve_device(getattr(train_config, "devices", None))
        self.progress = TrainProgress()
        self.callbacks: List[StepCallback] = []
        self.resumed_from: Optional[Path] = None
        self.resume_notes: List[str] = []  # checkpoints skipped by resume(), for the run log

        seed_everything(getattr(train_config, "init_seed", 0))
        self.model: nn.Module = self.build_model().to(self.device)
        seed_everything(getattr(train_config, "model_seed", 0))
        self.optimizer = self.build_optimizer(self.model)
        self.lr_scheduler = self.build_lr_scheduler(self.optimizer)
        self.saver = self.build_saver()

    # -- construction hooks --------------------------------------------------------------
    def model_kwargs(self) -> Dict[str, Any]:
        """Arguments from code (not YAML) for the model constructor, e.g. table sizes."""
        return {}

    def build_model(self) -> nn.Module:
        with _config_errors("model"):
            return registry.construct(
                "model", self.config_dict["model"], unused_keys=("preproc",), **self.model_kwargs()
            )

    def build_optimizer(self, model: nn.Module, config: Optional[Mapping[str, Any]] = None):
        config = config or (self.config_dict.get("train") or {}).get("optimizer") or {"name": "sgd", "lr": 0.1}
        with _config_errors("train.optimizer"):
            return registry.construct("optimizer", config, model=model)

    def build_lr_scheduler(self, optimizer):
        config = (self.config_dict.get("train") or {}).get("lr_scheduler") or {"name": "noop"}
        with _config_errors("train.lr_scheduler"):
            return registry.construct("lr_scheduler", config, optimizer=optimizer)

    def build_saver(self):
        if self.logdir is None:
            return None
        from fedrec.utilities.checkpoint import CheckpointManager

        keep = getattr(self.train_config, "keep_every_n", 2)
        return CheckpointManager(self.logdir / "checkpoints", keep_last=keep)

    # -- what subclasses implement -------------------------------------------------------
    @property
    @abc.abstractmethod
    def dataloaders(self) -> Dict[str, Any]:
        """Loaders by phase: at least ``train``, ``train_eval`` and ``val``."""

    @abc.abstractmethod
    def train(self) -> Dict[str, float]:
        """Standard (centralized) training; returns the final validation metrics."""

    @abc.abstractmethod
    def test(self) -> Dict[str, float]:
        """Metrics on the held-out test data."""

    def validate(self) -> Dict[str, float]:
        """Metrics on the validation data (optional)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement validate()")

    @abc.abstractmethod
    def train_step(self, batch: Any, optimizer, objective=None) -> tuple[torch.Tensor, int]:
        """One optimizer step on ``batch``: returns (summed loss as a tensor, batch size).
        With ``objective``, back-propagate ``objective(loss)`` instead of ``loss``."""

    # -- shared machinery ----------------------------------------------------------------
    def local_train(self, batches: Iterable[Any], optimizer=None,
                    max_steps: Optional[int] = None, objective=None) -> LocalTrainResult:
        """Train the model on ``batches`` (a federated client's local update).

        No scheduler, no evaluation, no logging: the tight loop a simulator repeats for
        every client with freshly loaded weights. ``objective`` (an FL algorithm's local
        objective hook) maps each step's loss to the value minimised; the reported loss
        stays the model's own.
        """
        optimizer = optimizer or self.optimizer
        self.model.train()
        steps, samples = 0, 0
        # summed on the device: no host sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            if max_steps is not None and steps >= max_steps:
                break
            loss, n = (self.train_step(batch, optimizer) if objective is None
                       else self.train_step(batch, optimizer, objective=objective))
            loss_sum += loss.detach()
            steps += 1
            samples += n
        return LocalTrainResult(num_samples=samples, num_steps=steps, loss_sum=float(loss_sum))

    def resume_fingerprint(self) -> Dict[str, Any]:
        """Settings a checkpoint's data position depends on (batch size, order, rows).

        Saved with every checkpoint; :meth:`resume` refuses a checkpoint whose values
        differ, because its step and batch counters would point at other data.
        """
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (weights_only-safe values only)."""
        from fedrec.utilities.checkpoint import pack_rng_state

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "progress": self.progress.as_dict(),
            "rng": pack_rng_state(),
            "fingerprint": dict(self.resume_fingerprint()),
            "optimizer_kind": optimizer_kind(self.optimizer),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from fedrec.utilities.checkpoint import unpack_rng_state
        from fedrec.utilities.random_state import set_rng_state

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.progress = TrainProgress(**state["progress"])
        set_rng_state(unpack_rng_state(state["rng"]))

    def save_checkpoint(self, is_best: bool = False, step_checkpoint: bool = True) -> Optional[Path]:
        """Save the state: a step checkpoint (pruned to the newest ``keep_every_n``) and/or
        ``best.pt``. With ``step_checkpoint=False`` only ``best.pt`` is written."""
        if self.saver is None or not (step_checkpoint or is_best):
            return None
        state = self.state_dict()
        if step_checkpoint:
            return self.saver.save(self.progress.step, state, is_best=is_best)
        from fedrec.utilities.checkpoint import save_checkpoint

        return save_checkpoint(self.saver.best_path, state, step=self.progress.step)

    def resume(self, path: Optional[str | Path] = None) -> bool:
        """Restore the newest loadable checkpoint (or ``path``); False when there is none.

        An unreadable newest file is skipped for the one before it; each skip is a
        warning, also kept in ``resume_notes`` for a logger opened later. A checkpoint
        written with other data settings (see :meth:`resume_fingerprint`), another
        optimizer or for another model raises ``ConfigError`` saying what differs.
        """
        from fedrec.utilities.checkpoint import CheckpointError, CheckpointManager, LoadedCheckpoint

        self.resume_notes = []

        def skipped(message: str) -> None:
            self.resume_notes.append(message)
            self.logger.warning(message)

        if path is not None:
            loaded = LoadedCheckpoint(-1, Path(path), CheckpointManager.load(path))
        elif self.saver is not None:
            try:
                loaded = self.saver.load_newest_intact(on_skip=skipped)
            except CheckpointError as err:
                raise ConfigError(f"cannot resume: {err}") from None
        else:
            loaded = None
        if loaded is None:
            return False
        candidate, state = loaded.path, loaded.state
        self._check_fingerprint(candidate, state.get("fingerprint"))
        self._check_optimizer(candidate, state.get("optimizer_kind"))
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"checkpoint {candidate} does not fit this config's model/optimizer ({first}); "
                "resume with the config it was written with, or use a new --logdir"
            ) from err
        self.resumed_from = candidate
        self.logger.info(f"resumed from {candidate} at step {self.progress.step} "
                         f"(epoch {self.progress.epoch}, batch {self.progress.batch_in_epoch})")
        return True

    def _check_fingerprint(self, path: Path, saved: Optional[Mapping[str, Any]]) -> None:
        from fedrec.utilities.fingerprint import fingerprint_diffs

        if not saved:
            return
        diffs = fingerprint_diffs(saved, self.resume_fingerprint(), common_only=True)
        if diffs:
            raise ConfigError(
                f"cannot resume from {path}: it was written with other data settings "
                f"({'; '.join(diffs)}), so its step and batch position would point at other "
                "data; resume with the original settings or use a new --logdir"
            )

    def _check_optimizer(self, path: Path, saved: Optional[str]) -> None:
        """Another optimizer type would load the old state wrongly or fail mid-step."""
        current = optimizer_kind(self.optimizer)
        if saved is not None and saved != current:
            raise ConfigError(
                f"cannot resume from {path}: it was written with optimizer {saved}, but this "
                f"config's train.optimizer builds {current}; resume with the optimizer it was "
                "written with, or start a fresh run in another --logdir"
            )

    def _run_callbacks(self) -> None:
        for callback in self.callbacks:
            callback(self, self.progress.step)
