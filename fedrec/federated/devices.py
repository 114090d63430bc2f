"""Device profiles: how fast each simulated client computes and communicates, and when it is online.

Real cross-device FL is dominated by slow phones, thin uplinks and devices that come and
go; a profile gives every client a compute ``speed`` (samples per second), ``download``
and ``upload`` bandwidth (bytes per second) and availability windows. The virtual clock
(``fedrec.federated.virtual_clock``) turns them, with a round's real byte counts, into
device time. ``fl.devices`` configures them::

    devices:
      speed: {name: log_uniform, low: 10, high: 200}     # samples/s
      download: {name: lognormal, median: 2.0e6, spread: 10}   # bytes/s
      upload: {name: constant, value: 5.0e5}
      availability: {name: periodic, period: 86400, online_fraction: 0.5}
      capacity_file: null       # FedScale client_device_capacity (replaces the three above)
      trace_file: null          # FedScale client_behave_trace (replaces availability)

Distributions are registry kind ``device_distribution``; availability models are kind
``availability``. Every draw comes from ``derive_seed(fl.seed, tag)``, so profiles are
the same in every process and after a resume, and are saved as ``devices.npz`` beside
the partition.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import numpy as np
import pydantic

from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.random_state import derive_seed

DEVICES_FILE = "devices.npz"

Positive = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, pydantic.Field(gt=0, le=1)]

# stream tags: each profile column draws from its own stream of the run's seed
_SPEED, _DOWNLOAD, _UPLOAD, _AVAILABILITY = 0xDE7101, 0xDE7102, 0xDE7103, 0xDE7104


class DevicesConfig(pydantic.BaseModel):
    """``fl.devices``: where each profile column comes from (unknown keys are errors)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    speed: Dict[str, Any] = {"name": "constant", "value": 100.0}  # samples per second
    download: Dict[str, Any] = {"name": "constant", "value": 1.0e7}  # bytes per second
    upload: Dict[str, Any] = {"name": "constant", "value": 1.0e7}  # bytes per second
    availability: Dict[str, Any] = {"name": "always"}
    capacity_file: Optional[str] = None  # FedScale client_device_capacity: speed, download, upload
    trace_file: Optional[str] = None  # FedScale client_behave_trace: availability
    trace_assign: str = pydantic.Field("by_id", pattern="^(by_id|cycle)$")  # how trace entries map to clients
    trace_first_id: int = 1  # by_id: the trace key of client 0 (FedScale numbers clients from 1)
    augmentation_factor: Positive = 3.0  # FedScale: training costs this many inference passes


# -- distributions ------------------------------------------------------------------------
class Distribution(abc.ABC):
    """Positive values, one per client, from a seeded generator."""

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` positive float64 values."""


@registry.load("device_distribution", "constant")
class Constant(Distribution):
    """Every client the same ``value``."""

    def __init__(self, value: Positive) -> None:
        self.value = float(value)

    def draw(self, rng, count):
        return np.full(count, self.value, dtype=np.float64)


@registry.load("device_distribution", "uniform")
class Uniform(Distribution):
    """Uniform on ``[low, high]``."""

    def __init__(self, low: Positive, high: Positive) -> None:
        if high < low:
            raise ValueError(f"high ({high}) is below low ({low})")
        self.low, self.high = float(low), float(high)

    def draw(self, rng, count):
        return rng.uniform(self.low, self.high, count)


@registry.load("device_distribution", "log_uniform")
class LogUniform(Distribution):
    """Log-uniform on ``[low, high]``: the fastest client is at most ``high / low`` times the slowest."""

    def __init__(self, low: Positive, high: Positive) -> None:
        if high < low:
            raise ValueError(f"high ({high}) is below low ({low})")
        self.low, self.high = float(low), float(high)

    def draw(self, rng, count):
        return np.exp(rng.uniform(math.log(self.low), math.log(self.high), count))


@registry.load("device_distribution", "lognormal")
class LogNormal(Distribution):
    """Log-normal with ``median``; ``spread`` is the ratio of its 95th to its 5th percentile
    (device speeds are log-normal: Wang et al. 2021, "A Field Guide to FL")."""

    def __init__(self, median: Positive, spread: Annotated[float, pydantic.Field(ge=1)] = 10.0) -> None:
        self.median, self.spread = float(median), float(spread)

    def draw(self, rng, count):
        sigma = math.log(self.spread) / (2 * 1.6448536269514722)
        return self.median * np.exp(sigma * rng.standard_normal(count))


# -- availability -------------------------------------------------------------------------
@dataclasses.dataclass
class Availability:
    """Online windows per client, repeating with the client's period (CSR layout).

    Client ``i`` is online at time ``t`` when ``starts[j] <= t mod periods[i] <= ends[j]``
    for a window ``j`` in ``offsets[i]:offsets[i + 1]``; ``periods[i] = inf`` with one
    window ``[0, inf]`` is always online.
    """

    offsets: np.ndarray  # int64 [N + 1]
    starts: np.ndarray  # float64 [windows]
    ends: np.ndarray  # float64 [windows]
    periods: np.ndarray  # float64 [N]

    @classmethod
    def always(cls, count: int) -> "Availability":
        return cls(np.arange(count + 1, dtype=np.int64), np.zeros(count), np.full(count, np.inf),
                   np.full(count, np.inf))

    @property
    def always_online(self) -> bool:
        return bool(np.all(np.isinf(self.periods)) and np.all(self.starts <= 0) and np.all(np.isinf(self.ends)))

    def _phase(self, t: float) -> tuple:
        """``t mod period`` for every window, and its owner's period (inf: no repeat)."""
        periods = np.repeat(self.periods, np.diff(self.offsets))
        with np.errstate(invalid="ignore"):
            return np.where(np.isinf(periods), t, np.mod(t, periods)), periods

    def _left(self, t: float) -> np.ndarray:
        """Seconds each window has left at ``t`` (-inf where it is closed). A window may run
        past its period's end (``ends`` up to twice the period): then it is also open at
        the start of the next period."""
        phase, periods = self._phase(t)
        left = np.where((self.starts <= phase) & (phase <= self.ends), self.ends - phase, -np.inf)
        repeats = np.isfinite(periods)
        later = phase + np.where(repeats, periods, 0.0)
        again = repeats & (self.starts <= later) & (later <= self.ends)
        with np.errstate(invalid="ignore"):
            return np.where(again, np.maximum(left, self.ends - later), left)

    def online_until(self, t: float) -> np.ndarray:
        """float64 [N]: when each client's current online window closes (-inf: offline now)."""
        best = np.full(self.periods.size, -np.inf)
        owner = np.repeat(np.arange(self.periods.size), np.diff(self.offsets))
        np.maximum.at(best, owner, self._left(t))
        return t + best

    def online(self, t: float) -> np.ndarray:
        """bool [N]: who is online at time ``t``."""
        return self.online_until(t) > -np.inf

    def next_online(self, t: float) -> float:
        """The earliest time >= ``t`` at which some client is online (inf: never again)."""
        if self.online(t).any():
            return t
        phase, periods = self._phase(t)
        wait = np.where(self.starts > phase, self.starts - phase, periods - phase + self.starts)
        return t + float(wait.min()) if wait.size else math.inf

    def online_from(self, t: float) -> np.ndarray:
        """float64 [N]: ``t`` for clients online at ``t``, else when each next comes
        online (inf: never)."""
        phase, periods = self._phase(t)
        with np.errstate(invalid="ignore"):
            wait = np.where(self.starts > phase, self.starts - phase, periods - phase + self.starts)
        best = np.full(self.periods.size, np.inf)
        owner = np.repeat(np.arange(self.periods.size), np.diff(self.offsets))
        np.minimum.at(best, owner, np.where(np.isnan(wait), np.inf, wait))
        return np.where(self.online(t), t, t + best)

    def check(self, source: str) -> None:
        bad = np.flatnonzero(self.ends < self.starts)
        if bad.size:
            j = int(bad[0])
            client = int(np.searchsorted(self.offsets, j, side="right") - 1)
            raise ConfigError(f"{source}: client {client}'s online window ends ({self.ends[j]}) before it "
                              f"starts ({self.starts[j]})")


class AvailabilityModel(abc.ABC):
    @abc.abstractmethod
    def build(self, rng: np.random.Generator, count: int) -> Availability:
        """Windows for ``count`` clients."""


@registry.load("availability", "always")
class AlwaysOnline(AvailabilityModel):
    """Every client online all the time (the default)."""

    def build(self, rng, count):
        return Availability.always(count)


@registry.load("availability", "periodic")
class Periodic(AvailabilityModel):
    """Each client online for ``online_fraction`` of every ``period`` seconds, in one window
    at a seeded phase (phones charging overnight, in different time zones)."""

    def __init__(self, period: Positive = 86400.0, online_fraction: Fraction = 0.5) -> None:
        self.period, self.fraction = float(period), float(online_fraction)

    def build(self, rng, count):
        if self.fraction >= 1:
            return Availability.always(count)
        starts = rng.uniform(0, self.period, count)
        return Availability(np.arange(count + 1, dtype=np.int64), starts, starts + self.fraction * self.period,
                            np.full(count, self.period))


# -- profiles -----------------------------------------------------------------------------
@dataclasses.dataclass
class DeviceProfiles:
    """Every client's speed (samples/s), bandwidths (bytes/s) and availability."""

    speed: np.ndarray
    download: np.ndarray
    upload: np.ndarray
    availability: Availability

    @property
    def num_clients(self) -> int:
        return int(self.speed.size)

    def save(self, path: str | Path) -> None:
        a = self.availability
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, speed=self.speed, download=self.download, upload=self.upload, offsets=a.offsets,
                 starts=a.starts, ends=a.ends, periods=a.periods)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfiles":
        with np.load(path) as f:
            return cls(f["speed"], f["download"], f["upload"],
                       Availability(f["offsets"], f["starts"], f["ends"], f["periods"]))

    def digest(self) -> str:
        """A short hash of the profiles (part of the resume fingerprint: a changed trace file
        would give other clients other devices)."""
        h = hashlib.sha256()
        for array in (self.speed, self.download, self.upload, self.availability.offsets,
                      self.availability.starts, self.availability.ends, self.availability.periods):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        def spread(x: np.ndarray) -> str:
            return f"{x.min():.3g}..{x.max():.3g} (median {np.median(x):.3g})"

        online = self.availability.online(0.0).mean()
        return (f"devices: speed {spread(self.speed)} samples/s, download {spread(self.download)} B/s, "
                f"upload {spread(self.upload)} B/s, {online:.0%} online at time 0")


def _construct(kind: str, spec: Any, key: str) -> Any:
    """A distribution or availability model from ``fl.devices.<key>``, errors naming the key."""
    try:
        return registry.construct(kind, spec)
    except (registry.RegistryError, ValueError, TypeError) as err:
        raise ConfigError(f"fl.devices.{key}: {err}") from None


def build_profiles(config: DevicesConfig, num_clients: int, seed: int) -> DeviceProfiles:
    """Profiles for ``num_clients`` clients from the config, the same for the same seed."""
    from fedrec.federated.traces import load_behave_trace, load_device_capacity

    def column(key: str, tag: int) -> np.ndarray:
        dist = _construct("device_distribution", getattr(config, key), key)
        values = dist.draw(np.random.default_rng(derive_seed(seed, tag)), num_clients).astype(np.float64)
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ConfigError(f"fl.devices.{key}: gives values that are not positive and finite")
        return values

    if config.capacity_file is not None:
        speed, download, upload = load_device_capacity(config.capacity_file, num_clients, config.trace_assign,
                                                       config.trace_first_id, config.augmentation_factor)
    else:
        speed, download, upload = column("speed", _SPEED), column("download", _DOWNLOAD), column("upload", _UPLOAD)
    if config.trace_file is not None:
        availability = load_behave_trace(config.trace_file, num_clients, config.trace_assign, config.trace_first_id)
    else:
        model = _construct("availability", config.availability, "availability")
        availability = model.build(np.random.default_rng(derive_seed(seed, _AVAILABILITY)), num_clients)
        availability.check("fl.devices.availability")
    return DeviceProfiles(speed, download, upload, availability)


def devices_config_from(fl: Any) -> Optional[DevicesConfig]:
    """``fl.devices`` validated (None when the run has no device profiles)."""
    if fl.devices is None:
        return None
    return registry.validate_model(DevicesConfig, fl.devices, "fl.devices")
