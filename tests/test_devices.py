"""Device profiles, the virtual clock and the round policies (docs/devices.md).

Virtual times are recomputed here by hand from ``devices.npz`` and the byte counts of
``virtual_clock.jsonl``; policies are checked on hand-made rounds; the feature with
identical, always-online devices must leave FedAvg bit-identical.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
import yaml

from fedrec.federated.devices import Availability, DeviceProfiles, DevicesConfig, build_profiles
from fedrec.federated.round_policy import RoundPolicy, plan_round
from fedrec.federated.simulation import Simulation
from fedrec.federated.traces import KBIT_BYTES, load_behave_trace, load_device_capacity
from fedrec.federated.virtual_clock import local_samples, truncate_records
from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.config import ConfigError
from fedrec.utilities.logger import MemoryLogger, read_metrics

from test_fl_simulation import run, without_timings

HETERO = {"speed": {"name": "log_uniform", "low": 10, "high": 200},
          "download": {"name": "lognormal", "median": 2.0e6, "spread": 10},
          "upload": {"name": "log_uniform", "low": 1.0e4, "high": 5.0e5}}
DEVICE_KEYS = {"virtual_time", "virtual_round_seconds", "clients_selected", "clients_dropped", "clients_late",
               "clients_surplus", "wasted_samples", "wasted_bytes", "round_abandoned"}


def with_devices(config, devices=None, policy=None, **fl):
    config = copy.deepcopy(config)
    config["fl"]["devices"] = copy.deepcopy(HETERO if devices is None else devices)
    if policy is not None:
        config["fl"]["round_policy"] = policy
    config["fl"].update(fl)
    return config


def clock_lines(logdir):
    return [json.loads(line) for line in (logdir / "virtual_clock.jsonl").read_text().splitlines()]


# -- profiles ----------------------------------------------------------------------------------
def test_distributions_are_seeded_positive_and_spread_as_named():
    config = DevicesConfig(speed={"name": "log_uniform", "low": 10, "high": 200},
                           download={"name": "lognormal", "median": 1e6, "spread": 20},
                           upload={"name": "uniform", "low": 1e4, "high": 2e4})
    a, b = build_profiles(config, 5000, seed=3), build_profiles(config, 5000, seed=3)
    assert np.array_equal(a.speed, b.speed) and np.array_equal(a.upload, b.upload)
    assert not np.array_equal(a.speed, build_profiles(config, 5000, seed=4).speed)
    assert a.speed.min() >= 10 and a.speed.max() <= 200 and a.speed.max() / a.speed.min() > 15
    p5, p50, p95 = np.percentile(a.download, [5, 50, 95])
    assert 15 < p95 / p5 < 27 and 0.9e6 < p50 < 1.1e6
    assert 1e4 <= a.upload.min() and a.upload.max() <= 2e4
    assert a.availability.online(123.0).all()


def test_periodic_windows_wrap_and_say_when_they_close():
    avail = Availability(np.array([0, 1, 3]), np.array([80.0, 10.0, 50.0]), np.array([120.0, 20.0, 60.0]),
                         np.array([100.0, 100.0]))
    # client 0: online 80..100 and 0..20 of every 100 s (its window runs past the period)
    assert avail.online(90.0).tolist() == [True, False]
    assert avail.online(215.0).tolist() == [True, True]
    assert avail.online(30.0).tolist() == [False, False]
    until = avail.online_until(285.0)
    assert until[0] == pytest.approx(320.0) and until[1] == -np.inf
    assert avail.next_online(30.0) == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="client 1's online window ends"):
        Availability(np.array([0, 1, 2]), np.array([0.0, 9.0]), np.array([5.0, 3.0]), np.ones(2) * 10).check("x")


def _fedscale_files(tmp_path, num=4, first=1):
    capacity = {first + i: {"computation": 10.0 * (i + 1), "communication": 100.0 * (i + 1)} for i in range(num)}
    trace = {first + i: {"duration": 5, "active": [0, 50 + i], "inactive": [10, 80 + i], "finish_time": 100,
                         "model": "phone"} for i in range(num)}
    (tmp_path / "capacity.pkl").write_bytes(pickle.dumps(capacity))
    (tmp_path / "trace.pkl").write_bytes(pickle.dumps(trace))
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps({"client_id": k, **v}) + "\n" for k, v in trace.items()))
    return capacity, trace


def test_fedscale_capacity_and_behave_trace_read_as_fedscale_times_them(tmp_path):
    _fedscale_files(tmp_path)
    speed, down, up = load_device_capacity(tmp_path / "capacity.pkl", 4, "by_id", 1, 3.0)
    # FedScale: 3 x samples x computation / 1000 s to train; kbit / (kbit/s) to communicate
    assert speed[1] == pytest.approx(1000 / (3 * 20.0)) and down[2] == up[2] == pytest.approx(300 * KBIT_BYTES)
    for path in ("trace.pkl", "trace.jsonl"):
        avail = load_behave_trace(tmp_path / path, 4, "by_id", 1)
        assert avail.online(5.0).all() and not avail.online(30.0).any()
        assert avail.online(251.0).tolist() == [True, True, False, False]  # 251 mod 100 = 51
    cycled = load_behave_trace(tmp_path / "trace.pkl", 10, "cycle", 1)
    assert np.array_equal(cycled.starts[2 * 4:2 * 5], cycled.starts[0:2])
    profiles = build_profiles(DevicesConfig(capacity_file=str(tmp_path / "capacity.pkl"),
                                            trace_file=str(tmp_path / "trace.jsonl")), 4, seed=0)
    assert profiles.speed[0] == pytest.approx(1000 / 30.0)


def test_traces_naming_missing_clients_or_bad_windows_name_the_file_and_line(tmp_path):
    _, trace = _fedscale_files(tmp_path, num=5)
    with pytest.raises(ConfigError, match=r"trace.jsonl:5: client id 5 names no client \(fl.num_workers is 4"):
        load_behave_trace(tmp_path / "trace.jsonl", 4, "by_id", 1)
    with pytest.raises(ConfigError, match=r"trace.pkl: entry 5: client id 5 names no client"):
        load_behave_trace(tmp_path / "trace.pkl", 4, "by_id", 1)
    with pytest.raises(ConfigError, match=r"no entry for 1 of 6 clients"):
        load_behave_trace(tmp_path / "trace.jsonl", 6, "by_id", 1)
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"client_id": 3, "active": [40], "inactive": [20], "finish_time": 100})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: an online window ends \(20.0\) before it starts \(40.0\)"):
        load_behave_trace(tmp_path / "bad.jsonl", 5, "by_id", 1)
    (tmp_path / "cap.jsonl").write_text(json.dumps({"client_id": 1, "computation": 0, "communication": 5}) + "\n")
    with pytest.raises(ConfigError, match=r"cap.jsonl:1: 'computation' must be positive"):
        load_device_capacity(tmp_path / "cap.jsonl", 1, "by_id", 1, 3.0)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({1: torch.nn.Linear}))
    with pytest.raises(ConfigError, match="refusing to build"):
        load_device_capacity(tmp_path / "evil.pkl", 1, "by_id", 1, 3.0)


# -- the policies on hand-made rounds ------------------------------------------------------------
def _plan(policy, ids, times_train, goal, **kw):
    """Clients with 1 B/s links moving 0 bytes: a client's time is samples / speed (speed 1)."""
    n = len(ids)
    ones = np.ones(n)
    return plan_round(policy, kw.get("start", 0.0), 0, 0, goal, np.array(ids), np.zeros(n), np.array(times_train),
                      np.zeros(n), ones, ones, ones, kw.get("until", np.full(n, np.inf)), 100, 0.0)


def test_deadline_over_commitment_and_min_reports_by_hand():
    plan = _plan(RoundPolicy(deadline=10, over_commitment=1.5), [1, 2, 3, 4, 5, 6], [4, 12, 3, 9, 2, 7], goal=4)
    # in time: 5 (2 s), 3 (3 s), 1 (4 s), 6 (7 s), 4 (9 s); late: 2 (12 s); the first 4 are kept
    assert dict(zip(plan.ids.tolist(), plan.status)) == {1: "kept", 2: "late", 3: "kept", 4: "surplus",
                                                          5: "kept", 6: "kept"}
    assert plan.end == 7.0 and not plan.abandoned
    # the surplus client worked 7 of its 9 s, the late one until the round closed at 7 s
    assert plan.wasted_samples == 7 + 7
    short = _plan(RoundPolicy(deadline=10, min_reports=3), [1, 2, 3], [4, 12, 30], goal=3)
    assert short.status == ["kept", "late", "late"] and short.end == 10.0 and short.abandoned
    assert short.wasted_samples == 4 + 10 + 10  # abandoned: every client's work is wasted
    waits = _plan(RoundPolicy(), [1, 2], [4, 6], goal=3)  # no deadline, goal not met: wait for all
    assert waits.end == 6.0 and waits.kept == [1, 2]
    offline = _plan(RoundPolicy(), [1, 2], [4, 6], goal=2, until=np.array([np.inf, 5.0]))
    assert offline.status == ["kept", "offline"] and offline.wasted_samples == 5 and offline.end == 5.0


def test_dropouts_depend_on_seed_round_and_client_only():
    policy = RoundPolicy(dropout_rate=0.3)
    n = 400
    ones = np.ones(n)

    def statuses(ids, round_idx):
        plan = plan_round(policy, 0.0, round_idx, 7, n, np.array(ids), np.zeros(len(ids)), np.ones(len(ids)),
                          np.zeros(len(ids)), ones[:len(ids)], ones[:len(ids)], ones[:len(ids)],
                          np.full(len(ids), np.inf), n, 0.0)
        return dict(zip(plan.ids.tolist(), plan.status))

    everyone = statuses(list(range(n)), 0)
    assert 0.2 < sum(s == "dropped" for s in everyone.values()) / n < 0.4
    some = statuses(list(range(0, n, 3)), 0)
    assert all(everyone[c] == s for c, s in some.items())
    assert statuses(list(range(n)), 1) != everyone


def test_local_samples_counts_what_local_training_processes():
    class FL:
        local_epochs, local_steps, local_batch_size = 2, None, 16

    assert local_samples(np.array([0, 5, 40]), FL).tolist() == [0, 10, 80]
    FL.local_epochs, FL.local_steps = None, 5  # 40 rows: 3 batches a pass (16, 16, 8)
    assert local_samples(np.array([0, 5, 40]), FL).tolist() == [0, 25, 40 + 32]


# -- in a simulation ---------------------------------------------------------------------------
def test_identical_always_online_devices_leave_fedavg_bit_identical(config, tmp_path):
    plain, plain_history = run(config, tmp_path / "plain")
    same = with_devices(config, {"speed": {"name": "constant", "value": 50}})
    devices, history = run(same, tmp_path / "devices")
    for name, tensor in plain.global_state.items():
        assert torch.equal(tensor, devices.global_state[name]), name
    stripped = [{k: v for k, v in row.items() if k not in DEVICE_KEYS} for row in without_timings(history)]
    assert stripped == without_timings(plain_history)
    assert all(DEVICE_KEYS <= set(row) for row in history)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_virtual_time_is_recomputed_from_profiles_and_real_bytes(config, tmp_path, mode):
    cfg = with_devices(config, policy={"deadline": 60, "over_commitment": 1.3, "dropout_rate": 0.1},
                       embedding_updates=mode, num_rounds=4)
    sim, history = run(cfg, tmp_path)
    profiles = DeviceProfiles.load(tmp_path / "devices.npz")
    assert np.array_equal(profiles.speed, sim.clock.profiles.speed)
    lines = clock_lines(tmp_path)
    now = 0.0
    for row, line in zip(history, lines):
        assert line["start"] == pytest.approx(now)
        kept = [c for c in line["clients"] if c[1] == "kept"]
        for cid, status, down, samples, up, seconds in line["clients"]:
            expected = down / profiles.download[cid] + samples / profiles.speed[cid] + up / profiles.upload[cid]
            assert seconds == pytest.approx(expected, rel=1e-12)
            if status == "late":
                assert seconds > 60
        assert row["clients"] == len(kept) <= cfg["fl"]["client_num_per_round"]
        assert row["clients_selected"] == len(line["clients"]) == math.ceil(1.3 * cfg["fl"]["client_num_per_round"])
        assert row["bytes_down"] == sum(c[2] for c in kept) and row["bytes_up"] == sum(c[4] for c in kept)
        assert row["samples"] == sum(c[3] for c in kept)
        if len(kept) == cfg["fl"]["client_num_per_round"]:
            assert line["end"] - line["start"] == pytest.approx(max(c[5] for c in kept))
        now = line["end"]
        assert row["virtual_time"] == pytest.approx(now)
    assert sum(r["clients_late"] + r["clients_dropped"] + r["clients_surplus"] for r in history) > 0
    # the plan (made before training) foresaw the bytes and samples the kept clients really had
    from fedrec.federated.context import RoundContext

    for line in lines:
        kept = [c for c in line["clients"] if c[1] == "kept"]
        planned = sim.runner.planned_costs([c[0] for c in kept], RoundContext(0, 0), sim.clock.samples)
        assert planned.tolist() == [[c[2], c[3], c[4]] for c in kept]


def test_min_reports_abandons_the_round_without_changing_the_model(config, tmp_path):
    cfg = with_devices(config, policy={"dropout_rate": 0.6, "min_reports": 6}, num_rounds=4)
    sim = Simulation(cfg, tmp_path, logger=MemoryLogger())
    rows = []
    try:
        for _ in range(4):
            before = {k: v.clone() for k, v in sim.global_state.items()}
            row = sim.run_round()
            rows.append(row)
            same = all(torch.equal(before[k], sim.global_state[k]) for k in before)
            assert same == bool(row["round_abandoned"])
            if row["round_abandoned"]:
                assert row["clients"] == 0 and row["samples"] == 0 and row["wasted_samples"] > 0
    finally:
        sim.close()
    assert any(r["round_abandoned"] for r in rows)


def test_availability_limits_selection_to_online_clients(config, tmp_path):
    devices = dict(HETERO, availability={"name": "periodic", "period": 200, "online_fraction": 0.3})
    cfg = with_devices(config, devices, num_rounds=4)
    sim, history = run(cfg, tmp_path)
    avail = sim.clock.profiles.availability
    for line in clock_lines(tmp_path):
        online = avail.online(line["start"])
        assert all(online[c[0]] for c in line["clients"])


def test_resume_restores_the_clock_and_its_records(config, tmp_path):
    from test_fl_simulation import resumed_after

    cfg = with_devices(config, policy={"deadline": 60, "over_commitment": 1.3, "dropout_rate": 0.2},
                       num_rounds=4, target_auc=0.5)
    whole, history = run(cfg, tmp_path / "whole")
    resumed, rest = resumed_after(cfg, tmp_path / "cut", rounds=2, unsaved_rounds=1)
    assert without_timings(rest) == without_timings(history[2:])
    assert resumed.clock.now == whole.clock.now
    # the cut run's rounds ran through run_round (no records); the resumed ones wrote theirs
    assert clock_lines(tmp_path / "cut") == clock_lines(tmp_path / "whole")[2:]
    truncate_records(tmp_path / "whole", 3)  # what a resume from round 3 keeps
    assert [line["round"] for line in clock_lines(tmp_path / "whole")] == [1, 2, 3]
    for name, tensor in whole.global_state.items():
        assert torch.equal(tensor, resumed.global_state[name]), name
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert a["devices"] == b["devices"] and a["target"] == b["target"]
    assert (tmp_path / "whole" / "participation.json").read_text() == (tmp_path / "cut" / "participation.json").read_text()


def test_summary_has_time_to_target_wasted_work_and_participation(config, tmp_path):
    from fedrec.federated.run import run_simulation

    cfg = with_devices(config, policy={"dropout_rate": 0.2, "over_commitment": 1.5}, num_rounds=3, target_auc=0.5)
    history = run_simulation(cfg, tmp_path, print_rounds=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    first = next(r for r in history if r["roc_auc"] >= 0.5)
    assert summary["target"] == {"auc": 0.5, "reached_auc": first["roc_auc"], "rounds": first["round"],
                                 "virtual_time": first["virtual_time"]}
    assert summary["devices"]["wasted_samples"] == sum(r["wasted_samples"] for r in history)
    assert summary["devices"]["virtual_time"] == history[-1]["virtual_time"]
    part = json.loads((tmp_path / "participation.json").read_text())
    assert sum(part["kept"]) == sum(r["clients"] for r in history)
    assert sum(part["selected"]) == sum(r["clients_selected"] for r in history)
    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["phase"] == "fl"]
    assert all("virtual_time" in line and "round_seconds" in line for line in lines)
    unreached = with_devices(config, num_rounds=1, target_auc=0.999)
    run_simulation(unreached, tmp_path / "un", print_rounds=False)
    assert json.loads((tmp_path / "un" / "summary.json").read_text())["target"]["rounds"] is None


# -- bad input, before round 1 -------------------------------------------------------------------
@pytest.mark.parametrize("devices, policy, message", [
    ({"speed": {"name": "constant", "value": 0}}, None, "fl.devices.speed"),
    ({"upload": {"name": "uniform", "low": -1, "high": 5}}, None, "fl.devices.upload"),
    ({"download": {"name": "gaussian", "mean": 1}}, None, "fl.devices.download"),
    ({"speedd": {"name": "constant", "value": 1}}, None, "unknown key 'speedd'"),
    ({"availability": {"name": "periodic", "online_fraction": 0}}, None, "fl.devices.availability"),
    ({}, {"over_commitment": 0.9}, "fl.round_policy: key 'over_commitment'"),
    ({}, {"min_reports": 9}, r"fl.round_policy.min_reports \(9\) exceeds fl.client_num_per_round \(8\)"),
    ({"speed": {"name": "constant", "value": 1}}, {"deadline": 1}, r"fl.round_policy.deadline \(1s\) is shorter"),
    (None, {"deadline": 5}, "fl.round_policy needs fl.devices"),
])
def test_bad_device_input_is_a_one_line_error_before_round_one(config, tmp_path, capsys, devices, policy, message):
    from fedrec.cli import main

    cfg = copy.deepcopy(config)
    if devices is not None:
        cfg["fl"]["devices"] = devices
    if policy is not None:
        cfg["fl"]["round_policy"] = policy
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_trace_naming_unknown_clients_fails_before_round_one(config, tmp_path, capsys):
    from fedrec.cli import main

    _fedscale_files(tmp_path, num=config["fl"]["num_workers"] + 1)
    cfg = with_devices(config, {"trace_file": str(tmp_path / "trace.jsonl")})
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"trace.jsonl:{config['fl']['num_workers'] + 1}: client id {config['fl']['num_workers'] + 1} names no client" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- MPI ------------------------------------------------------------------------------------------
def test_policies_under_mpi_give_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, assert_same_run, simulate

    from fedrec.federated.run import run_simulation

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    config = _config(synthetic_data["config"], backend="local", num_rounds=3, embedding_updates="sparse",
                     client_num_per_round=10, devices=dict(HETERO, availability={"name": "periodic", "period": 300,
                                                                                   "online_fraction": 0.7}),
                     round_policy={"deadline": 60, "over_commitment": 1.3, "dropout_rate": 0.1})
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")
    assert clock_lines(tmp_path / "local") == clock_lines(tmp_path / "mpi")
    assert CheckpointManager(tmp_path / "mpi" / "checkpoints").latest_step() == 3
