"""Federated Averaging (McMahan et al. 2017) as the tutorial writes it, registered as
``fed_avg``, and the adaptive server optimizers of Reddi et al. (2021) on top of it.

FedAvg's server step is a ``ServerOptimizer`` over the mean client delta, so FedAvgM,
FedAdam, FedYogi and FedAdagrad are FedAvg with another optimizer: ``fl_algo: {name:
fed_avg, server_optimizer: {name: adam, lr: 0.01, bias_correction: false, eps: 0.001}}``,
or the named presets below with the papers' hyper-parameter names.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Dict, List, Mapping, Optional

import pydantic
import torch

from fedrec.federated.samplers import UniformSampler
from fedrec.federated.server_optimizer import DEFAULT as DEFAULT_SERVER_OPTIMIZER
from fedrec.federated.server_optimizer import ServerOptimizer
from fedrec.federated_worker import Cohort, FederatedWorker, InvalidStateError
from fedrec.utilities import registry

log = logging.getLogger("fedrec")

PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
UnitInterval = Annotated[float, pydantic.Field(ge=0, lt=1)]


@registry.load("fl_algo", "fed_avg")
class FedAvgWorker(FederatedWorker):
    """The aggregator averages the trainers' models weighted by their sample counts."""

    # aggregate() needs only the sample-weighted sum, so the backend may pre-reduce.
    linear_aggregation = True

    def __init__(self, *args: Any, server_optimizer: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_optimizer_config = dict(server_optimizer or DEFAULT_SERVER_OPTIMIZER)
        self._server_optimizer: Optional[ServerOptimizer] = None
        if "aggregator" in self.roles and self.runtime is not None:
            self.server_optimizer  # noqa: B018  (built now: a bad config fails before round 1)

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

    def aggregate(self, neighbours: Cohort) -> Dict[str, torch.Tensor]:
        """The global model after the server step on the cohort's mean delta.

        The backend has already summed ``n_i * (w_i - w_global)`` (in client-id order), so
        the mean is ``sum / sum(n_i)``: the same value as averaging every model, computed
        with one model-sized buffer per process instead of one per client.
        """
        self.server_step(self.reduced_update(neighbours), neighbours)
        return self.get_model()

    def server_step(self, update: Any, cohort: Cohort) -> None:
        """Apply the (server-postprocessed) summed update with the server optimizer."""
        self.server_optimizer.step(update, per_row=self.runtime.per_row_embeddings)

    @property
    def server_optimizer(self) -> ServerOptimizer:
        if self._server_optimizer is None:
            self._server_optimizer = ServerOptimizer(self.server_optimizer_config, self.get_model())
        return self._server_optimizer

    def sample_neighbours(self, round_idx: int, client_num_per_round: int) -> List[int]:
        """The configured sampler's cohort (``fl.sampler``; uniform without replacement by
        default), the same for the same (seed, round)."""
        runtime = self.runtime
        sampler = getattr(runtime, "sampler", None) or UniformSampler()
        seed = runtime.seed if runtime is not None else 0
        table = self.in_neighbours
        sizes = table.sample_nums() if hasattr(table, "sample_nums") else None
        selected = sampler.sample(round_idx, list(table), client_num_per_round, seed, sizes=sizes)
        log.debug("round %d: worker_indexes = %s", round_idx, selected)
        return selected

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self._server_optimizer is not None:
            state["server_optimizer"] = self._server_optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "server_optimizer" in state:
            self.server_optimizer.load_state_dict(state["server_optimizer"])


class _Preset(FedAvgWorker):
    """A FedAvg whose server optimizer is set by the paper's hyper-parameters."""

    def __init__(self, *args: Any, server_optimizer: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        if server_optimizer is not None:
            raise ValueError(f"{type(self).__name__} sets its own server optimizer; to choose one, "
                             "use fl_algo: {name: fed_avg, server_optimizer: {...}}")
        super().__init__(*args, server_optimizer=self.preset(), **kwargs)

    def preset(self) -> Dict[str, Any]:
        raise NotImplementedError


@registry.load("fl_algo", "fed_avgm")
class FedAvgMWorker(_Preset):
    """FedAvg with server momentum (Hsu et al. 2019): ``v = beta * v + mean_delta``,
    ``w += server_lr * v`` (server optimizer ``sgd`` with momentum).

    Config: ``fl_algo: {name: fed_avgm, server_lr: 1.0, server_momentum: 0.9}``. With
    ``server_momentum: 0`` and ``server_lr: 1`` it is FedAvg.
    """

    def __init__(self, *args: Any, server_lr: PositiveFloat = 1.0, server_momentum: UnitInterval = 0.9,
                 **kwargs: Any) -> None:
        self.server_lr, self.server_momentum = float(server_lr), float(server_momentum)
        super().__init__(*args, **kwargs)

    def preset(self) -> Dict[str, Any]:
        return {"name": "sgd", "lr": self.server_lr, "momentum": self.server_momentum}


class _AdaptivePreset(_Preset):
    """Reddi et al. (2021): ``m = b1*m + (1-b1)*d``, ``v`` by the method,
    ``w += server_lr * m / (sqrt(v) + tau)``, ``v`` starting at ``tau**2``."""

    def __init__(self, *args: Any, server_lr: PositiveFloat = 0.01, beta1: UnitInterval = 0.9,
                 beta2: UnitInterval = 0.99, tau: PositiveFloat = 1e-3, **kwargs: Any) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        super().__init__(*args, **kwargs)


@registry.load("fl_algo", "fed_adam")
class FedAdamWorker(_AdaptivePreset):
    """FedAdam: server optimizer ``adam`` without bias correction, ``eps`` = tau."""

    def preset(self) -> Dict[str, Any]:
        return {"name": "adam", "lr": self.server_lr, "betas": [self.beta1, self.beta2], "eps": self.tau,
                "bias_correction": False, "initial_accumulator_value": self.tau ** 2}


@registry.load("fl_algo", "fed_yogi")
class FedYogiWorker(_AdaptivePreset):
    """FedYogi: server optimizer ``yogi`` (``v -= (1-b2) d^2 sign(v - d^2)``)."""

    def preset(self) -> Dict[str, Any]:
        return {"name": "yogi", "lr": self.server_lr, "betas": [self.beta1, self.beta2], "eps": self.tau,
                "initial_accumulator_value": self.tau ** 2}


@registry.load("fl_algo", "fed_adagrad")
class FedAdagradWorker(_Preset):
    """FedAdagrad: server optimizer ``adagrad`` (``v += d^2``, ``w += lr d / (sqrt(v) + tau)``;
    no server momentum, i.e. the paper's beta1 = 0)."""

    def __init__(self, *args: Any, server_lr: PositiveFloat = 0.01, tau: PositiveFloat = 1e-3,
                 **kwargs: Any) -> None:
        self.server_lr, self.tau = float(server_lr), float(tau)
        super().__init__(*args, **kwargs)

    def preset(self) -> Dict[str, Any]:
        return {"name": "adagrad", "lr": self.server_lr, "eps": self.tau,
                "initial_accumulator_value": self.tau ** 2}
