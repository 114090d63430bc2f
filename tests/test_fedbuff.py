"""FedBuff, asynchronous FL (fl.async; docs/devices.md).

The event order, the model version each client trained on and the staleness weights are
checked against a replay written here from the profiles alone; FedBuff with one buffer of
the whole cohort, identical devices and constant weights is synchronous FedAvg bit for
bit; resume and MPI give the uninterrupted, local result bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from fedrec.federated.devices import DeviceProfiles
from fedrec.federated.fedbuff import StalenessConfig
from fedrec.federated.simulation import Simulation
from fedrec.federated.virtual_clock import local_samples
from fedrec.utilities.logger import MemoryLogger

from test_devices import clock_lines
from test_fl_simulation import run, without_timings

HETERO = {"speed": {"name": "log_uniform", "low": 10, "high": 200},
          "download": {"name": "log_uniform", "low": 1.0e6, "high": 1.0e7},
          "upload": {"name": "log_uniform", "low": 2.0e4, "high": 1.0e6}}


def with_async(config, concurrency, buffer_size, devices=None, policy=None, **fl):
    config = copy.deepcopy(config)
    config["fl"]["devices"] = copy.deepcopy(HETERO if devices is None else devices)
    config["fl"]["async"] = {"concurrency": concurrency, "buffer_size": buffer_size}
    if policy is not None:
        config["fl"]["round_policy"] = policy
    config["fl"].update(fl)
    return config


def test_staleness_weights():
    assert StalenessConfig().weight(0) == 1.0
    assert StalenessConfig().weight(3) == pytest.approx(0.5, rel=1e-15)  # 1 / sqrt(1 + 3)
    assert StalenessConfig(name="polynomial", exponent=1.0).weight(4) == pytest.approx(0.2, rel=1e-15)
    assert StalenessConfig(name="constant").weight(7) == 1.0


def replay(times, buffer_size, steps):
    """FedBuff on clients that are always in flight (concurrency = number of clients):
    each client trains back to back, ``times[c]`` seconds a trip. Written from the
    paper's rules: arrivals in (time, client) order, a server step every ``buffer_size``
    arrivals, a client freed at ``t`` restarts after every event at ``t``, on the model
    version current then. Returns per step the arrivals (client, start, end, version
    trained on, staleness, weight)."""
    start = {c: 0.0 for c in range(len(times))}
    trained_on = {c: 0 for c in range(len(times))}
    running = dict(start)
    version, steps_out, buffer, freed, now = 0, [], [], [], 0.0
    while len(steps_out) < steps:
        client = min(running, key=lambda c: (running[c] + times[c], c))
        end = running[client] + times[client]
        if freed and end > now:  # restart the clients freed at `now`
            for c in freed:
                running[c], start[c], trained_on[c] = now, now, version
            freed = []
            continue
        del running[client]
        now = end
        staleness = version - trained_on[client]
        buffer.append((client, start[client], end, trained_on[client], staleness, 1 / math.sqrt(1 + staleness)))
        freed.append(client)
        if len(buffer) == buffer_size:
            steps_out.append(buffer)
            buffer, version = [], version + 1
    return steps_out


def test_event_order_staleness_and_weights_by_hand(config, tmp_path):
    """4 clients always in flight, a step every 2 arrivals: who arrives when, on which
    version it trained, its staleness weight, and the server's update from them."""
    cfg = with_async(config, 4, 2, num_workers=4, client_num_per_round=2, num_rounds=8, local_steps=2,
                     local_epochs=None)
    sim = Simulation(cfg, tmp_path, logger=MemoryLogger())
    trained, applied, versions = {}, [], [{k: v.clone() for k, v in sim.global_state.items()}]
    train, step = sim._train_async, sim._step_async

    def spy_train(version, flights):
        for name, tensor in sim.global_state.items():  # clients train on the model of their version
            assert torch.equal(tensor, versions[version][name]), name
        out = train(version, flights)
        for f in flights:
            update = out[f.client][0]
            trained[(f.client, f.start)] = (version, {k: v.clone() for k, v in update.dense.items()}, update.weight)
        return out

    def spy_step(update, server_lr):
        applied.append(({k: v.clone() for k, v in update.dense.items()}, update.weight))
        step(update, server_lr)
        versions.append({k: v.clone() for k, v in sim.global_state.items()})

    sim._train_async, sim._step_async = spy_train, spy_step
    try:
        history = sim.run()
    finally:
        sim.close()
    profiles = DeviceProfiles.load(tmp_path / "devices.npz")
    nbytes = sim.runner.dense_bytes  # dense updates: every client moves the whole model both ways
    samples = local_samples(sim.partition.sizes, sim.fl)
    times = [nbytes / profiles.download[c] + samples[c] / profiles.speed[c] + nbytes / profiles.upload[c]
             for c in range(4)]
    expected = replay(times, 2, 8)
    lines = clock_lines(tmp_path)
    assert len(lines) == len(history) == 8
    stalenesses = []
    for r, (line, row, arrivals) in enumerate(zip(lines, history, expected)):
        got = [dict(zip(line["fields"], c)) for c in line["clients"]]
        assert [(g["client"], g["version"], g["staleness"]) for g in got] == [(a[0], a[3], a[4]) for a in arrivals]
        for g, a in zip(got, arrivals):
            assert g["start"] == pytest.approx(a[1], rel=1e-12) and g["end"] == pytest.approx(a[2], rel=1e-12)
            assert g["weight"] == pytest.approx(a[5], rel=1e-15)
            assert g["status"] == "kept" and g["seconds"] == pytest.approx(times[g["client"]], rel=1e-12)
        assert row["virtual_time"] == pytest.approx(arrivals[-1][2], rel=1e-12)
        assert row["staleness_max"] == max(a[4] for a in arrivals)
        assert row["staleness_mean"] == pytest.approx(np.mean([a[4] for a in arrivals]))
        stalenesses += [a[4] for a in arrivals]
        # the server's update: sum of s(t_i) n_i delta_i over the arrivals, weight sum n_i
        dense, weight = applied[r]
        parts = [trained[(a[0], g["start"])] for a, g in zip(arrivals, got)]
        assert [p[0] for p in parts] == [a[3] for a in arrivals]  # trained on the version it downloaded
        assert weight == sum(p[2] for p in parts)
        for name, value in dense.items():
            want = sum(a[5] * p[1][name].double() for a, p in zip(arrivals, parts))
            # float32 sums in another order: equal to float32 precision of the largest value
            assert torch.allclose(value.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), name
    assert max(stalenesses) >= 2  # the trace has stale updates (fast clients overtake slow ones)
    for name, tensor in versions[-1].items():
        assert torch.equal(tensor, sim.global_state[name])


@pytest.mark.parametrize("algo", [{"name": "fed_avg"}, {"name": "fed_avgm", "server_momentum": 0.5}])
def test_one_full_buffer_of_identical_clients_is_fedavg_bit_for_bit(config, tmp_path, algo):
    """concurrency = buffer_size = clients per round, every client equally fast and equally
    costly (dense updates; compute time below the float resolution), constant weights:
    each buffer is one synchronous cohort, summed in the same blocks."""
    config = copy.deepcopy(config)
    config["fl"]["fl_algo"] = algo
    plain, plain_history = run(config, tmp_path / "sync")
    identical = {"speed": {"name": "constant", "value": 1.0e30}, "download": {"name": "constant", "value": 1.0e7},
                 "upload": {"name": "constant", "value": 1.0e7}}
    cfg = with_async(config, 8, 8, devices=identical)
    cfg["fl"]["async"]["staleness"] = {"name": "constant"}
    fedbuff, history = run(cfg, tmp_path / "async")
    for name, tensor in plain.global_state.items():
        assert torch.equal(tensor, fedbuff.global_state[name]), name
    for a, b in zip(plain_history, history):
        for key in ("round", "clients", "samples", "train_loss", "bytes_down", "bytes_up", "roc_auc", "log_loss"):
            assert a[key] == b[key], key
        assert b["staleness_max"] == 0
    lines = clock_lines(tmp_path / "async")
    assert all(len(line["clients"]) == 8 and len({c[6] for c in line["clients"]}) == 1 for line in lines)


def test_resume_equals_uninterrupted(config, tmp_path):
    from test_fl_simulation import resumed_after

    cfg = with_async(config, 6, 3, policy={"dropout_rate": 0.2}, num_rounds=5, target_auc=0.5,
                     embedding_updates="sparse")
    cfg["fl"]["fl_algo"] = {"name": "fed_adam"}
    whole, history = run(cfg, tmp_path / "whole")
    resumed, rest = resumed_after(cfg, tmp_path / "cut", rounds=2, unsaved_rounds=1)
    assert without_timings(rest) == without_timings(history[2:])
    assert resumed.clock.now == whole.clock.now
    assert clock_lines(tmp_path / "cut") == clock_lines(tmp_path / "whole")[2:]
    for name, tensor in whole.global_state.items():
        assert torch.equal(tensor, resumed.global_state[name]), name
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert a["devices"] == b["devices"] and a["target"] == b["target"]
    assert sum(r["clients_dropped"] for r in history) > 0 and max(r["staleness_max"] for r in history) > 0


@pytest.mark.parametrize("change, message", [
    ({"devices": None}, "fl.async needs fl.devices"),
    ({"async": {"concurrency": 8, "buffer_size": 9}}, r"fl.async.buffer_size \(9\) exceeds fl.async.concurrency \(8\)"),
    ({"async": {"concurrency": 41, "buffer_size": 4}}, r"fl.async.concurrency \(41\) exceeds fl.num_workers \(40\)"),
    ({"async": {"concurrency": 0, "buffer_size": 1}}, "fl.async: key 'concurrency'"),
    ({"async": {"concurrency": 4, "buffer_size": -1}}, "fl.async: key 'buffer_size'"),
    ({"async": {"concurrency": 4, "buffer_size": 2, "server_lr": 0}}, "fl.async: key 'server_lr'"),
    ({"async": {"concurrency": 4, "buffer_size": 2, "staleness": {"name": "hinge"}}}, "fl.async: key 'staleness.name'"),
    ({"async": {"concurrency": 4}}, "fl.async: key 'buffer_size'"),
    ({"fl_algo": {"name": "scaffold"}}, "fl.async: fl.fl_algo 'scaffold' is not supported"),
    ({"round_policy": {"deadline": 100}}, "fl.round_policy.deadline does not apply with fl.async"),
])
def test_bad_async_config_is_a_one_line_error_before_round_one(config, tmp_path, capsys, change, message):
    from fedrec.cli import main

    cfg = with_async(config, 4, 2)
    cfg["fl"].update(change)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fedbuff_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, assert_same_run, simulate

    from fedrec.federated.run import run_simulation
    from fedrec.utilities.checkpoint import CheckpointManager

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    config = _config(synthetic_data["config"], backend="local", num_rounds=3, embedding_updates="sparse",
                     devices=dict(HETERO, availability={"name": "periodic", "period": 30, "online_fraction": 0.7}),
                     round_policy={"dropout_rate": 0.1})
    config["fl"]["async"] = {"concurrency": 12, "buffer_size": 4}
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")
    assert clock_lines(tmp_path / "local") == clock_lines(tmp_path / "mpi")
    assert CheckpointManager(tmp_path / "mpi" / "checkpoints").latest_step() == 3
