"""Round policies of synchronous cross-device FL (Bonawitz et al. 2019, "Towards Federated
Learning at Scale"): which selected clients make it into a round's aggregate, and when
the round ends in device time.

``fl.round_policy`` (needs ``fl.devices``)::

    round_policy:
      deadline: 120          # seconds of device time; later reports are dropped (null: none)
      over_commitment: 1.3   # select ceil(1.3 K) clients, keep the first K to report
      dropout_rate: 0.1      # each selected client fails with this probability
      min_reports: 50        # fewer kept reports: the round is abandoned, the model unchanged
      offline_drops: true    # a client whose online window closes mid-round fails then

Everything here is decided on the server before any client trains, from the profiles and
each client's planned cost (bytes down, samples, bytes up: known in advance, see
``ClientRunner.planned_costs``) and from draws seeded by (seed, round, client): so the
outcome is the same on every backend, and clients that cannot count are never trained
(their wasted work is counted from the plan instead).

One rule for wasted work: a client that does not enter the aggregate works until it fails
or until the round closes, whichever is first; what it processed and transferred by then
is wasted (``wasted_samples``, ``wasted_bytes``). In an abandoned round every client's
work is wasted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, List, Optional

import numpy as np
import pydantic

from fedrec.utilities.random_state import derive_seed

_DROPOUT = 0x0D0F01  # stream tag of the dropout draws

KEPT, DROPPED, OFFLINE, LATE, SURPLUS = "kept", "dropped", "offline", "late", "surplus"


class RoundPolicy(pydantic.BaseModel):
    """``fl.round_policy``: deadline, over-commitment, dropouts and the minimum report count."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    deadline: Optional[Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]] = None
    over_commitment: float = pydantic.Field(1.0, ge=1, allow_inf_nan=False)
    dropout_rate: float = pydantic.Field(0.0, ge=0, lt=1)
    min_reports: int = pydantic.Field(1, ge=1)
    offline_drops: bool = True

    def selected(self, num: int) -> int:
        """How many clients to select for a goal of ``num`` reports (over-commitment)."""
        return int(math.ceil(self.over_commitment * num - 1e-9))


@dataclasses.dataclass
class RoundPlan:
    """The outcome of one round, per selected client (ascending id) and in all."""

    start: float
    ids: np.ndarray  # int64, ascending
    bytes_down: np.ndarray
    samples: np.ndarray
    bytes_up: np.ndarray
    times: np.ndarray  # seconds each client needs to report
    fail_at: np.ndarray  # seconds after the start at which it fails (inf: never)
    status: List[str]
    end: float  # virtual time at which the round closes
    abandoned: bool
    wasted_samples: int = 0
    wasted_bytes: int = 0

    @property
    def kept(self) -> List[int]:
        return [int(c) for c, s in zip(self.ids, self.status) if s == KEPT]

    def count(self, status: str) -> int:
        return sum(1 for s in self.status if s == status)


def client_times(bytes_down: np.ndarray, samples: np.ndarray, bytes_up: np.ndarray, speed: np.ndarray,
                 download: np.ndarray, upload: np.ndarray) -> np.ndarray:
    """Device seconds of a round: download, then train, then upload (all in float64)."""
    return bytes_down / download + samples / speed + bytes_up / upload


def done_by(elapsed: np.ndarray, bytes_down, samples, bytes_up, speed, download, upload):
    """(samples processed, bytes moved) ``elapsed`` seconds into each client's round."""
    t_down = bytes_down / download
    t_train = samples / speed
    down = np.minimum(bytes_down, np.maximum(elapsed, 0) * download)
    trained = np.minimum(samples, np.floor(np.clip(elapsed - t_down, 0, t_train) * speed + 1e-9))
    up = np.minimum(bytes_up, np.maximum(elapsed - t_down - t_train, 0) * upload)
    return trained.astype(np.int64), np.floor(down + up + 1e-9).astype(np.int64)


def plan_round(policy: RoundPolicy, start: float, round_idx: int, seed: int, goal: int, ids: np.ndarray,
               bytes_down: np.ndarray, samples: np.ndarray, bytes_up: np.ndarray, speed: np.ndarray,
               download: np.ndarray, upload: np.ndarray, online_until: np.ndarray,
               num_clients: int, next_online: float) -> RoundPlan:
    """Who reports in time and is kept, and when the round closes (see the module notes).

    ``speed``/``download``/``upload``/``online_until`` are the selected clients' own;
    ``goal`` is the number of reports wanted (``fl.client_num_per_round``).
    """
    ids = np.asarray(ids, dtype=np.int64)
    bytes_down, samples, bytes_up = (np.asarray(x, dtype=np.float64) for x in (bytes_down, samples, bytes_up))
    times = client_times(bytes_down, samples, bytes_up, speed, download, upload)
    fail_at = np.full(ids.size, np.inf)
    status = [KEPT] * ids.size
    if policy.dropout_rate > 0 and ids.size:
        # one draw per (seed, round, client): the same whoever else is selected
        rng = np.random.default_rng(derive_seed(seed, round_idx, _DROPOUT))
        draws = rng.random((num_clients, 2))[ids]
        failing = draws[:, 0] < policy.dropout_rate
        fail_at[failing] = draws[failing, 1] * times[failing]  # somewhere in its work
        for i in np.flatnonzero(failing):
            status[i] = DROPPED
    offline_left = online_until - start
    for i in range(ids.size):
        if offline_left[i] < 0:  # not online at the start at all (an algorithm's own sampling)
            status[i], fail_at[i] = OFFLINE, 0.0
        elif policy.offline_drops and offline_left[i] < times[i] and offline_left[i] < fail_at[i]:
            status[i], fail_at[i] = OFFLINE, float(offline_left[i])
    reporters = sorted((float(times[i]), int(ids[i]), i) for i in range(ids.size) if status[i] == KEPT)
    kept = 0
    for t, _, i in reporters:
        if policy.deadline is not None and t > policy.deadline:
            status[i] = LATE
        elif kept >= goal:
            status[i] = SURPLUS
        else:
            kept += 1
    if ids.size == 0:
        end = next_online
        if not math.isfinite(end):
            end = start
    else:
        kept_times = [t for t, _, i in reporters if status[i] == KEPT]
        if kept >= goal:  # the goal's last report closes the round
            end = start + max(kept_times)
        else:  # the server waits for everyone to report or fail, at most until the deadline
            finish = np.where(np.isfinite(fail_at), fail_at, times)
            last = float(finish.max())
            end = start + (min(last, policy.deadline) if policy.deadline is not None else last)
    abandoned = kept < policy.min_reports
    plan = RoundPlan(start, ids, bytes_down.astype(np.int64), samples.astype(np.int64), bytes_up.astype(np.int64),
                     times, fail_at, status, end, abandoned)
    if ids.size:
        wasted = np.array([abandoned or s != KEPT for s in status])
        elapsed = np.minimum(fail_at, end - start)
        trained, moved = done_by(elapsed, bytes_down, samples, bytes_up, speed, download, upload)
        plan.wasted_samples = int(trained[wasted].sum())
        plan.wasted_bytes = int(moved[wasted].sum())
    return plan
