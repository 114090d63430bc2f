"""Divergence: training that reaches nan/inf stops with one line saying where.

A diverged model writes nan metrics and nan checkpoints, and every later step stays nan:
stopping at once keeps the last good checkpoint the newest one, and the message says
when it happened (the step or round) and what to lower.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["DivergedError", "NonFinitePredictions", "check_round"]


class DivergedError(ValueError):
    """Training produced nan or inf; the message names the step or round."""


class NonFinitePredictions(DivergedError):
    """A model predicts nan or inf (raised by ``compute_metrics``, which cannot know the
    step or round: the trainer and the simulation say it again with theirs)."""


def check_round(row: Mapping[str, Any], round_number: int) -> None:
    """Raise :class:`DivergedError` when a federated round's training loss is not finite."""
    loss = row.get("train_loss")
    if row.get("samples") and isinstance(loss, float) and not math.isfinite(loss):
        raise DivergedError(
            f"the simulation diverged in round {round_number}: the clients' mean training loss is "
            f"{loss}; this round was neither logged nor checkpointed. Lower fl.local_lr "
            "(or the local optimizer's lr) and start a fresh run")
