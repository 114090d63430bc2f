"""FedNova (``fed_nova``) and q-FedAvg (``q_fedavg``/``q_ffl``): their maths on toy clients
against values worked out by hand and an independent numpy version of each paper's
formulas; their wiring to local training; end-to-end runs in dense and sparse mode;
exact resume; local = MPI; bad hyper-parameters refused before anything is written."""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import yaml

from fedrec.federated.client_runner import RoundJob
from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.fednova import NORMALISED_STEPS, FedNovaWorker, normaliser
from fedrec.federated.qffl import CURVATURE, QFedAvgWorker
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import WeightedUpdate, sum_updates
from fedrec.federated_worker import Cohort
from fedrec.trainers.base_trainer import LocalTrainResult
from fedrec.utilities import registry
from fedrec.utilities.logger import MemoryLogger
from tests.test_mpi import _config as mpi_config
from tests.test_mpi import assert_same_run, needs_mpi, simulate
from tests.test_fl_simulation import resumed_after, run

W = "w"
TABLE = "table"


# -- toy clients ------------------------------------------------------------------------------
class ToyRuntime:
    """The aggregator's runtime, reduced to what a server step reads."""

    def __init__(self, state: Dict[str, torch.Tensor], per_row: bool = False) -> None:
        self.state, self.per_row_embeddings = state, per_row

    def get_model(self, worker):
        return self.state


def toy_global() -> Dict[str, torch.Tensor]:
    return {W: torch.tensor([0.0, 0.0], dtype=torch.float64), TABLE: torch.zeros(4, 2, dtype=torch.float64)}


def toy_context(start, trained, n: int, steps: int, momentum: float = 0.0, loss: float = 0.0,
                local_lr: float = 0.1, sparse: bool = False) -> ClientContext:
    """A client that trained from ``start`` to ``trained`` in ``steps`` steps."""
    touched = {TABLE: torch.nonzero((trained[TABLE] != start[TABLE]).any(1)).flatten()} if sparse else {}
    context = ClientContext(round=RoundContext(0, 0), client_id=0, sample_num=n, model=None,
                            weights={k: v.clone() for k, v in trained.items()}, start=start,
                            dense_names=[W] if sparse else [W, TABLE], touched_rows=touched,
                            local_lr=local_lr, local_momentum=momentum)
    context.train_result = LocalTrainResult(n, steps, 0.0)
    context.evaluate_loss = lambda: loss
    return context


def client_uploads(algorithm, contexts: Sequence[ClientContext], **kwargs) -> List[WeightedUpdate]:
    """Each client's upload through the algorithm's own client hooks."""
    uploads = []
    for cid, context in enumerate(contexts):
        worker = algorithm(worker_index=cid, roles=["trainer"], sample_num=context.sample_num, **kwargs)
        worker.begin_local_training(context)
        uploads.append(worker.client_update(context))
    return uploads


def server_result(algorithm, uploads: Sequence[WeightedUpdate], per_row: bool = False,
                  **kwargs) -> Dict[str, torch.Tensor]:
    """The global model after the aggregator's step on the summed uploads."""
    runtime = ToyRuntime(toy_global(), per_row)
    aggregator = algorithm(worker_index=99, roles=["aggregator"], runtime=runtime, **kwargs)
    return aggregator.aggregate(Cohort([], reduced=sum_updates(uploads)))


def model(w, rows=None) -> Dict[str, torch.Tensor]:
    table = torch.zeros(4, 2, dtype=torch.float64)
    for row, value in (rows or {}).items():
        table[row] = torch.tensor(value, dtype=torch.float64)
    return {W: torch.tensor(w, dtype=torch.float64), TABLE: table}


def flat(state: Dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([state[W].numpy().ravel(), state[TABLE].numpy().ravel()])


def assert_state(state: Dict[str, torch.Tensor], expected: np.ndarray) -> None:
    np.testing.assert_allclose(flat(state), expected, rtol=1e-12, atol=1e-12)


# -- independent numpy versions of the papers' server steps ---------------------------------
def numpy_normaliser(tau: int, rho: float) -> float:
    """|a_i|_1 as the authors' optimizer accumulates it: counter = counter * rho + 1 and
    norm += counter at every local step."""
    counter, norm = 0.0, 0.0
    for _ in range(tau):
        counter = counter * rho + 1.0
        norm += counter
    return norm


def numpy_fednova(w: np.ndarray, trained: List[np.ndarray], n: List[int], tau: List[int],
                  rho: float = 0.0) -> np.ndarray:
    """Wang et al. 2020: d_i = (x_i - x) / |a_i|_1, x += tau_eff * sum p_i d_i, with
    |a_i|_1 accumulated step by step as the authors' optimizer does (counter = counter *
    rho + 1; norm += counter); clients with no steps left out."""
    keep = [i for i in range(len(n)) if tau[i] > 0]
    p = np.array([n[i] for i in keep], dtype=np.float64)
    p /= p.sum()
    a = [numpy_normaliser(tau[i], rho) for i in keep]
    d = [(trained[i] - w) / a_k for i, a_k in zip(keep, a)]
    tau_eff = float(np.dot(p, a))
    return w + tau_eff * sum(p_k * d_k for p_k, d_k in zip(p, d))


def numpy_qfedavg(w: np.ndarray, trained: List[np.ndarray], losses: List[float], q: float,
                  L: float) -> np.ndarray:
    """Li et al. 2020, Algorithm 3 (q-FedAvg): Δw_k = L (w - w_k), Δ_k = F_k^q Δw_k,
    h_k = q F_k^(q-1) |Δw_k|^2 + L F_k^q, w -= sum Δ_k / sum h_k."""
    deltas, hs = [], []
    for w_k, F in zip(trained, losses):
        dw = L * (w - w_k)
        deltas.append(np.float_power(F, q) * dw)
        hs.append(q * np.float_power(F, q - 1) * np.dot(dw, dw) + L * np.float_power(F, q))
    return w - sum(deltas) / sum(hs)


# -- FedNova maths ----------------------------------------------------------------------------
def test_fednova_normaliser_by_hand():
    assert normaliser(3) == 3.0 and normaliser(0) == 0.0 and normaliser(0, 0.9) == 0.0
    # rho = 0.5, three steps: the gradients carry 1, 1.5 and 1.75 of lr in the delta
    assert normaliser(3, 0.5) == pytest.approx(1 + 1.5 + 1.75)
    assert normaliser(1, 0.9) == pytest.approx(1.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_fednova_server_step_by_hand(sparse):
    """A: n=1, 1 step, moved w by (1, 0); B: n=3, 3 steps, moved w by (0, 3) and table
    row 2 by (3, 3). p = (1/4, 3/4), a = (1, 3), d_A = (1, 0), d_B = (0, 1),
    tau_eff = 1/4 + 9/4 = 5/2: w += 5/2 (1/4, 3/4) = (0.625, 1.875); row 2 += 5/2 * 3/4 * 1.
    (FedAvg: (0.25, 2.25).) C: n=2, no steps, contributes nothing."""
    start = toy_global()
    clients = [toy_context(start, model([1.0, 0.0]), 1, 1, sparse=sparse),
               toy_context(start, model([0.0, 3.0], {2: [3.0, 3.0]}), 3, 3, sparse=sparse),
               toy_context(start, model([0.0, 0.0]), 2, 0, sparse=sparse)]
    uploads = client_uploads(FedNovaWorker, clients)
    assert [u.scalars[NORMALISED_STEPS] for u in uploads] == [1.0, 9.0, 0.0]
    assert [u.weight for u in uploads] == [1.0, 3.0, 0.0]
    result = server_result(FedNovaWorker, uploads)
    expected = model([0.625, 1.875], {2: [1.875, 1.875]})
    assert_state(result, flat(expected))
    assert_state(result, numpy_fednova(flat(start), [flat(c.weights) for c in clients], [1, 3, 2], [1, 3, 0]))
    # the FedAvg of the same clients differs: FedNova does not favour B's extra steps
    avg = server_result(FedAvgWorker, client_uploads(FedAvgWorker, clients[:2]))
    assert_state(avg, flat(model([0.25, 2.25], {2: [2.25, 2.25]})))


def test_fednova_with_local_momentum_matches_numpy():
    start = toy_global()
    trained = [model([0.4, -1.0], {0: [0.5, 0.1]}), model([2.0, 0.5], {0: [-1.0, 0.2], 3: [1.0, 1.0]}),
               model([-0.3, 0.7])]
    n, tau, rho = [5, 2, 9], [4, 7, 2], 0.9
    clients = [toy_context(start, t, n_i, tau_i, momentum=rho) for t, n_i, tau_i in zip(trained, n, tau)]
    result = server_result(FedNovaWorker, client_uploads(FedNovaWorker, clients))
    assert_state(result, numpy_fednova(flat(start), [flat(t) for t in trained], n, tau, rho))


def test_fednova_with_equal_steps_is_fedavg_and_per_row_stays_finite():
    start = toy_global()
    trained = [model([0.4, -1.0], {0: [0.5, 0.1]}), model([2.0, 0.5], {1: [-1.0, 0.2]}), model([-0.3, 0.7])]
    n = [5, 2, 9]
    for sparse in (False, True):
        clients = [toy_context(start, t, n_i, 4, momentum=0.5, sparse=sparse) for t, n_i in zip(trained, n)]
        nova = server_result(FedNovaWorker, client_uploads(FedNovaWorker, clients))
        avg = server_result(FedAvgWorker, client_uploads(FedAvgWorker, clients))
        np.testing.assert_allclose(flat(nova), flat(avg), rtol=1e-12, atol=1e-15)
    # per_row with a client that took no steps but touched rows: its rows get no NaN
    idle = toy_context(start, model([0.0, 0.0], {3: [0.0, 1.0]}), 4, 0, sparse=True)
    clients = [toy_context(start, trained[0], 5, 2, sparse=True), idle]
    per_row = server_result(FedNovaWorker, client_uploads(FedNovaWorker, clients), per_row=True)
    assert all(torch.isfinite(t).all() for t in per_row.values())
    assert torch.equal(per_row[TABLE][3], torch.zeros(2, dtype=torch.float64))


def test_fednova_step_goes_through_the_server_optimizer():
    """sgd at lr 0.5 moves half as far as the paper's step (lr 1)."""
    start = toy_global()
    clients = [toy_context(start, model([1.0, 0.0]), 1, 1), toy_context(start, model([0.0, 3.0]), 3, 3)]
    half = server_result(FedNovaWorker, client_uploads(FedNovaWorker, clients),
                         server_optimizer={"name": "sgd", "lr": 0.5})
    assert_state(half, flat(model([0.3125, 0.9375])))


# -- q-FedAvg maths ---------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_qfedavg_server_step_by_hand(sparse):
    """q = 1, L = 2. A: F = 0.5, moved w by (1, 0): Δw = (-2, 0), |Δw|^2 = 4, Δ = (-1, 0),
    h = 4 + 2 * 0.5 = 5. B: F = 2, moved w by (0, -1) and row 1 by (0, -1): Δw = (0, 2, 0, 2),
    |Δw|^2 = 8, Δ = (0, 4, 0, 4), h = 8 + 4 = 12. w -= (-1, 4, 0, 4) / 17."""
    start = toy_global()
    clients = [toy_context(start, model([1.0, 0.0]), 10, 3, loss=0.5, sparse=sparse),
               toy_context(start, model([0.0, -1.0], {1: [0.0, -1.0]}), 99, 3, loss=2.0, sparse=sparse)]
    uploads = client_uploads(QFedAvgWorker, clients, q=1.0, lipschitz=2.0)
    assert [u.scalars[CURVATURE] for u in uploads] == [5.0, 12.0]
    assert [u.weight for u in uploads] == [1.0, 1.0]  # weighted by loss, not by data size
    result = server_result(QFedAvgWorker, uploads)
    expected = model([1 / 17, -4 / 17], {1: [0.0, -4 / 17]})
    assert_state(result, flat(expected))
    assert_state(result, numpy_qfedavg(flat(start), [flat(c.weights) for c in clients], [0.5, 2.0], 1.0, 2.0))


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 3.0])
def test_qfedavg_matches_numpy_and_lipschitz_defaults_to_one_over_local_lr(q):
    start = toy_global()
    trained = [model([0.4, -1.0], {0: [0.5, 0.1]}), model([2.0, 0.5], {0: [-1.0, 0.2], 3: [1.0, 1.0]}),
               model([-0.3, 0.7])]
    losses = [0.3, 1.7, 0.9]
    for sparse in (False, True):
        clients = [toy_context(start, t, 7, 2, loss=F, local_lr=0.25, sparse=sparse)
                   for t, F in zip(trained, losses)]
        result = server_result(QFedAvgWorker, client_uploads(QFedAvgWorker, clients, q=q), q=q)
        assert_state(result, numpy_qfedavg(flat(start), [flat(t) for t in trained], losses, q, 4.0))


def test_qfedavg_with_q_zero_is_the_unweighted_mean_of_the_client_deltas():
    start = toy_global()
    trained = [model([0.4, -1.0], {0: [0.5, 0.1]}), model([2.0, 0.5], {2: [-1.0, 0.2]}), model([-0.3, 0.7])]
    clients = [toy_context(start, t, n, 2, loss=F, local_lr=0.1)
               for t, n, F in zip(trained, [1, 50, 7], [0.3, 1.7, 0.0])]
    result = server_result(QFedAvgWorker, client_uploads(QFedAvgWorker, clients, q=0.0), q=0.0)
    assert_state(result, np.mean([flat(t) for t in trained], axis=0))


def test_qfedavg_zero_loss_is_safe():
    """0 < q < 1 and F = 0: F^(q-1) is infinite; the client adds nothing (its limit)."""
    start = toy_global()
    a = toy_context(start, model([1.0, 0.0]), 1, 1, loss=0.5)
    zero = toy_context(start, model([5.0, 5.0], {0: [1.0, 1.0]}), 1, 1, loss=0.0)
    uploads = client_uploads(QFedAvgWorker, [a, zero], q=0.5, lipschitz=2.0)
    assert uploads[1].scalars[CURVATURE] == 0.0 and uploads[1].sq_norm() == 0.0
    with_zero = server_result(QFedAvgWorker, uploads)
    alone = server_result(QFedAvgWorker, client_uploads(QFedAvgWorker, [a], q=0.5, lipschitz=2.0))
    assert_state(with_zero, flat(alone))
    assert all(torch.isfinite(t).all() for t in with_zero.values())
    # a cohort of zero-loss clients does not move the model (no 0/0)
    nobody = server_result(QFedAvgWorker, client_uploads(QFedAvgWorker, [zero], q=0.5, lipschitz=2.0))
    assert_state(nobody, flat(toy_global()))
    # q >= 1 has a finite h at F = 0: q = 1 gives h = |Δw|^2, and Δ = 0
    (upload,) = client_uploads(QFedAvgWorker, [zero], q=1.0, lipschitz=2.0)
    assert upload.scalars[CURVATURE] == pytest.approx(4.0 * (25 + 25 + 1 + 1))


def test_q_ffl_is_an_alias_of_q_fedavg():
    assert registry.lookup("fl_algo", "q_ffl") is registry.lookup("fl_algo", "q_fedavg") is QFedAvgWorker
    assert registry.lookup("fl_algo", "fed_nova") is FedNovaWorker


# -- wiring to local training -----------------------------------------------------------------
def one_client_blocks(sim: Simulation, clients: Sequence[int]):
    """Run ``clients`` of round 0, each in its own block: their uploads one by one."""
    job = RoundJob(RoundContext(0, sim.seed), [(i, [c]) for i, c in enumerate(clients)], sim.global_state)
    result = sim.runner.run_job(job)
    stats = {s.client_id: s for s in result.stats}
    return [(c, upload, stats[c]) for c, (_, upload) in zip(clients, result.block_updates)]


def fedavg_uploads(sim: Simulation, clients: Sequence[int]):
    """The same clients' FedAvg uploads (same seeds, so the same local training)."""
    runner = sim.runner
    algorithm, kwargs = runner.algorithm, runner.algorithm_kwargs
    runner.algorithm, runner.algorithm_kwargs = FedAvgWorker, {}
    try:
        return one_client_blocks(sim, clients)
    finally:
        runner.algorithm, runner.algorithm_kwargs = algorithm, kwargs


def test_fednova_client_normalises_by_its_real_steps_and_momentum(config, tmp_path):
    config["fl"].update({"fl_algo": {"name": "fed_nova"},
                         "local_optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.5}})
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    try:
        clients = [1, 4, 9]
        nova, avg = one_client_blocks(sim, clients), fedavg_uploads(sim, clients)
    finally:
        sim.close()
    steps = set()
    for (_, upload, stat), (_, plain, _) in zip(nova, avg):
        a = numpy_normaliser(stat.num_steps, 0.5)
        assert stat.num_steps > 0 and upload.weight == stat.sample_num
        assert upload.scalars[NORMALISED_STEPS] == pytest.approx(stat.sample_num * a, rel=1e-12)
        for name, value in plain.dense.items():
            torch.testing.assert_close(upload.dense[name] * a, value, rtol=1e-5, atol=1e-7)
        steps.add(stat.num_steps)
    assert len(steps) > 1  # the clients differ in steps: the case FedNova is for


def test_qfedavg_client_measures_its_loss_at_the_global_model(config, tmp_path):
    q = 2.0
    config["fl"].update({"fl_algo": {"name": "q_fedavg", "q": q}, "embedding_updates": "sparse"})
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    try:
        clients = [2, 5]
        qffl, avg = one_client_blocks(sim, clients), fedavg_uploads(sim, clients)
        losses = []
        sim.trainer.model.load_state_dict(sim.global_state)
        for cid in clients:  # F_k by hand: mean BCE of the global model on the client's data
            loader = sim.trainer.client_loader(sim.partition.indices_of(cid), 64, seed=0)
            labels, probs = (np.asarray(x, dtype=np.float64) for x in sim.trainer.predict(loader))
            losses.append(float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))))
    finally:
        sim.close()
    L = 1.0 / config["fl"]["local_lr"]
    for (_, upload, stat), (_, plain, _), F in zip(qffl, avg, losses):
        assert upload.weight == 1.0
        scale = F ** q * L / stat.sample_num  # F^q L (w_k - w) against n (w_k - w)
        for name, value in plain.dense.items():
            torch.testing.assert_close(upload.dense[name], value * scale, rtol=1e-4, atol=1e-7)
        sq_norm = plain.sq_norm() / stat.sample_num ** 2
        h = q * F ** (q - 1) * L ** 2 * sq_norm + L * F ** q
        assert upload.scalars[CURVATURE] == pytest.approx(h, rel=1e-4)


# -- end to end ------------------------------------------------------------------------------
def assert_close_weights(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance)


ALGORITHMS = {"fed_nova": {"name": "fed_nova"}, "q_fedavg": {"name": "q_fedavg", "q": 1.0}}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_end_to_end_dense_and_sparse_agree(config, tmp_path, algo):
    config["fl"].update({"fl_algo": ALGORITHMS[algo], "num_rounds": 2})
    dense, dense_history = run(copy.deepcopy(config), tmp_path / "dense")
    config["fl"]["embedding_updates"] = "sparse"
    sparse, sparse_history = run(copy.deepcopy(config), tmp_path / "sparse")
    for history in (dense_history, sparse_history):
        assert [r["clients"] for r in history] == [8, 8]
        assert all(0.0 <= r["roc_auc"] <= 1.0 and math.isfinite(r["log_loss"]) for r in history)
    assert_close_weights(dense.global_state, sparse.global_state, rtol=1e-5, atol=1e-7)
    assert sparse_history[-1]["bytes_up"] < dense_history[-1]["bytes_up"] / 5
    config["fl"]["embedding_aggregation"] = "per_row"
    per_row, history = run(config, tmp_path / "per_row")
    assert all(torch.isfinite(t).all() for t in per_row.global_state.values())
    assert 0.0 <= history[-1]["roc_auc"] <= 1.0


def test_fednova_with_equal_local_steps_is_fedavg_end_to_end(config, tmp_path):
    config["fl"].update({"local_epochs": None, "local_steps": 3, "num_rounds": 2})
    avg, _ = run(copy.deepcopy(config), tmp_path / "avg")
    config["fl"]["fl_algo"] = {"name": "fed_nova"}
    nova, _ = run(copy.deepcopy(config), tmp_path / "nova")
    assert_close_weights(avg.global_state, nova.global_state, rtol=1e-5, atol=1e-6)
    # one local epoch: the clients' step counts differ, and so does FedNova from FedAvg
    config["fl"].update({"local_epochs": 1, "local_steps": None})
    nova_epoch, _ = run(copy.deepcopy(config), tmp_path / "nova_epoch")
    config["fl"]["fl_algo"] = {"name": "fed_avg"}
    avg_epoch, _ = run(config, tmp_path / "avg_epoch")
    weight = "over_arch.mlp.layers.0.weight"
    assert not torch.allclose(nova_epoch.global_state[weight], avg_epoch.global_state[weight], atol=1e-4)


@registry.load("fl_algo", "test_uniform_fed_avg")
class UniformFedAvg(FedAvgWorker):
    """FedAvg with every client weighted 1 (q-FedAvg's q = 0 limit)."""

    def client_update(self, context):
        return context.model_delta(weight=1.0)


def test_qfedavg_with_q_zero_is_uniform_fedavg_end_to_end(config, tmp_path):
    config["fl"].update({"num_rounds": 2, "fl_algo": {"name": "test_uniform_fed_avg"}})
    uniform, _ = run(copy.deepcopy(config), tmp_path / "uniform")
    config["fl"]["fl_algo"] = {"name": "q_ffl", "q": 0.0, "lipschitz": 3.0}
    q_zero, _ = run(copy.deepcopy(config), tmp_path / "q0")
    assert_close_weights(uniform.global_state, q_zero.global_state, rtol=1e-5, atol=1e-6)
    config["fl"]["fl_algo"] = {"name": "fed_avg"}
    weighted, _ = run(config, tmp_path / "weighted")
    weight = "over_arch.mlp.layers.0.weight"
    assert not torch.allclose(weighted.global_state[weight], q_zero.global_state[weight], atol=1e-4)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_resume_is_exact(config, tmp_path, algo):
    # server momentum: the server optimizer's state must come back from the checkpoint
    fl_algo = dict(ALGORITHMS[algo], server_optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.5})
    config["fl"].update({"fl_algo": fl_algo, "num_rounds": 3, "embedding_updates": "sparse"})
    full, full_history = run(copy.deepcopy(config), tmp_path / "full")
    resumed, rest = resumed_after(config, tmp_path / "cut")
    for name, value in full.global_state.items():
        assert torch.equal(resumed.global_state[name], value), name
    drop = {"round_seconds", "eval_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in full_history[2:]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rest]


# -- MPI ---------------------------------------------------------------------------------------
@needs_mpi
def test_qfedavg_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    """Sparse mode, 2 MPI processes: per-process pre-reduction of uploads and h_k."""
    from fedrec.federated.run import run_simulation

    config = mpi_config(synthetic_data["config"], backend="local", num_rounds=2, embedding_updates="sparse",
                        fl_algo={"name": "q_fedavg", "q": 2.0})
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


@needs_mpi
def test_fednova_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from fedrec.federated.run import run_simulation

    config = mpi_config(synthetic_data["config"], backend="local", num_rounds=2,
                        fl_algo={"name": "fed_nova"})
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=4)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fl_algo, key", [({"name": "q_fedavg", "q": -1}, "'q'"),
                                          ({"name": "q_ffl", "lipschitz": 0}, "'lipschitz'"),
                                          ({"name": "fed_nova", "q": 1.0}, "'q'")])
def test_bad_hyper_parameters_exit_2_and_write_nothing(config, tmp_path, capsys, fl_algo, key):
    from fedrec.cli import main

    config["fl"]["fl_algo"] = fl_algo
    config_file = tmp_path / "c.yml"
    config_file.write_text(yaml.safe_dump(config))
    logdir = tmp_path / "run"
    assert main(["simulate", "--config", str(config_file), "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert f"fl.fl_algo {fl_algo['name']!r}" in err and key in err
    assert not logdir.exists()
