"""Federated Averaging (McMahan et al. 2017) as the tutorial writes it, registered as ``fed_avg``."""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List

import numpy as np
import torch

from fedrec.federated_worker import FederatedWorker, InvalidStateError, NeighbourKey
from fedrec.utilities import registry
from fedrec.utilities.random_state import RandomContext, derive_seed

log = logging.getLogger("fedrec")


@registry.load("fl_algo", "fed_avg")
class FedAvgWorker(FederatedWorker):
    """The aggregator averages the trainers' models weighted by their sample counts."""

    # aggregate() is a sample-weighted mean, so the backend may pre-reduce the updates.
    linear_aggregation = True

    async def run(self) -> None:
        """Aggregator: sample trainers, collect their models, average. Trainer: sync, train."""
        role = self.role
        if role not in self.roles:
            raise InvalidStateError(f"worker {self.worker_index} has no role {role!r}")

        if role == "aggregator":
            selected = self.sample_neighbours(self.round_idx, self.client_num_per_round)
            neighbours = await self.request_models_suspendable(selected)
            weighted_params = self.aggregate(neighbours)
            self.update_model(weighted_params)
        elif role == "trainer":
            # Standard FL syncs with the central aggregator before each round's training.
            aggregators = list(self.out_neighbours.values())
            global_models = await self.request_models_suspendable(aggregators)
            self.update_model(global_models[0])
            await self.train(model_dir=self.persistent_storage)
        self.round_idx += 1

    def aggregate(self, neighbour_ids: Iterable[NeighbourKey]) -> Dict[str, torch.Tensor]:
        """The sample-weighted average of the neighbours' models.

        The backend has already summed ``n_i * (w_i - w_global)`` (in client-id order), so
        the average is ``w_global + sum / sum(n_i)``: the same value as averaging every
        model, computed with one model-sized buffer per process instead of one per client.
        """
        update = self.reduced_update(neighbour_ids)
        model = self.get_model()
        update.apply_mean_(model, per_row=self.runtime.per_row_embeddings)
        return model

    def sample_neighbours(self, round_idx: int, client_num_per_round: int) -> List[int]:
        """A uniform sample without replacement, the same for the same (seed, round)."""
        candidates = list(self.in_neighbours)
        if client_num_per_round <= 0 or client_num_per_round >= len(candidates):
            return candidates
        seed = derive_seed(self.runtime.seed if self.runtime is not None else 0, round_idx)
        with RandomContext(seed):
            selected = np.random.choice(candidates, client_num_per_round, replace=False)
        log.debug("round %d: worker_indexes = %s", round_idx, selected)
        return sorted(int(i) for i in selected)


@registry.load("fl_algo", "fed_avgm")
class FedAvgMWorker(FedAvgWorker):
    """FedAvg with server momentum (Hsu et al. 2019): ``v = beta * v + mean_delta``,
    ``w += server_lr * v``. Clients train exactly as in FedAvg; only the aggregator differs.

    Config: ``fl_algo: {name: fed_avgm, server_lr: 1.0, server_momentum: 0.9}``. With
    ``server_momentum: 0`` and ``server_lr: 1`` it is FedAvg. The momentum buffers live in
    the aggregator's ``extra`` state, so checkpoints and ``--resume`` carry them.
    """

    def __init__(self, *args, server_lr: float = 1.0, server_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError(f"fed_avgm needs server_lr > 0 and 0 <= server_momentum < 1, "
                             f"got {server_lr} and {server_momentum}")
        self.server_lr = server_lr
        self.server_momentum = server_momentum

    def aggregate(self, neighbour_ids: Iterable[NeighbourKey]) -> Dict[str, torch.Tensor]:
        model = self.get_model()
        mean_delta = {name: torch.zeros_like(value) for name, value in model.items()}
        self.reduced_update(neighbour_ids).apply_mean_(mean_delta, per_row=self.runtime.per_row_embeddings)
        momentum = self.extra.setdefault("momentum", {})
        with torch.no_grad():
            for name, delta in mean_delta.items():
                if not delta.is_floating_point():
                    continue
                buffer = momentum.get(name)
                if buffer is None:
                    buffer = momentum[name] = delta
                else:
                    buffer.mul_(self.server_momentum).add_(delta)
                model[name].add_(buffer, alpha=self.server_lr)
        return model
