"""``RecTrainer``: (user, item) models on processed ratings, centralized and as FL clients.

Training batches carry each positive's sampled negatives (``num_negatives`` items the
user has not rated, in any split), drawn from a seed: per epoch in centralized training,
once per (seed, round, client) for a federated client, so the item rows a client will
touch are known before it trains. Evaluation follows the literature: per user, the
held-out item against ``eval_negatives`` (99) sampled unrated items, HR@k and NDCG@k with
the user's own embedding, and RMSE when the model predicts ratings (``mse``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import pydantic
import torch

from fedrec.data.errors import DataError
from fedrec.data.negatives import RatedItems
from fedrec.trainers.base_trainer import BaseTrainer
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.console import progress_bar
from fedrec.utilities.divergence import DivergedError
from fedrec.utilities.logger import BaseLogger
from fedrec.utilities.random_state import derive_seed

#: evaluation scores at most this many (user, item) pairs per forward pass (sampled
#: negatives) and this many scores per chunk of users (full ranking): small pieces that
#: the heap reuses, so the evaluation's working set does not depend on the number of users
SCORE_PAIRS = 8192
FULL_SCORES = 1 << 17
#: hand freed heap pages back every this many chunks (see fedrec/utilities/memory.py)
TRIM_EVERY = 4


class ReconstructConfig(pydantic.BaseModel):
    """FedRecon-style evaluation (Singhal et al. 2021): a user never selected in training
    fits its own rows on its own train data, the item side frozen, before it is scored."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    steps: int = pydantic.Field(20, ge=1)  # full-batch SGD steps on the user's rows
    lr: float = pydantic.Field(1.0, gt=0)


@registry.load("train_config", "rec_std")
class RecTrainConfig(pydantic.BaseModel):
    """``train.config`` of the rec trainer: ``num_epochs`` passes over the training split,
    validation and a checkpoint after each (resume continues at the next epoch)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    batch_size: int = pydantic.Field(256, ge=1)
    eval_batch_size: int = pydantic.Field(4096, ge=1)
    num_epochs: int = pydantic.Field(1, ge=1)
    num_negatives: int = pydantic.Field(4, ge=0)  # per positive (bce, bpr); mse uses none
    eval_negatives: int = pydantic.Field(99, ge=1)
    top_k: int = pydantic.Field(10, ge=1)
    eval_seed: int = 0  # the sampled evaluation negatives: the same for every run and round
    #: also rank the held-out item against every item the user has not rated in train
    #: (``hr@k_full``, ``ndcg@k_full``)
    full_ranking: bool = True
    #: federated evaluation: re-fit never-selected users' rows first (None: score their seeded start)
    reconstruct_unseen: Optional[ReconstructConfig] = None
    report_every_n: int = pydantic.Field(100, ge=1)
    keep_every_n: int = pydantic.Field(2, ge=1)
    data_seed: int = 100
    init_seed: int = 100
    model_seed: int = 100
    devices: List[str] = ["cpu"]
    progress_bar: bool = True
    #: federated runs log one ``client`` record per user and evaluation up to this many users
    client_records_max_users: int = pydantic.Field(10000, ge=0)


@dataclasses.dataclass
class RecBatch:
    """users [B], items [B], labels [B] (ratings or 1), negatives [B, k] or None."""

    user: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor
    negatives: Optional[torch.Tensor]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def to(self, device: Any, non_blocking: bool = False) -> "RecBatch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking))
        return RecBatch(move(self.user), move(self.item), move(self.label), move(self.negatives))


class RecLoader:
    """Batches of a split's rows (``indices``: a client's rows) with sampled negatives.

    Negatives come from ``derive_seed(seed, epoch)`` with ``resample`` (a new draw each
    epoch, centralized training), else from ``seed`` alone (a client's round: the same
    draw in every local epoch, and known to :meth:`negatives` beforehand).
    """

    def __init__(self, split: Any, batch_size: int, rated: Optional[RatedItems], num_negatives: int,
                 indices: Optional[np.ndarray] = None, shuffle: bool = True, seed: int = 0,
                 resample: bool = True) -> None:
        self.split, self.batch_size, self.rated = split, int(batch_size), rated
        self.num_negatives = int(num_negatives) if rated is not None else 0
        self.indices = np.arange(len(split), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.shuffle, self.seed, self.resample = shuffle, int(seed), resample
        self.epoch = 0
        self.start_batch = 0
        #: without ``resample`` every epoch has the same draw: made once, kept here
        self.fixed_negatives: Optional[np.ndarray] = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def negatives(self, epoch: int = 0) -> Optional[np.ndarray]:
        """int64 [rows, num_negatives] for ``indices`` in their given order (or None)."""
        if not self.num_negatives or not len(self.indices):
            return None
        if not self.resample and self.fixed_negatives is not None:
            return self.fixed_negatives
        seed = derive_seed(self.seed, epoch) if self.resample else self.seed
        users = np.asarray(self.split.user[self.indices])
        drawn = self.rated.sample(users, self.num_negatives, np.random.default_rng(seed))
        if not self.resample:
            drawn.setflags(write=False)
            self.fixed_negatives = drawn
        return drawn

    def __iter__(self) -> Iterator[RecBatch]:
        negatives = self.negatives(self.epoch)
        order = np.arange(len(self.indices))
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, self.epoch, 1)).permutation(len(self.indices))
        first, self.start_batch = self.start_batch, 0
        for b in range(first, self.batches_per_epoch):
            pos = order[b * self.batch_size:(b + 1) * self.batch_size]
            rows = self.indices[pos]
            yield RecBatch(torch.from_numpy(np.asarray(self.split.user[rows], np.int64)),
                           torch.from_numpy(np.asarray(self.split.item[rows], np.int64)),
                           torch.from_numpy(np.asarray(self.split.label[rows], np.float32)),
                           None if negatives is None else torch.from_numpy(negatives[pos]))


@registry.load("trainer", "rec")
class RecTrainer(BaseTrainer):
    """Trains a registered rec model (``biased_mf``, ``neumf``, ``two_tower``) on processed ratings."""

    def __init__(self, config_dict: Dict[str, Any], train_config: RecTrainConfig,
                 logger: Optional[BaseLogger] = None, model_preproc: Any = None, logdir: Any = None) -> None:
        if model_preproc is None or not hasattr(model_preproc, "fl_defaults"):
            raise ConfigError("the rec trainer reads processed ratings: set model.preproc.name: movielens")
        if not isinstance(train_config, RecTrainConfig):
            raise ConfigError("the rec trainer takes train.config.name: rec_std")
        self.train_config = train_config
        self.dataset = model_preproc.load()
        if len(self.dataset.split("train")) == 0:
            raise DataError(f"the training split of {self.dataset.path} has no rows")
        splits = [self.dataset.split(s) for s in ("train", "val", "test")]
        # a temporal split's later interactions are the user's too: never sampled as negatives
        rated = splits + ([self.dataset.split("future")] if "future" in self.dataset.splits else [])
        self.rated = RatedItems([s.user for s in rated], [s.item for s in rated], self.dataset.num_items)
        most = int(np.bincount(self.rated.keys // self.dataset.num_items).max())
        if self.dataset.num_items - most < train_config.eval_negatives:
            raise ConfigError(f"train.config.eval_negatives is {train_config.eval_negatives}, but a user of "
                              f"{self.dataset.path} has rated {most} of its {self.dataset.num_items} items, leaving "
                              f"{self.dataset.num_items - most} to sample from; lower eval_negatives")
        train = splits[0]
        #: sorted (user * num_items + item) of the training split: what full ranking leaves out
        self.train_keys = np.unique(np.asarray(train.user, np.int64) * self.dataset.num_items
                                    + np.asarray(train.item, np.int64))
        self._loaders: Optional[Dict[str, Any]] = None
        #: (seed, rows, negatives) of the last client_touched_rows, for the client's loader
        self._drawn: Optional[tuple] = None
        super().__init__(config_dict, train_config, logger, model_preproc, logdir)
        if self.model.loss_function == "mse" and self.dataset.feedback != "explicit":
            raise ConfigError("model.loss_function mse fits ratings, but the data were preprocessed with "
                              "feedback: implicit (every label is 1); use bce or bpr, or preprocess with "
                              "model.preproc.feedback: explicit")

    def model_kwargs(self) -> Dict[str, Any]:
        return {"num_users": self.dataset.num_users, "num_items": self.dataset.num_items,
                "rating_mean": float(self.dataset.metadata.get("rating_mean", 0.0))}

    def resume_fingerprint(self) -> Dict[str, Any]:
        cfg = self.train_config
        return {"batch_size": cfg.batch_size, "data_seed": cfg.data_seed, "num_negatives": cfg.num_negatives,
                "train_rows": len(self.dataset.split("train"))}

    @property
    def num_negatives(self) -> int:
        return 0 if self.model.loss_function == "mse" else self.train_config.num_negatives

    # -- data ----------------------------------------------------------------------------
    @property
    def dataloaders(self) -> Dict[str, Any]:
        if self._loaders is None:
            cfg = self.train_config
            train = self.dataset.split("train")
            self._loaders = {
                "train": RecLoader(train, cfg.batch_size, self.rated, self.num_negatives, seed=cfg.data_seed),
                "train_eval": self.dataset.split("train"),
                "val": self.dataset.split("val"),
                "test": self.dataset.split("test"),
            }
        return self._loaders

    def client_loader(self, indices: np.ndarray, batch_size: int, seed: int, shuffle: bool = True) -> RecLoader:
        """One federated client's rows; its negatives are drawn once from ``seed`` (or taken
        from :meth:`client_touched_rows` of the same rows and seed, which drew them first)."""
        loader = RecLoader(self.dataset.split("train"), batch_size, self.rated, self.num_negatives,
                           indices=indices, shuffle=shuffle, seed=seed, resample=False)
        drawn, self._drawn = self._drawn, None
        if drawn is not None and drawn[0] == loader.seed and np.array_equal(drawn[1], loader.indices):
            loader.fixed_negatives = drawn[2]
        return loader

    def client_touched_rows(self, indices: np.ndarray, seed: int) -> Dict[str, torch.Tensor]:
        """Item rows a client's round reads: its rated items plus its sampled negatives
        (kept for the client's next :meth:`client_loader`, so they are drawn once)."""
        loader = self.client_loader(indices, 1, seed)
        items = [np.asarray(self.dataset.split("train").item[loader.indices])]
        negatives = loader.negatives()
        if negatives is not None:
            items.append(negatives.reshape(-1))
            self._drawn = (loader.seed, loader.indices, negatives)
        return self.model.rows_touched(torch.from_numpy(np.concatenate(items)))

    def client_users(self, indices: np.ndarray) -> np.ndarray:
        """The users whose rows these are (one, for a natural split's client)."""
        users = np.asarray(self.dataset.split("train").user[np.asarray(indices, np.int64)])
        if len(users) and users.min() == users.max():  # one user: what unique gives, without its sort
            return users[:1].copy()
        return np.unique(users)

    # -- steps ---------------------------------------------------------------------------
    def train_step(self, batch: RecBatch, optimizer, objective=None) -> tuple[torch.Tensor, int]:
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        loss = self.model.loss(batch.user, batch.item, batch.label, batch.negatives)
        optimizer.zero_grad(set_to_none=True)
        (loss if objective is None else objective(loss)).backward()
        optimizer.step()
        n = len(batch)
        return loss.detach() * n, n

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def score_split(self, phase: str) -> Dict[str, np.ndarray]:
        """Per held-out row of ``phase``: user, rank of its item among the sampled
        negatives, and (mse models) the squared rating error."""
        cfg = self.train_config
        split = self.dataloaders[phase]
        was_training = self.model.training
        self.model.eval()
        # filled in place: a list of per-chunk pieces and their concatenation would hold the
        # per-user results twice, and the pieces would pin heap pages between chunks
        n = len(split)
        out = {"user": np.array(split.user[:n], np.int64), "rank": np.empty(n, np.int64)}
        mse = self.model.loss_function == "mse"
        if mse:
            out["squared_error"] = np.empty(n, np.float32)
        try:
            from fedrec.utilities.memory import release_freed_memory
            from fedrec.utilities.ranking import ranks

            chunk = max(1, cfg.eval_batch_size // (cfg.eval_negatives + 1))
            for b, start in enumerate(range(0, n, chunk)):
                user = out["user"][start:start + chunk]
                item = np.asarray(split.item[start:start + chunk], np.int64)
                rng = np.random.default_rng(derive_seed(cfg.eval_seed, b, n))
                negatives = self.rated.sample_distinct(user, cfg.eval_negatives, rng)
                candidates = torch.from_numpy(np.concatenate([item[:, None], negatives], axis=1)).to(self.device)
                u = torch.from_numpy(user).to(self.device)
                step = max(1, SCORE_PAIRS // candidates.shape[1])  # users per forward
                scores = torch.cat([self.model(u[s:s + step], candidates[s:s + step]).float()
                                    for s in range(0, len(u), step)])
                if not bool(torch.isfinite(scores).all()):
                    raise DivergedError(f"the model's scores on the {phase} data are nan or inf")
                out["rank"][start:start + len(user)] = ranks(scores.cpu().numpy())
                if mse:
                    label = torch.from_numpy(np.array(split.label[start:start + chunk], np.float32))
                    out["squared_error"][start:start + len(user)] = ((scores[:, 0].cpu() - label) ** 2).numpy()
                del scores, candidates, negatives
                if b % TRIM_EVERY == TRIM_EVERY - 1:  # else the heap keeps freed chunks' pages
                    release_freed_memory()
        finally:
            self.model.train(was_training)
        if cfg.full_ranking:
            out["rank_full"] = self.full_ranks(split)
        return out

    @torch.no_grad()
    def full_ranks(self, split: Any) -> np.ndarray:
        """Per held-out row: its item's rank among every item the user has not rated in
        train (the user's other held-out items compete), scored in chunks of users."""
        from fedrec.utilities.memory import release_freed_memory
        from fedrec.utilities.ranking import full_ranks, rated_mask

        num_items = self.dataset.num_items
        chunk = max(1, FULL_SCORES // num_items)  # 128K scores (0.5 MB) at a time
        was_training = self.model.training
        self.model.eval()
        out = np.empty(len(split), np.int64)  # filled in place (see score_split)
        try:
            for b, start in enumerate(range(0, len(split), chunk)):
                user = np.array(split.user[start:start + chunk], np.int64)
                item = torch.from_numpy(np.array(split.item[start:start + chunk], np.int64)).to(self.device)
                scores = self.model.score_all_items(torch.from_numpy(user).to(self.device)).float()
                if not bool(torch.isfinite(scores).all()):
                    raise DivergedError(f"the model's scores on the {split.name} data are nan or inf")
                excluded = rated_mask(self.train_keys, user, num_items).to(self.device)
                out[start:start + len(user)] = full_ranks(scores, item, excluded).cpu().numpy()
                del scores, excluded
                if b % TRIM_EVERY == TRIM_EVERY - 1:  # else the heap keeps freed chunks' pages
                    release_freed_memory()
        finally:
            self.model.train(was_training)
        return out

    def metrics_of(self, scored: Dict[str, np.ndarray]) -> tuple[Dict[str, float], Dict[str, np.ndarray]]:
        """(means over users, per-user values) of :meth:`score_split`'s output."""
        from fedrec.utilities.ranking import hit_and_ndcg, summarize

        k = self.train_config.top_k
        hit, ndcg = hit_and_ndcg(scored["rank"], k)
        metrics = summarize(hit, ndcg, k)
        per_user = {"user": scored["user"], f"hr@{k}": hit, f"ndcg@{k}": ndcg}
        if "rank_full" in scored and len(hit):
            hit_full, ndcg_full = hit_and_ndcg(scored["rank_full"], k)
            metrics[f"hr@{k}_full"], metrics[f"ndcg@{k}_full"] = float(hit_full.mean()), float(ndcg_full.mean())
            per_user[f"hr@{k}_full"], per_user[f"ndcg@{k}_full"] = hit_full, ndcg_full
        if "squared_error" in scored:
            metrics["rmse"] = float(np.sqrt(scored["squared_error"].mean())) if len(hit) else math.nan
            per_user["abs_error"] = np.sqrt(scored["squared_error"])
        return metrics, per_user

    def evaluate(self, phase: str, log: bool = True) -> Dict[str, float]:
        metrics, _ = self.metrics_of(self.score_split(phase))
        if log and metrics:
            self.logger.log_metrics(phase, self.progress.step, metrics, epoch=self.progress.epoch)
        return metrics

    def validate(self) -> Dict[str, float]:
        return self.evaluate("val")

    def test(self) -> Dict[str, float]:
        return self.evaluate("test")

    def evaluate_federated(self, global_state: Dict[str, torch.Tensor],
                           private_rows: Callable[[np.ndarray], Dict[str, torch.Tensor]],
                           phase: str = "val", chunk: int = 4096) -> tuple[Dict[str, float], Dict[str, np.ndarray]]:
        """Metrics of the global model where each user scores with its own private rows
        (``private_rows(users) -> {table: rows}``, or ``({table: rows}, stored)``, from the
        client state store). The rows are read ``chunk`` users at a time straight into the
        model's user tables, so evaluation holds no second copy of every user's rows."""
        state = self.model.state_dict()
        users = np.arange(self.dataset.num_users)
        with torch.no_grad():
            for name, tensor in global_state.items():
                state[name].copy_(tensor)
        seen: List[np.ndarray] = []
        for start in range(0, len(users), chunk):
            found = private_rows(users[start:start + chunk])
            rows, stored = found if isinstance(found, tuple) else (found, None)
            with torch.no_grad():
                for name, values in rows.items():
                    state[name][start:start + len(values)].copy_(values)
            if stored is not None:
                seen.append(np.asarray(stored, bool))
        unseen = users[~np.concatenate(seen)] if seen else np.zeros(0, np.int64)
        if self.train_config.reconstruct_unseen is not None and len(unseen):
            self.reconstruct(unseen)
        metrics, per_user = self.metrics_of(self.score_split(phase))
        if self.train_config.reconstruct_unseen is not None and metrics:
            metrics["users_reconstructed"] = float(len(unseen))
        return metrics, per_user

    def reconstruct(self, users: np.ndarray, max_rows: int = 1 << 17) -> None:
        """Fit ``users``' private rows in the model on their train rows (item side frozen):
        ``steps`` of full-batch SGD on each user's own mean loss, with negatives drawn once
        from ``eval_seed``. Vectorised over users (their losses are independent); only
        the model's replica changes, nothing is stored."""
        cfg = self.train_config.reconstruct_unseen
        assert cfg is not None
        train = self.dataset.split("train")
        all_users = np.asarray(train.user, np.int64)
        order = np.argsort(all_users, kind="stable")
        sorted_users = all_users[order]
        users = np.asarray(users, np.int64)
        lo, hi = np.searchsorted(sorted_users, users), np.searchsorted(sorted_users, users, side="right")
        tables = [self.model.get_parameter(name) for name in self.model.private_tables()]
        was_training = self.model.training
        self.model.eval()
        try:
            first = 0
            while first < len(users):  # chunks of whole users, about max_rows rows each
                last = int(np.searchsorted(np.cumsum(hi[first:] - lo[first:]), max_rows, side="right"))
                last = first + max(last, 1)
                self._reconstruct_chunk(order, lo[first:last], hi[first:last], tables, cfg, first)
                first = last
        finally:
            self.model.train(was_training)

    def _reconstruct_chunk(self, order: np.ndarray, lo: np.ndarray, hi: np.ndarray, tables: List[torch.Tensor],
                           cfg: ReconstructConfig, chunk: int) -> None:
        counts = hi - lo
        if not counts.sum():
            return
        rows = np.concatenate([order[a:b] for a, b in zip(lo, hi)])
        train = self.dataset.split("train")
        user = torch.from_numpy(np.asarray(train.user[rows], np.int64)).to(self.device)
        item = torch.from_numpy(np.asarray(train.item[rows], np.int64)).to(self.device)
        label = torch.from_numpy(np.asarray(train.label[rows], np.float32)).to(self.device)
        negatives = None
        if self.num_negatives:
            rng = np.random.default_rng(derive_seed(self.train_config.eval_seed, 7, chunk))
            negatives = torch.from_numpy(self.rated.sample(user.cpu().numpy(), self.num_negatives, rng)).to(self.device)
        # the batch loss is a mean over all rows; n / n_u turns a user's share into its own mean
        unique, per_user = torch.unique(user, return_counts=True)
        scale = (len(rows) / per_user.to(torch.float32)).unsqueeze(1)
        for _ in range(cfg.steps):
            with torch.enable_grad():
                loss = self.model.loss(user, item, label, negatives)
                grads = torch.autograd.grad(loss, tables)
            with torch.no_grad():
                for table, grad in zip(tables, grads):
                    grad = grad.coalesce().to_dense() if grad.is_sparse else grad
                    table.index_add_(0, unique, -cfg.lr * scale.to(table.dtype) * grad.index_select(0, unique))

    # -- the training loop ----------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        cfg = self.train_config
        loader = self.dataloaders["train"]
        progress = self.progress
        last_val: Dict[str, float] = {}
        bar = progress_bar(cfg.progress_bar, total=cfg.num_epochs * loader.batches_per_epoch,
                           initial=progress.step, unit="batch", desc="train", dynamic_ncols=True)
        window = torch.zeros((), dtype=torch.float64)
        samples, start = 0, time.perf_counter()
        self.model.train()
        try:
            while progress.epoch < cfg.num_epochs:
                loader.set_epoch(progress.epoch)
                for batch in loader:
                    loss, n = self.train_step(batch, self.optimizer)
                    self.lr_scheduler.step()
                    progress.step += 1
                    window += loss
                    samples += n
                    bar.update()
                    if progress.step % cfg.report_every_n == 0:
                        self._report(window, samples, start)
                        window.zero_()
                        samples, start = 0, time.perf_counter()
                progress.epoch += 1
                if samples:
                    self._report(window, samples, start)
                    window.zero_()
                    samples, start = 0, time.perf_counter()
                last_val = self.validate()
                if self.saver is not None:
                    self.save_checkpoint()
        finally:
            bar.close()
        return last_val or self.evaluate("val", log=False)

    def _report(self, window: torch.Tensor, samples: int, start: float) -> None:
        mean = float(window) / max(samples, 1)
        if not math.isfinite(mean):
            raise DivergedError(f"training diverged by step {self.progress.step}: the loss is {mean}; "
                                "lower train.optimizer.lr and start a fresh run")
        rate = samples / max(time.perf_counter() - start, 1e-9)
        self.logger.log_metrics("train", self.progress.step, {"loss": mean, "samples_per_second": rate},
                                epoch=self.progress.epoch)
