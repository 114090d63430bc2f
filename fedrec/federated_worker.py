"""``FederatedWorker``: the tutorial's API for writing a federated-learning algorithm.

Subclass it, implement ``async run()`` (what each role does in a round), ``aggregate`` and
``sample_neighbours``, register it with ``@registry.load("fl_algo", name)`` and name it in
the config's ``fl.fl_algo``. See ``fedrec/federated/fed_avg.py`` for FedAvg.

A worker is a cheap record (id, roles, neighbours, sample count, round index, per-client
state), not a live model: 10,000+ of them fit in one process. The models live in a
*runtime*: each process holds one model replica that a trainer worker loads its weights
into while it runs, and the aggregator holds the global weights. Asking neighbours for
their models (``request_models_suspendable``) is where the simulator schedules their work,
in this process or on MPI ranks.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, MutableMapping, Optional,
                    Sequence, Union)

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from fedrec.federated.context import ClientContext, Runtime

ROLES = ("aggregator", "trainer")


class InvalidStateError(RuntimeError):
    """A worker asked to do something its roles or state do not allow."""


@dataclasses.dataclass
class Neighbour:
    """What a worker knows of a neighbour: its id, its last model and sample count."""

    id: int
    model: Any = None
    sample_num: int = 0
    last_sync: int = -1

    # A Neighbour may stand for its id, so the tutorial's `self.in_neighbours[n]` works
    # whether `n` is an id or the Neighbour that `request_models_suspendable` returned.
    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Neighbour):
            return self.id == other.id
        return isinstance(other, int) and self.id == other

    def __index__(self) -> int:
        return self.id


NeighbourKey = Union[int, Neighbour]


class Cohort(List[Neighbour]):
    """What ``request_models_suspendable`` returns to an aggregator: the neighbours that
    took part, plus what the runtime reduced from their uploads.

    ``reduced`` is the cohort's summed ``WeightedUpdate`` (algorithms whose aggregation is
    ``"sum"``), already through the server-side postprocessors; ``updates`` maps client id
    to its own update (aggregation ``"updates"``: robust aggregators); each neighbour's
    ``model`` is filled in for aggregation ``"models"`` (the tutorial's FedAvg).
    """

    def __init__(self, neighbours: Iterable[Neighbour] = (), reduced: Any = None,
                 updates: Optional[Dict[int, Any]] = None) -> None:
        super().__init__(neighbours)
        self.reduced = reduced
        self.updates: Dict[int, Any] = updates or {}


def neighbour_id(key: NeighbourKey) -> int:
    return key.id if isinstance(key, Neighbour) else int(key)


class NeighbourTable(MutableMapping[int, Neighbour]):
    """Neighbours by id; accepts a ``Neighbour`` or an id as key.

    Built from compact arrays when a worker has thousands of neighbours: a ``Neighbour``
    object exists only for those touched, so an aggregator over 100,000 trainers costs a
    few arrays, not 100,000 objects.
    """

    def __init__(self, ids: Sequence[int] = (), sample_nums: Optional[Sequence[int]] = None) -> None:
        self._ids = np.asarray(list(ids) if not isinstance(ids, (range, np.ndarray)) else ids, dtype=np.int64)
        count = len(self._ids)
        self._sample_nums = (np.zeros(count, np.int64) if sample_nums is None
                             else np.asarray(sample_nums, dtype=np.int64).copy())
        # ids 0..n-1 (an aggregator over its trainers) need no index: the id is the position
        self._first = int(self._ids[0]) if count else 0
        contiguous = count == 0 or bool(np.array_equal(self._ids, np.arange(self._first, self._first + count)))
        self._index: Optional[Dict[int, int]] = None if contiguous else \
            {int(i): k for k, i in enumerate(self._ids.tolist())}
        self._live: Dict[int, Neighbour] = {}

    def _position(self, nid: int) -> Optional[int]:
        if self._index is not None:
            return self._index.get(nid)
        position = nid - self._first
        return position if 0 <= position < len(self._ids) else None

    def __getitem__(self, key: NeighbourKey) -> Neighbour:
        nid = neighbour_id(key)
        live = self._live.get(nid)
        if live is not None:
            return live
        position = self._position(nid)
        if position is None:
            raise KeyError(f"worker {nid} is not a neighbour")
        neighbour = Neighbour(nid, sample_num=int(self._sample_nums[position]))
        self._live[nid] = neighbour
        return neighbour

    def __setitem__(self, key: NeighbourKey, value: Neighbour) -> None:
        nid = neighbour_id(key)
        if self._position(nid) is None:  # a new neighbour (rare): from here on, an explicit index
            if self._index is None:
                self._index = {int(i): k for k, i in enumerate(self._ids.tolist())}
            self._index[nid] = len(self._ids)
            self._ids = np.append(self._ids, np.int64(nid))
            self._sample_nums = np.append(self._sample_nums, np.int64(value.sample_num))
        self._live[nid] = value

    def __delitem__(self, key: NeighbourKey) -> None:
        raise InvalidStateError("neighbours are fixed by the topology")

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids.tolist())

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        try:
            return self._position(neighbour_id(key)) is not None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def sample_nums(self) -> List[int]:
        """Every neighbour's sample count, in iteration order (weighted sampling)."""
        counts = self._sample_nums.tolist()
        for nid, neighbour in self._live.items():
            counts[self._position(nid)] = neighbour.sample_num
        return counts

    def release_models(self) -> None:
        """Forget the models received in a round (they are large; the ids stay)."""
        for neighbour in self._live.values():
            neighbour.model = None
        self._live.clear()


@dataclasses.dataclass
class WorkerState:
    """A worker as data: what ``serialise`` writes and ``load_worker`` reads."""

    worker_index: int
    roles: List[str]
    round_idx: int = 0
    sample_num: int = 0
    in_neighbours: List[int] = dataclasses.field(default_factory=list)
    out_neighbours: List[int] = dataclasses.field(default_factory=list)
    persistent_storage: Optional[str] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-safe per-client state

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerState":
        return cls(**json.loads(text))


class FederatedWorker(abc.ABC):
    """One simulated participant with one or more roles (``aggregator``, ``trainer``).

    Beneath the tutorial's API sit the seams an algorithm overrides (defaults: FedAvg):

    * trainer side, with the client's ``ClientContext`` (``fedrec.federated.context``):
      ``begin_local_training`` (after the download, before training),
      ``local_objective`` (the loss local training minimises, e.g. a proximal term) and
      ``client_update`` (what the client uploads: its weighted delta, plus extras);
    * aggregator side: ``aggregate`` receives the ``Cohort`` (the reduced sum, every
      update, or every model, as ``aggregation`` declares) and ``server_values`` says what
      to broadcast to the next round's clients; ``state_dict``/``load_state_dict`` carry
      server state (the server optimizer's) through checkpoints.
    """

    #: Declare True when ``aggregate`` needs only the sum of the clients' uploads: the
    #: backend then pre-reduces updates (one message per process, not per client) and
    #: ``reduced_update`` gives the sum. Otherwise see ``aggregation``.
    linear_aggregation: bool = False
    #: What the aggregator receives when ``linear_aggregation`` is False: ``"models"``
    #: (every client's whole model, the tutorial's way) or ``"updates"`` (every client's
    #: ``WeightedUpdate``, sparse rows included: robust aggregators).
    aggregation: str = "models"

    @classmethod
    def aggregation_mode(cls) -> str:
        """``"sum"``, ``"updates"`` or ``"models"``."""
        if cls.linear_aggregation:
            return "sum"
        if cls.aggregation not in ("models", "updates"):
            raise InvalidStateError(f"{cls.__name__}.aggregation must be 'models' or 'updates', "
                                    f"got {cls.aggregation!r}")
        return cls.aggregation

    def __init__(
        self,
        worker_index: int,
        roles: Sequence[str],
        in_neighbours: Optional[MutableMapping[int, Neighbour]] = None,
        out_neighbours: Optional[MutableMapping[int, Neighbour]] = None,
        runtime: Optional["Runtime"] = None,
        round_idx: int = 0,
        sample_num: int = 0,
        persistent_storage: Optional[str] = None,
        client_num_per_round: int = 0,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise InvalidStateError(f"unknown role(s) {unknown} for worker {worker_index}; known: {ROLES}")
        self.worker_index = int(worker_index)
        self.roles = list(roles)
        self.in_neighbours = in_neighbours if in_neighbours is not None else NeighbourTable()
        self.out_neighbours = out_neighbours if out_neighbours is not None else NeighbourTable()
        self.runtime = runtime
        self.round_idx = round_idx
        self.sample_num = sample_num
        self.persistent_storage = persistent_storage
        self.client_num_per_round = client_num_per_round
        self.extra: Dict[str, Any] = dict(extra or {})
        self.role: str = self.roles[0] if self.roles else ""
        #: a trainer's ``ClientContext`` while it runs (set by the runtime)
        self.context: Optional["ClientContext"] = None

    # -- what an algorithm implements ----------------------------------------------------
    @abc.abstractmethod
    async def run(self) -> None:
        """One round of this worker in its current ``self.role``."""

    def aggregate(self, neighbour_ids: Iterable[NeighbourKey]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not aggregate")

    def sample_neighbours(self, round_idx: int, client_num_per_round: int) -> List[int]:
        """All in-neighbours by default; algorithms override with their sampling."""
        return list(self.in_neighbours)

    # -- models --------------------------------------------------------------------------
    def get_model(self) -> Dict[str, torch.Tensor]:
        """This worker's current weights (a live view: copy before keeping)."""
        return self._runtime().get_model(self)

    def update_model(self, weights: Union[Mapping[str, torch.Tensor], Neighbour]) -> None:
        """Replace this worker's weights (a state dict, or a neighbour's model)."""
        if isinstance(weights, Neighbour):
            weights = weights.model
        if weights is None:
            raise InvalidStateError(f"worker {self.worker_index}: update_model got no weights")
        self._runtime().update_model(self, weights)

    async def request_models_suspendable(self, neighbours: Iterable[NeighbourKey]) -> List[Neighbour]:
        """Ask ``neighbours`` for their models; returns them with ``model`` filled in.

        For an aggregator this is where the selected trainers train (the runtime runs
        them, here or on other processes); for a trainer it fetches the aggregator's
        global model. The call suspends until the models are there.
        """
        ids = [neighbour_id(n) for n in neighbours]
        return await self._runtime().request_models(self, ids)

    def reduced_update(self, neighbours: Iterable[NeighbourKey] = ()) -> Any:
        """The pre-reduced ``WeightedUpdate`` of a request (pass what it returned)."""
        reduced = getattr(neighbours, "reduced", None)
        if reduced is None:
            raise InvalidStateError(
                f"{type(self).__name__}: no reduced update; declare linear_aggregation = True "
                "and pass aggregate() the list request_models_suspendable returned"
            )
        return reduced

    # -- client hooks (trainer role; defaults are FedAvg's) ------------------------------
    def begin_local_training(self, context: "ClientContext") -> None:
        """Called with the downloaded weights loaded, before local training."""

    def local_objective(self, loss: torch.Tensor, context: "ClientContext") -> torch.Tensor:
        """The loss local training minimises; default: the model's own loss."""
        return loss

    def client_update(self, context: "ClientContext") -> Any:
        """What this client uploads after training: its delta weighted by its data size."""
        return context.model_delta(weight=float(self.sample_num))

    # -- aggregator state ----------------------------------------------------------------
    def server_values(self) -> Dict[str, torch.Tensor]:
        """Tensors broadcast to this round's clients with the weights (e.g. SCAFFOLD's c)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """The aggregator's state for checkpoints (weights_only-safe values)."""
        return {"extra": dict(self.extra)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.extra = dict(state.get("extra", {}))

    async def train(self, model_dir: Optional[str] = None) -> Any:
        """Local training on this worker's data with the current weights."""
        if "trainer" not in self.roles:
            raise InvalidStateError(f"worker {self.worker_index} has no trainer role")
        result = self._runtime().train(self, model_dir=model_dir)
        if inspect.isawaitable(result):  # a runtime that batches many workers' training (gossip)
            result = await result
        return result

    async def test(self) -> Dict[str, float]:
        """Metrics of this worker's current model on the validation data."""
        return self._runtime().test(self)

    # -- persistence ---------------------------------------------------------------------
    def serialise(self) -> WorkerState:
        return WorkerState(
            worker_index=self.worker_index,
            roles=list(self.roles),
            round_idx=self.round_idx,
            sample_num=self.sample_num,
            in_neighbours=list(self.in_neighbours),
            out_neighbours=list(self.out_neighbours),
            persistent_storage=self.persistent_storage,
            extra=dict(self.extra),
        )

    @classmethod
    def load_worker(cls, state: WorkerState, runtime: Optional["Runtime"] = None, **kwargs: Any) -> "FederatedWorker":
        return cls(
            worker_index=state.worker_index,
            roles=state.roles,
            in_neighbours=NeighbourTable(state.in_neighbours),
            out_neighbours=NeighbourTable(state.out_neighbours),
            runtime=runtime,
            round_idx=state.round_idx,
            sample_num=state.sample_num,
            persistent_storage=state.persistent_storage,
            extra=state.extra,
            **kwargs,
        )

    def _runtime(self):
        if self.runtime is None:
            raise InvalidStateError(f"worker {self.worker_index} is not attached to a simulation runtime")
        return self.runtime

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.worker_index}, roles={self.roles}, round={self.round_idx})"


def save_worker_state(state: WorkerState, path: str | Path) -> None:
    Path(path).write_text(state.to_json())


def load_worker_state(path: str | Path) -> WorkerState:
    return WorkerState.from_json(Path(path).read_text())
