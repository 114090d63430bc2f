"""Client samplers (registry kind ``sampler``): which clients take part in a round.

``fl.sampler: {name: uniform}`` (the default) draws ``client_num_per_round`` clients
uniformly without replacement; ``poisson`` includes each client independently with rate
``q`` (default ``client_num_per_round / num_workers``), as user-level differential privacy
needs; ``weighted`` draws without replacement with probability proportional to data size.
Every draw depends on (seed, round) only, so the cohort is the same in every backend and
after a resume.
"""

from __future__ import annotations

import abc
from typing import Annotated, List, Optional, Sequence

import numpy as np
import pydantic

from fedrec.utilities import registry
from fedrec.utilities.random_state import RandomContext, derive_seed


# stream tags: each sampler draws from its own stream of (seed, round)
_POISSON, _WEIGHTED = 0x5A3101, 0x5A3102


class Sampler(abc.ABC):
    """Chooses a round's cohort from the aggregator's in-neighbours."""

    @abc.abstractmethod
    def sample(self, round_idx: int, candidates: Sequence[int], num: int, seed: int,
               sizes: Optional[np.ndarray] = None) -> List[int]:
        """Client ids, ascending. ``num`` is the configured (expected) cohort size;
        ``sizes[i]`` is candidate ``candidates[i]``'s data size."""

    def expected_cohort(self, num_candidates: int, num: int) -> float:
        """The expected cohort size (a fixed denominator for DP and norm-bounded sums)."""
        return float(min(num, num_candidates))


@registry.load("sampler", "uniform")
class UniformSampler(Sampler):
    """``num`` clients uniformly without replacement (all of them when ``num`` covers all)."""

    def sample(self, round_idx, candidates, num, seed, sizes=None):
        candidates = list(candidates)
        if num <= 0 or num >= len(candidates):
            return sorted(int(c) for c in candidates)
        with RandomContext(derive_seed(seed, round_idx)):
            selected = np.random.choice(candidates, num, replace=False)
        return sorted(int(i) for i in selected)


@registry.load("sampler", "poisson")
class PoissonSampler(Sampler):
    """Each client independently with probability ``q`` (Poisson sampling, as in DP-FedAvg).

    ``q`` defaults to ``client_num_per_round / num_workers``; the cohort size varies
    around that expectation and may be empty.
    """

    def __init__(self, q: Optional[Annotated[float, pydantic.Field(gt=0, le=1)]] = None) -> None:
        self.q = q

    def rate(self, num_candidates: int, num: int) -> float:
        return self.q if self.q is not None else min(1.0, num / max(num_candidates, 1))

    def sample(self, round_idx, candidates, num, seed, sizes=None):
        candidates = np.asarray(list(candidates), dtype=np.int64)
        rng = np.random.default_rng(derive_seed(seed, round_idx, _POISSON))
        keep = rng.random(candidates.size) < self.rate(candidates.size, num)
        return sorted(int(c) for c in candidates[keep])

    def expected_cohort(self, num_candidates, num):
        return self.rate(num_candidates, num) * num_candidates


@registry.load("sampler", "weighted")
class WeightedSampler(Sampler):
    """``num`` clients without replacement, each draw proportional to data size."""

    def sample(self, round_idx, candidates, num, seed, sizes=None):
        candidates = np.asarray(list(candidates), dtype=np.int64)
        if num <= 0 or num >= candidates.size:
            return sorted(int(c) for c in candidates)
        weights = np.ones(candidates.size) if sizes is None else np.asarray(sizes, dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones(candidates.size)
        rng = np.random.default_rng(derive_seed(seed, round_idx, _WEIGHTED))
        selected = rng.choice(candidates, num, replace=False, p=weights / weights.sum())
        return sorted(int(c) for c in selected)
