"""The virtual clock: device time of synchronous rounds, from profiles and real byte counts.

A client's round takes ``bytes_down / download + samples / speed + bytes_up / upload``
seconds of device time; a round ends when its last kept client reports (or when the
round policy closes it: the goal reached, the deadline, every client failed). The clock
keeps the cumulative ``virtual_time``, wasted work and per-client participation, all of
which a checkpoint carries, so a resumed run continues the same clock.

The server decides everything before clients train (``fedrec.federated.round_policy``):
``VirtualClock.plan`` runs on the simulation's process only, so backends and MPI
processes know nothing of devices and stay bit-identical. After the kept clients ran,
``settle`` times them again by their real ``ClientStats`` (for FedAvg's uploads the plan's
bytes are exact; an algorithm that uploads more than the model delta, such as SCAFFOLD's
control variates, is timed by what it really sent, but was selected by the plan).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from fedrec.federated.devices import DEVICES_FILE, DeviceProfiles, build_profiles, devices_config_from
from fedrec.federated.round_policy import DROPPED, KEPT, LATE, OFFLINE, SURPLUS, RoundPlan, RoundPolicy, \
    client_times, plan_round
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError

CLOCK_FILE = "virtual_clock.jsonl"  # one line per round: every selected client's cost and fate


class RoundAbandoned(Exception):
    """Raised inside the aggregator's request: too few reports, the model stays as it is."""


def local_samples(sizes: np.ndarray, fl: Any) -> np.ndarray:
    """Samples each client processes in local training (``train_locally``'s count, computed
    in advance): ``local_epochs`` passes, or ``local_steps`` batches across passes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if fl.local_steps is None:
        return sizes * int(fl.local_epochs or 1)
    batch = int(fl.local_batch_size)
    per_epoch = -(-sizes // batch)
    full, rest = np.divmod(int(fl.local_steps), np.maximum(per_epoch, 1))
    return np.where(sizes > 0, full * sizes + rest * batch, 0)


class DeviceSampler:
    """The configured sampler over the clients online at the round's virtual start, asked
    for ``ceil(over_commitment x num)`` of them."""

    def __init__(self, base: Any, clock: "VirtualClock") -> None:
        self.base, self.clock = base, clock

    def sample(self, round_idx: int, candidates: Sequence[int], num: int, seed: int,
               sizes: Optional[np.ndarray] = None) -> List[int]:
        candidates = np.asarray(list(candidates), dtype=np.int64)
        if not self.clock.always_online:
            online = self.clock.online_now()[candidates]
            candidates = candidates[online]
            sizes = None if sizes is None else np.asarray(sizes)[online]
        goal = self.clock.policy.selected(num)
        return self.base.sample(round_idx, [int(c) for c in candidates], goal, seed, sizes=sizes)

    def expected_cohort(self, num_candidates: int, num: int) -> float:
        return self.base.expected_cohort(num_candidates, num)


class VirtualClock:
    """Device time and the round policy of one simulation (lives on the simulation's process)."""

    def __init__(self, profiles: DeviceProfiles, policy: RoundPolicy, fl: Any, sizes: np.ndarray) -> None:
        self.profiles, self.policy, self.fl = profiles, policy, fl
        self.seed, self.goal = int(fl.seed), int(fl.client_num_per_round)
        self.samples = local_samples(sizes, fl)
        self.always_online = profiles.availability.always_online
        n = profiles.num_clients
        self.now = 0.0
        self.totals: Dict[str, int] = {"wasted_samples": 0, "wasted_bytes": 0, "abandoned_rounds": 0,
                                       "dropped": 0, "offline": 0, "late": 0, "surplus": 0}
        self.selected_count = np.zeros(n, dtype=np.int64)
        self.kept_count = np.zeros(n, dtype=np.int64)

    # -- before the round ---------------------------------------------------------------
    def online_now(self) -> np.ndarray:
        return self.profiles.availability.online(self.now)

    def plan(self, round_idx: int, ids: Sequence[int], costs: np.ndarray) -> RoundPlan:
        """The round's outcome from the selected ``ids`` and their planned ``costs``
        (rows: bytes down, samples, bytes up)."""
        p = self.profiles
        ids = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
        costs = np.asarray(costs, dtype=np.float64).reshape(-1, 3)
        if self.always_online:
            until = np.full(ids.size, np.inf)
        else:
            until = p.availability.online_until(self.now)[ids]
        nxt = p.availability.next_online(self.now) if ids.size == 0 else self.now
        return plan_round(self.policy, self.now, round_idx, self.seed, self.goal, ids, costs[:, 0], costs[:, 1],
                          costs[:, 2], p.speed[ids], p.download[ids], p.upload[ids], until, p.num_clients, nxt)

    # -- after the round ----------------------------------------------------------------
    def settle(self, plan: RoundPlan, stats: Sequence[Any]) -> Dict[str, Any]:
        """Time the kept clients by what they really did, advance the clock, and return
        the metrics line's device keys."""
        real = {s.client_id: s for s in stats}
        p = self.profiles
        kept_times = []
        for i, cid in enumerate(plan.ids):
            stat = real.get(int(cid))
            if stat is None or plan.status[i] != KEPT:
                continue
            plan.bytes_down[i], plan.samples[i], plan.bytes_up[i] = stat.bytes_down, stat.num_samples, stat.bytes_up
            plan.times[i] = client_times(np.float64(stat.bytes_down), np.float64(stat.num_samples),
                                         np.float64(stat.bytes_up), p.speed[cid], p.download[cid], p.upload[cid])
            kept_times.append(plan.times[i])
        if kept_times and len(kept_times) >= self.goal:
            plan.end = plan.start + float(max(kept_times))
        elif kept_times:  # the goal not met: the server waited for every client (or the deadline)
            plan.end = max(plan.end, plan.start + float(max(kept_times)))
        seconds = plan.end - plan.start
        self.now = plan.end
        self.selected_count[plan.ids] += 1
        if not plan.abandoned:
            self.kept_count[np.asarray(plan.kept, dtype=np.int64)] += 1
        counts = {s: plan.count(s) for s in (DROPPED, OFFLINE, LATE, SURPLUS)}
        for key, value in counts.items():
            self.totals[key] += value
        self.totals["wasted_samples"] += plan.wasted_samples
        self.totals["wasted_bytes"] += plan.wasted_bytes
        self.totals["abandoned_rounds"] += int(plan.abandoned)
        return {"virtual_time": self.now, "virtual_round_seconds": seconds, "clients_selected": int(plan.ids.size),
                "clients_dropped": counts[DROPPED] + counts[OFFLINE], "clients_late": counts[LATE],
                "clients_surplus": counts[SURPLUS], "wasted_samples": plan.wasted_samples,
                "wasted_bytes": plan.wasted_bytes, "round_abandoned": int(plan.abandoned)}

    @staticmethod
    def record(round_number: int, plan: RoundPlan) -> Dict[str, Any]:
        """The round's line in ``virtual_clock.jsonl``: enough to recompute its times by hand."""
        clients = [[int(c), plan.status[i], int(plan.bytes_down[i]), int(plan.samples[i]), int(plan.bytes_up[i]),
                    float(plan.times[i])] for i, c in enumerate(plan.ids)]
        return {"round": round_number, "start": plan.start, "end": plan.end, "abandoned": plan.abandoned,
                "fields": ["client", "status", "bytes_down", "samples", "bytes_up", "seconds"], "clients": clients}

    def participation(self) -> Dict[str, Any]:
        return {"selected": self.selected_count.tolist(), "kept": self.kept_count.tolist()}

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        import torch

        return {"now": self.now, "totals": dict(self.totals), "selected": torch.from_numpy(self.selected_count.copy()),
                "kept": torch.from_numpy(self.kept_count.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.now = float(state["now"])
        self.totals = dict(state["totals"])
        import torch

        self.selected_count = torch.as_tensor(state["selected"]).numpy().astype(np.int64)
        self.kept_count = torch.as_tensor(state["kept"]).numpy().astype(np.int64)


def build_clock(runner: Any) -> Optional[VirtualClock]:
    """The run's clock (None without ``fl.devices``), every input checked before round 1."""
    fl = runner.fl
    devices = devices_config_from(fl)
    if devices is None:
        if fl.round_policy is not None:
            raise ConfigError("fl.round_policy needs fl.devices (deadlines and over-commitment are in device "
                              "time): add fl.devices: {} for identical default devices")
        return None
    policy = registry.validate_model(RoundPolicy, fl.round_policy or {}, "fl.round_policy")
    if policy.min_reports > fl.client_num_per_round:
        raise ConfigError(f"fl.round_policy.min_reports ({policy.min_reports}) exceeds "
                          f"fl.client_num_per_round ({fl.client_num_per_round}): every round would be abandoned")
    profiles = build_profiles(devices, fl.num_workers, fl.seed)
    clock = VirtualClock(profiles, policy, fl, runner.partition.sizes)
    if policy.deadline is not None:
        # the fastest a client can be: the dense part of its download and upload (exact in
        # dense mode; sparse rows only add), plus its training
        fixed = float(runner.dense_bytes)
        best = client_times(fixed, clock.samples.astype(np.float64), fixed, profiles.speed, profiles.download,
                            profiles.upload)
        fastest = int(np.argmin(best))
        if best[fastest] > policy.deadline:
            raise ConfigError(f"fl.round_policy.deadline ({policy.deadline:g}s) is shorter than any client's round: "
                              f"the fastest, client {fastest}, needs at least {best[fastest]:.4g}s; raise the "
                              "deadline or the devices' speeds and bandwidths")
    return clock


def save_profiles(clock: Optional[VirtualClock], logdir: Path) -> None:
    """``devices.npz`` beside the partition (what the run's clients were)."""
    if clock is not None:
        clock.profiles.save(Path(logdir) / DEVICES_FILE)


def append_record(logdir: Path, line: Dict[str, Any]) -> None:
    with open(Path(logdir) / CLOCK_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def truncate_records(logdir: Path, rounds: int) -> None:
    """Keep the lines of rounds up to ``rounds`` (a resume runs the later ones again)."""
    path = Path(logdir) / CLOCK_FILE
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= rounds]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
