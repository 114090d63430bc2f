"""Plans deployed over Flower (fedrec/plans/flower_app.py, deploy.py).

The server side runs against a grid of this test's own first (in one process, fast: the
ClientApp's handlers answer its messages), then for real: a SuperLink, three SuperNodes
each with its own data file, ClientApp processes, the ServerApp; the global model must
equal the simulation's bit for bit. A client that never answers is dropped after the
round timeout, or the round is abandoned below ``min-clients``.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity

from fedrec.federated.simulation import Simulation
from fedrec.plans import flower_app
from fedrec.plans.data import export_client_data
from fedrec.plans.export import export_plan
from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.logger import MemoryLogger


@pytest.fixture(scope="module")
def deployment(synthetic_data, tmp_path_factory):
    """Three clients, every one in every round, FedAdam on the server: plan, data files."""
    root = tmp_path_factory.mktemp("deploy")
    config = copy.deepcopy(synthetic_data["config"])
    config["fl"].update({"num_workers": 3, "client_num_per_round": 3, "num_rounds": 2,
                         "fl_algo": {"name": "fed_adam", "server_lr": 0.05}})
    export_plan(config, root / "client.plan")
    export_client_data(config, None, root / "data", [0, 1, 2], [])
    (root / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    sim = Simulation(copy.deepcopy(config), root / "simulated", logger=MemoryLogger())
    history = sim.run()
    sim.close()
    return {"root": root, "config": config, "history": history}


def _checkpoints(logdir: Path):
    manager = CheckpointManager(logdir / "checkpoints")
    return {step: CheckpointManager.load(path)["global"] for step, path in manager.checkpoints()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _metrics(logdir: Path):
    return [r for r in map(json.loads, (logdir / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "fl"]


class FakeGrid:
    """Flower's Grid in one process: each node's ClientApp handler answers at once;
    ``silent`` nodes never answer in the given rounds, ``failing`` ones reply an error."""

    def __init__(self, root: Path, silent=None, failing=None):
        self.root, self.silent, self.failing = root, silent or {}, failing or {}
        self.nodes = {100 + c: c for c in range(3)}
        self.timeouts = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            cid = self.nodes[node]
            context = types.SimpleNamespace(node_config={
                "plan": str(self.root / "client.plan"), "client-id": cid,
                "data-file": str(self.root / "data" / f"client-{cid}.safetensors")})
            if message.metadata.message_type == "query":
                replies.append(flower_app.query(message, context))
                continue
            round_idx = int(message.content["config"]["round"])
            if round_idx in self.silent.get(cid, ()):
                continue
            if round_idx in self.failing.get(cid, ()):
                replies.append(Message(Error(code=0, reason="ClientApp raised"), reply_to=message))
                continue
            replies.append(flower_app.train(message, context))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Messages need a run id, which Flower sets in its own processes."""
    for key in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _serve(deployment, logdir, grid, min_clients=3):
    run = {"fedrec-config": str(deployment["root"] / "config.yml"), "logdir": str(logdir),
           "plan": str(deployment["root"] / "client.plan"), "round-timeout": 5.0, "connect-timeout": 5.0,
           "min-clients": min_clients}
    return flower_app.serve(grid, run)


def test_server_side_over_a_grid_equals_the_simulation(deployment, tmp_path, task_identity):
    grid = FakeGrid(deployment["root"])
    summary = _serve(deployment, tmp_path / "run", grid)
    assert summary["rounds"] == 2 and summary["dropped"] == [] and summary["error"] is None
    assert grid.timeouts[1:] == [5.0, 5.0]  # every round's wait is bounded
    simulated, deployed = _checkpoints(deployment["root"] / "simulated"), _checkpoints(tmp_path / "run")
    assert simulated.keys() == deployed.keys() == {1, 2}
    for step in simulated:
        _assert_same(simulated[step], deployed[step])
    keys = ("clients", "samples", "train_loss", "bytes_down", "bytes_up", "roc_auc")
    assert [{k: r[k] for k in keys} for r in _metrics(tmp_path / "run")] == \
           [{k: r[k] for k in keys} for r in deployment["history"]]


def test_sparse_rows_over_a_grid_equal_the_sparse_simulation(deployment, tmp_path, task_identity):
    """Sparse mode: each client downloads only its rows and uploads row updates; the
    model, the bytes counted and the metrics equal the sparse simulation's."""
    config = copy.deepcopy(deployment["config"])
    config["fl"].update({"embedding_updates": "sparse", "num_rounds": 1})
    root = _plan_root(deployment, tmp_path / "sparse", config)
    sim = Simulation(copy.deepcopy(config), tmp_path / "simulated", logger=MemoryLogger())
    history = sim.run()
    sim.close()
    grid = FakeGrid(root)
    sent = []
    send = grid.send_and_receive

    def recording(messages, timeout=None):
        messages = list(messages)
        sent.extend(m for m in messages if m.metadata.message_type == "train")
        return send(messages, timeout)

    grid.send_and_receive = recording
    _serve({"root": root}, tmp_path / "run", grid)
    _assert_same(_checkpoints(tmp_path / "simulated")[1], _checkpoints(tmp_path / "run")[1])
    keys = ("clients", "samples", "train_loss", "bytes_down", "bytes_up", "roc_auc")
    assert [{k: r[k] for k in keys} for r in _metrics(tmp_path / "run")] == [{k: r[k] for k in keys} for r in history]
    table = "sparse_arch.tables.0.weight"
    full_rows = sim.global_state[table].shape[0]
    assert all(m.content["weights"][table].shape[0] < full_rows for m in sent)  # only the client's rows went down


def _plan_root(deployment, root: Path, config, logdir=None) -> Path:
    """A folder like the fixture's (plan, config, the same client data) for ``config``."""
    root.mkdir()
    export_plan(config, root / "client.plan", logdir=logdir)
    (root / "data").symlink_to(deployment["root"] / "data")
    (root / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def test_a_plan_exported_from_a_run_continues_it(deployment, tmp_path, task_identity):
    """Export from the simulation's round-2 checkpoint, deploy round 3: the server resumes
    that checkpoint (FedAdam's moments too) and ends where a 3-round simulation ends."""
    config = copy.deepcopy(deployment["config"])
    config["fl"]["num_rounds"] = 3
    root = _plan_root(deployment, tmp_path / "continued", config, logdir=deployment["root"] / "simulated")
    sim = Simulation(copy.deepcopy(config), tmp_path / "simulated", logger=MemoryLogger())
    sim.run()
    sim.close()
    summary = _serve({"root": root}, tmp_path / "run", FakeGrid(root))
    assert summary["rounds"] == 3
    deployed = _checkpoints(tmp_path / "run")
    assert sorted(deployed) == [3]
    _assert_same(_checkpoints(tmp_path / "simulated")[3], deployed[3])


def test_a_silent_or_failing_client_is_dropped_or_the_round_abandoned(deployment, tmp_path, task_identity):
    # in round 1 client 2 never answers and client 0 fails: with min-clients 1 the round completes
    summary = _serve(deployment, tmp_path / "drop", FakeGrid(deployment["root"], silent={2: [1]},
                                                            failing={0: [1]}), min_clients=1)
    assert summary["rounds"] == 2
    assert [tuple(d[:2]) for d in summary["dropped"]] == [(1, 0), (1, 2)]
    assert "error: ClientApp raised" in summary["dropped"][0][2] and "no reply within 5s" in summary["dropped"][1][2]
    rows = _metrics(tmp_path / "drop")
    assert [r["clients"] for r in rows] == [3, 1]
    first = _checkpoints(tmp_path / "drop")
    _assert_same(first[1], _checkpoints(deployment["root"] / "simulated")[1])
    assert not all(torch.equal(first[1][k], first[2][k]) for k in first[1])  # round 2 moved the model
    # with min-clients 3 the same round is abandoned: the model stays as round 1 left it
    summary = _serve(deployment, tmp_path / "abandon", FakeGrid(deployment["root"], silent={2: [1]}), min_clients=3)
    assert summary["rounds"] == 2
    rows = _metrics(tmp_path / "abandon")
    assert [r["clients"] for r in rows] == [3, 0]
    saved = _checkpoints(tmp_path / "abandon")
    _assert_same(saved[1], saved[2])


def test_a_client_of_another_plan_is_refused(deployment, tmp_path, task_identity):
    import zipfile

    from fedrec.plans.format import CHECKSUM, MANIFEST, sha256

    with zipfile.ZipFile(deployment["root"] / "client.plan") as src, \
            zipfile.ZipFile(tmp_path / "other.plan", "w") as dst:  # the same plan, another identity
        members = {i.filename: src.read(i) for i in src.infolist()}
        manifest = json.loads(members[MANIFEST])
        manifest["source"]["config"] = "another.yml"
        members[MANIFEST] = json.dumps(manifest).encode()
        members[CHECKSUM] = sha256(members[MANIFEST]).encode()
        for name, data in members.items():
            dst.writestr(name, data)
    grid = FakeGrid(deployment["root"])
    run = {"fedrec-config": str(deployment["root"] / "config.yml"), "logdir": str(tmp_path / "run"),
           "plan": str(tmp_path / "other.plan"), "round-timeout": 5.0, "connect-timeout": 5.0, "min-clients": 3}
    with pytest.raises(RuntimeError, match="has another plan"):
        flower_app.serve(grid, run)


# Every ClientApp message starts a Python process (Flower's subprocess isolation; torch's
# import alone is seconds): a real deployment takes about a minute on a busy 2-core machine,
# so it runs under -m slow; the in-process grid above runs the same ServerApp and ClientApp
# code for both rounds by default (only deploy.py's process handling is left to these).
@pytest.mark.slow
@pytest.mark.parametrize("rounds", [1, 2])
def test_loopback_deployment_over_flower_equals_the_simulation(deployment, tmp_path, rounds):
    """Real processes: a SuperLink, three SuperNodes (each with its own data file), a
    ClientApp process per message, the ServerApp; the same global model, bit for bit."""
    from fedrec.plans.deploy import deploy_loopback

    root = deployment["root"]
    config = copy.deepcopy(deployment["config"])
    config["fl"]["num_rounds"] = rounds
    summary = deploy_loopback(config, root / "client.plan",
                              [root / "data" / f"client-{c}.safetensors" for c in range(3)], tmp_path / "run",
                              round_timeout=240, timeout=540)
    assert summary["rounds"] == rounds and summary["dropped"] == []
    assert sorted(summary["clients"]) == ["0", "1", "2"]
    simulated, deployed = _checkpoints(root / "simulated"), _checkpoints(tmp_path / "run")
    assert sorted(deployed) == list(range(1, rounds + 1))
    for step in deployed:
        _assert_same(simulated[step], deployed[step])
    for log in ("superlink", "supernode-0", "flwr-run"):
        assert (tmp_path / "run" / "flower" / f"{log}.log").is_file()


@pytest.mark.slow  # a round waits out its timeout; test_a_silent_... covers the policy in one process
def test_a_client_process_that_dies_mid_round_is_dropped(deployment, tmp_path):
    from fedrec.plans.deploy import deploy_loopback

    root = deployment["root"]
    summary = deploy_loopback(deployment["config"], root / "client.plan",
                              [root / "data" / f"client-{c}.safetensors" for c in range(3)], tmp_path / "run",
                              round_timeout=60, min_clients=2, exits={2: 1}, timeout=540)
    assert summary["rounds"] == 2 and [tuple(d[:2]) for d in summary["dropped"]] == [(1, 2)]
    assert [r["clients"] for r in _metrics(tmp_path / "run")] == [3, 2]
