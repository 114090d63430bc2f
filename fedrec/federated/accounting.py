"""Privacy accounting through Google's ``dp-accounting`` library (no hand-written maths).

A round of user-level DP-FedAvg is a Poisson-subsampled Gaussian mechanism: each client
is in the cohort with probability ``q`` and the cohort's sum of clipped updates gets
Gaussian noise of ``z`` times the clip norm. ``T`` rounds compose. The RDP accountant
(Mironov 2017) is the default; the PLD accountant (privacy loss distributions) is tighter
and slower.
"""

from __future__ import annotations

import functools
from typing import Callable

ACCOUNTANTS = ("rdp", "pld")


def _accountant_factory(kind: str) -> Callable[[], object]:
    from absl import logging as absl_logging
    from dp_accounting import pld, rdp

    absl_logging.set_verbosity(absl_logging.ERROR)  # RDP orders it skips are not the user's concern

    if kind == "rdp":
        return rdp.RdpAccountant
    if kind == "pld":
        return pld.PLDAccountant
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")


def _event(q: float, noise_multiplier: float, rounds: int):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


@functools.lru_cache(maxsize=4096)
def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon after ``rounds`` rounds at rate ``q`` and noise multiplier ``z`` (inf for z = 0)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    accountant = _accountant_factory(kind)()
    accountant.compose(_event(q, noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(q: float, rounds: int, target_epsilon: float, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon`` (the library's own search)."""
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(
        _accountant_factory(kind), lambda z: _event(q, z, rounds), target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3)))


def rounds_within(q: float, noise_multiplier: float, budget: float, delta: float, max_rounds: int,
                  kind: str = "rdp") -> int:
    """The most rounds (up to ``max_rounds``) whose epsilon stays within ``budget``."""
    low, high = 0, max_rounds  # epsilon grows with rounds: binary search
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon(q, noise_multiplier, middle, delta, kind) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
