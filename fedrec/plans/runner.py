"""Running a plan on a client: no simulator, no YAML, only the plan and local data.

``PlanRunner(plan).train(weights, data, round_idx, client_id)`` does what a simulated
client does in a round: it visits its rows in the simulation's order (seeded by
``derive_seed(seed, round, client)``), applies the plan's train step batch by batch and
returns its upload, ``sample_num * (trained - start)``: every parameter whole (dense
mode), or the MLPs whole and only the rows its data touch (sparse mode: ``weights``
then holds just those rows, as ``RowSubset``s, and the program trains on them alone).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load

from fedrec.data.errors import DataError
from fedrec.federated.update import RowSubset, RowUpdate, WeightedUpdate
from fedrec.plans.data import ClientData
from fedrec.plans.format import WEIGHTS, PlanError, PlanFile, load_program, read_plan
from fedrec.utilities.random_state import derive_seed
from fedrec.utilities.threads import torch_threads

#: operator namespaces a plan's programs may call (anything else is refused at load)
_ALLOWED_NAMESPACES = ("aten",)
_ALLOWED_CALLABLES = (operator.getitem,)


@dataclasses.dataclass
class ClientResult:
    """A client's round: its upload and what it reports beside it."""

    update: WeightedUpdate
    sample_num: int
    num_samples: int
    num_steps: int
    loss_sum: float
    bytes_up: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.num_samples if self.num_samples else math.nan


class PlanRunner:
    """A loaded, checked plan and its two programs."""

    def __init__(self, plan: str | Path | PlanFile) -> None:
        self.file = plan if isinstance(plan, PlanFile) else read_plan(plan)
        self.manifest = m = self.file.manifest
        self.path = self.file.path
        programs = m["programs"]
        self._step = self._program(programs["train_step"]["file"])
        self._evaluate = self._program(programs["validate"]["file"])
        self.names: list[str] = [p["name"] for p in m["model"]["parameters"]]
        self.shapes = {p["name"]: tuple(p["shape"]) for p in m["model"]["parameters"]}
        self.tables: dict[str, dict[str, Any]] = {t["name"]: t for t in m["model"]["tables"]}
        self.table_of_feature = {t["feature"]: t["name"] for t in m["model"]["tables"]}
        self.sparse_mode = m["update"]["embedding_updates"] == "sparse"
        self.value_bytes = int(m["update"]["value_bytes"])
        train = m["train"]
        self.seed = int(train["seed"])
        self.batch_size = int(train["local_batch_size"])
        self.local_epochs: int | None = train["local_epochs"]
        self.local_steps: int | None = train["local_steps"]
        self.threads = int(train.get("threads", 1))

    @property
    def checksum(self) -> str:
        return self.file.checksum

    def _program(self, name: str) -> Any:
        program = load_program(self.file.members[name], name, self.path)
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            namespace = getattr(target, "namespace", None)
            if namespace not in _ALLOWED_NAMESPACES and target not in _ALLOWED_CALLABLES:
                raise PlanError(f"plan {self.path}: program {name} calls {target}, outside the ATen operators "
                                "a fedrec plan uses; refused")
        return program.module()

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The global model the plan was exported with."""
        weights = safetensors_load(self.file.members[WEIGHTS])
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise PlanError(f"plan {self.path}: {WEIGHTS} lacks {missing[:3]}")
        return {n: weights[n] for n in self.names}

    # -- rows -------------------------------------------------------------------------------
    def rows_needed(self, data: ClientData) -> dict[str, torch.Tensor]:
        """Per table, the sorted unique rows the data read (what a sparse client downloads)."""
        return {self.table_of_feature[t]: torch.unique(data.sparse[:, t])
                for t in sorted(self.table_of_feature)}

    def _local_model(self, weights: Mapping[str, Any], data: ClientData):
        """(parameter list, sparse ids for it, rows per table or None): each table cut to
        the rows the client's data read and its ids renumbered (only those rows can
        change, so this is exact, and it spares a table-sized gradient per step); whole
        tables where a table maps ids to rows otherwise (dense mode only)."""
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise PlanError(f"weights for plan {self.path} lack {missing[:3]}")
        cut = self.sparse_mode or all(t["row_map"] == "identity" for t in self.tables.values())
        rows = self.rows_needed(data) if cut else {}
        sparse = data.sparse.clone() if cut else data.sparse
        params = []
        for name in self.names:
            tensor = weights[name]
            if not self.sparse_mode:
                if isinstance(tensor, RowSubset):
                    raise PlanError(f"plan {self.path} is a dense-mode plan: {name} must be the whole table")
                if tuple(tensor.shape) != self.shapes[name]:
                    raise PlanError(f"weights: {name} has shape {list(tensor.shape)}, the plan "
                                    f"{list(self.shapes[name])}")
            if name in rows:
                ids = rows[name]
                try:
                    values = tensor.gather(ids) if isinstance(tensor, RowSubset) else tensor.index_select(0, ids)
                except KeyError:
                    raise PlanError(f"weights for {name} lack rows this client's data read") from None
                feature = self.tables[name]["feature"]
                sparse[:, feature] = torch.searchsorted(ids, data.sparse[:, feature].contiguous())
                params.append(values.detach().to(torch.float32).clone())
            else:
                params.append(tensor.detach().to(torch.float32).clone())
        return params, sparse, (rows if cut else None)

    # -- train and evaluate -------------------------------------------------------------------
    def train(self, weights: Mapping[str, Any], data: ClientData, round_idx: int, client_id: int) -> ClientResult:
        """One round of local training from ``weights``; the upload and its counts (with
        the simulator's client thread count: more threads can change the sums' bits, and
        on a busy machine they oversubscribe the cores)."""
        with torch_threads(self.threads):
            return self._train_round(weights, data, round_idx, client_id)

    def _train_round(self, weights: Mapping[str, Any], data: ClientData, round_idx: int,
                     client_id: int) -> ClientResult:
        params, sparse, rows = self._local_model(weights, data)
        start = [p.clone() for p in params]
        n = len(data)
        client_seed = derive_seed(self.seed, int(round_idx), int(client_id))
        steps, samples = 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        epochs = itertools.count() if self.local_steps is not None else range(self.local_epochs or 1)
        with torch.no_grad():
            for epoch in epochs:
                if self.local_steps is not None and steps >= self.local_steps:
                    break
                order = torch.from_numpy(np.random.default_rng(derive_seed(client_seed, epoch)).permutation(n))
                stepped = 0
                for lo in range(0, n, self.batch_size):
                    if self.local_steps is not None and steps >= self.local_steps:
                        break
                    idx = order[lo:lo + self.batch_size]
                    out = self._step(params, data.dense[idx], sparse[idx], data.label[idx])
                    params, loss = list(out[0]), out[1]
                    size = int(idx.numel())
                    loss_sum += loss.detach() * size
                    steps, samples, stepped = steps + 1, samples + size, stepped + 1
                if stepped == 0:
                    break
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise DataError(f"client {client_id}, round {round_idx}: local training diverged (nan/inf weights); "
                            "lower fl.local_lr and export the plan again")
        weight = float(n)
        dense: dict[str, torch.Tensor] = {}
        row_updates: dict[str, RowUpdate] = {}
        for name, trained, before in zip(self.names, params, start):
            delta = (trained - before).mul_(weight)
            if rows is not None and name in rows and self.sparse_mode:
                ids = rows[name]
                row_updates[name] = RowUpdate(ids, delta, torch.full((ids.numel(),), weight, dtype=torch.float64))
            elif rows is not None and name in rows:  # dense mode uploads the whole table's delta
                whole = torch.zeros(self.shapes[name], dtype=delta.dtype)
                dense[name] = whole.index_copy_(0, rows[name], delta)
            else:
                dense[name] = delta
        update = WeightedUpdate(dense, row_updates, weight, 1)
        return ClientResult(update, n, samples, steps, float(loss_sum), update.nbytes(self.value_bytes))

    def predict(self, weights: Mapping[str, Any], data: ClientData, batch_size: int = 16384) -> torch.Tensor:
        """Click probabilities of ``weights`` on ``data`` (validate and test)."""
        params, sparse, _ = self._local_model(weights, data)
        out = []
        with torch.no_grad(), torch_threads(self.threads):
            for lo in range(0, len(data), batch_size):
                out.append(self._evaluate(params, data.dense[lo:lo + batch_size], sparse[lo:lo + batch_size]))
        return torch.cat(out) if out else torch.zeros(0)

    def evaluate(self, weights: Mapping[str, Any], data: ClientData) -> dict[str, float]:
        """The simulator's metrics (ROC AUC, log loss, ...) of ``weights`` on ``data``."""
        from fedrec.utilities.metrics import compute_metrics

        probs = self.predict(weights, data)
        return compute_metrics(data.label.numpy(), probs.numpy())

    def download_bytes(self, data: ClientData) -> int:
        """Bytes this client downloads: the whole model, or in sparse mode the MLPs and its
        rows with their ids (as the simulation counts them)."""
        rows = self.rows_needed(data) if self.sparse_mode else {}
        total = 0
        for name in self.names:
            shape = self.shapes[name]
            if name in rows:
                total += int(rows[name].numel()) * (8 + int(np.prod(shape[1:])) * self.value_bytes)
            else:
                total += int(np.prod(shape)) * self.value_bytes
        return total
