"""Federated simulation on the local backend: metrics, determinism, resume, FedAvg maths."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fedrec.federated.client_runner import ClientError
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.logger import MemoryLogger, read_metrics

ROUND_KEYS = {"round", "roc_auc", "log_loss", "accuracy", "clients", "samples", "round_seconds",
              "bytes_down", "bytes_up"}
TIMING_KEYS = {"round_seconds", "eval_seconds"}


def run(config, logdir, rounds=None):
    sim = Simulation(config, logdir, logger=MemoryLogger())
    try:
        history = sim.run()
    finally:
        sim.close()
    return sim, history


def resumed_after(config, logdir, rounds=2, unsaved_rounds=0):
    """A run checkpointed after ``rounds`` rounds (then ``unsaved_rounds`` more that are
    never checkpointed) and "killed", then resumed in a new Simulation and run to the
    end: returns the resumed simulation and the rows it ran."""
    cut = Simulation(config, logdir, logger=MemoryLogger())
    for _ in range(rounds):
        cut.history.append(cut.run_round())
        cut.save_checkpoint()
    for _ in range(unsaved_rounds):
        cut.run_round()
    cut.close()
    resumed = Simulation(config, logdir, logger=MemoryLogger())
    assert resumed.resume() and resumed.round_idx == rounds
    try:
        rest = resumed.run()
    finally:
        resumed.close()
    return resumed, rest


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_simulate_cli_writes_one_line_per_round(config, tmp_path):
    from fedrec.federated.run import run_simulation

    history = run_simulation(config, tmp_path / "fl", print_rounds=False)
    lines = [r for r in read_metrics(tmp_path / "fl" / "metrics.jsonl") if r["phase"] == "fl"]
    assert [r["round"] for r in lines] == [1, 2, 3]
    for line in lines:
        assert ROUND_KEYS <= set(line)
        assert line["clients"] == config["fl"]["client_num_per_round"]
        assert 0.0 <= line["roc_auc"] <= 1.0
    assert len(history) == 3
    summary = json.loads((tmp_path / "fl" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in lines)
    assert (tmp_path / "fl" / "config.yml").exists()
    assert list((tmp_path / "fl" / "checkpoints").glob("ckpt-*.pt"))


def test_auc_rises_over_rounds(config, tmp_path):
    config["fl"].update({"num_rounds": 6, "partitioner": {"name": "iid"}, "client_num_per_round": 20})
    _, history = run(config, tmp_path)
    assert history[-1]["roc_auc"] > history[0]["roc_auc"] + 0.02


def test_same_seed_same_result_and_other_seed_differs(config, tmp_path):
    first, h1 = run(config, tmp_path / "a")
    second, h2 = run(copy.deepcopy(config), tmp_path / "b")
    assert_same_weights(first.global_state, second.global_state)
    assert without_timings(h1) == without_timings(h2)
    config["fl"]["seed"] = 1
    third, _ = run(config, tmp_path / "c")
    assert not torch.equal(first.global_state["over_arch.mlp.layers.0.weight"],
                           third.global_state["over_arch.mlp.layers.0.weight"])


def test_resume_after_interruption_gives_identical_result(config, tmp_path):
    full, full_history = run(config, tmp_path / "full")

    interrupted = Simulation(config, tmp_path / "cut", logger=MemoryLogger())
    for _ in range(2):  # two of three rounds, checkpointed, then the process "dies"
        interrupted.history.append(interrupted.run_round())
        interrupted.save_checkpoint()
    interrupted.close()

    resumed = Simulation(config, tmp_path / "cut", logger=MemoryLogger())
    assert resumed.resume() and resumed.round_idx == 2
    rest = resumed.run()
    resumed.close()
    assert_same_weights(full.global_state, resumed.global_state)
    assert without_timings(full_history[2:]) == without_timings(rest)


def test_tutorial_fedavg_runs_unchanged_and_matches_builtin(config, tmp_path):
    import tests.user_algorithms.tutorial_fedavg  # noqa: F401  (registers tutorial_fed_avg)

    config["fl"].update({"num_workers": 10, "client_num_per_round": 10, "num_rounds": 2})
    builtin, _ = run(copy.deepcopy(config), tmp_path / "builtin")
    config["fl"]["fl_algo"] = {"name": "tutorial_fed_avg"}
    tutorial, history = run(config, tmp_path / "tutorial")
    assert len(history) == 2
    for name, value in builtin.global_state.items():
        torch.testing.assert_close(tutorial.global_state[name], value, atol=2e-6, rtol=1e-5)


def test_fedavg_update_maths_by_hand():
    base = {"w": torch.tensor([1.0, 2.0]), "table": torch.zeros(4, 2)}
    client_a = {"w": torch.tensor([2.0, 2.0]), "table": torch.tensor([[1.0, 1.0], [0, 0], [0, 0], [0, 0]])}
    client_b = {"w": torch.tensor([1.0, 5.0]), "table": torch.tensor([[0, 0], [0, 0], [3.0, 3.0], [0, 0]])}
    # dense: average of models weighted 1:3
    total = WeightedUpdate.from_client(client_a, base, 1, ["w", "table"])
    total.add_(WeightedUpdate.from_client(client_b, base, 3, ["w", "table"]))
    state = {k: v.clone() for k, v in base.items()}
    total.apply_mean_(state)
    assert torch.allclose(state["w"], torch.tensor([1.25, 4.25]))
    assert torch.allclose(state["table"][0], torch.tensor([0.25, 0.25]))
    assert torch.allclose(state["table"][2], torch.tensor([2.25, 2.25]))
    # sparse rows, dense_equivalent: the same numbers
    rows_a = {"table": torch.tensor([0])}
    rows_b = {"table": torch.tensor([2])}
    sparse = WeightedUpdate.from_client(client_a, base, 1, ["w"], rows_a)
    sparse.add_(WeightedUpdate.from_client(client_b, base, 3, ["w"], rows_b))
    equivalent = {k: v.clone() for k, v in base.items()}
    sparse.apply_mean_(equivalent)
    assert torch.equal(equivalent["table"], state["table"])
    # per_row: each row averages only over the clients that touched it
    per_row = {k: v.clone() for k, v in base.items()}
    sparse.apply_mean_(per_row, per_row=True)
    assert torch.allclose(per_row["table"][0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(per_row["table"][2], torch.tensor([3.0, 3.0]))
    assert sparse.nbytes() == 2 * 4 + 2 * (8 + 2 * 4)


def _with_tables(config, sparse_grads: bool):
    config["model"]["embedding_types"] = {"threshold": 100,
                                          "base": {"name": "torch_bag", "mode": "sum", "sparse": sparse_grads}}
    return config


@pytest.mark.parametrize("sparse_grads", [False, True])
def test_sparse_updates_equal_dense_fedavg_bit_for_bit(config, tmp_path, sparse_grads):
    config = _with_tables(config, sparse_grads)
    config["fl"]["num_rounds"] = 2
    dense, dense_history = run(copy.deepcopy(config), tmp_path / "dense")
    config["fl"]["embedding_updates"] = "sparse"
    sparse, sparse_history = run(config, tmp_path / "sparse")
    assert_same_weights(dense.global_state, sparse.global_state)
    for d, s in zip(dense_history, sparse_history):
        assert d["roc_auc"] == s["roc_auc"]
        assert s["bytes_up"] < d["bytes_up"] / 5 and s["bytes_down"] < d["bytes_down"] / 5


def test_per_row_aggregation_runs_and_differs(config, tmp_path):
    config["fl"].update({"num_rounds": 2, "embedding_updates": "sparse"})
    equivalent, _ = run(copy.deepcopy(config), tmp_path / "eq")
    config["fl"]["embedding_aggregation"] = "per_row"
    per_row, history = run(config, tmp_path / "pr")
    assert 0.0 <= history[-1]["roc_auc"] <= 1.0
    table = "sparse_arch.tables.0.weight"
    assert not torch.equal(equivalent.global_state[table], per_row.global_state[table])


def test_bad_fl_config_fails_clearly(config, tmp_path):
    bad = copy.deepcopy(config)
    bad["fl"]["fl_algo"] = {"name": "fed_avgg"}
    with pytest.raises(registry.RegistryError, match="known fl_algo names: .*fed_avg"):
        Simulation(bad, tmp_path / "a")
    bad = copy.deepcopy(config)
    bad["fl"]["num_round"] = 3
    with pytest.raises(registry.ConfigTypeError, match="unknown key 'num_round'"):
        Simulation(bad, tmp_path / "b")
    bad = copy.deepcopy(config)
    bad["fl"].update({"local_epochs": 1, "local_steps": 2})
    with pytest.raises(registry.ConfigTypeError, match="either local_epochs or local_steps"):
        Simulation(bad, tmp_path / "c")


@registry.load("fl_algo", "test_failing_trainer")
class _FailingTrainer(registry.lookup("fl_algo", "fed_avg")):
    async def run(self):
        if self.role == "trainer" and self.worker_index == 3:
            raise RuntimeError("disk full")
        await super().run()


def test_client_failure_names_round_and_client(config, tmp_path):
    config["fl"].update({"fl_algo": {"name": "test_failing_trainer"}, "client_num_per_round": 40})
    with pytest.raises(ClientError, match="round 0, client 3: RuntimeError: disk full"):
        run(config, tmp_path)


def test_local_steps_bound_local_training(config, tmp_path):
    config["fl"].update({"local_steps": 2, "num_rounds": 1, "local_epochs": None})
    sim, history = run(config, tmp_path)
    assert history[0]["samples"] <= 2 * config["fl"]["local_batch_size"] * config["fl"]["client_num_per_round"]


def test_ten_thousand_workers_are_cheap_records(tmp_path):
    from fedrec.data import synthesize
    from fedrec.runner import run_preprocess
    from tests.conftest import small_config

    synthesize(25000, str(tmp_path / "d.txt"), seed=2)
    config = small_config(tmp_path / "d.txt", tmp_path / "p")
    run_preprocess(config, progress=False)
    config["fl"].update({"num_workers": 10000, "client_num_per_round": 50, "num_rounds": 1,
                         "partitioner": {"name": "iid"}})
    sim, history = run(config, tmp_path / "fl")
    assert history[0]["clients"] == 50
    assert len(sim.aggregator.in_neighbours) == 10000
    assert len(sim.aggregator.in_neighbours._live) == 0  # no Neighbour objects kept between rounds


def test_submodel_download_gives_identical_updates(config, tmp_path):
    """A process sent only the rows its clients use computes the same sums bit for bit."""
    from fedrec.federated.client_runner import RoundJob
    from fedrec.federated.context import RoundContext
    from fedrec.federated.update import RowSubset, state_nbytes, submodel

    config["fl"]["embedding_updates"] = "sparse"
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    clients = [1, 4, 9, 17]
    full = sim.runner.run_job(RoundJob(RoundContext(0, 0), [(0, clients)], sim.global_state))
    rows = sim.runner.rows_of_clients(clients)
    partial_state = submodel(sim.global_state, rows)
    assert any(isinstance(v, RowSubset) for v in partial_state.values())
    assert state_nbytes(partial_state) < state_nbytes(sim.global_state) / 5
    partial = sim.runner.run_job(RoundJob(RoundContext(0, 0), [(0, clients)], partial_state))
    sim.close()
    (_, a), (_, b) = full.block_updates[0], partial.block_updates[0]
    assert_same_weights(a.dense, b.dense)
    assert a.rows.keys() == b.rows.keys()
    for name in a.rows:
        assert torch.equal(a.rows[name].ids, b.rows[name].ids)
        assert torch.equal(a.rows[name].values, b.rows[name].values)


def test_natural_split_by_latent_users(config, tmp_path):
    """The synthetic generator's latent users carry through preprocessing into clients."""
    config["fl"].update({"partitioner": {"name": "natural"}, "num_workers": 30, "num_rounds": 1})
    sim, history = run(config, tmp_path)
    users = sim.trainer.dataset.split("train").user
    for cid in range(sim.partition.num_clients):
        rows = sim.partition.indices_of(cid)
        assert len(rows) > 0
    # every latent user lands in exactly one client
    owner = {}
    for cid in range(sim.partition.num_clients):
        for user in set(users[sim.partition.indices_of(cid)].tolist()):
            assert owner.setdefault(user, cid) == cid
    assert history[0]["clients"] == config["fl"]["client_num_per_round"]


def test_cli_resume_rewrites_rounds_after_the_checkpoint_and_fresh_runs_archive(config, tmp_path):
    """`simulate --resume` after a crash: one metrics line per round; a fresh run moves old files."""
    from fedrec.federated.run import run_simulation

    logdir = tmp_path / "fl"
    config["fl"]["checkpoint_every_n_rounds"] = 2
    run_simulation(config, logdir, print_rounds=False)  # checkpoints after rounds 2 and 3
    (logdir / "checkpoints" / "ckpt-000000003.pt").unlink()  # as if it died after round 3's log
    run_simulation(config, logdir, resume=True, print_rounds=False)
    rounds = [r["round"] for r in read_metrics(logdir / "metrics.jsonl") if r["phase"] == "fl"]
    assert rounds == [1, 2, 3]
    run_simulation(config, logdir, print_rounds=False)
    rounds = [r["round"] for r in read_metrics(logdir / "metrics.jsonl") if r["phase"] == "fl"]
    assert rounds == [1, 2, 3]
    assert list((logdir / "previous").iterdir())


def test_fed_avgm_without_momentum_is_fed_avg_and_momentum_resumes(config, tmp_path):
    config["fl"]["num_rounds"] = 3
    plain, _ = run(copy.deepcopy(config), tmp_path / "avg")
    config["fl"]["fl_algo"] = {"name": "fed_avgm", "server_lr": 1.0, "server_momentum": 0.0}
    no_momentum, _ = run(copy.deepcopy(config), tmp_path / "avgm0")
    for name, value in plain.global_state.items():
        torch.testing.assert_close(no_momentum.global_state[name], value, atol=1e-6, rtol=1e-6)
    # with momentum: a run interrupted after round 2 and resumed equals an uninterrupted one
    config["fl"]["fl_algo"] = {"name": "fed_avgm", "server_lr": 1.0, "server_momentum": 0.9}
    full, _ = run(copy.deepcopy(config), tmp_path / "full")
    resumed, _ = resumed_after(config, tmp_path / "cut")
    assert_same_weights(full.global_state, resumed.global_state)
    assert not torch.equal(full.global_state["over_arch.mlp.layers.0.weight"],
                           plain.global_state["over_arch.mlp.layers.0.weight"])
