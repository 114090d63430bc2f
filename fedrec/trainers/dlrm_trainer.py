"""``DLRMTrainer``: standard training of a click model on processed Criteo-format data."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional

import numpy as np
import pydantic
import torch

from fedrec.data.errors import DataError
from fedrec.optimization.schedulers import ConstantScheduler
from fedrec.trainers.base_trainer import BaseTrainer
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.console import progress_bar
from fedrec.utilities.divergence import DivergedError, NonFinitePredictions
from fedrec.utilities.logger import BaseLogger


@registry.load("train_config", "dlrm_std")
class DLRMTrainConfig(pydantic.BaseModel):
    """The seed's training flags (``train.config`` in YAML), validated and frozen.

    Training runs ``num_epochs`` epochs or ``num_batches`` optimizer steps (setting both
    is an error; neither means one epoch). Every ``eval_every_n`` steps and at the end it
    validates (unless ``no_eval_on_val``; ``eval_on_train`` also scores the training
    data, at most ``num_eval_batches`` batches of ``eval_batch_size`` per phase); every
    ``save_every_n`` steps and at the end it checkpoints, keeping the newest
    ``keep_every_n`` and ``best.pt`` (best val AUC); every ``report_every_n`` steps it
    logs the mean training loss. ``init_seed`` seeds the model's initialisation,
    ``model_seed`` the global generators after it, ``data_seed`` the batch order.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    eval_every_n: int = pydantic.Field(10000, ge=1)
    report_every_n: int = pydantic.Field(100, ge=1)
    save_every_n: int = pydantic.Field(10000, ge=1)
    keep_every_n: int = pydantic.Field(2, ge=1)  # how many step checkpoints to keep
    batch_size: int = pydantic.Field(128, ge=1)
    eval_batch_size: int = pydantic.Field(16384, ge=1)
    eval_on_train: bool = False
    no_eval_on_val: bool = False
    data_seed: int = 100
    init_seed: int = 100
    model_seed: int = 100
    num_batches: Optional[int] = pydantic.Field(None, ge=1)
    num_epochs: Optional[int] = pydantic.Field(None, ge=1)
    num_workers: int = pydantic.Field(0, ge=0)  # background threads preparing batches
    num_eval_batches: Optional[int] = pydantic.Field(None, ge=1)
    log_gradients: bool = False
    devices: List[str] = ["cpu"]
    pin_memory: bool = False
    shuffle: bool = True
    progress_bar: bool = True

    @pydantic.model_validator(mode="after")
    def _one_length(self) -> "DLRMTrainConfig":
        if self.num_epochs is not None and self.num_batches is not None:
            raise ValueError(
                "set either num_epochs or num_batches, not both "
                f"(got num_epochs={self.num_epochs}, num_batches={self.num_batches})"
            )
        return self

    @property
    def epochs(self) -> int:
        """Epochs to run when training is bounded by epochs (1 when nothing is set)."""
        return self.num_epochs if self.num_epochs is not None else 1


@registry.load("trainer", "dlrm")
class DLRMTrainer(BaseTrainer):
    """Trains DLRM (or any model with ``forward(dense, sparse)`` and ``loss``) on Criteo."""

    def __init__(self, config_dict: Dict[str, Any], train_config: DLRMTrainConfig,
                 logger: Optional[BaseLogger] = None, model_preproc: Any = None,
                 logdir: Any = None) -> None:
        if model_preproc is None:
            raise ConfigError("DLRMTrainer needs model_preproc (the model.preproc section) to find its data")
        self.train_config = train_config
        self.dataset = model_preproc.load()
        if len(self.dataset.split("train")) == 0:
            raise DataError(f"the training split of {self.dataset.path} has no rows: preprocess "
                            "more data or lower model.preproc.val_fraction/test_fraction")
        self._loaders: Optional[Dict[str, Any]] = None
        super().__init__(config_dict, train_config, logger, model_preproc, logdir)

    def resume_fingerprint(self) -> Dict[str, Any]:
        cfg = self.train_config
        return {"batch_size": cfg.batch_size, "shuffle": cfg.shuffle, "data_seed": cfg.data_seed,
                "train_rows": len(self.dataset.split("train"))}

    def model_kwargs(self) -> Dict[str, Any]:
        return {"table_sizes": list(self.dataset.table_sizes), "num_dense": self.dataset.num_dense}

    # -- data ----------------------------------------------------------------------------
    @property
    def dataloaders(self) -> Dict[str, Any]:
        if self._loaders is None:
            from fedrec.data import BatchLoader

            cfg = self.train_config
            train = self.dataset.split("train")
            self._loaders = {
                "train": BatchLoader(train, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.data_seed),
                "train_eval": BatchLoader(train, cfg.eval_batch_size),
                "val": BatchLoader(self.dataset.split("val"), cfg.eval_batch_size),
                "test": BatchLoader(self.dataset.split("test"), cfg.eval_batch_size),
            }
        return self._loaders

    def client_loader(self, indices: np.ndarray, batch_size: int, seed: int, shuffle: bool = True):
        """Batches over some training rows only (one federated client's data)."""
        from fedrec.data import BatchLoader

        return BatchLoader(self.dataset.split("train"), batch_size, indices=indices,
                           shuffle=shuffle, seed=seed)

    # -- steps ---------------------------------------------------------------------------
    def train_step(self, batch, optimizer, objective=None) -> tuple[torch.Tensor, int]:
        if self.device.type != "cpu":
            batch = batch.to(self.device, non_blocking=self.train_config.pin_memory)
        probs = self.model(batch.dense, batch.sparse)
        try:
            loss = self.model.loss(probs, batch.label)
        except RuntimeError as err:  # BCE refuses nan probabilities; only then look at them
            if bool(torch.isfinite(probs).all()):
                raise
            raise DivergedError("the model's predicted probabilities became nan or inf") from err
        # set_to_none: backward then hands its fresh gradient over instead of adding it
        # into a zeroed buffer (embedding backward allocates a table-sized gradient either
        # way); measured ~5% faster per step on the demo and reference models
        # (benchmarks/train_throughput.py).
        optimizer.zero_grad(set_to_none=True)
        (loss if objective is None else objective(loss)).backward()
        optimizer.step()
        n = int(batch.label.shape[0])
        return loss.detach() * n, n

    @torch.no_grad()
    def predict(self, loader, max_batches: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and predicted probabilities over ``loader``."""
        was_training = self.model.training
        self.model.eval()
        labels, probs = [], []
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                labels.append(batch.label.cpu().numpy())
                batch = batch.to(self.device)
                probs.append(self.model(batch.dense, batch.sparse).float().cpu().numpy())
        finally:
            self.model.train(was_training)
        if not labels:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(labels), np.concatenate(probs)

    def evaluate(self, phase: str, log: bool = True) -> Dict[str, float]:
        """Metrics of the current model on one phase's loader (val, test, train_eval)."""
        from fedrec.utilities.metrics import compute_metrics

        labels, probs = self.predict(self.dataloaders[phase], self.train_config.num_eval_batches)
        if not len(labels):
            return {}  # an empty split has no metrics (and gets no line)
        try:
            metrics = compute_metrics(labels, probs)
        except NonFinitePredictions as err:
            raise DivergedError(f"training diverged by step {self.progress.step}: on the {phase} data {err}; "
                                "lower train.optimizer.lr and start a fresh run") from None
        if log:
            self.logger.log_metrics(phase, self.progress.step, metrics, epoch=self.progress.epoch)
        return metrics

    def validate(self) -> Dict[str, float]:
        return self.evaluate("val")

    def test(self) -> Dict[str, float]:
        return self.evaluate("test")

    # -- the training loop ----------------------------------------------------------------
    def total_steps(self) -> int:
        cfg = self.train_config
        per_epoch = self.dataloaders["train"].batches_per_epoch
        if cfg.num_batches is not None:
            return cfg.num_batches
        return per_epoch * cfg.epochs

    def train(self) -> Dict[str, float]:
        """Train until ``num_batches`` steps or ``num_epochs`` epochs, from where
        ``self.progress`` stands (0, or a resumed checkpoint's position).

        Every ``report_every_n`` steps a ``train`` line (mean loss of the window, samples/s,
        lr); every ``eval_every_n`` steps and at the end the ``val`` metrics (and
        ``train_eval`` ones with ``eval_on_train``); a checkpoint every ``save_every_n``
        steps and at the end, plus ``best.pt`` whenever val AUC improves. Returns the last
        validation metrics.

        The per-step work besides the step itself is kept to counters: the loss is summed
        on the device and read (one host sync) only when a line is reported.
        """
        cfg = self.train_config
        loader = self.dataloaders["train"]
        total = self.total_steps()
        progress = self.progress
        if progress.step >= total:
            self.logger.info(f"nothing to train: step {progress.step} of {total} already done")
            return {} if cfg.no_eval_on_val else self.evaluate("val", log=False)
        last_val: Dict[str, float] = {}
        report_every, eval_every, save_every = cfg.report_every_n, cfg.eval_every_n, cfg.save_every_n
        # a constant schedule has nothing to do per step
        step_scheduler = type(self.lr_scheduler) is not ConstantScheduler
        # the open report window, restored after a resume
        window_loss = torch.tensor(progress.window_loss_sum, dtype=torch.float64, device=self.device)
        window_samples = progress.window_samples
        timed_samples, window_start = 0, time.perf_counter()
        bar = progress_bar(cfg.progress_bar, total=total, initial=progress.step, unit="batch", dynamic_ncols=True,
                           desc="train")
        self.model.train()
        try:
            while progress.step < total:
                loader.set_epoch(progress.epoch)
                batches = self._batches(loader, start=progress.batch_in_epoch)
                finished = False
                try:
                    for batch in batches:
                        try:
                            loss, n = self.train_step(batch, self.optimizer)
                        except DivergedError as err:
                            raise DivergedError(self._diverged_text(f"at step {progress.step + 1}", str(err))) from None
                        if step_scheduler:
                            self.lr_scheduler.step()
                        progress.step += 1
                        progress.batch_in_epoch += 1
                        window_loss += loss
                        window_samples += n
                        timed_samples += n
                        bar.update()
                        step = progress.step
                        at_end = step >= total
                        if step % report_every == 0 or at_end:
                            mean = float(window_loss) / max(window_samples, 1)
                            self._check_diverged(mean, step)
                            rate = timed_samples / max(time.perf_counter() - window_start, 1e-9)
                            self.logger.log_metrics(
                                "train", step, {"loss": mean, "samples_per_second": rate,
                                                "lr": self._current_lr()}, epoch=progress.epoch)
                            if cfg.log_gradients:
                                self._log_gradient_norms(step)
                            bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
                            window_loss.zero_()
                            window_samples = timed_samples = 0
                            window_start = time.perf_counter()
                        eval_now = step % eval_every == 0 or at_end
                        save_now = step % save_every == 0 or at_end
                        if eval_now or save_now:
                            paused = time.perf_counter()
                            is_best = False
                            if eval_now:
                                if cfg.eval_on_train:
                                    self.evaluate("train_eval")
                                if not cfg.no_eval_on_val:
                                    last_val = self.validate()
                                    is_best = self._update_best(last_val)
                            if self.saver is not None and (save_now or is_best):
                                self._check_diverged(float(window_loss), step)  # never save nan
                                progress.window_loss_sum = float(window_loss)
                                progress.window_samples = window_samples
                                self.save_checkpoint(is_best=is_best, step_checkpoint=save_now)
                            # evaluation and checkpoints do not count against samples/s
                            window_start += time.perf_counter() - paused
                        if self.callbacks:
                            self._run_callbacks()
                        if at_end:
                            finished = True
                            break
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()  # stops a prefetch thread
                if finished:
                    break
                progress.epoch += 1
                progress.batch_in_epoch = 0
        finally:
            bar.close()
        return last_val

    # -- helpers -------------------------------------------------------------------------
    def _check_diverged(self, loss: float, step: int) -> None:
        """Stop at a nan/inf training loss, before it is logged or checkpointed."""
        if math.isfinite(loss):
            return
        first = (step - 1) // self.train_config.report_every_n * self.train_config.report_every_n + 1
        where = f"at step {step}" if first >= step else f"between steps {first} and {step}"
        raise DivergedError(self._diverged_text(where, f"the training loss is {loss}"))

    def _diverged_text(self, where: str, what: str) -> str:
        newest = self.saver.latest() if self.saver is not None else None
        kept = f"; the newest checkpoint, {newest}, is from before it" if newest is not None else ""
        return (f"training diverged {where} (epoch {self.progress.epoch}): {what}{kept}. "
                "Lower train.optimizer.lr and start a fresh run")

    def _batches(self, loader, start: int):
        """The epoch's batches from ``start``, prefetched by background threads if asked."""
        loader.start_batch = start
        batches = iter(loader)
        if self.train_config.num_workers > 0:
            from fedrec.data.prefetch import prefetch

            batches = prefetch(batches, depth=2 * self.train_config.num_workers,
                               pin_memory=self.train_config.pin_memory and self.device.type == "cuda")
        return batches

    def _update_best(self, metrics: Dict[str, float]) -> bool:
        auc = metrics.get("roc_auc")
        if auc is None or (isinstance(auc, float) and math.isnan(auc)):
            return False
        if self.progress.best_metric is None or auc > self.progress.best_metric:
            self.progress.best_metric = float(auc)
            return True
        return False

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_gradient_norms(self, step: int) -> None:
        norms = {}
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                grad = param.grad.coalesce().values() if param.grad.is_sparse else param.grad
                norms[f"grad_norm/{name}"] = float(grad.norm())
        self.logger.log_metrics("gradients", step, norms)
