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

``adaptive_clipping: {target_quantile: 0.5, learning_rate: 0.2}`` makes the clip norm
adaptive (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping"; TFF's ``DifferentiallyPrivateFactory.gaussian_adaptive``): see
:class:`GaussianMechanism`; z stays the *total* noise multiplier and epsilon is unchanged.

The guarantee is user-level (add or remove one client's whole data) for the model updates
the server sees. Dense embedding updates only: sparse uploads reveal which rows a client
touched, which the Gaussian mechanism does not cover.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, Literal, Mapping, Optional

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
_COUNT_STREAM = 0xC0C1A5  # the unclipped count's noise: a stream apart from the update noise
#: the scalar each client uploads with adaptive clipping: 1[||delta|| <= C] - 1/2
UNCLIPPED = "dp_unclipped"
ADAPTIVE_DEFAULTS: Dict[str, Optional[float]] = {
    "target_quantile": 0.5, "learning_rate": 0.2, "clipped_count_stddev": None}


def update_noise_multiplier(total: float, count_stddev: float) -> float:
    """The update noise multiplier z_Delta that leaves a total of ``total`` = z when the
    unclipped count gets noise of std ``count_stddev`` = sigma_b.

    Derivation (Andrew et al. 2021, the noise split of the private quantile estimate; TFF's
    ``gaussian_adaptive`` computes the same): a round releases two noisy sums of the cohort,
    the clipped updates (L2 sensitivity C, noise std z_Delta C on every coordinate) and the
    centred indicators sum_i (b_i - 1/2) (sensitivity 1/2: adding or removing one user moves
    it by exactly 1/2; centring is what halves it from 1; noise std sigma_b). Dividing each
    sum by its noise std gives one vector with unit isotropic Gaussian noise, in which one
    user moves the values by at most sqrt((C / (z_Delta C))^2 + ((1/2) / sigma_b)^2). The
    round is therefore exactly *one* Gaussian mechanism with noise multiplier z where z^-2 =
    z_Delta^-2 + (2 sigma_b)^-2, i.e. z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the
    accountant keeps composing one Poisson-subsampled Gaussian(z) per round, and the clip
    norm C (a function of earlier rounds' noisy outputs) is adaptive composition.
    Defined only for z < 2 sigma_b; z = 0 (no privacy) gives z_Delta = 0.
    """
    if total == 0:
        return 0.0
    if total >= 2 * count_stddev:
        raise ValueError(f"needs z < 2 * sigma_b (got z = {total:.4g}, sigma_b = {count_stddev:.4g})")
    return (total ** -2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_settings(config: Any) -> Dict[str, Optional[float]]:
    """``adaptive_clipping`` checked key by key (an error names the key and the value)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ValueError(f"adaptive_clipping must be a mapping of {sorted(ADAPTIVE_DEFAULTS)}, got {config!r}")
    unknown = sorted(set(config) - set(ADAPTIVE_DEFAULTS))
    if unknown:
        raise ValueError(f"adaptive_clipping does not take {unknown}; it takes {sorted(ADAPTIVE_DEFAULTS)}")
    values = {**ADAPTIVE_DEFAULTS, **config}
    for key, value in values.items():
        if value is None and key == "clipped_count_stddev":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"adaptive_clipping.{key} must be a finite number, got {value!r}")
        values[key] = float(value)
    if not 0 < values["target_quantile"] < 1:
        raise ValueError(f"adaptive_clipping.target_quantile must be in (0, 1), got {values['target_quantile']!r}")
    if not values["learning_rate"] > 0:
        raise ValueError(f"adaptive_clipping.learning_rate must be > 0, got {values['learning_rate']!r}")
    stddev = values["clipped_count_stddev"]
    if stddev is not None and not stddev > 0:
        raise ValueError(f"adaptive_clipping.clipped_count_stddev must be > 0, got {stddev!r}")
    return values


@registry.load("postprocessor", "dp_gaussian")
class GaussianMechanism(Postprocessor):
    """DP-FedAvg's clipping, noise and fixed denominator, with its accountant.

    With ``adaptive_clipping`` (central mode only) the clip norm C starts at ``clip_norm``
    and follows the ``target_quantile`` gamma of the clients' update norms (Andrew et al.
    2021, Algorithm 1, as TFF's ``QuantileEstimatorQuery`` with a geometric update): C
    lives on rank 0, reaches the clients by :meth:`broadcast`; each client clips to C and
    uploads b_i - 1/2 (b_i = 1[||delta_i|| <= C]) as the scalar ``dp_unclipped``; rank 0
    adds N(0, sigma_b^2) to their sum (``clipped_count_stddev``, default expected cohort
    / 20 as TFF's, from the round's seed on its own stream), estimates the unclipped
    fraction b = sum / (q N) + 1/2 (clamped to [0, 1]) and sets
    C <- C exp(-learning_rate (b - gamma)). The updates' noise multiplier drops to
    z_Delta (:func:`update_noise_multiplier`) so that both releases together cost z.
    """

    name = "dp_gaussian"

    def __init__(self, clip_norm: PositiveFloat, noise_multiplier: Optional[NonNegativeFloat] = None,
                 target_epsilon: Optional[PositiveFloat] = None, delta: Optional[OpenUnit] = None,
                 epsilon_budget: Optional[PositiveFloat] = None, accountant: Literal["rdp", "pld"] = "rdp",
                 mode: Literal["central", "local"] = "central",
                 adaptive_clipping: Optional[Dict[str, Any]] = None) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier (z) and target_epsilon "
                             f"(got noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon})")
        self.adaptive = adaptive_settings(adaptive_clipping)
        if self.adaptive and mode == "local":
            raise ValueError("adaptive_clipping needs mode: central (in local DP each client would have to "
                             "noise its own unclipped bit too, which is not implemented); drop one of the two")
        self.clip_norm = float(clip_norm)  # C: with adaptive_clipping the current one (rank 0's)
        self.initial_clip_norm = self.clip_norm
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.accountant = accountant
        self.mode = mode
        self.q = 1.0
        self.expected_cohort = 1.0
        self.num_rounds = 0
        self.count_stddev = 0.0  # sigma_b (adaptive_clipping)
        self.update_noise = None  # z_Delta (adaptive_clipping)
        self._round: Dict[str, float] = {}  # the last round's C and unclipped fraction

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
        if self.adaptive:
            self._split_noise()
        if self.epsilon_budget is not None and self.max_rounds() == 0:
            raise ValueError(f"epsilon_budget {self.epsilon_budget} does not allow one round at noise multiplier "
                             f"{self.noise_multiplier:.4g}; raise it to at least "
                             f"{self.epsilon_after(1):.4g} or raise the noise")

    def _split_noise(self) -> None:
        """sigma_b (default: TFF's, expected cohort / 20; 0 when z = 0, no privacy) and z_Delta."""
        z = float(self.noise_multiplier)
        stddev = self.adaptive["clipped_count_stddev"]
        if stddev is None:
            stddev = self.expected_cohort / 20 if z > 0 else 0.0
        source = "noise_multiplier" if self.target_epsilon is None else "target_epsilon (calibrated)"
        if z > 0 and z >= 2 * stddev:
            default = "" if self.adaptive["clipped_count_stddev"] is not None else \
                f" (the default, expected cohort {self.expected_cohort:.4g} / 20)"
            raise ValueError(
                f"adaptive_clipping.clipped_count_stddev {stddev:.4g}{default} is too small for the total noise "
                f"multiplier z = {z:.4g} from {source}: the updates' share z_Delta = (z^-2 - (2 "
                f"clipped_count_stddev)^-2)^(-1/2) needs z < 2 clipped_count_stddev; set "
                f"adaptive_clipping.clipped_count_stddev above {z / 2:.4g} (z / 2) or a z below {2 * stddev:.4g}")
        self.count_stddev = float(stddev)
        self.update_noise = update_noise_multiplier(z, self.count_stddev)

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the updates: z, or z_Delta with adaptive clipping."""
        return float(self.noise_multiplier) if not self.adaptive else float(self.update_noise)

    def _rate(self) -> float:
        """Local DP: every round a client is in counts (no amplification by sampling)."""
        return self.q if self.mode == "central" else 1.0

    def epsilon_after(self, rounds: int) -> float:
        return accounting.epsilon(self._rate(), float(self.noise_multiplier), rounds, float(self.delta),
                                  self.accountant)

    @property
    def noise_std(self) -> float:
        return self.update_noise_multiplier * self.clip_norm

    # -- the mechanism ------------------------------------------------------------------------
    def postprocess_client(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        if update.aux or update.scalars:
            raise ValueError(f"dp_gaussian bounds the model delta only, but this algorithm also uploads "
                             f"{sorted(update.aux) + sorted(update.scalars)}")
        # the round's C is rank 0's broadcast (this process's own copy may be stale under MPI)
        bound = float(self.received(context.round, "clip_norm")) if self.adaptive else self.clip_norm
        # one user, weight 1, norm <= S: unweighted and clipped in one in-place pass
        norm = math.sqrt(update.sq_norm()) / abs(update.weight or 1.0)
        clipped = norm > bound
        plain = update.one_vote_(scale=bound / norm if clipped else 1.0)
        context.metrics["dp_clipped"] = context.metrics.get("dp_clipped", 0.0) + float(clipped)
        if self.adaptive:  # centred: the sum's sensitivity is 1/2 (see update_noise_multiplier)
            plain.scalars[UNCLIPPED] = -0.5 if clipped else 0.5
        if self.mode == "local":
            seed = derive_seed(context.round.seed, context.round.round_idx, context.client_id, _NOISE_STREAM)
            self._add_noise(plain, seed)
        return plain

    def postprocess_server(self, update: WeightedUpdate, context: RoundContext) -> WeightedUpdate:
        if self.adaptive:
            if update.num_clients and UNCLIPPED not in update.scalars:
                raise ValueError(f"dp_gaussian: the cohort's sum lacks its {UNCLIPPED!r} count")
            centred = update.scalars.pop(UNCLIPPED, 0.0)  # sum of b_i - 1/2 (0 for an empty cohort)
        if self.mode == "central":
            self._add_noise(update, derive_seed(context.seed, context.round_idx, _NOISE_STREAM))
        if update.num_clients:  # (an empty cohort has no tensors to noise: the model stays)
            update.weight = self.expected_cohort  # the fixed denominator q N
        if self.adaptive:
            fraction = self.unclipped_fraction(self.noisy_count(centred, context))
            self._round = {"dp_clip_norm": self.clip_norm, "dp_unclipped_fraction": fraction}
            self.clip_norm = self.next_clip_norm(self.clip_norm, fraction)
        return update

    # -- adaptive clipping (rank 0) ----------------------------------------------------------
    def noisy_count(self, centred_sum: float, context: RoundContext) -> float:
        """sum_i (b_i - 1/2) + N(0, sigma_b^2), the noise from the round's seed."""
        generator = torch.Generator().manual_seed(derive_seed(context.seed, context.round_idx, _COUNT_STREAM))
        noise = float(torch.randn((), generator=generator, dtype=torch.float64))
        return centred_sum + noise * self.count_stddev

    def unclipped_fraction(self, noisy_centred_sum: float) -> float:
        """The estimate of the fraction of unclipped clients: divided by the expected cohort
        (not the sampled one), un-centred, clamped to [0, 1] (post-processing, as TFF's)."""
        return min(1.0, max(0.0, noisy_centred_sum / self.expected_cohort + 0.5))

    def next_clip_norm(self, clip_norm: float, unclipped_fraction: float) -> float:
        """The geometric update C exp(-eta_C (b - gamma)): C grows while too many clients
        are clipped (b < gamma) and shrinks while too few are."""
        return clip_norm * math.exp(-self.adaptive["learning_rate"]
                                    * (unclipped_fraction - self.adaptive["target_quantile"]))

    def broadcast(self) -> Dict[str, float]:
        return {"clip_norm": self.clip_norm} if self.adaptive else {}

    def state_dict(self) -> Dict[str, Any]:
        return {"clip_norm": self.clip_norm} if self.adaptive else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.adaptive and "clip_norm" in state:
            self.clip_norm = float(state["clip_norm"])

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
        if self.adaptive:
            a = self.adaptive
            clipping = (f"adaptive clip norm from {self.initial_clip_norm:g} towards the {a['target_quantile']:g} "
                        f"quantile of update norms (learning rate {a['learning_rate']:g}, unclipped-count "
                        f"noise std {self.count_stddev:.4g}), noise multiplier {self.noise_multiplier:.4g} in "
                        f"total: {self.update_noise_multiplier:.4g} on the updates")
        else:
            clipping = f"clip norm {self.clip_norm:g}, noise multiplier {self.noise_multiplier:.4g}"
        return (f"dp_gaussian ({self.mode} DP): {clipping}, Poisson rate {self.q:.4g} (expected cohort "
                f"{self.expected_cohort:.1f}), delta {self.delta:.3g}: epsilon "
                f"{self.epsilon_after(self.num_rounds):.4g} after {self.num_rounds} rounds ({self.accountant})")

    def round_metrics(self, rounds_done: int) -> Dict[str, float]:
        """Epsilon so far, and what it was computed from (z and q), for anyone to check."""
        accounted = {"epsilon": self.epsilon_after(rounds_done), "dp_noise_multiplier": float(self.noise_multiplier),
                     "dp_sampling_rate": self._rate()}
        if not self.adaptive:
            return {**accounted, "dp_noise_std": self.noise_std}
        used = self._round.get("dp_clip_norm", self.clip_norm)  # the round's C, not the next one
        return {**accounted, "dp_noise_std": self.update_noise_multiplier * used, **self._round}

    def max_rounds(self) -> Optional[int]:
        if self.epsilon_budget is None:
            return None
        return accounting.rounds_within(self._rate(), float(self.noise_multiplier), self.epsilon_budget,
                                        float(self.delta), max(self.num_rounds, 1), self.accountant)

