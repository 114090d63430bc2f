"""The FL algorithm seams: samplers, postprocessors, server optimizers, the client state
store, client hooks, and the algorithms built on them (FedProx, SCAFFOLD, FedAdam & co).

Server steps are checked against independent numpy versions of the papers' formulas.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedrec.federated.client_state import ClientStateStore
from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.server_optimizer import ServerOptimizer
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import RowUpdate, WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.logger import MemoryLogger
from fedrec.utilities.random_state import RandomContext, derive_seed

from test_fl_simulation import assert_same_weights, resumed_after, run, without_timings


# -- samplers ----------------------------------------------------------------------------------
def test_uniform_sampler_is_the_earlier_draw():
    sampler = registry.construct("sampler", {"name": "uniform"})
    with RandomContext(derive_seed(7, 3)):
        expected = sorted(int(i) for i in np.random.choice(list(range(50)), 10, replace=False))
    assert sampler.sample(3, range(50), 10, seed=7) == expected
    assert sampler.sample(3, range(5), 10, seed=7) == [0, 1, 2, 3, 4]


def test_poisson_sampler_rate_and_determinism():
    sampler = registry.construct("sampler", {"name": "poisson", "q": 0.1})
    sizes = [len(sampler.sample(r, range(2000), 0, seed=1)) for r in range(50)]
    assert abs(np.mean(sizes) - 200) < 10  # binomial(2000, 0.1): sd of the mean ~1.9
    assert len(set(sizes)) > 5  # the cohort size varies
    assert sampler.sample(4, range(2000), 0, seed=1) == sampler.sample(4, range(2000), 0, seed=1)
    assert sampler.sample(4, range(2000), 0, seed=1) != sampler.sample(5, range(2000), 0, seed=1)
    default_rate = registry.construct("sampler", {"name": "poisson"})
    assert default_rate.expected_cohort(1000, 100) == pytest.approx(100)


def test_weighted_sampler_prefers_large_clients():
    sampler = registry.construct("sampler", {"name": "weighted"})
    sizes = np.array([1] * 90 + [100] * 10)
    picks = np.concatenate([sampler.sample(r, range(100), 10, seed=0, sizes=sizes) for r in range(30)])
    assert np.mean(picks >= 90) > 0.6  # 10 of 100 clients hold 92% of the data


@pytest.mark.parametrize("config, key", [({"name": "poisson", "q": 1.5}, "'q'"),
                                         ({"name": "poisson", "q": 0}, "'q'"),
                                         ({"name": "uniformm"}, "uniform")])
def test_bad_sampler_config_names_the_key(config, key):
    with pytest.raises((registry.RegistryError, registry.ConfigTypeError), match=key):
        registry.construct("sampler", config)


# -- postprocessors -------------------------------------------------------------------------------
def _client_update(values, weight=2.0, rows=None):
    dense = {k: torch.tensor(v, dtype=torch.float32) * weight for k, v in values.items()}
    return WeightedUpdate(dense, rows or {}, weight, 1)


def _context(metrics=None):
    context = ClientContext.__new__(ClientContext)
    context.metrics = {} if metrics is None else metrics
    return context


def test_l2_clip_bounds_the_unweighted_delta_over_mlps_and_rows():
    clip = registry.construct("postprocessor", {"name": "l2_clip", "bound": 1.0})
    rows = {"t": RowUpdate(torch.tensor([3]), torch.tensor([[0.0, 8.0]]), torch.tensor([2.0], dtype=torch.float64))}
    update = _client_update({"w": [3.0, 0.0]}, weight=2.0, rows=rows)  # delta (3, 0) and row (0, 4): norm 5
    context = _context()
    out = clip.postprocess_client(update, context)
    assert math.sqrt(out.sq_norm()) / out.weight == pytest.approx(1.0)
    assert torch.allclose(out.dense["w"], torch.tensor([0.6, 0.0]) * 2)
    assert torch.allclose(out.rows["t"].values, torch.tensor([[0.0, 0.8]]) * 2)
    assert context.metrics == {"l2_clip_clipped": 1.0}
    small = clip.postprocess_client(_client_update({"w": [0.3, 0.4]}), context)
    assert torch.equal(small.dense["w"], torch.tensor([0.6, 0.8]))  # norm 0.5: untouched
    assert context.metrics == {"l2_clip_clipped": 1.0}


@pytest.mark.parametrize("config, key", [({"name": "l2_clip", "bound": 0}, "'bound'"),
                                         ({"name": "l2_clip"}, "bound"),
                                         ({"name": "l2_clipp", "bound": 1}, "l2_clip, norm_bound")])
def test_bad_postprocessor_config_names_the_key(config, key):
    with pytest.raises((registry.RegistryError, registry.ConfigTypeError, TypeError), match=key):
        registry.construct("postprocessor", config)


def test_clipping_in_a_simulation_counts_and_bounds_the_step(config, tmp_path):
    config["fl"].update({"num_rounds": 1, "postprocessors": [{"name": "l2_clip", "bound": 0.01}]})
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    before = {k: v.clone() for k, v in sim.global_state.items()}
    row = sim.run_round()
    sim.close()
    assert row["l2_clip_clipped"] == row["clients"]  # every update is longer than 0.01
    step = math.sqrt(sum(float((sim.global_state[k] - before[k]).pow(2).sum()) for k in before))
    assert step <= 0.01 + 1e-6  # a weighted mean of vectors of norm <= 0.01


# -- server optimizers against the papers' formulas ----------------------------------------------
def _reddi(method, deltas, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, in numpy: x += lr * m / (sqrt(v) + tau), v0 = tau^2."""
    x = np.zeros_like(deltas[0], dtype=np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau ** 2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if method == "adagrad":
            v = v + d * d
        elif method == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("algo, method, b1", [("fed_adam", "adam", 0.9), ("fed_yogi", "yogi", 0.9),
                                               ("fed_adagrad", "adagrad", 0.0)])
def test_adaptive_server_steps_match_reddi_et_al(algo, method, b1):
    cls = registry.lookup("fl_algo", algo)
    kwargs = {"server_lr": 0.1, "tau": 0.01} if algo == "fed_adagrad" else \
        {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}
    optimizer_config = cls(worker_index=0, roles=["trainer"], **kwargs).server_optimizer_config
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=6) * s for s in (1.0, 0.1, 3.0, 0.5)]
    x = torch.zeros(6, dtype=torch.float64)
    server = ServerOptimizer(optimizer_config, {"x": x})
    for d in deltas:
        server.step(WeightedUpdate({"x": torch.tensor(d) * 3.0}, {}, 3.0, 2))
    expected = _reddi(method, deltas, 0.1, b1, 0.99, 0.01)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_server_momentum_matches_hsu_et_al():
    x = torch.zeros(3, dtype=torch.float64)
    server = ServerOptimizer({"name": "sgd", "lr": 0.5, "momentum": 0.9}, {"x": x})
    deltas = [np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.2, 0.3]), np.array([-1.0, 0.0, 2.0])]
    v, expected = np.zeros(3), np.zeros(3)
    for d in deltas:
        server.step(WeightedUpdate({"x": torch.tensor(d)}, {}, 1.0, 1))
        v = 0.9 * v + d
        expected = expected + 0.5 * v
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-12)


def test_plain_sgd_server_step_is_fedavg_bit_for_bit_with_sparse_rows():
    state = {"w": torch.randn(4), "t": torch.randn(10, 2)}
    expected = {k: v.clone() for k, v in state.items()}
    rows = {"t": RowUpdate(torch.tensor([1, 7]), torch.randn(2, 2), torch.tensor([3.0, 3.0], dtype=torch.float64))}
    update = WeightedUpdate({"w": torch.randn(4)}, rows, 3.0, 2)
    copy.deepcopy(update).apply_mean_(expected)
    ServerOptimizer({"name": "sgd", "lr": 1.0}, state).step(update)
    assert_same_weights(state, expected)


@pytest.mark.parametrize("fl_algo, key", [({"name": "fed_prox", "mu": -0.1}, "mu"),
                                          ({"name": "fed_adam", "beta1": 1.0}, "beta1"),
                                          ({"name": "fed_yogi", "beta2": -0.1}, "beta2"),
                                          ({"name": "fed_adam", "tau": 0}, "tau"),
                                          ({"name": "fed_avgm", "server_momentum": 1}, "server_momentum"),
                                          ({"name": "scaffold", "server_lr": 0}, "server_lr"),
                                          ({"name": "fed_avg", "mu": 1}, "mu"),
                                          ({"name": "fed_avg", "server_optimizer": {"name": "adamm", "lr": 1}},
                                           "adam"),
                                          ({"name": "fed_avg", "server_optimizer": {"name": "sgd", "lr": -1}},
                                           "lr"),
                                          ({"name": "fedd_avg"}, "fed_prox")])
def test_bad_algorithm_config_is_a_one_line_error_before_round_one(config, tmp_path, capsys, fl_algo, key):
    import yaml

    from fedrec.cli import main

    config["fl"]["fl_algo"] = fl_algo
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["simulate", "--config", str(path), "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing written for a config that fails


def test_bad_local_optimizer_values_fail_before_round_one(config, tmp_path):
    config["fl"]["local_optimizer"] = {"name": "sgd", "lr": -1.0}
    with pytest.raises(Exception, match="lr"):
        Simulation(config, tmp_path, logger=MemoryLogger())


def test_models_algorithm_with_sparse_updates_is_refused(config, tmp_path):
    config["fl"].update({"fl_algo": {"name": "tutorial_fed_avg"}, "embedding_updates": "sparse",
                         "imports": ["tests.user_algorithms.tutorial_fedavg"]})
    with pytest.raises(Exception, match="whole client models"):
        Simulation(config, tmp_path, logger=MemoryLogger())


# -- the client state store -------------------------------------------------------------------------
def test_state_store_reads_the_newest_older_version_and_prunes(tmp_path):
    store = ClientStateStore(tmp_path)
    assert store.get(5, 0) == ({}, {})
    store.put(5, 0, {"a": torch.tensor([1.0])}, {"seen": 1}, checkpointed_round=0)
    store.put(5, 2, {"a": torch.tensor([2.0])}, {"seen": 2}, checkpointed_round=2)
    tensors, extra = store.get(5, 2)  # what round 2 reads: written before it
    assert torch.equal(tensors["a"], torch.tensor([1.0])) and extra == {"seen": 1}
    tensors, extra = store.get(5, 3)
    assert torch.equal(tensors["a"], torch.tensor([2.0])) and extra == {"seen": 2}
    store.put(5, 4, {"a": torch.tensor([4.0])}, checkpointed_round=3)
    # round 0's version is gone (round 2's is what a resume from round 3 reads)
    assert store.get(5, 1) == ({}, {})
    assert torch.equal(store.get(5, 3)[0]["a"], torch.tensor([2.0]))
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_state_store_files_are_plain_safetensors_and_written_lists_clients(tmp_path):
    from safetensors.torch import save_file

    from fedrec.federated.client_state import _EXTRA_KEY

    store = ClientStateStore(tmp_path / "store")
    assert not store.written(np.array([0, 1])).any()  # no folder at all yet
    tensors = {"f": torch.randn(2, 3), "d": torch.zeros(1, dtype=torch.float64), "i": torch.tensor(7),
               "e": torch.zeros(0, 4), "h": torch.randn(3).to(torch.bfloat16)}
    store.put(1234, 3, tensors, {"seen": 1})
    store.put(7, 0, {"f": torch.ones(1)})
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={_EXTRA_KEY: '{"seen": 1}'})
    written = tmp_path / "store" / "00001" / "1234" / "r000003.safetensors"
    assert written.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()  # what save_file writes
    got, extra = store.get(1234, 4)
    assert extra == {"seen": 1} and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert store.written(np.array([1234, 7, 8, 1235, 99999])).tolist() == [True, True, False, False, False]


# -- sums of row updates -------------------------------------------------------------------------
def test_block_sum_is_the_chain_of_adds_bit_for_bit():
    from fedrec.federated.update import BlockSum, sum_updates

    gen = torch.Generator().manual_seed(5)

    def client(k: int) -> WeightedUpdate:
        ids = torch.unique(torch.randint(0, 40, (12,), generator=gen))
        values = torch.randn(len(ids), 3, generator=gen) * 10.0 ** float(k % 5 - 2)  # mixed magnitudes
        rows = RowUpdate(ids, values, torch.rand(len(ids), generator=gen, dtype=torch.float64))
        return WeightedUpdate({"w": torch.randn(4, generator=gen)}, {"t": rows}, float(k + 1), 1)

    updates = [client(k) for k in range(9)]
    chain = WeightedUpdate()
    for update in updates:
        chain.add_(update)
    block = BlockSum()
    for update in [WeightedUpdate()] + updates:  # an update of no clients adds nothing
        block.add(update)
    for total in (block.result(), sum_updates(updates)):
        assert total.weight == chain.weight and total.num_clients == 9
        assert torch.equal(total.dense["w"], chain.dense["w"])
        for field in ("ids", "values", "row_weight"):
            assert torch.equal(getattr(total.rows["t"], field), getattr(chain.rows["t"], field)), field
    other = BlockSum()
    other.add(updates[0])
    with pytest.raises(ValueError, match="different parameters"):
        other.add(WeightedUpdate({"w": torch.zeros(4)}, {}, 1.0, 1))


# -- client hooks -----------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    """A linear layer and a sparse-gradient table, named like a model's parameters."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.emb = torch.nn.Embedding(6, 2, sparse=True)
        self.emb.sparse = True


def _tiny_context(model, start):
    context = ClientContext(round=RoundContext(0, 0), client_id=0, sample_num=4, model=model,
                            weights=dict(model.state_dict()), start=start, dense_names=["lin.weight", "lin.bias"],
                            touched_rows={}, local_lr=0.1)
    context.rows_of_client = lambda: {"emb.weight": torch.tensor([1, 4])}
    return context


def test_fedprox_objective_gradient_is_mu_times_the_drift_on_touched_rows():
    cls = registry.lookup("fl_algo", "fed_prox")
    model = _Tiny()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    worker = cls(worker_index=0, roles=["trainer"], mu=0.5)
    context = _tiny_context(model, start)
    worker.begin_local_training(context)
    worker.local_objective(torch.zeros(()), context).backward()
    assert torch.allclose(model.lin.weight.grad, 0.5 * (model.lin.weight - start["lin.weight"]))
    grad = model.emb.weight.grad.to_dense()
    drift = 0.5 * (model.emb.weight - start["emb.weight"])
    assert torch.allclose(grad[[1, 4]], drift[[1, 4]])
    assert torch.equal(grad[[0, 2, 3, 5]], torch.zeros(4, 2))  # untouched rows: no term


def test_fedprox_with_mu_zero_is_fedavg_and_mu_shrinks_the_step(config, tmp_path):
    config["fl"]["num_rounds"] = 1
    plain, _ = run(config, tmp_path / "avg")
    config["fl"]["fl_algo"] = {"name": "fed_prox", "mu": 0.0}
    prox0, _ = run(config, tmp_path / "prox0")
    assert_same_weights(plain.global_state, prox0.global_state)
    config["fl"]["fl_algo"] = {"name": "fed_prox", "mu": 5.0}
    prox, _ = run(config, tmp_path / "prox")
    start = Simulation(config, tmp_path / "start", logger=MemoryLogger())
    start.close()

    def step(sim):
        return sum(float((sim.global_state[k] - start.global_state[k]).pow(2).sum()) for k in start.global_state)

    assert step(prox) < 0.5 * step(plain)


def test_scaffold_first_round_is_fedavg_and_c_is_the_mean_control_update(config, tmp_path):
    config["fl"]["num_rounds"] = 1
    plain, _ = run(config, tmp_path / "avg")
    config["fl"]["fl_algo"] = {"name": "scaffold"}
    sim, history = run(config, tmp_path / "scaffold")
    assert_same_weights(plain.global_state, sim.global_state)  # c = c_i = 0 in round 1
    # c_i+ = (x - y_i) / (K lr) in round 1, and c = sum_i c_i+ / N
    store = sim.runner.store
    total = {}
    clients = [cid for cid in range(sim.fl.num_workers) if store.get(cid, 1)[0]]
    assert len(clients) == config["fl"]["client_num_per_round"]
    for cid in clients:
        state, _ = store.get(cid, 1)
        for name, value in state.items():
            if "@" not in name:
                total[name] = total.get(name, 0) + value
    name = "over_arch.mlp.layers.0.weight"
    assert torch.allclose(sim.aggregator.c[name], total[name] / sim.fl.num_workers, atol=1e-7)
    assert history[0]["bytes_up"] > plain.history[0]["bytes_up"]  # the control deltas travel too


@pytest.mark.parametrize("fl_algo", [{"name": "scaffold"}, {"name": "fed_adam", "server_lr": 0.01}])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_resume_is_exact_for_scaffold_and_a_server_optimizer(config, tmp_path, fl_algo, mode):
    config["fl"].update({"fl_algo": fl_algo, "embedding_updates": mode, "num_rounds": 3})
    full, full_history = run(config, tmp_path / "full")
    # round 3 runs (and writes client state) but is never checkpointed
    resumed, history = resumed_after(config, tmp_path / "cut", unsaved_rounds=1)
    assert_same_weights(full.global_state, resumed.global_state)
    assert without_timings(full_history[2:]) == without_timings(history)


def test_dense_and_sparse_modes_agree_for_scaffold_and_fedprox(config, tmp_path):
    for fl_algo in ({"name": "scaffold"}, {"name": "fed_prox", "mu": 0.5}):
        config["fl"].update({"fl_algo": fl_algo, "num_rounds": 2, "embedding_updates": "dense"})
        dense, _ = run(config, tmp_path / f"{fl_algo['name']}-dense")
        config["fl"]["embedding_updates"] = "sparse"
        sparse, _ = run(config, tmp_path / f"{fl_algo['name']}-sparse")
        for name in dense.global_state:
            assert torch.allclose(dense.global_state[name], sparse.global_state[name], atol=1e-6), name


def test_scaffold_client_follows_option_two_on_mlps_and_touched_rows():
    """Correction c - c_i in the gradient; c_i+ = c_i - c + (x - y) / (K lr); upload
    y - x (weighted) and c_i+ - c_i; the new c_i is stored (rows with their ids)."""
    from fedrec.federated.client_state import rows_of

    cls = registry.lookup("fl_algo", "scaffold")
    model = _Tiny()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_c = {k: torch.randn_like(v) for k, v in start.items()}
    context = _tiny_context(model, start)
    context.round.server_values = server_c
    old_lin = torch.randn_like(start["lin.weight"])
    context.state = {"lin.weight": old_lin, "emb.weight@ids": torch.tensor([4]),
                     "emb.weight@rows": torch.tensor([[1.0, 2.0]])}  # row 1: no stored c_i yet
    worker = cls(worker_index=0, roles=["trainer"], sample_num=4)
    worker.begin_local_training(context)
    worker.local_objective(torch.zeros(()), context).backward()
    assert torch.allclose(model.lin.weight.grad, server_c["lin.weight"] - old_lin)
    emb_grad = model.emb.weight.grad.to_dense()
    assert torch.allclose(emb_grad[4], server_c["emb.weight"][4] - torch.tensor([1.0, 2.0]))
    assert torch.allclose(emb_grad[1], server_c["emb.weight"][1])
    assert torch.equal(emb_grad[[0, 2, 3, 5]], torch.zeros(4, 2))

    with torch.no_grad():  # "train": K = 5 steps at lr 0.1 moved the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    from fedrec.trainers.base_trainer import LocalTrainResult

    context.train_result = LocalTrainResult(num_samples=20, num_steps=5, loss_sum=1.0)
    update = worker.client_update(context)
    expected_lin = old_lin - server_c["lin.weight"] + (start["lin.weight"] - model.lin.weight) / (5 * 0.1)
    control = update.aux["control"]
    assert control.weight == 1.0 and control.num_clients == 1
    assert torch.allclose(control.dense["lin.weight"], expected_lin - old_lin, atol=1e-6)
    assert torch.allclose(update.dense["lin.weight"], 4 * (model.lin.weight - start["lin.weight"]))
    ids, rows = rows_of(context.new_state, "emb.weight")
    assert torch.equal(ids, torch.tensor([1, 4]))
    drift = (start["emb.weight"] - model.emb.weight)[[1, 4]] / 0.5
    stored = torch.stack([torch.zeros(2), torch.tensor([1.0, 2.0])])
    assert torch.allclose(rows, stored - server_c["emb.weight"][[1, 4]] + drift, atol=1e-6)
    assert torch.allclose(context.new_state["lin.weight"], expected_lin, atol=1e-6)


def test_a_fresh_run_in_a_used_logdir_does_not_read_the_earlier_runs_client_state(config, tmp_path):
    from fedrec.federated.run import run_simulation
    from fedrec.utilities.checkpoint import CheckpointManager

    config["fl"].update({"fl_algo": {"name": "scaffold"}, "num_rounds": 2})
    run_simulation(config, tmp_path / "clean", print_rounds=False)
    other = copy.deepcopy(config)
    other["fl"]["local_lr"] = 0.05  # an earlier, different run in the same logdir
    run_simulation(other, tmp_path / "used", print_rounds=False)
    run_simulation(config, tmp_path / "used", print_rounds=False)
    assert list((tmp_path / "used" / "previous").glob("*/client_state"))
    clean = CheckpointManager.load(CheckpointManager(tmp_path / "clean" / "checkpoints").latest())["global"]
    used = CheckpointManager.load(CheckpointManager(tmp_path / "used" / "checkpoints").latest())["global"]
    assert_same_weights(clean, used)
