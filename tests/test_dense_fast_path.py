"""Dense mode's fast path (fedrec/federated/dense_fast_path.py): clients load and upload
only their embedding rows, bytes are counted as dense, and every round's metrics and the
global weights equal the full-table path's bit for bit; anything not proved falls back."""

from __future__ import annotations

import copy

import pytest
import torch

from fedrec.federated.client_runner import build_client_runner
from fedrec.federated.simulation import Simulation
from fedrec.utilities.logger import MemoryLogger
from tests.test_mpi import _config, assert_same_run, needs_mpi, simulate

TIMING_KEYS = {"round_seconds", "eval_seconds"}


def _run(config, logdir):
    sim = Simulation(config, logdir, logger=MemoryLogger())
    try:
        history = sim.run()
    finally:
        sim.close()
    return sim, [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    return tensor.contiguous().view(torch.int32 if tensor.element_size() == 4 else torch.int64)


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            assert torch.equal(_bits(a[name]), _bits(b[name])), name
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("fl_algo, local_optimizer, sparse_grads", [
    ({"name": "fed_avg"}, None, False),
    ({"name": "fed_avg"}, None, True),
    ({"name": "fed_adam", "server_lr": 0.01}, None, False),
    ({"name": "fed_avgm", "server_lr": 0.5, "server_momentum": 0.9}, {"name": "sgd", "lr": 0.1, "momentum": 0.9},
     False),
    ({"name": "fed_prox", "mu": 0.5}, None, False),
])
def test_fast_path_equals_the_full_table_path_bit_for_bit(config, tmp_path, fl_algo, local_optimizer,
                                                          sparse_grads):
    config["fl"].update({"num_rounds": 3, "fl_algo": fl_algo, "client_num_per_round": 12,
                         "local_optimizer": local_optimizer})
    config["model"]["embedding_types"]["base"]["sparse"] = sparse_grads
    fast, fast_history = _run(copy.deepcopy(config), tmp_path / "fast")
    config["fl"]["dense_fast_path"] = "off"
    full, full_history = _run(config, tmp_path / "full")
    assert fast.runner.dense_fast and "fast path" in fast.runner.dense_path_note
    assert not full.runner.dense_fast and "fl.dense_fast_path: off" in full.runner.dense_path_note
    assert fast_history == full_history  # AUC, loss, samples and bytes_down / bytes_up (counted as dense)
    assert_bit_identical(fast.global_state, full.global_state)
    state = fast.aggregator.state_dict().get("server_optimizer")
    if state:  # adaptive and momentum server optimizers: their state too
        other = full.aggregator.state_dict()["server_optimizer"]
        for key, value in state["state"].items():
            for field, tensor in value.items():
                if torch.is_tensor(tensor):
                    assert torch.equal(_bits(tensor), _bits(other["state"][key][field])), field


def test_fast_path_bytes_are_the_dense_bytes(config, tmp_path):
    """Per round: bytes_down and bytes_up as every parameter sent whole, both ways."""
    config["fl"]["num_rounds"] = 1
    sim, history = _run(config, tmp_path / "run")
    assert sim.runner.dense_fast
    whole = sum(t.numel() for t in sim.global_state.values()) * config["fl"].get("value_bytes", 4)
    clients = history[0]["clients"]
    assert history[0]["bytes_down"] == clients * whole and history[0]["bytes_up"] == clients * whole


@pytest.mark.parametrize("change, reason", [
    ({"fl_algo": {"name": "scaffold"}}, "has its own"),
    ({"fl_algo": {"name": "fed_avg"}, "dense_fast_path": "off"}, "fl.dense_fast_path: off"),
    ({"fl_algo": {"name": "fed_nova"}}, "has its own"),
    ({"local_optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 0.01}}, "weight decay"),
    ({"local_optimizer": {"name": "adam", "lr": 0.01}}, "not SGD"),
    ({"postprocessors": [{"name": "l2_clip", "bound": 1.0}]}, "postprocessors"),
    ({"embedding_aggregation": "per_row"}, "per_row"),
    ({"attack": {"name": "sign_flip", "fraction": 0.2}}, "attack"),
    ({"fl_algo": {"name": "median"}}, "is not FedAvg"),
])
def test_anything_not_proved_keeps_the_full_table_path(config, change, reason):
    config["fl"].update(change)
    runner = build_client_runner(config, None, new_partition=True)
    assert not runner.dense_fast
    assert reason in runner.dense_path_note and runner.dense_path_note.startswith("dense updates: full-table path")
    assert runner.whole_names == runner.dense_names


def test_sparse_mode_and_max_norm_tables(config):
    config["fl"]["embedding_updates"] = "sparse"
    runner = build_client_runner(copy.deepcopy(config), None, new_partition=True)
    assert not runner.dense_fast and runner.dense_path_note == ""
    config["fl"]["embedding_updates"] = "dense"
    runner = build_client_runner(config, None, new_partition=True)
    table = next(m for m in runner.model.modules() if isinstance(m, torch.nn.EmbeddingBag))
    table.max_norm = 1.0
    from fedrec.federated import dense_fast_path

    fast, note = dense_fast_path.choose(runner)
    assert not fast and "max_norm" in note


def test_bad_dense_fast_path_value_is_a_config_error(config, tmp_path):
    from fedrec.utilities.config import ConfigError

    config["fl"]["dense_fast_path"] = "on"
    with pytest.raises((ConfigError, ValueError), match="dense_fast_path"):
        build_client_runner(config, None, new_partition=True)


@needs_mpi
@pytest.mark.parametrize("fl_algo, processes", [({"name": "fed_avg"}, 3), ({"name": "fed_adam", "server_lr": 0.01}, 2)])
def test_fast_path_under_mpi_equals_the_local_full_table_path(synthetic_data, tmp_path, fl_algo, processes):
    """Each MPI process gets a submodel (MLPs and its clients' rows): the same results."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local", num_rounds=3, fl_algo=fl_algo,
                     client_num_per_round=12, dense_fast_path="off")
    run_simulation(config, tmp_path / "full", print_rounds=False)
    config["fl"].update({"backend": "mpi", "dense_fast_path": "auto"})
    simulate(config, tmp_path / "mpi", processes=processes)
    assert "dense updates: fast path" in (tmp_path / "mpi" / "run.log").read_text()
    assert_same_run(tmp_path / "full", tmp_path / "mpi")
