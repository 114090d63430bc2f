"""Private user rows in the client state store's row slots (fedrec/federated/row_slots.py):
versions as the files keep them, a killed write read as no write, one read and one write
pass per shard in a job, and the same runs bit for bit as the one-file-per-client store,
resumed and under MPI."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from fedrec.federated.client_state import ClientStateStore
from fedrec.federated.row_slots import HEADER_BYTES, RowSlotError

LAYOUT = {"private/emb": ((1, 3), torch.float32), "private/bias": ((1, 1), torch.float32)}


def _rows(value: float) -> Dict[str, torch.Tensor]:
    return {"private/emb": torch.full((1, 3), value), "private/bias": torch.full((1, 1), -value)}


def _emb(store: ClientStateStore, client: int, round_idx: int) -> Any:
    tensors = store.get(client, round_idx)[0]
    return None if "private/emb" not in tensors else float(tensors["private/emb"][0, 0])


def test_row_slots_keep_the_versions_the_files_keep(tmp_path):
    store = ClientStateStore(tmp_path, fixed_rows=LAYOUT)
    assert store.get(1234, 5) == ({}, {}) and not store.written(np.array([1234])).any()
    store.put(1234, 0, _rows(1.0), checkpointed_round=0)
    store.put(1234, 2, _rows(2.0), checkpointed_round=2)
    assert _emb(store, 1234, 2) == 1.0 and _emb(store, 1234, 3) == 2.0 and _emb(store, 1234, 0) is None
    tensors = store.get(1234, 3)[0]
    assert torch.equal(tensors["private/bias"], torch.full((1, 1), -2.0)) and set(tensors) == set(LAYOUT)
    store.put(1234, 4, _rows(4.0), checkpointed_round=3)  # keeps round 2's (a resume from 3 reads it)
    assert _emb(store, 1234, 1) is None and _emb(store, 1234, 3) == 2.0 and _emb(store, 1234, 5) == 4.0
    store.put(1234, 6, _rows(6.0), checkpointed_round=5)  # round 4's is the one before 5 now
    assert _emb(store, 1234, 5) == 4.0 and _emb(store, 1234, 7) == 6.0 and _emb(store, 1234, 3) is None
    # a resumed run (checkpoint 5) writes round 6 again: the same record, round 4's kept
    store.put(1234, 6, _rows(6.5), checkpointed_round=5)
    assert _emb(store, 1234, 5) == 4.0 and _emb(store, 1234, 7) == 6.5
    # a killed run's round 9 (which replaced round 6's) is ignored before round 10, and a
    # run resumed from round 7's checkpoint writes over it, keeping round 4's
    store.put(1234, 9, _rows(9.0), checkpointed_round=5)
    assert _emb(store, 1234, 9) == 4.0 and _emb(store, 1234, 10) == 9.0
    store.put(1234, 7, _rows(7.0), checkpointed_round=7)
    assert _emb(store, 1234, 8) == 7.0 and _emb(store, 1234, 7) == 4.0 and _emb(store, 1234, 10) == 7.0
    # nothing but the shard's slot file: no folder or file per client
    assert [p.name for p in (tmp_path / "00001").iterdir()] == ["rows.slots"]
    assert not list(tmp_path.rglob("*.safetensors")) and store.nbytes() > HEADER_BYTES


def test_many_clients_read_at_once_match_one_at_a_time(tmp_path):
    store = ClientStateStore(tmp_path, fixed_rows=LAYOUT)
    clients = [3, 999, 1000, 2500, 17]
    for k, client in enumerate(clients):
        store.put(client, k, _rows(float(client)), checkpointed_round=k)
    store.put(17, 9, _rows(-1.0), checkpointed_round=9)
    ask = np.array([17, 4, 2500, 3, 1000, 999, 5000])
    for round_idx in (0, 2, 5, 10):
        found, rows = store.get_rows(ask, round_idx)
        for k, client in enumerate(ask.tolist()):
            one = store.get(client, round_idx)[0]
            assert found[k] == bool(one)
            for key in LAYOUT:
                assert torch.equal(rows[key][k], one[key] if one else torch.zeros(LAYOUT[key][0])), (client, key)
    assert store.written(ask).tolist() == [True, False, True, True, True, True, False]


def test_a_write_killed_midway_reads_as_no_write(tmp_path):
    store = ClientStateStore(tmp_path, fixed_rows=LAYOUT)
    store.put(7, 1, _rows(1.0), checkpointed_round=0)
    store.put(7, 3, _rows(3.0), checkpointed_round=0)
    slots = store.slots
    # what a process killed after zeroing the tag and writing half the rows leaves behind
    path = tmp_path / "00000" / "rows.slots"
    slot = slots._target(slots._tags(path.read_bytes()[HEADER_BYTES + 14 * slots.record:][:2 * slots.record]), 5, 0)
    start = HEADER_BYTES + 14 * slots.record + slot * slots.record
    data = bytearray(path.read_bytes())
    data[start + slots.record - 8:start + slots.record] = bytes(8)
    data[start:start + 6] = b"\xff" * 6
    path.write_bytes(bytes(data))
    assert _emb(store, 7, 6) == 3.0  # the other record: round 3's rows, whole
    assert store.get_rows(np.array([7]), 6)[0].tolist() == [True]


def test_another_layout_is_refused_and_bad_rows_are_named(tmp_path):
    ClientStateStore(tmp_path, fixed_rows=LAYOUT).put(1, 0, _rows(1.0))
    wider = {"private/emb": ((1, 4), torch.float32), "private/bias": ((1, 1), torch.float32)}
    with pytest.raises(RowSlotError, match="another layout.*fresh logdir"):
        ClientStateStore(tmp_path, fixed_rows=wider).get(1, 1)
    with pytest.raises(ValueError, match=r"private/emb as \[1, 3\] torch.float32, got \[2, 3\]"):
        ClientStateStore(tmp_path, fixed_rows=LAYOUT).put(1, 1, {**_rows(1.0), "private/emb": torch.zeros(2, 3)})


@pytest.mark.parametrize("damage", ["truncated", "cut_header", "empty", "folder"])
def test_a_damaged_slot_file_is_refused_in_one_line_and_left_alone(tmp_path, damage):
    """A run folder's slot file cut short (its later clients' rows would read as never
    written) or replaced: ``--resume`` stops with one line, exit status 2, the file as found."""
    import argparse

    from fedrec.cli import user_error

    ClientStateStore(tmp_path, fixed_rows=LAYOUT).put(1, 0, _rows(1.0))
    path = tmp_path / "00000" / "rows.slots"
    whole = path.read_bytes()
    assert len(whole) == HEADER_BYTES + 1000 * 2 * 24  # made at its full size (sparse)
    if damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(whole[:{"truncated": HEADER_BYTES + 100, "cut_header": 100, "empty": 0}[damage]])
    before = None if damage == "folder" else path.read_bytes()
    with pytest.raises(RowSlotError, match=f"{path}.*fresh logdir") as caught:
        ClientStateStore(tmp_path, fixed_rows=LAYOUT).get_rows(np.array([1, 999]), 1)
    status, message = user_error(caught.value, argparse.Namespace(command="simulate", argv=[]))
    assert status == 2 and "\n" not in message and message.startswith("fedrec simulate: error: ")
    assert damage == "folder" or path.read_bytes() == before


def test_other_state_stays_in_files_beside_the_rows(tmp_path):
    store = ClientStateStore(tmp_path, fixed_rows=LAYOUT)
    store.put(5, 0, {**_rows(1.0), "c": torch.tensor([1.0])}, {"seen": 1})
    store.put(5, 1, _rows(2.0), {"seen": 1}, rest_unchanged=True)  # the file is not rewritten
    tensors, extra = store.get(5, 2)
    assert float(tensors["c"][0]) == 1.0 and extra == {"seen": 1} and float(tensors["private/emb"][0, 0]) == 2.0
    assert sorted(p.name for p in (tmp_path / "00000" / "5").iterdir()) == ["r000000.safetensors"]
    # rows a file holds (a store written before the slots) are read where they are newer
    ClientStateStore(tmp_path).put(5, 3, {"private/emb": torch.full((1, 3), 3.0), "private/bias": torch.zeros(1, 1)})
    assert float(store.get(5, 4)[0]["private/emb"][0, 0]) == 3.0
    assert float(store.get(5, 3)[0]["private/emb"][0, 0]) == 2.0


def test_a_batch_reads_up_front_writes_at_its_end_and_drops_writes_on_error(tmp_path):
    store = ClientStateStore(tmp_path, fixed_rows=LAYOUT)
    store.put(2, 0, _rows(1.0))
    with store.batch([2, 3], 1):
        assert store.batching and _emb(store, 2, 1) == 1.0 and _emb(store, 3, 1) is None
        store.put(2, 1, _rows(2.0), rest_unchanged=True)
        reused = _rows(3.0)
        store.put(3, 1, reused, rest_unchanged=True)
        reused["private/emb"].fill_(-7.0)  # the caller's tensors are its own again after put
        assert _emb(store, 2, 1) == 1.0  # what the round reads: written before it
        assert store.get_rows(np.array([2, 3]), 2)[0].tolist() == [True, False]  # not written yet
    assert not store.batching and _emb(store, 2, 2) == 2.0 and _emb(store, 3, 2) == 3.0
    with pytest.raises(KeyError), store.batch([2], 2):
        store.put(2, 2, _rows(9.0), rest_unchanged=True)
        raise KeyError("a client failed")
    assert _emb(store, 2, 3) == 2.0  # the failed job's write was dropped


# -- whole runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ratings_config(tmp_path_factory) -> Dict[str, Any]:
    from tests.test_movielens import small_ratings_config

    return small_ratings_config(tmp_path_factory.mktemp("slot_ratings"), users=40, items=120, seed=3,
                                train={"full_ranking": False, "client_records_max_users": 0},
                                fl={"num_rounds": 4, "client_num_per_round": 8, "local_epochs": 2,
                                    "eval_every_n_rounds": 2, "checkpoint_every_n_rounds": 2})


def _private_rows(config: Dict[str, Any], logdir: Path, rounds: int) -> Dict[str, torch.Tensor]:
    from fedrec.federated.simulation import Simulation
    from fedrec.runner import with_data_defaults

    sim = Simulation(with_data_defaults(copy.deepcopy(config)), logdir / "reader")
    sim.runner.attach_logdir(logdir)
    rows = sim.runner.private_rows(np.arange(sim.trainer.dataset.num_users), rounds + 1)
    sim.close()
    return rows


def _final(logdir: Path) -> Dict[str, torch.Tensor]:
    from fedrec.utilities.checkpoint import CheckpointManager

    return CheckpointManager(logdir / "checkpoints").load_newest_intact().state["global"]


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_runs_are_bit_identical_to_the_file_per_client_store(ratings_config, tmp_path, monkeypatch):
    """The reference: the same run the way rounds ran before (the rows in a safetensors file
    per client and round, a new local optimizer per client, touched rows by a sort), then
    a run split in two and resumed."""
    from fedrec.federated import client_runner
    from fedrec.federated.client_state import STATE_DIR
    from fedrec.federated.run import run_simulation
    from fedrec.modules.recsys import RecModel

    history = run_simulation(copy.deepcopy(ratings_config), tmp_path / "slots", print_rounds=False)
    with monkeypatch.context() as patch:
        patch.setattr(client_runner.ClientRunner, "_state_store", lambda self, logdir: ClientStateStore(
            logdir / STATE_DIR))
        patch.setattr(client_runner.ClientRunner, "_local_optimizer", lambda self: self._make_optimizer(
            model=self.model))
        patch.setattr(RecModel, "rows_touched", lambda self, items: {
            name: torch.unique(items.reshape(-1), sorted=True) for name in self.item_tables})
        reference = run_simulation(copy.deepcopy(ratings_config), tmp_path / "files", print_rounds=False)
    assert list((tmp_path / "files" / STATE_DIR).rglob("r*.safetensors"))  # the reference did use files
    assert not list((tmp_path / "slots" / STATE_DIR).rglob("r*.safetensors"))
    timing = ("round_seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in history] == [
        {k: v for k, v in r.items() if k not in timing} for r in reference]
    _assert_same(_final(tmp_path / "slots"), _final(tmp_path / "files"))
    rows = _private_rows(ratings_config, tmp_path / "slots", 4)
    _assert_same(rows, _private_rows(ratings_config, tmp_path / "files", 4))
    config = copy.deepcopy(ratings_config)
    config["fl"]["num_rounds"] = 3  # stopped after round 3, resumed to round 4
    run_simulation(config, tmp_path / "split", print_rounds=False)
    config["fl"]["num_rounds"] = 4
    run_simulation(config, tmp_path / "split", resume=True, print_rounds=False)
    _assert_same(_final(tmp_path / "split"), _final(tmp_path / "slots"))
    _assert_same(_private_rows(ratings_config, tmp_path / "split", 4), rows)


def test_a_killed_run_resumes_exactly_and_mpi_runs_match(ratings_config, tmp_path):
    """``kill -9`` in round 3 (its batch of rows never written; round 2's written after the
    last checkpoint), then ``--resume``: the same rows and model as an uninterrupted run;
    and the same again under MPI (rank 0 and two processes writing one slot file)."""
    from tests.test_mpi import _mpi_missing, assert_same_run, simulate

    config = copy.deepcopy(ratings_config)
    once = tmp_path / "killed.txt"
    config["fl"].update({"backend": "auto", "imports": ["tests.mpi_algorithms"],
                         "fl_algo": {"name": "test_kill_in_round", "kill_round": 3, "once_file": str(once)}})
    killed = simulate(config, tmp_path / "killed", check=False)  # checkpoints after rounds 2 and 4
    assert killed.returncode != 0 and once.exists()
    from fedrec.utilities.checkpoint import CheckpointManager

    assert CheckpointManager(tmp_path / "killed" / "checkpoints").latest_step() == 2  # rounds 0-1 saved
    slots = ClientStateStore(tmp_path / "killed" / "client_state", fixed_rows={
        f"private/{n}": ((1, 8 if "embedding" in n else 1), torch.float32)
        for n in ("user_embedding.weight", "user_bias.weight")})
    users = np.arange(40)
    assert not np.array_equal(slots.get_rows(users, 3)[0], slots.get_rows(users, 2)[0])  # round 2's rows written
    simulate(config, tmp_path / "killed", resume=True)
    simulate(config, tmp_path / "whole")  # (the once file exists: nobody is killed)
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    rows = _private_rows(ratings_config, tmp_path / "whole", 4)
    _assert_same(rows, _private_rows(ratings_config, tmp_path / "killed", 4))
    if _mpi_missing():
        pytest.skip(_mpi_missing())
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "whole", tmp_path / "mpi")
    _assert_same(rows, _private_rows(ratings_config, tmp_path / "mpi", 4))
