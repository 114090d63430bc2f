"""Loaders for FedScale's device traces (Lai et al. 2022, SymbioticLab/FedScale).

FedScale publishes two pickled dicts keyed by client id (numbered from 1):

- ``client_device_capacity``: ``{id: {"computation": ms per sample (inference),
  "communication": kbit/s}}``. FedScale times training as ``augmentation_factor`` (3:
  backward costs two forward passes) x samples x computation / 1000 seconds, and both
  directions as bytes / (communication x 1024 / 8) seconds (its sizes are bytes / 1024 x 8
  kbit), so here ``speed = 1000 / (3 x computation)`` samples/s and ``download = upload =
  communication x 128`` bytes/s.
- ``client_behave_trace``: ``{id: {"active": [t...], "inactive": [t...], "finish_time": T,
  ...}}``: online from ``active[i]`` to ``inactive[i]``, repeating every ``T`` seconds
  (FedScale's ``ClientMetadata.is_active``). Other keys (``duration``, ``model``) are ignored.

The same records may also come as JSON lines (``.jsonl``: one object a line with a
``client_id`` key beside the fields above), which is easier to write by hand; errors
then name the line. Pickles are read with an unpickler that builds only plain data.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from fedrec.utilities.config import ConfigError

#: FedScale's kbit (bytes / 1024 * 8) per second, in bytes per second
KBIT_BYTES = 1024 / 8


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, numbers and strings (and numpy scalars); nothing that runs code."""

    _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name} (a trace holds plain data only)")


def _records(path: str | Path) -> List[Tuple[str, Any, Dict[str, Any]]]:
    """``(where, client key, fields)`` per entry; ``where`` names the file and line or key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such trace file")
    if path.suffix in (".jsonl", ".json"):
        out = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict) or "client_id" not in record:
                raise ConfigError(f"{where}: expected an object with a 'client_id' key")
            out.append((where, record.pop("client_id"), record))
        return out
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # noqa: BLE001  (any unreadable pickle: name the file)
        raise ConfigError(f"{path}: not a FedScale trace pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict keyed by client id, got {type(data).__name__}")
    return [(f"{path}: entry {key!r}", key, value if isinstance(value, dict) else {"": value})
            for key, value in data.items()]


def _assign(records: List[Tuple[str, Any, Dict[str, Any]]], path: str | Path, num_clients: int, assign: str,
            first_id: int) -> List[Tuple[str, Dict[str, Any]]]:
    """Each client's record: ``by_id`` (key - first_id is the client; every client needs one,
    and a key naming no client is an error) or ``cycle`` (FedScale's own: entries in key
    order, client i takes entry i mod count)."""
    if not records:
        raise ConfigError(f"{path}: the trace has no entries")
    if assign == "cycle":
        def order(r: Tuple[str, Any, Dict[str, Any]]) -> Tuple[int, Any]:
            try:
                return (0, int(r[1]))
            except (TypeError, ValueError):
                return (1, str(r[1]))
        ordered = sorted(records, key=order)
        return [(ordered[i % len(ordered)][0], ordered[i % len(ordered)][2]) for i in range(num_clients)]
    out: List[Any] = [None] * num_clients
    for where, key, fields in records:
        try:
            client = int(key) - first_id
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: client id {key!r} is not an integer") from None
        if not 0 <= client < num_clients:
            raise ConfigError(f"{where}: client id {key!r} names no client (fl.num_workers is {num_clients}; "
                              f"ids {first_id}..{first_id + num_clients - 1} with trace_first_id {first_id}); "
                              "set fl.devices.trace_assign: cycle to reuse a larger trace's entries")
        if out[client] is not None:
            raise ConfigError(f"{where}: client id {key!r} appears twice (also at {out[client][0]})")
        out[client] = (where, fields)
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise ConfigError(f"{path}: no entry for {len(missing)} of {num_clients} clients (e.g. client "
                          f"{missing[0]}, id {missing[0] + first_id}); set fl.devices.trace_assign: cycle to reuse "
                          "the trace's entries")
    return out


def _positive(where: str, fields: Dict[str, Any], key: str) -> float:
    value = fields.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key!r} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{where}: {key!r} must be positive and finite, got {value!r}")
    return number


def load_device_capacity(path: str | Path, num_clients: int, assign: str, first_id: int,
                         augmentation_factor: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(speed samples/s, download B/s, upload B/s)`` per client from a capacity file."""
    records = _assign(_records(path), path, num_clients, assign, first_id)
    speed, bandwidth = np.empty(num_clients), np.empty(num_clients)
    for i, (where, fields) in enumerate(records):
        speed[i] = 1000.0 / (augmentation_factor * _positive(where, fields, "computation"))
        bandwidth[i] = _positive(where, fields, "communication") * KBIT_BYTES
    return speed, bandwidth, bandwidth.copy()


def load_behave_trace(path: str | Path, num_clients: int, assign: str, first_id: int):
    """Availability windows per client from a behave trace."""
    from fedrec.federated.devices import Availability

    records = _assign(_records(path), path, num_clients, assign, first_id)
    sizes, starts, ends, periods = [], [], [], np.empty(num_clients)
    for i, (where, fields) in enumerate(records):
        active, inactive = fields.get("active"), fields.get("inactive")
        if not isinstance(active, list) or not isinstance(inactive, list) or len(active) != len(inactive) or not active:
            raise ConfigError(f"{where}: 'active' and 'inactive' must be lists of the same, non-zero length")
        periods[i] = _positive(where, fields, "finish_time")
        for a, b in zip(active, inactive):
            try:
                a, b = float(a), float(b)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: window times must be numbers, got {a!r}, {b!r}") from None
            if not (math.isfinite(a) and math.isfinite(b)) or a < 0:
                raise ConfigError(f"{where}: window [{a}, {b}] must be finite and start at 0 or later")
            if b < a:
                raise ConfigError(f"{where}: an online window ends ({b}) before it starts ({a})")
            starts.append(a)
            ends.append(b)
        sizes.append(len(active))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Availability(offsets, np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64), periods)
