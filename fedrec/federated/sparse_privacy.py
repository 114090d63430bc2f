"""Sparsity-preserving user-level DP for embedding rows: DP-AdaFEST adapted to FL.

Dense DP-FedAvg (``dp_gaussian``) noises every coordinate, so every row of every embedding
table changes every round: a sparse round's few touched rows become whole tables, and the
row ids a client uploads (which items it touched) are not covered at all. Ghazi et al.
(NeurIPS 2023, "Sparsity-Preserving Differentially Private Training of Large Embedding
Models") select the rows to update privately instead. ``dp_adafest`` is their adaptive
selection (DP-AdaFEST) with user-level units, one round being one step:

1. Each client clips its whole update (MLPs and the rows it touched) to L2 norm S with
   weight 1, as in DP-FedAvg, and reports a *contribution map*: 1 for every row it
   touched, the map clipped to L2 norm C1 (``contribution_clip``) over all tables, so a
   client that touched k rows gives each ``min(1, C1 / sqrt(k))``.
2. The server sums the maps over the cohort, adds N(0, (z1 C1)^2) to every row's count
   (untouched rows too) and keeps the rows whose noisy count exceeds ``threshold`` (tau).
3. The summed clipped updates get N(0, (z2 S)^2) on the MLPs and on the selected rows only;
   touched rows that were not selected are dropped, selected rows nobody touched get the
   noise alone. Rows outside the selection receive no update.
4. The sum is divided by the expected cohort size q N (the fixed denominator).

Both steps are Gaussian mechanisms on the same Poisson-sampled cohort, each with
sensitivity 1 in its own units, so a round is one subsampled Gaussian mechanism with
``z = (z1^-2 + z2^-2)^-1/2`` (exact for Gaussians: their privacy losses add). The
configured ``noise_multiplier`` (or the one ``target_epsilon`` calibrates) is that z;
``selection_noise_ratio`` r = z1 / z2 splits it. Untouched rows' noisy counts are sampled
exactly without drawing one number per row: the number of them above tau is binomial, and
which ones is uniform among the untouched rows, so the server's cost grows with the rows
touched and selected, not with the vocabulary.

Bytes are the two-phase protocol's: a client sends its row ids with its contribution
(phase 1) and, once the selection is known, its values for the selected rows among its own
(phase 2, no ids needed); ``bytes_up`` counts exactly that.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, Literal, Mapping, Optional, Tuple

import numpy as np
import pydantic
import torch

from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.privacy import GaussianMechanism
from fedrec.federated.update import RowUpdate, WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed

PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
NonNegativeFloat = Annotated[float, pydantic.Field(ge=0)]
OpenUnit = Annotated[float, pydantic.Field(gt=0, lt=1)]
_SELECTION_STREAM = 0xADAFE5


def split_noise(noise_multiplier: float, ratio: float) -> Tuple[float, float]:
    """(z1, z2) with z1 = ratio * z2 and z1^-2 + z2^-2 = z^-2 (z = 0 gives no noise)."""
    if noise_multiplier == 0:
        return 0.0, 0.0
    z2 = noise_multiplier * math.sqrt(1.0 + 1.0 / ratio ** 2)
    return ratio * z2, z2


@registry.load("postprocessor", "dp_adafest")
class SparseGaussianMechanism(GaussianMechanism):
    """DP-FedAvg whose embedding rows are privately selected each round (DP-AdaFEST)."""

    name = "dp_adafest"

    def __init__(self, clip_norm: PositiveFloat, noise_multiplier: Optional[NonNegativeFloat] = None,
                 target_epsilon: Optional[PositiveFloat] = None, delta: Optional[OpenUnit] = None,
                 epsilon_budget: Optional[PositiveFloat] = None, accountant: Literal["rdp", "pld"] = "rdp",
                 contribution_clip: PositiveFloat = 1.0, selection_noise_ratio: PositiveFloat = 1.0,
                 threshold: Optional[NonNegativeFloat] = None,
                 adaptive_clipping: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(clip_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
                         epsilon_budget=epsilon_budget, accountant=accountant, mode="central",
                         adaptive_clipping=adaptive_clipping)
        self.contribution_clip = float(contribution_clip)
        self.selection_noise_ratio = float(selection_noise_ratio)
        self.threshold_setting = threshold
        self.threshold = 0.0
        self.table_rows: Dict[str, int] = {}
        self.value_bytes = 4
        self._selection: Dict[str, float] = {}

    def bind_tables(self, tables: Mapping[str, int]) -> None:
        self.table_rows = dict(tables)

    def setup(self, fl: Any, sampler: Any, sparse: bool = False) -> None:
        if not sparse:
            raise ValueError("dp_adafest selects embedding rows of sparse uploads: set fl.embedding_updates: sparse "
                             "(for dense updates use dp_gaussian)")
        if fl.embedding_aggregation != "dense_equivalent":
            raise ValueError("dp_adafest divides by the expected cohort size: set fl.embedding_aggregation: "
                             "dense_equivalent (per_row would divide by how many clients touched a row, which "
                             "is not private)")
        names = [p.get("name") if isinstance(p, Mapping) else p for p in fl.postprocessors]
        if names and names[-1] != self.name:
            raise ValueError(f"dp_adafest must be the last entry of fl.postprocessors (its clients' rows carry "
                             f"their contribution as an extra column), got fl.postprocessors {names}")
        super().setup(fl, sampler, sparse=False)
        self.value_bytes = fl.value_bytes
        if self.threshold_setting is None:  # 3 standard deviations of the selection noise: about 0.13%
            self.threshold = 3.0 * self.count_noise_std  # of the rows nobody touched pass
        else:
            self.threshold = float(self.threshold_setting)

    # -- noise scales -----------------------------------------------------------------------
    def _split(self) -> Tuple[float, float]:
        """(z1, z2) from what the clip-norm estimate leaves: z, or z_Delta with adaptive
        clipping (then z1^-2 + z2^-2 + (2 sigma_b)^-2 = z^-2: three Gaussians, one z)."""
        rest = GaussianMechanism.update_noise_multiplier.fget(self)  # type: ignore[attr-defined]
        return split_noise(float(rest), self.selection_noise_ratio)

    @property
    def selection_noise_multiplier(self) -> float:
        return self._split()[0]

    @property
    def update_noise_multiplier(self) -> float:
        return self._split()[1]

    @property
    def count_noise_std(self) -> float:
        return self.selection_noise_multiplier * self.contribution_clip

    @property
    def noise_std(self) -> float:
        return self.update_noise_multiplier * self.clip_norm

    def _client_contribution(self, rows: int) -> float:
        """Each touched row's entry of a client's contribution map clipped to L2 norm C1."""
        return min(1.0, self.contribution_clip / math.sqrt(rows)) if rows else 0.0

    # -- client side --------------------------------------------------------------------------
    def postprocess_client(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        """Clip (weight 1), then append the contribution map to the rows as one more value
        column: it sums with the rows in the same merge (a separate map would double the
        cost of summing rows), and the server splits it off first."""
        plain = super().postprocess_client(update, context)  # clipped to S, weight 1
        touched = sum(int(row.ids.numel()) for row in plain.rows.values())
        share = self._client_contribution(touched)
        for name, row in plain.rows.items():
            column = torch.full((row.ids.numel(), 1), share, dtype=row.values.dtype)
            plain.rows[name] = RowUpdate(row.ids, torch.cat([row.values, column], dim=1), row.row_weight)
        return plain

    # -- server side --------------------------------------------------------------------------
    def postprocess_server(self, update: WeightedUpdate, context: RoundContext) -> WeightedUpdate:
        self._selection = {"dp_rows_touched": 0.0, "dp_rows_selected": 0.0, "dp_rows_noise_only": 0.0,
                           "dp_rows_dropped": 0.0, "_bytes_saved": 0.0}
        if not update.num_clients:
            return super().postprocess_server(update, context)
        seed = derive_seed(context.seed, context.round_idx, _SELECTION_STREAM)
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        for name in sorted(update.rows):
            summed = update.rows[name]
            rows = RowUpdate(summed.ids, summed.values[:, :-1], summed.row_weight)
            counts = summed.values[:, -1].to(torch.float64)
            selected = self._select(name, rows.ids, counts, generator, rng)
            self._selection["_bytes_saved"] += self._phase_two_saving(rows, selected)
            update.rows[name] = self._restrict(rows, selected, generator)
        # the MLPs: dense noise z2 S from the round's seed, and the fixed denominator
        return super().postprocess_server(update, context)

    def _select(self, name: str, ids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator,
                rng: np.random.Generator) -> torch.Tensor:
        """Row ids whose noisy contribution count exceeds tau (ascending)."""
        std = self.count_noise_std
        noisy = counts.clone()
        if std > 0:
            noisy.add_(torch.randn(noisy.shape, generator=generator, dtype=noisy.dtype) * std)
        chosen = ids[noisy > self.threshold]
        extra = self._untouched_above_threshold(name, ids, rng)
        self._selection["dp_rows_touched"] += ids.numel()
        self._selection["dp_rows_noise_only"] += extra.numel()
        return torch.unique(torch.cat([chosen, extra]), sorted=True)

    def _untouched_above_threshold(self, name: str, touched: torch.Tensor, rng: np.random.Generator
                                   ) -> torch.Tensor:
        """Untouched rows whose count (0 + noise) exceeds tau: Binomial(untouched, P(N > tau))
        of them, uniformly chosen: the same distribution as noising every row."""
        std = self.count_noise_std
        num_rows = self.table_rows.get(name)
        if num_rows is None:
            raise KeyError(f"dp_adafest: no table size for {name!r} (bind_tables was not called)")
        untouched = num_rows - int(touched.numel())
        if std == 0 or untouched <= 0:
            return touched[:0]
        probability = 0.5 * math.erfc(self.threshold / std / math.sqrt(2.0))  # P(N(0, std^2) > tau)
        wanted = int(rng.binomial(untouched, probability))
        if wanted == 0:
            return touched[:0]
        if wanted > untouched // 2:  # dense case: choose from the explicit complement
            mask = np.ones(num_rows, dtype=bool)
            mask[touched.numpy()] = False
            pool = np.flatnonzero(mask)
            return torch.from_numpy(np.sort(rng.choice(pool, size=wanted, replace=False)))
        taken = set(touched.tolist())
        picked: set = set()
        while len(picked) < wanted:  # rejection sampling: O(wanted), not O(num_rows)
            for row in rng.integers(0, num_rows, size=2 * (wanted - len(picked))).tolist():
                if row not in taken and row not in picked:
                    picked.add(row)
                    if len(picked) == wanted:
                        break
        return torch.tensor(sorted(picked), dtype=torch.int64)

    def _restrict(self, rows: RowUpdate, selected: torch.Tensor, generator: torch.Generator) -> RowUpdate:
        """The summed rows on ``selected`` only (zeros where nobody touched), plus N(0, (z2 S)^2)."""
        dim = int(rows.values.shape[1])
        values = torch.zeros((selected.numel(), dim), dtype=rows.values.dtype)
        weight = torch.zeros(selected.numel(), dtype=torch.float64)
        if selected.numel() and rows.ids.numel():
            positions = torch.searchsorted(selected, rows.ids).clamp_(max=selected.numel() - 1)
            kept = selected[positions] == rows.ids
            values.index_copy_(0, positions[kept], rows.values[kept])
            weight.index_copy_(0, positions[kept], rows.row_weight[kept])
            self._selection["dp_rows_dropped"] += float((~kept).sum())
        else:
            self._selection["dp_rows_dropped"] += float(rows.ids.numel())
        self._selection["dp_rows_selected"] += selected.numel()
        std = self.noise_std
        if std > 0 and selected.numel():
            values.add_(torch.randn(values.shape, generator=generator, dtype=values.dtype) * std)
        return RowUpdate(selected, values, weight)

    def _phase_two_saving(self, rows: RowUpdate, selected: torch.Tensor) -> float:
        """Bytes the clients counted that the two-phase protocol does not send: they counted
        each touched row's id, contribution and values; phase 2 carries values (no ids) for
        each client's selected rows only. ``row_weight`` counts the clients of a row."""
        row_bytes = int(rows.values.shape[1]) * self.value_bytes
        touched_pairs = float(rows.row_weight.sum())
        if selected.numel():
            positions = torch.searchsorted(selected, rows.ids).clamp_(max=selected.numel() - 1)
            selected_pairs = float(rows.row_weight[selected[positions] == rows.ids].sum())
        else:
            selected_pairs = 0.0
        return (touched_pairs - selected_pairs) * row_bytes

    # -- reporting ------------------------------------------------------------------------------
    def round_byte_corrections(self) -> Dict[str, int]:
        return {"bytes_up": -int(self._selection.pop("_bytes_saved", 0.0))}  # consumed: once per round

    def round_metrics(self, rounds_done: int) -> Dict[str, float]:
        metrics = super().round_metrics(rounds_done)
        metrics.update({k: v for k, v in self._selection.items() if not k.startswith("_")})
        metrics["dp_count_noise_std"] = self.count_noise_std
        return metrics

    def resume_fingerprint(self) -> Dict[str, Any]:
        return {**super().resume_fingerprint(), "threshold": self.threshold}

    def describe(self) -> str:
        z1, z2 = self._split()
        return (f"dp_adafest (sparsity-preserving central DP): clip norm {self.clip_norm:g}, contribution clip "
                f"{self.contribution_clip:g}, threshold {self.threshold:.4g}, noise multiplier "
                f"{self.noise_multiplier:.4g} = selection {z1:.4g} (std {self.count_noise_std:.4g}) with updates "
                f"{z2:.4g} (std {self.noise_std:.4g}), Poisson rate {self.q:.4g} (expected cohort "
                f"{self.expected_cohort:.1f}), delta {self.delta:.3g}{self._adaptive_text()}: epsilon "
                f"{self.epsilon_after(self.num_rounds):.4g} after {self.num_rounds} rounds ({self.accountant})")

    def _adaptive_text(self) -> str:
        if not self.adaptive:
            return ""
        return (f", adaptive clipping to quantile {self.adaptive['target_quantile']:g} (learning rate "
                f"{self.adaptive['learning_rate']:g}, count noise std {self.count_stddev:.4g})")
