"""The worker API: neighbour tables, roles, serialisation, running outside a simulation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedrec.federated_worker import (
    FederatedWorker,
    InvalidStateError,
    Neighbour,
    NeighbourTable,
    WorkerState,
    load_worker_state,
    save_worker_state,
)
from fedrec.utilities.random_state import RandomContext


class EchoWorker(FederatedWorker):
    async def run(self) -> None:
        self.round_idx += 1


def test_neighbour_stands_for_its_id():
    table = NeighbourTable([3, 5, 9], sample_nums=[10, 20, 30])
    neighbour = table[5]
    assert neighbour.sample_num == 20 and neighbour == 5 and hash(neighbour) == hash(5)
    assert table[neighbour] is neighbour  # a Neighbour indexes like its id
    assert list(table) == [3, 5, 9] and len(table) == 3 and 9 in table and 4 not in table
    assert [n.id for n in table.values()] == [3, 5, 9]
    with pytest.raises(KeyError, match="worker 4 is not a neighbour"):
        table[4]
    # the tutorial's sampling: np.random.choice over the ids
    with RandomContext(1):
        chosen = np.random.choice(list(table), 2, replace=False)
    assert set(chosen) <= {3, 5, 9}


def test_neighbour_objects_are_created_lazily_and_released():
    table = NeighbourTable(range(100_000))
    assert len(table) == 100_000 and not table._live
    table[7].model = {"w": 1}
    assert len(table._live) == 1
    table.release_models()
    assert not table._live and table[7].model is None


def test_serialise_and_load_worker_round_trip(tmp_path):
    worker = EchoWorker(4, ["trainer"], NeighbourTable([1, 2]), NeighbourTable([0]), round_idx=3,
                        sample_num=17, persistent_storage=str(tmp_path), extra={"momentum_norm": 0.5})
    asyncio.run(worker.run())
    state = worker.serialise()
    assert isinstance(state, WorkerState) and state.round_idx == 4
    save_worker_state(state, tmp_path / "w.json")
    again = EchoWorker.load_worker(load_worker_state(tmp_path / "w.json"))
    assert again.serialise() == state
    assert list(again.in_neighbours) == [1, 2] and list(again.out_neighbours) == [0]


def test_roles_are_checked():
    with pytest.raises(InvalidStateError, match="unknown role"):
        EchoWorker(0, ["server"])
    worker = EchoWorker(0, ["aggregator"])
    with pytest.raises(InvalidStateError, match="no trainer role"):
        asyncio.run(worker.train())
    with pytest.raises(InvalidStateError, match="not attached to a simulation runtime"):
        worker.get_model()
    with pytest.raises(InvalidStateError, match="got no weights"):
        EchoWorker(0, ["trainer"], runtime=object()).update_model(Neighbour(1))
