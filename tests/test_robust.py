"""Robust aggregators (median, trimmed mean, Krum / Multi-Krum) and simulated attacks.

The maths on toy clients worked out by hand and against independent numpy / scipy
implementations; sparse rows against dense tables; the aggregators in simulations (dense
and sparse, resume); bad hyper-parameters through the CLI; attacks chosen by seed, and
robust aggregation against sign-flipping clients measured as distance to the honest mean.
"""

from __future__ import annotations

import copy
import math
import types
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import trim_mean

from fedrec.federated.attacks import build_attack
from fedrec.federated.client_runner import RoundJob
from fedrec.federated.context import RoundContext
from fedrec.federated.postprocessors import NormBound
from fedrec.federated.robust import (
    KrumWorker,
    MedianWorker,
    TrimmedMeanWorker,
    coordinate_median,
    krum_select,
    pairwise_sq_distances,
    trimmed_mean,
    unit_delta,
)
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import RowUpdate, WeightedUpdate, sum_updates
from fedrec.federated_worker import Cohort
from tests.test_fl_simulation import resumed_after, run
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError
from fedrec.utilities.logger import MemoryLogger


# -- toy updates ------------------------------------------------------------------------------
def dense_update(values: Dict[str, Sequence], weight: float = 1.0) -> WeightedUpdate:
    """One client's update from plain deltas, weighted as a client uploads it."""
    dense = {k: torch.tensor(v, dtype=torch.float32) * weight for k, v in values.items()}
    return WeightedUpdate(dense, {}, float(weight), 1)


def row_update(rows: Dict[int, Sequence[float]], dense: Sequence[float] = (0.0,), weight: float = 1.0
               ) -> WeightedUpdate:
    """A sparse-mode update: table ``t`` as the rows sent, plus a dense parameter ``w``."""
    ids = torch.tensor(sorted(rows), dtype=torch.int64)
    values = torch.tensor([rows[i] for i in sorted(rows)], dtype=torch.float32).reshape(len(rows), -1)
    return WeightedUpdate({"w": torch.tensor(dense) * weight},
                          {"t": RowUpdate(ids, values * weight, torch.full((len(rows),), weight, dtype=torch.float64))},
                          float(weight), 1)


def as_dense_table(update: WeightedUpdate, num_rows: int) -> WeightedUpdate:
    """The same update as dense mode sends it: the table whole, untouched rows zero."""
    rows = update.rows["t"]
    table = torch.zeros((num_rows, rows.values.shape[1]))
    table[rows.ids] = rows.values
    return WeightedUpdate({**update.dense, "t": table}, {}, update.weight, 1)


def flat(update: WeightedUpdate, like: Dict[str, torch.Tensor], per_row: bool = False) -> torch.Tensor:
    delta = update.mean_delta(like, per_row=per_row)
    return torch.cat([delta[k].reshape(-1).double() for k in sorted(delta)])


# -- coordinate-wise median ---------------------------------------------------------------------
def test_median_by_hand_odd_and_even_cohorts():
    clients = [dense_update({"w": [1.0, 5.0, -2.0]}), dense_update({"w": [2.0, -1.0, 0.0]}),
               dense_update({"w": [10.0, 0.0, 1.0]})]
    assert coordinate_median(clients).dense["w"].tolist() == [2.0, 0.0, 0.0]
    clients.append(dense_update({"w": [3.0, 4.0, 7.0]}))
    # even count: the mean of the two middle values (np.median's convention)
    assert coordinate_median(clients).dense["w"].tolist() == [2.5, 2.0, 0.5]
    result = coordinate_median(clients)
    assert result.weight == 1.0 and result.num_clients == 1


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_median_matches_numpy(n):
    gen = torch.Generator().manual_seed(n)
    clients = [dense_update({"a": torch.randn(6, 3, generator=gen).tolist(), "b": torch.randn(4, generator=gen).tolist()})
               for _ in range(n)]
    result = coordinate_median(clients)
    for name in ("a", "b"):
        expected = np.median(np.stack([c.dense[name].numpy() for c in clients]), axis=0)
        np.testing.assert_allclose(result.dense[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_median_of_sparse_rows_is_per_row_over_the_senders_by_hand():
    # table t of 4 rows x 1; client 0 sends rows 0, 1; client 1 rows 0, 2; client 2 rows 0, 1, 3
    clients = [row_update({0: [1.0], 1: [5.0]}, dense=[1.0]), row_update({0: [3.0], 2: [7.0]}, dense=[4.0]),
               row_update({0: [2.0], 1: [9.0], 3: [-4.0]}, dense=[2.0])]
    sparse = coordinate_median(clients)
    assert sparse.rows["t"].ids.tolist() == [0, 1, 2, 3]
    # row 0: median(1, 3, 2) = 2; row 1: median(5, 9) = 7; row 2: 7 (one sender); row 3: -4
    assert sparse.rows["t"].values.flatten().tolist() == [2.0, 7.0, 7.0, -4.0]
    assert sparse.rows["t"].row_weight.tolist() == [1.0, 1.0, 1.0, 1.0]
    # dense mode counts a client's untouched row as a zero vote: row 1 = median(5, 0, 9) = 5,
    # row 2 = median(0, 7, 0) = 0; rows sent by every client and the dense parameter agree
    dense = coordinate_median([as_dense_table(c, 4) for c in clients])
    assert dense.dense["t"].flatten().tolist() == [2.0, 5.0, 0.0, 0.0]
    assert torch.equal(dense.dense["w"], sparse.dense["w"]) and sparse.dense["w"].tolist() == [2.0]


def test_median_of_rows_matches_numpy_per_row():
    gen = torch.Generator().manual_seed(3)
    clients = []
    for _ in range(5):
        ids = torch.unique(torch.randint(0, 30, (15,), generator=gen))
        clients.append(row_update({int(i): torch.randn(4, generator=gen).tolist() for i in ids}))
    result = coordinate_median(clients)
    for position, row in enumerate(result.rows["t"].ids.tolist()):
        sent = np.stack([c.rows["t"].values[c.rows["t"].ids == row].numpy()[0] for c in clients
                         if bool((c.rows["t"].ids == row).any())])
        np.testing.assert_allclose(result.rows["t"].values[position].numpy(), np.median(sent, axis=0), rtol=1e-6)
        np.testing.assert_allclose(trimmed_mean(clients, 0.25).rows["t"].values[position].numpy(),
                                   trim_mean(sent, 0.25, axis=0), rtol=1e-5, atol=1e-6)


# -- trimmed mean -------------------------------------------------------------------------------
def test_trimmed_mean_by_hand():
    clients = [dense_update({"w": [v, -v]}) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    # floor(0.2 * 5) = 1 value cut at each end: mean(2, 3, 4) = 3
    assert trimmed_mean(clients, 0.2).dense["w"].tolist() == [3.0, -3.0]
    # floor(0.1 * 5) = 0: the plain mean, 22
    assert trimmed_mean(clients, 0.1).dense["w"].tolist() == [22.0, -22.0]
    # floor(0.4 * 5) = 2: the median, 3
    assert trimmed_mean(clients, 0.4).dense["w"].tolist() == [3.0, -3.0]
    # rows: row 0 from three clients (floor(0.34 * 3) = 1 cut: the middle, 2), row 1 from two (none cut)
    rows = [row_update({0: [1.0], 1: [5.0]}), row_update({0: [3.0]}), row_update({0: [2.0], 1: [9.0]})]
    assert trimmed_mean(rows, 0.34).rows["t"].values.flatten().tolist() == [2.0, 7.0]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.25, 0.4, 0.49])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_trimmed_mean_matches_scipy(n, fraction):
    gen = torch.Generator().manual_seed(10 * n)
    clients = [dense_update({"a": torch.randn(5, 3, generator=gen).tolist()}) for _ in range(n)]
    expected = trim_mean(np.stack([c.dense["a"].numpy() for c in clients]).astype(np.float64), fraction, axis=0)
    np.testing.assert_allclose(trimmed_mean(clients, fraction).dense["a"].numpy(), expected, rtol=1e-5, atol=1e-6)


# -- Krum -----------------------------------------------------------------------------------------
def test_krum_by_hand():
    # points 0, 1, 2, 3 and an attacker at 100; f = 1: each score sums the n - f - 2 = 2
    # smallest squared distances to the others: 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2,
    # 2 -> 1 + 1 = 2, 3 -> 1 + 4 = 5, 100 -> 97^2 + 98^2
    clients = [dense_update({"w": [x]}) for x in (0.0, 1.0, 2.0, 3.0, 100.0)]
    assert pairwise_sq_distances(clients)[0].tolist() == [0.0, 1.0, 4.0, 9.0, 10000.0]
    assert krum_select(clients, 1) == [1]  # tie 1 / 2: the lower position
    assert krum_select(clients, 1, multi_krum=2) == [1, 2]  # Multi-Krum averages 1 and 2
    assert krum_select(clients, 1, multi_krum=3) == [0, 1, 2]  # tie 0 / 3: the lower
    assert sum_updates(clients[i] for i in krum_select(clients, 1, 2)).mean_delta(
        {"w": torch.zeros(1)})["w"].tolist() == [1.5]


def numpy_krum(points: np.ndarray, f: int, m: int) -> List[int]:
    """Blanchard et al. (2017), straight from the paper: scores by explicit distances."""
    n = len(points)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((points[i] - points[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[:n - f - 2]))
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])


@pytest.mark.parametrize("n,f,m", [(5, 1, 1), (5, 1, 3), (7, 2, 1), (7, 2, 4), (4, 0, 2)])
def test_krum_matches_numpy_on_dense_and_sparse_updates(n, f, m):
    gen = torch.Generator().manual_seed(n * 10 + f)
    clients = []
    for i in range(n):
        ids = torch.unique(torch.randint(0, 12, (6,), generator=gen))
        scale = 5.0 if i < f else 1.0  # the first f clients are outliers
        clients.append(row_update({int(r): (scale * torch.randn(3, generator=gen)).tolist() for r in ids},
                                  dense=(scale * torch.randn(4, generator=gen)).tolist()))
    dense = [as_dense_table(c, 12) for c in clients]
    points = np.stack([np.concatenate([c.dense["w"].numpy(), c.dense["t"].numpy().ravel()])
                       for c in dense]).astype(np.float64)
    expected = numpy_krum(points, f, m)
    assert krum_select(dense, f, m) == expected
    assert krum_select(clients, f, m) == expected  # a missing row is a zero delta
    reference = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_sq_distances(clients).numpy(), reference, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pairwise_sq_distances(dense).numpy(), reference, rtol=1e-9, atol=1e-9)


def test_multi_krum_averages_rows_like_fed_avg_by_hand():
    clients = [row_update({0: [2.0]}, dense=[1.0]), row_update({0: [4.0], 1: [6.0]}, dense=[3.0])]
    chosen = sum_updates(clients)
    like = {"w": torch.zeros(1), "t": torch.zeros(2, 1)}
    # dense_equivalent: row 1 over both chosen clients (6 / 2); per_row: over its one sender
    assert chosen.mean_delta(like)["t"].flatten().tolist() == [3.0, 3.0]
    assert chosen.mean_delta(like, per_row=True)["t"].flatten().tolist() == [3.0, 6.0]


def test_krum_refuses_a_cohort_too_small_for_f():
    with pytest.raises(ValueError, match=r"fl.fl_algo.num_byzantine = 3 is too large for a cohort of 8 clients "
                                         r"\(fl.client_num_per_round\).*num_byzantine <= 2"):
        KrumWorker(worker_index=0, roles=["aggregator"], client_num_per_round=8, num_byzantine=3)
    with pytest.raises(ValueError, match=r"fl.fl_algo.multi_krum = 9 exceeds a cohort of 8"):
        KrumWorker(worker_index=0, roles=["aggregator"], client_num_per_round=8, multi_krum=9)
    KrumWorker(worker_index=0, roles=["aggregator"], client_num_per_round=9, num_byzantine=3, multi_krum=9)
    with pytest.raises(ValueError, match="too large for a cohort of 2 clients"):
        krum_select([dense_update({"w": [0.0]})] * 2, 0)


# -- the aggregators' server step -------------------------------------------------------------------
class ToyRuntime:
    """The aggregator's runtime reduced to what ``aggregate`` uses."""

    def __init__(self, state: Dict[str, torch.Tensor], per_row: bool = False) -> None:
        self.state, self.per_row_embeddings, self.seed = state, per_row, 0

    def get_model(self, worker):
        return self.state

    def update_model(self, worker, weights):
        pass


def aggregator(cls, state, per_row=False, **kwargs):
    return cls(worker_index=99, roles=["aggregator"], runtime=ToyRuntime(state, per_row), **kwargs)


def test_every_client_has_one_vote_whatever_its_weight():
    # plain deltas 1, 2, 30 with sample weights 100, 1, 1: the median is 2 (FedAvg: ~1.3)
    cohort = Cohort(updates={0: dense_update({"w": [1.0]}, 100), 1: dense_update({"w": [2.0]}, 1),
                             2: dense_update({"w": [30.0]}, 1)})
    state = {"w": torch.tensor([10.0])}
    assert aggregator(MedianWorker, state).aggregate(cohort)["w"].tolist() == [12.0]
    state = {"w": torch.tensor([10.0])}
    assert aggregator(TrimmedMeanWorker, state, trim_fraction=0.34).aggregate(cohort)["w"].tolist() == [12.0]
    # Krum, f = 0: scores 1, 1, 28^2 (one nearest neighbour); the tie goes to client 0
    state = {"w": torch.tensor([10.0])}
    assert aggregator(KrumWorker, state, num_byzantine=0).aggregate(cohort)["w"].tolist() == [11.0]


def test_server_optimizer_applies_to_the_robust_combination():
    cohort = Cohort(updates={i: dense_update({"w": [v]}, 3) for i, v in enumerate((1.0, 2.0, 4.0))})
    state = {"w": torch.tensor([0.0])}
    worker = aggregator(MedianWorker, state, server_optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9})
    worker.aggregate(cohort)
    assert state["w"].tolist() == [1.0]  # 0.5 * median 2
    worker.aggregate(cohort)
    assert state["w"].tolist() == pytest.approx([1.0 + 0.5 * (0.9 * 2 + 2)])  # momentum buffer carried
    assert "server_optimizer" in worker.state_dict()


def test_sparse_rows_reach_the_global_table():
    state = {"w": torch.zeros(1), "t": torch.zeros(4, 1)}
    cohort = Cohort(updates={0: row_update({0: [1.0], 1: [5.0]}, weight=2), 1: row_update({0: [3.0], 2: [7.0]}, weight=5),
                             2: row_update({0: [2.0], 1: [9.0], 3: [-4.0]}, weight=1)})
    aggregator(MedianWorker, state).aggregate(cohort)
    assert state["t"].flatten().tolist() == pytest.approx([2.0, 7.0, 7.0, -4.0])
    # Multi-Krum of all three: the rows' mean over the three (dense_equivalent) or per row
    for per_row, expected in ((False, [2.0, 14 / 3, 7 / 3, -4 / 3]), (True, [2.0, 7.0, 7.0, -4.0])):
        state = {"w": torch.zeros(1), "t": torch.zeros(4, 1)}
        aggregator(KrumWorker, state, per_row=per_row, multi_krum=3).aggregate(cohort)
        assert state["t"].flatten().tolist() == pytest.approx(expected)


def test_an_empty_cohort_leaves_the_model_alone():
    state = {"w": torch.tensor([1.0])}
    for cls in (MedianWorker, TrimmedMeanWorker, KrumWorker):
        assert aggregator(cls, state).aggregate(Cohort())["w"].tolist() == [1.0]


def test_krum_names_the_round_when_a_sampled_cohort_is_too_small():
    worker = aggregator(KrumWorker, {"w": torch.zeros(1)}, client_num_per_round=10, num_byzantine=2)
    worker.round_idx = 4
    cohort = Cohort(updates={i: dense_update({"w": [float(i)]}) for i in range(5)})
    with pytest.raises(ConfigError, match=r"num_byzantine = 2 is too large for a cohort of 5 clients \(round 4"):
        worker.aggregate(cohort)


# -- in simulations -------------------------------------------------------------------------------
ALGOS = [{"name": "median"}, {"name": "trimmed_mean", "trim_fraction": 0.2},
         {"name": "krum", "num_byzantine": 2, "multi_krum": 3}]


@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: a["name"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_robust_aggregators_run_end_to_end(config, tmp_path, algo, mode):
    config["fl"].update({"fl_algo": algo, "embedding_updates": mode, "num_rounds": 2})
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    initial = {k: v.clone() for k, v in sim.global_state.items()}
    try:
        history = sim.run()
    finally:
        sim.close()
    assert len(history) == 2 and all(0.0 <= row["roc_auc"] <= 1.0 for row in history)
    assert history[0]["clients"] == config["fl"]["client_num_per_round"]
    moved = [n for n, v in sim.global_state.items() if not torch.equal(v, initial[n])]
    assert "over_arch.mlp.layers.0.weight" in moved and any("tables" in n for n in moved)


def cohort_updates(config, logdir, clients) -> Dict[int, WeightedUpdate]:
    """Every client's upload in round 0 (what the aggregator's cohort holds)."""
    sim = Simulation(config, logdir, logger=MemoryLogger())
    result = sim.runner.run_job(RoundJob(RoundContext(0, config["fl"]["seed"]), [(0, clients)], sim.global_state))
    sim.close()
    return dict(result.updates)


def test_dense_and_sparse_modes_agree_where_they_should(config, tmp_path):
    """Median: dense parameters bit for bit, table rows every client sent bit for bit
    (a row fewer clients sent is per row over its senders in sparse mode). Krum: the same
    distances (up to float order), so the same choice and the same update."""
    clients = [1, 4, 9, 17, 22, 30, 35]
    config["fl"]["fl_algo"] = {"name": "median"}
    dense = [unit_delta(u) for u in cohort_updates(copy.deepcopy(config), tmp_path / "d", clients).values()]
    config["fl"]["embedding_updates"] = "sparse"
    sparse = [unit_delta(u) for u in cohort_updates(config, tmp_path / "s", clients).values()]
    assert sparse[0].rows and set(sparse[0].dense) < set(dense[0].dense)

    dense_median, sparse_median = coordinate_median(dense), coordinate_median(sparse)
    for name, value in sparse_median.dense.items():
        assert torch.equal(value, dense_median.dense[name]), name
    shared_rows = 0
    for name, rows in sparse_median.rows.items():
        senders = torch.zeros(dense_median.dense[name].shape[0], dtype=torch.int64)
        for update in sparse:
            senders[update.rows[name].ids] += 1
        everyone = senders[rows.ids] == len(clients)
        shared_rows += int(everyone.sum())
        assert torch.equal(rows.values[everyone], dense_median.dense[name][rows.ids[everyone]]), name
    assert shared_rows > 0

    torch.testing.assert_close(pairwise_sq_distances(sparse), pairwise_sq_distances(dense), rtol=1e-9, atol=1e-12)
    assert krum_select(sparse, 2, 2) == krum_select(dense, 2, 2)


def test_resume_of_a_robust_aggregator_with_server_momentum_is_exact(config, tmp_path):
    config["fl"].update({"num_rounds": 3, "embedding_updates": "sparse",
                         "fl_algo": {"name": "median", "server_optimizer": {"name": "sgd", "lr": 1.0, "momentum": 0.9}}})
    full, full_history = run(copy.deepcopy(config), tmp_path / "full")
    resumed, rest = resumed_after(config, tmp_path / "cut")
    for name, value in full.global_state.items():
        assert torch.equal(resumed.global_state[name], value), name
    assert rest[0]["roc_auc"] == full_history[2]["roc_auc"]


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,needle", [
    ({"name": "trimmed_mean", "trim_fraction": 0.5}, "'trim_fraction'"),
    ({"name": "trimmed_mean", "trim_fraction": -0.1}, "'trim_fraction'"),
    ({"name": "krum", "num_byzantine": -1}, "'num_byzantine'"),
    ({"name": "krum", "multi_krum": 0}, "'multi_krum'"),
    ({"name": "krum", "num_byzantine": 3}, "fl.fl_algo.num_byzantine = 3 is too large for a cohort of 8 clients"),
    ({"name": "krum", "multi_krum": 9}, "fl.fl_algo.multi_krum = 9"),
    ({"name": "median", "trim_fraction": 0.1}, "does not take config key(s) ['trim_fraction']"),
    ({"name": "medain"}, "known fl_algo names: "),
])
def test_bad_hyper_parameters_fail_before_round_1_and_write_nothing(config, tmp_path, capsys, algo, needle):
    from fedrec.cli import main

    config["fl"]["fl_algo"] = algo
    config_file = tmp_path / "c.yml"
    config_file.write_text(yaml.safe_dump(config))
    logdir = tmp_path / "run"
    assert main(["simulate", "--config", str(config_file), "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedrec simulate: error: ") and needle in err, err
    assert not logdir.exists()


def test_bad_hyper_parameters_fail_when_the_simulation_is_built(config, tmp_path):
    config["fl"]["fl_algo"] = {"name": "krum", "num_byzantine": 3}
    with pytest.raises(ConfigError, match="num_byzantine = 3 is too large for a cohort of 8"):
        Simulation(config, tmp_path)
    config["fl"]["fl_algo"] = {"name": "trimmed_mean", "trim_fraction": 0.5}
    with pytest.raises(registry.ConfigTypeError, match="'trim_fraction'"):
        Simulation(config, tmp_path)


# -- attacks ------------------------------------------------------------------------------------------
def test_malicious_clients_are_fixed_by_seed_and_fraction():
    first = build_attack({"name": "sign_flip", "fraction": 0.1}, 1000, seed=0)
    again = build_attack({"name": "label_flip", "fraction": 0.1}, 1000, seed=0)
    assert int(first.malicious.sum()) == 100
    assert np.array_equal(first.malicious, again.malicious)  # the same clients, whatever the attack
    other_seed = build_attack({"name": "sign_flip", "fraction": 0.1}, 1000, seed=1)
    assert not np.array_equal(first.malicious, other_seed.malicious)
    assert int(build_attack({"name": "scale", "fraction": 0.25}, 1000, seed=0).malicious.sum()) == 250
    assert int(build_attack({"name": "sign_flip", "fraction": 0.0}, 1000, seed=0).malicious.sum()) == 0
    assert build_attack(None, 1000, seed=0) is None
    with pytest.raises(registry.ConfigTypeError, match="'fraction'"):
        build_attack({"name": "sign_flip", "fraction": 1.0}, 10, seed=0)


def test_the_runner_uses_the_seeded_malicious_set(config, tmp_path):
    config["fl"].update({"attack": {"name": "sign_flip", "fraction": 0.2}, "seed": 5})
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    sim.close()
    expected = build_attack({"name": "sign_flip", "fraction": 0.2}, config["fl"]["num_workers"], seed=5)
    assert np.array_equal(sim.runner.attack.malicious, expected.malicious) and int(expected.malicious.sum()) == 8


def test_label_flip_flips_every_label(config, tmp_path):
    config["fl"]["attack"] = {"name": "label_flip", "fraction": 0.5}
    sim = Simulation(config, tmp_path, logger=MemoryLogger())
    sim.close()
    cid = max(np.flatnonzero(sim.runner.attack.malicious), key=lambda c: len(sim.partition.indices_of(int(c))))
    cid = int(cid)
    indices = sim.partition.indices_of(cid)
    honest = list(sim.trainer.client_loader(indices, 16, seed=3))
    flipped = list(sim.runner.attack.poison_data(sim.trainer.client_loader(indices, 16, seed=3)))
    assert len(flipped) == len(honest) > 0
    for a, b in zip(honest, flipped):
        assert torch.equal(b.label, 1.0 - a.label) and torch.equal(a.dense, b.dense)
    assert any(bool(b.label.any()) and not bool(b.label.all()) for b in flipped)


def test_sign_flip_uploads_the_negated_honest_update(config, tmp_path):
    clients = list(range(config["fl"]["num_workers"]))
    config["fl"]["fl_algo"] = {"name": "median"}
    honest = cohort_updates(copy.deepcopy(config), tmp_path / "h", clients)
    config["fl"]["attack"] = {"name": "sign_flip", "fraction": 0.2, "scale": 3.0}
    attacked = cohort_updates(config, tmp_path / "a", clients)
    malicious = build_attack(config["fl"]["attack"], len(clients), config["fl"]["seed"]).malicious
    for cid in clients:
        for name, value in honest[cid].dense.items():
            expected = value * -3.0 if malicious[cid] else value
            assert torch.equal(attacked[cid].dense[name], expected), (cid, name)


def _toy_cohort(honest: int, malicious: int, scale: float, dim: int = 50, seed: int = 0):
    """Honest deltas around a common direction; malicious ones their ``-scale`` flip."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=gen)
    plain = [direction + 0.1 * torch.randn(dim, generator=gen) for _ in range(honest + malicious)]
    weights = [float(w) for w in torch.randint(20, 200, (len(plain),), generator=gen)]
    updates = [dense_update({"w": (-scale * p if i >= honest else p).tolist()}, w)
               for i, (p, w) in enumerate(zip(plain, weights))]
    honest_mean = sum_updates(updates[:honest]).mean_delta({"w": torch.zeros(dim)})["w"]
    return updates, honest_mean


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_sign_flip_hurts_fed_avg_and_robust_aggregation_resists_it(scale):
    """4 of 22 toy clients flip their delta (times ``scale``). FedAvg lands far from the
    honest clients' mean; median, trimmed mean and (Multi-)Krum land within a fifth of
    its length. Norm bounding limits the damage of a scaled flip to about one honest
    update each (a flip at scale 1 is as long as an honest update, so it cannot help)."""
    updates, honest_mean = _toy_cohort(honest=18, malicious=4, scale=scale)
    like = {"w": torch.zeros_like(honest_mean)}
    reference = float(honest_mean.norm())

    def distance(update: WeightedUpdate) -> float:
        return float((update.mean_delta(like)["w"] - honest_mean).norm()) / reference

    fed_avg = distance(sum_updates(updates))
    deltas = [unit_delta(u) for u in updates]
    robust = {
        "median": distance(coordinate_median(deltas)),
        "trimmed_mean": distance(trimmed_mean(deltas, 0.2)),
        "krum": distance(sum_updates(deltas[i] for i in krum_select(deltas, 4, 1))),
        "multi_krum": distance(sum_updates(deltas[i] for i in krum_select(deltas, 4, 10))),
    }
    assert fed_avg > (0.2 if scale == 1.0 else 1.0)
    for name, value in robust.items():
        assert value < 0.2 and value < fed_avg / 2, (name, value, fed_avg)
    clipped = [NormBound(bound=1.1 * reference).postprocess_client(copy.deepcopy(u), types.SimpleNamespace(metrics={}))
               for u in updates]
    norm_bound = distance(sum_updates(clipped))
    if scale > 1.0:
        assert norm_bound < fed_avg / 3, (norm_bound, fed_avg)
    else:
        assert norm_bound == pytest.approx(fed_avg, rel=0.05)


def test_robust_aggregators_resist_sign_flip_on_the_small_config(config, tmp_path):
    """Real client updates from one round: 8 of 40 clients sign-flip at scale 10. Each
    defence's step stays much closer to the honest clients' FedAvg step than FedAvg's."""
    clients = list(range(config["fl"]["num_workers"]))
    attack = {"name": "sign_flip", "fraction": 0.2, "scale": 10.0}
    config["fl"].update({"client_num_per_round": len(clients), "fl_algo": {"name": "median"}})
    honest_run = cohort_updates(copy.deepcopy(config), tmp_path / "h", clients)
    attacked = cohort_updates({**config, "fl": {**config["fl"], "attack": attack}}, tmp_path / "a", clients)
    malicious = build_attack(attack, len(clients), config["fl"]["seed"]).malicious
    sim = Simulation(config, tmp_path / "like", logger=MemoryLogger())
    like = {k: torch.zeros_like(v) for k, v in sim.global_state.items()}
    sim.close()

    honest = flat(sum_updates(honest_run[c] for c in clients if not malicious[c]), like)

    def distance(update: WeightedUpdate) -> float:
        return float((flat(update, like) - honest).norm())

    norms = sorted(math.sqrt(u.sq_norm()) / u.weight for u in honest_run.values())
    bounded = {**config["fl"], "fl_algo": {"name": "fed_avg"}, "attack": attack,
               "postprocessors": [{"name": "norm_bound", "bound": norms[len(norms) // 2]}]}
    sim = Simulation({**config, "fl": bounded}, tmp_path / "nb", logger=MemoryLogger())
    norm_bound = sim.runner.run_job(RoundJob(RoundContext(0, 0), [(0, clients)], sim.global_state))
    sim.close()

    fed_avg = distance(sum_updates(attacked[c] for c in clients))
    deltas = [unit_delta(attacked[c]) for c in clients]
    defended = {
        "median": distance(coordinate_median(deltas)),
        "trimmed_mean": distance(trimmed_mean(deltas, 0.2)),
        "krum": distance(sum_updates(deltas[i] for i in krum_select(deltas, 8, 10))),
        "norm_bound": distance(norm_bound.block_updates[0][1]),
    }
    assert fed_avg > float(honest.norm())  # FedAvg moved further off than the whole honest step
    for name, value in defended.items():
        assert value < fed_avg / 2, (name, value, fed_avg)
