"""Asynchronous FL with buffered aggregation: FedBuff (Nguyen et al. 2022, "Federated
Learning with Buffered Asynchronous Aggregation").

``fl.async`` (needs ``fl.devices``; docs/devices.md)::

    async:
      concurrency: 100        # clients training at any time
      buffer_size: 10         # K: the server steps after every K arrivals
      staleness: {name: polynomial, exponent: 0.5}   # s(t) = (1 + t)^-0.5; or {name: constant}
      server_lr: 1.0          # the paper's eta_g: multiplies the server optimizer's step

A deterministic event queue in virtual time. ``concurrency`` clients are in flight; each
downloaded the model version current when it started and reports after its virtual-clock
time (``bytes_down / download + samples / speed + bytes_up / upload``, from its planned
costs), or fails earlier (the round policy's ``dropout_rate``, or its online window
closing). Events are taken in (time, client id) order. An arrival goes into the buffer
with staleness ``t = version now - version it started from`` and weight ``s(t)``; the
K-th arrival makes the server step: ``w += server_lr * sum_i s(t_i) n_i delta_i / sum_i
n_i`` through the aggregator's server optimizer (FedAvg's sample weights; ``s = 1`` and
K simultaneous arrivals are FedAvg's round). A slot freed at time ``t`` is refilled after
every event at ``t`` is processed, on the version current then, by the configured sampler
among the idle (and online) clients; launch ``j`` draws with the sampler's round ``j``,
its dropouts from ``derive_seed(seed, j, ...)``, and its clients' data order from round
``j`` (``RoundContext.client_rounds``).

The schedule depends only on the profiles, the planned costs and the seeded draws, never
on the model: training only fills in updates. A reporting client is trained through the
backend at the latest possible moment, in batches: when the first untrained one arrives,
every untrained reporting client in flight (all on the current version) trains in one
``Backend.run_round`` (one block per client, so each update comes back alone and the
batch's size cannot change any sum); before a server step, those still untrained train
on the version they started from. So the server never holds an old model: one global
model, the trained updates of the clients in flight (at most ``concurrency``) and the
buffer (at most ``buffer_size``). Failing clients are never trained (their work until
they fail is counted as wasted).

The buffer is summed in client-id order in ``fl.reduce_blocks`` contiguous blocks, as a
synchronous round sums its cohort: with ``concurrency = buffer_size``, identical devices
and equal costs (every client reports at the same instant), constant staleness weights
and ``server_lr: 1`` the run is synchronous FedAvg bit for bit.

A checkpoint comes after a server step, with an empty buffer; it holds every client in
flight with its trained update (they are all trained by then), so a resumed run
continues the same event queue bit for bit.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple

import numpy as np
import pydantic
import torch

from fedrec.federated.client_runner import ClientStats
from fedrec.federated.context import RoundContext
from fedrec.federated.round_policy import _DROPOUT, DROPPED, KEPT, OFFLINE, client_times, done_by
from fedrec.federated.update import RowUpdate, WeightedUpdate, sum_updates
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.random_state import derive_seed

RECORD_FIELDS = ["client", "status", "bytes_down", "samples", "bytes_up", "seconds", "start", "end", "version",
                 "staleness", "weight"]


class StalenessConfig(pydantic.BaseModel):
    """``fl.async.staleness``: ``constant`` (1) or ``polynomial`` ((1 + t)^-exponent)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: Literal["constant", "polynomial"] = "polynomial"
    exponent: float = pydantic.Field(0.5, ge=0, allow_inf_nan=False)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "StalenessConfig":
        if self.name == "constant" and "exponent" in self.model_fields_set:
            raise ValueError("'exponent' is for name: polynomial; constant weighs every update 1")
        return self

    def weight(self, staleness: int) -> float:
        if self.name == "constant":
            return 1.0
        return float((1.0 + staleness) ** -self.exponent)


class AsyncConfig(pydantic.BaseModel):
    """``fl.async``: FedBuff's concurrency, buffer size, staleness weight and server lr."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    concurrency: int = pydantic.Field(gt=0)
    buffer_size: int = pydantic.Field(gt=0)
    staleness: StalenessConfig = StalenessConfig()
    server_lr: float = pydantic.Field(1.0, gt=0, allow_inf_nan=False)


@dataclasses.dataclass
class Flight:
    """One client's trip: launched at ``start`` on model ``version``; reports after
    ``seconds`` unless it fails ``fail_at`` seconds in."""

    client: int
    launch: int  # the launch's index: the sampler's round, dropout draws and data order
    version: int
    start: float
    seconds: float
    fail_at: float  # inf: it reports
    status: str  # kept (reports), dropped or offline
    bytes_down: int
    samples: int
    bytes_up: int
    update: Optional[WeightedUpdate] = None
    stats: Optional[ClientStats] = None

    @property
    def end(self) -> float:
        return self.start + min(self.seconds, self.fail_at)


@dataclasses.dataclass
class Arrival:
    flight: Flight
    staleness: int
    weight: float


@dataclasses.dataclass
class Outcome:
    """What happened between two server steps (one metrics line)."""

    start: float
    version: int  # the version the step replaced (the step makes version + 1)
    events: List[Any] = dataclasses.field(default_factory=list)  # Arrivals and failed Flights, in order
    launched: int = 0
    end: float = 0.0
    metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def arrivals(self) -> List[Arrival]:
        return [e for e in self.events if isinstance(e, Arrival)]

    @property
    def stats(self) -> List[ClientStats]:
        return sorted((a.flight.stats for a in self.arrivals), key=lambda s: s.client_id)

    def record(self, round_number: int) -> Dict[str, Any]:
        """The step's line in ``virtual_clock.jsonl``: every arrival and failure in the
        order the server took them."""
        clients = []
        for event in self.events:
            f = event.flight if isinstance(event, Arrival) else event
            stale, weight = (event.staleness, event.weight) if isinstance(event, Arrival) else (None, None)
            clients.append([f.client, f.status, f.bytes_down, f.samples, f.bytes_up, f.seconds, f.start, f.end,
                            f.version, stale, weight])
        return {"round": round_number, "start": self.start, "end": self.end, "version": self.version,
                "abandoned": False, "fields": RECORD_FIELDS, "clients": clients}


TrainFn = Callable[[int, List[Flight]], Dict[int, Tuple[WeightedUpdate, ClientStats]]]
StepFn = Callable[[WeightedUpdate, float], None]


class FedBuff:
    """The event queue of one asynchronous simulation (lives on the simulation's process)."""

    def __init__(self, config: AsyncConfig, clock: Any, runner: Any) -> None:
        self.config, self.clock, self.runner = config, clock, runner
        self.fl = runner.fl
        self.seed = int(self.fl.seed)
        self.sampler = runner.sampler
        self.sizes = np.asarray(runner.partition.sizes, dtype=np.int64)
        self.num_clients = int(clock.profiles.num_clients)
        self.version = 0
        self.launches = 0
        self.free = config.concurrency
        self.flights: Dict[int, Flight] = {}
        self.heap: List[Tuple[float, int]] = []
        self.buffer: List[Arrival] = []
        self.server_values: Callable[[], Dict[str, torch.Tensor]] = dict

    # -- the queue ------------------------------------------------------------------------
    def next_update(self, train: TrainFn, step: StepFn) -> Outcome:
        """Run the queue until the buffer holds ``buffer_size`` arrivals, then step the
        server (``step(update, server_lr)``); ``train(version, flights)`` trains clients
        on the global model, which is at ``version``."""
        clock = self.clock
        out = Outcome(start=clock.now, version=self.version)
        while len(self.buffer) < self.config.buffer_size:
            top = self.heap[0][0] if self.heap else math.inf
            if self.free and top > clock.now:
                self._launch(out)
                top = self.heap[0][0] if self.heap else math.inf
            wake = self._wake() if self.free else math.inf
            if wake < top:  # an idle client comes online before anyone reports: start it then
                clock.now = wake
                continue
            if not math.isfinite(top):
                raise ConfigError("fl.async: no client is in flight and none will come online again "
                                  "(fl.devices.availability)")
            end, cid = heapq.heappop(self.heap)
            flight = self.flights.pop(cid)
            clock.now = end
            self.free += 1
            if flight.status != KEPT:
                out.events.append(flight)
                continue
            if flight.update is None:  # train every reporting client in flight on this version now
                self._train(train, [flight])
            staleness = self.version - flight.version
            arrival = Arrival(flight, staleness, self.config.staleness.weight(staleness))
            self.buffer.append(arrival)
            out.events.append(arrival)
        self._train(train, [])  # the rest of this version's clients, before the model moves on
        step(self._buffer_sum(), self.config.server_lr)
        self.buffer = []
        self.version += 1
        out.end = clock.now
        out.metrics = self._settle(out)
        return out

    def _wake(self) -> float:
        """When the next idle, offline client comes online (inf: always online, or never)."""
        if self.clock.always_online:
            return math.inf
        idle = np.ones(self.num_clients, dtype=bool)
        idle[list(self.flights)] = False
        times = self.clock.profiles.availability.online_from(self.clock.now)[idle]
        later = times[times > self.clock.now]
        return float(later.min()) if later.size else math.inf

    def _launch(self, out: Outcome) -> None:
        """Fill the free slots at ``now`` from the idle (online) clients."""
        clock, p = self.clock, self.clock.profiles
        now = clock.now
        idle = np.ones(self.num_clients, dtype=bool)
        idle[list(self.flights)] = False
        if not clock.always_online:
            idle &= clock.online_now()
        candidates = np.flatnonzero(idle)
        count = min(self.free, int(candidates.size))
        if count == 0:
            return
        chosen = self.sampler.sample(self.launches, [int(c) for c in candidates], count, self.seed,
                                     sizes=self.sizes[candidates])
        ids = np.asarray(sorted(int(c) for c in chosen), dtype=np.int64)
        if ids.size > count or not np.isin(ids, candidates).all() or np.unique(ids).size != ids.size:
            raise ConfigError(f"fl.sampler {self.fl.sampler.get('name')!r} returned {ids.size} clients for "
                              f"{count} free slots of fl.async (it must choose distinct idle clients)")
        if ids.size == 0:
            return
        context = RoundContext(self.version, self.seed, server_values=self.server_values())
        costs = self.runner.planned_costs([int(c) for c in ids], context, clock.samples)
        times = client_times(costs[:, 0], costs[:, 1], costs[:, 2], p.speed[ids], p.download[ids], p.upload[ids])
        fail_at = np.full(ids.size, np.inf)
        status = [KEPT] * ids.size
        policy = clock.policy
        if policy.dropout_rate > 0:  # one draw per (seed, launch, client), as a round's
            draws = np.random.default_rng(derive_seed(self.seed, self.launches, _DROPOUT)).random(
                (self.num_clients, 2))[ids]
            failing = draws[:, 0] < policy.dropout_rate
            fail_at[failing] = draws[failing, 1] * times[failing]
            for i in np.flatnonzero(failing):
                status[i] = DROPPED
        if not clock.always_online and policy.offline_drops:
            left = p.availability.online_until(now)[ids] - now
            for i in range(ids.size):
                if left[i] < times[i] and left[i] < fail_at[i]:
                    status[i], fail_at[i] = OFFLINE, float(left[i])
        for i, cid in enumerate(ids):
            flight = Flight(int(cid), self.launches, self.version, now, float(times[i]), float(fail_at[i]),
                            status[i], int(costs[i, 0]), int(costs[i, 1]), int(costs[i, 2]))
            self.flights[int(cid)] = flight
            heapq.heappush(self.heap, (flight.end, int(cid)))
        clock.selected_count[ids] += 1
        out.launched += int(ids.size)
        self.free -= int(ids.size)
        self.launches += 1

    def _train(self, train: TrainFn, popped: List[Flight]) -> None:
        """Train ``popped`` and every untrained reporting client in flight (one batch)."""
        batch = popped + [f for f in self.flights.values() if f.status == KEPT and f.update is None]
        if not batch:
            return
        batch.sort(key=lambda f: f.client)
        stale = [f.client for f in batch if f.version != self.version]
        if stale:  # cannot happen: a version's clients train before the server steps past it
            raise RuntimeError(f"fl.async: clients {stale[:5]} would train on a model version the server no "
                               "longer holds")
        results = train(self.version, batch)
        for flight in batch:
            flight.update, flight.stats = results[flight.client]

    def _buffer_sum(self) -> WeightedUpdate:
        """``sum_i s(t_i) n_i delta_i`` (weight ``sum_i n_i``), in client-id order in
        ``fl.reduce_blocks`` contiguous blocks: a synchronous round's sum."""
        entries = sorted(range(len(self.buffer)), key=lambda j: (self.buffer[j].flight.client, j))
        updates = []
        for j in entries:
            arrival = self.buffer[j]
            update = arrival.flight.update
            if arrival.weight != 1.0:
                update.scale_(arrival.weight)
            updates.append(update)
            arrival.flight.update = None  # consumed
        count = max(1, min(int(self.fl.reduce_blocks), len(updates)))
        blocks = np.array_split(np.arange(len(updates)), count)
        return sum_updates(sum_updates(updates[int(j)] for j in block) for block in blocks)

    def _settle(self, out: Outcome) -> Dict[str, Any]:
        """The metrics line's device keys; the clock's totals and participation."""
        clock, p = self.clock, self.clock.profiles
        failed = [e for e in out.events if isinstance(e, Flight)]
        wasted_samples = wasted_bytes = 0
        for f in failed:
            c = f.client
            trained, moved = done_by(np.float64(f.fail_at), np.float64(f.bytes_down), np.float64(f.samples),
                                     np.float64(f.bytes_up), p.speed[c], p.download[c], p.upload[c])
            wasted_samples += int(trained)
            wasted_bytes += int(moved)
            clock.totals[f.status] += 1
        arrivals = out.arrivals
        for a in arrivals:
            clock.kept_count[a.flight.client] += 1
        clock.totals["wasted_samples"] += wasted_samples
        clock.totals["wasted_bytes"] += wasted_bytes
        stale = [a.staleness for a in arrivals]
        return {"virtual_time": out.end, "virtual_round_seconds": out.end - out.start,
                "clients_selected": out.launched, "clients_dropped": len(failed), "clients_late": 0,
                "clients_surplus": 0, "wasted_samples": wasted_samples, "wasted_bytes": wasted_bytes,
                "round_abandoned": 0, "staleness_mean": float(np.mean(stale)), "staleness_max": int(max(stale)),
                "clients_in_flight": len(self.flights)}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self.buffer:
            raise RuntimeError("fl.async: a checkpoint is taken after a server step, with an empty buffer")
        return {"version": self.version, "launches": self.launches, "free": self.free,
                "flights": [flight_state(f) for f in sorted(self.flights.values(), key=lambda f: f.client)]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.version, self.launches, self.free = int(state["version"]), int(state["launches"]), int(state["free"])
        self.flights = {int(s["client"]): flight_from_state(s) for s in state["flights"]}
        self.heap = sorted((f.end, f.client) for f in self.flights.values())
        self.buffer = []


# -- checkpoint values (weights_only-safe) ---------------------------------------------------
def update_state(update: WeightedUpdate) -> Dict[str, Any]:
    return {"dense": dict(update.dense),
            "rows": {k: {"ids": r.ids, "values": r.values, "row_weight": r.row_weight} for k, r in update.rows.items()},
            "weight": float(update.weight), "num_clients": int(update.num_clients),
            "aux": {k: update_state(v) for k, v in update.aux.items()}, "scalars": dict(update.scalars)}


def update_from_state(state: Mapping[str, Any]) -> WeightedUpdate:
    return WeightedUpdate({k: v for k, v in state["dense"].items()},
                          {k: RowUpdate(r["ids"], r["values"], r["row_weight"]) for k, r in state["rows"].items()},
                          float(state["weight"]), int(state["num_clients"]),
                          {k: update_from_state(v) for k, v in state["aux"].items()}, dict(state["scalars"]))


def flight_state(f: Flight) -> Dict[str, Any]:
    out = {k: getattr(f, k) for k in ("client", "launch", "version", "start", "seconds", "fail_at", "status",
                                      "bytes_down", "samples", "bytes_up")}
    out["update"] = None if f.update is None else update_state(f.update)
    out["stats"] = None if f.stats is None else dataclasses.asdict(f.stats)
    return out


def flight_from_state(s: Mapping[str, Any]) -> Flight:
    f = Flight(int(s["client"]), int(s["launch"]), int(s["version"]), float(s["start"]), float(s["seconds"]),
               float(s["fail_at"]), str(s["status"]), int(s["bytes_down"]), int(s["samples"]), int(s["bytes_up"]))
    f.update = None if s["update"] is None else update_from_state(s["update"])
    f.stats = None if s["stats"] is None else ClientStats(**s["stats"])
    return f


# -- config --------------------------------------------------------------------------------
def build_fedbuff(runner: Any, clock: Any) -> Optional[FedBuff]:
    """The run's event queue (None without ``fl.async``), every input checked before round 1."""
    fl = runner.fl
    if fl.async_ is None:
        return None
    config = registry.validate_model(AsyncConfig, fl.async_, "fl.async")
    if clock is None:
        raise ConfigError("fl.async needs fl.devices (clients report after their device time): add "
                          "fl.devices: {} for identical default devices")
    if config.buffer_size > config.concurrency:
        raise ConfigError(f"fl.async.buffer_size ({config.buffer_size}) exceeds fl.async.concurrency "
                          f"({config.concurrency}): the server steps after buffer_size arrivals of the "
                          "concurrency clients in flight")
    if config.concurrency > fl.num_workers:
        raise ConfigError(f"fl.async.concurrency ({config.concurrency}) exceeds fl.num_workers ({fl.num_workers}): "
                          "a client trains one model at a time")
    from fedrec.federated.fed_avg import FedAvgWorker
    from fedrec.federated_worker import FederatedWorker

    algorithm = runner.algorithm
    if not (issubclass(algorithm, FedAvgWorker) and runner.mode == "sum"
            and algorithm.aggregate is FedAvgWorker.aggregate and algorithm.server_step is FedAvgWorker.server_step
            and algorithm.server_values is FederatedWorker.server_values):
        raise ConfigError(f"fl.async: fl.fl_algo {fl.fl_algo.get('name')!r} is not supported; FedBuff steps the "
                          "server optimizer of the FedAvg family (fed_avg, fed_avgm, fed_adam, fed_yogi, "
                          "fed_adagrad, fed_prox) with staleness-weighted model deltas")
    if runner.postprocessors:
        raise ConfigError("fl.postprocessors are not supported with fl.async (their budgets and server steps "
                          "are per synchronous round); drop fl.postprocessors or fl.async")
    policy = clock.policy
    for key, value, default in (("deadline", policy.deadline, None), ("over_commitment", policy.over_commitment, 1.0),
                                ("min_reports", policy.min_reports, 1)):
        if value != default:
            raise ConfigError(f"fl.round_policy.{key} does not apply with fl.async (there is no synchronous "
                              "round to close); only dropout_rate and offline_drops do")
    from fedrec.federated.samplers import PoissonSampler

    if isinstance(runner.sampler, PoissonSampler):
        raise ConfigError("fl.sampler 'poisson' draws a random number of clients; fl.async refills each free "
                          "slot: use uniform or weighted")
    return FedBuff(config, clock, runner)


def describe(config: AsyncConfig) -> str:
    s = config.staleness
    weight = "1" if s.name == "constant" else f"(1 + staleness)^-{s.exponent:g}"
    return (f"FedBuff: {config.concurrency} clients in flight, a server step every {config.buffer_size} arrivals, "
            f"staleness weight {weight}, server lr {config.server_lr:g}")


__all__ = ["AsyncConfig", "StalenessConfig", "FedBuff", "Flight", "Arrival", "Outcome", "build_fedbuff",
           "describe", "RECORD_FIELDS"]
