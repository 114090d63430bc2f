"""What a round and a client know, passed explicitly instead of through side channels.

``RoundContext`` travels down with the global weights to every process (round index,
seed, server values that clients need, such as SCAFFOLD's control variate, and the
values of the postprocessors). ``ClientContext`` is one client's view during its local
work: its data size, the weights it started from, the rows it touches, its stored state,
and what local training returned. The algorithm's client hooks (``FederatedWorker``'s
``begin_local_training``, ``local_objective`` and ``client_update``) read it.

The runtimes a worker calls into are declared as protocols (``Runtime`` for every role,
``AggregatorRuntime`` for the aggregator) rather than ``Any``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from fedrec.federated.update import RowSubset, WeightedUpdate, gather_rows

if TYPE_CHECKING:  # pragma: no cover
    from fedrec.federated.samplers import Sampler
    from fedrec.federated_worker import FederatedWorker, Neighbour


@dataclasses.dataclass
class RoundContext:
    """The round's values sent with the weights to every process (tensors pack flat)."""

    round_idx: int
    seed: int
    #: tensors the aggregator broadcasts to its clients (e.g. SCAFFOLD's ``c``), by name;
    #: in sparse mode a table-shaped value arrives as a ``RowSubset`` of the needed rows
    server_values: Dict[str, Any] = dataclasses.field(default_factory=dict)
    #: numbers the postprocessors broadcast (e.g. an adaptive clipping bound), by name
    postprocessor_values: Dict[str, float] = dataclasses.field(default_factory=dict)
    #: rounds completed at the newest checkpoint: client-state versions older than the
    #: newest one before it may be pruned, since a resume never reads them
    checkpointed_round: int = 0
    #: the round's cohort, ascending (every client id the server selected): protocols
    #: among the clients (secure aggregation's pairwise masks) need to know who takes part
    cohort: List[int] = dataclasses.field(default_factory=list)
    #: per-client round index where it differs from ``round_idx`` (FedBuff: the index of
    #: the launch that started each client; it seeds the client's data order)
    client_rounds: Dict[int, int] = dataclasses.field(default_factory=dict)
    #: the worker whose request this round answers, where it is not the star's aggregator
    #: (an edge aggregator of a hierarchy; in a graph the peer itself, which trains from
    #: its own model): the trainers' out-neighbour
    aggregator_id: Optional[int] = None


@dataclasses.dataclass
class ClientContext:
    """One client's local work in a round (built by the process's ``ClientRunner``)."""

    round: RoundContext
    client_id: int
    sample_num: int
    model: torch.nn.Module
    #: live views of the replica's tensors (what the client trains)
    weights: Dict[str, Tensor]
    #: the weights the client started from (the global model or a submodel of it)
    start: Mapping[str, Any]
    #: parameters uploaded whole (MLPs; every parameter in dense mode)
    dense_names: List[str]
    #: embedding rows the client's data touch, per table parameter
    touched_rows: Dict[str, Tensor]
    #: ``local_lr`` of the config (algorithms that normalise by it: SCAFFOLD, q-FFL)
    local_lr: float
    #: momentum of the local optimizer, 0 for plain SGD (FedNova's normaliser needs it)
    local_momentum: float = 0.0
    #: the client's stored state from earlier rounds (tensors), or {} the first time
    state: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    #: the JSON-safe ``worker.extra`` it stored last time
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what :meth:`save_state` was given this round (None: keep the stored state)
    new_state: Optional[Dict[str, Tensor]] = None
    #: set by the runtime when local training returns
    train_result: Any = None
    #: numbers the client's hooks report (summed over the cohort into the round's metrics)
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    #: the client's local objective on its data, ``() -> mean loss``, at the current weights
    evaluate_loss: Any = None
    #: ``() -> {table: row ids}`` its data touch, also in dense mode (computed on demand)
    rows_of_client: Any = None
    _rows_cache: Optional[Dict[str, Tensor]] = None
    #: bytes per number of the upload when a postprocessor re-encodes it (secure
    #: aggregation's ring elements); None: ``fl.value_bytes``
    upload_value_bytes: Optional[int] = None
    #: bytes a postprocessor's own protocol moves beside the model (secure aggregation's
    #: keys and shares), added to the client's ``bytes_down`` / ``bytes_up``
    extra_bytes_down: int = 0
    extra_bytes_up: int = 0
    #: user-side parameters (rec models): in the client's state only, never up- or downloaded
    private_names: List[str] = dataclasses.field(default_factory=list)

    def table_rows(self) -> Dict[str, Tensor]:
        """Embedding rows this client's data touch, per table (dense mode too): the only
        rows local training can move, so per-row terms need only these."""
        if self.touched_rows or self.rows_of_client is None:
            return self.touched_rows
        if self._rows_cache is None:
            self._rows_cache = self.rows_of_client()
        return self._rows_cache

    def save_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Keep ``tensors`` as this client's state for the next round it takes part in."""
        self.new_state = dict(tensors)

    def server_value(self, name: str, ids: Optional[Tensor] = None) -> Tensor:
        """A broadcast value, or its rows ``ids`` (works for full tensors and row subsets)."""
        value = self.round.server_values[name]
        if ids is None:
            if isinstance(value, RowSubset):
                raise KeyError(f"server value {name!r} arrived as rows; ask for rows by id")
            return value
        return gather_rows(value, ids)

    def model_delta(self, weight: float) -> WeightedUpdate:
        """``weight * (trained - start)``: MLPs whole, tables as the touched rows only
        (the default upload, FedAvg's)."""
        return WeightedUpdate.from_client(self.weights, self.start, weight, self.dense_names,
                                          self.touched_rows)

    def trainable(self) -> Dict[str, Tensor]:
        """The model's parameters by state-dict name (what a local objective may use)."""
        return dict(self.model.named_parameters())


@runtime_checkable
class Runtime(Protocol):
    """What a worker calls into: models, neighbours' models, training and testing."""

    def get_model(self, worker: "FederatedWorker") -> Dict[str, Tensor]: ...

    def update_model(self, worker: "FederatedWorker", weights: Mapping[str, Tensor]) -> None: ...

    async def request_models(self, worker: "FederatedWorker", ids: Sequence[int]) -> List["Neighbour"]: ...

    def train(self, worker: "FederatedWorker", model_dir: Optional[str] = None) -> Any: ...

    def test(self, worker: "FederatedWorker") -> Dict[str, float]: ...


@runtime_checkable
class AggregatorRuntime(Runtime, Protocol):
    """The aggregator's runtime adds the run's seed, its client sampler and the
    embedding aggregation semantic."""

    seed: int
    per_row_embeddings: bool
    sampler: "Sampler"
