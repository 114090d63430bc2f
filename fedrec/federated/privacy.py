"""User-level differential privacy for FL: DP-FedAvg's Gaussian mechanism as a postprocessor.

``fl.postprocessors: [{name: dp_gaussian, clip_norm: 0.5, target_epsilon: 3.0}]`` with
``fl.sampler: {name: poisson}`` is DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"), as TFF's ``gaussian_fixed`` and
pfl-research's Gaussian mechanism implement it:

* each client's whole update (MLPs and embedding tables) is clipped to L2 norm
  ``clip_norm`` = S and counts with weight 1, so one user moves the sum by at most S;
* the cohort's sum gets Gaussian noise N(0, (z S)^2) on every coordinate, drawn once on
  rank 0 from the round's seed (the same in every backend);
* the sum is divided by the *expected* cohort size q N, not the sampled one (which would
  itself reveal whether a user took part);
* clients are Poisson-sampled with rate q, and the accountant (``dp-accounting``, RDP or
  PLD) composes the rounds; every metrics line carries ``epsilon`` at ``delta``.

``noise_multiplier`` sets z; ``target_epsilon`` instead calibrates z before round 1 so
that ``fl.num_rounds`` rounds spend exactly that budget; ``epsilon_budget`` stops a run
cleanly (with a checkpoint) at the last round within it. ``mode: local`` is local DP
instead: each client adds the noise to its own clipped update (z is then per client, and
the guarantee needs no trusted server).

The guarantee is user-level (add or remove one client's whole data) for the model updates
the server sees. Dense embedding updates only: sparse uploads reveal which rows a client
touched, which the Gaussian mechanism does not cover.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, Literal, Optional

import pydantic
import torch

from fedrec.federated import accounting
from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.postprocessors import Postprocessor
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed

PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
NonNegativeFloat = Annotated[float, pydantic.Field(ge=0)]
OpenUnit = Annotated[float, pydantic.Field(gt=0, lt=1)]
_NOISE_STREAM = 0xD9A551


@registry.load("postprocessor", "dp_gaussian")
class GaussianMechanism(Postprocessor):
    """DP-FedAvg's clipping, noise and fixed denominator, with its accountant."""

    name = "dp_gaussian"

    def __init__(self, clip_norm: PositiveFloat, noise_multiplier: Optional[NonNegativeFloat] = None,
                 target_epsilon: Optional[PositiveFloat] = None, delta: Optional[OpenUnit] = None,
                 epsilon_budget: Optional[PositiveFloat] = None, accountant: Literal["rdp", "pld"] = "rdp",
                 mode: Literal["central", "local"] = "central") -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier (z) and target_epsilon "
                             f"(got noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon})")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.accountant = accountant
        self.mode = mode
        self.q = 1.0
        self.expected_cohort = 1.0
        self.num_rounds = 0

    # -- set-up: sampling rate, delta, calibration ------------------------------------------
    def setup(self, fl: Any, sampler: Any, sparse: bool = False) -> None:
        from fedrec.federated.samplers import PoissonSampler

        if sparse:
            raise ValueError("dp_gaussian needs fl.embedding_updates: dense (a sparse upload's row ids "
                             "reveal what a client touched, which Gaussian noise does not hide)")
        if not isinstance(sampler, PoissonSampler):
            raise ValueError(f"dp_gaussian's accounting needs Poisson client sampling: set fl.sampler: "
                             f"{{name: poisson}} (got {fl.sampler.get('name')!r})")
        self.q = sampler.rate(fl.num_workers, fl.client_num_per_round)
        self.expected_cohort = sampler.expected_cohort(fl.num_workers, fl.client_num_per_round)
        self.num_rounds = fl.num_rounds
        if self.delta is None:
            self.delta = 1.0 / fl.num_workers
        if self.target_epsilon is not None:
            self.noise_multiplier = accounting.calibrate_noise(self._rate(), fl.num_rounds, self.target_epsilon,
                                                               self.delta, self.accountant)
        if self.epsilon_budget is not None and self.max_rounds() == 0:
            raise ValueError(f"epsilon_budget {self.epsilon_budget} does not allow one round at noise multiplier "
                             f"{self.noise_multiplier:.4g}; raise it to at least "
                             f"{self.epsilon_after(1):.4g} or raise the noise")

    def _rate(self) -> float:
        """Local DP: every round a client is in counts (no amplification by sampling)."""
        return self.q if self.mode == "central" else 1.0

    def epsilon_after(self, rounds: int) -> float:
        return accounting.epsilon(self._rate(), float(self.noise_multiplier), rounds, float(self.delta),
                                  self.accountant)

    @property
    def noise_std(self) -> float:
        return float(self.noise_multiplier) * self.clip_norm

    # -- the mechanism ------------------------------------------------------------------------
    def postprocess_client(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        if update.aux or update.scalars:
            raise ValueError(f"dp_gaussian bounds the model delta only, but this algorithm also uploads "
                             f"{sorted(update.aux) + sorted(update.scalars)}")
        # one user, weight 1, norm <= S: unweighted and clipped in one in-place pass
        norm = math.sqrt(update.sq_norm()) / abs(update.weight or 1.0)
        clipped = norm > self.clip_norm
        plain = update.one_vote_(scale=self.clip_norm / norm if clipped else 1.0)
        context.metrics["dp_clipped"] = context.metrics.get("dp_clipped", 0.0) + float(clipped)
        if self.mode == "local":
            seed = derive_seed(context.round.seed, context.round.round_idx, context.client_id, _NOISE_STREAM)
            self._add_noise(plain, seed)
        return plain

    def postprocess_server(self, update: WeightedUpdate, context: RoundContext) -> WeightedUpdate:
        if self.mode == "central":
            self._add_noise(update, derive_seed(context.seed, context.round_idx, _NOISE_STREAM))
        if update.num_clients:  # (an empty cohort has no tensors to noise: the model stays)
            update.weight = self.expected_cohort  # the fixed denominator q N
        return update

    def _add_noise(self, update: WeightedUpdate, seed: int) -> None:
        std = self.noise_std
        if std == 0:
            return
        generator = torch.Generator().manual_seed(seed)
        for name in sorted(update.dense):
            tensor = update.dense[name]
            tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std)

    def resume_fingerprint(self) -> Dict[str, Any]:
        """The earlier rounds' noise must be a resumed run's too, or the accounting (one z
        for every round) would be wrong: e.g. ``target_epsilon`` recalibrated for another
        ``fl.num_rounds``."""
        return {"noise_multiplier": float(self.noise_multiplier)}

    # -- reporting and the budget ---------------------------------------------------------------
    def describe(self) -> str:
        return (f"dp_gaussian ({self.mode} DP): clip norm {self.clip_norm:g}, noise multiplier "
                f"{self.noise_multiplier:.4g}, Poisson rate {self.q:.4g} (expected cohort "
                f"{self.expected_cohort:.1f}), delta {self.delta:.3g}: epsilon "
                f"{self.epsilon_after(self.num_rounds):.4g} after {self.num_rounds} rounds ({self.accountant})")

    def round_metrics(self, rounds_done: int) -> Dict[str, float]:
        return {"epsilon": self.epsilon_after(rounds_done), "dp_noise_std": self.noise_std}

    def max_rounds(self) -> Optional[int]:
        if self.epsilon_budget is None:
            return None
        return accounting.rounds_within(self._rate(), float(self.noise_multiplier), self.epsilon_budget,
                                        float(self.delta), max(self.num_rounds, 1), self.accountant)

