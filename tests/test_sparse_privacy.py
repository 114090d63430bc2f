"""Sparsity-preserving DP for embedding rows (``dp_adafest``) and DP's no-noise limit.

Epsilon is recomputed from ``dp-accounting`` with the two Gaussian mechanisms composed
as the library sees them (not through our effective noise multiplier); the selection's
probabilities are checked against the Gaussian tail; bytes against the plain sparse run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.sparse_privacy import split_noise
from fedrec.federated.update import RowUpdate, WeightedUpdate
from fedrec.utilities import registry

from run_helpers import assert_simulate_refuses
from test_fl_simulation import run

ADAFEST = {"name": "dp_adafest", "clip_norm": 0.5, "noise_multiplier": 1.0, "contribution_clip": 2.0}


def sparse_dp_config(config, **dp):
    config["fl"].update({"sampler": {"name": "poisson"}, "embedding_updates": "sparse",
                         "postprocessors": [{**ADAFEST, **dp}], "num_rounds": 2})
    return config


def mechanism(tables=None, **kwargs):
    from fedrec.federated.config import FLConfig

    fl = FLConfig(num_workers=1000, client_num_per_round=50, num_rounds=10, sampler={"name": "poisson"},
                  embedding_updates="sparse")
    dp = registry.construct("postprocessor", {**ADAFEST, **kwargs})
    dp.bind_tables(tables or {"t": 1_000_000})
    dp.setup(fl, registry.construct("sampler", fl.sampler), sparse=True)
    return dp


def _client(cid, rows, dim=4, weight=1.0, dense=None):
    """One client's update: ``rows`` {table: ids}, values 1 (times weight)."""
    row_updates = {name: RowUpdate(torch.tensor(sorted(ids), dtype=torch.int64),
                                   torch.full((len(ids), dim), weight, dtype=torch.float64),
                                   torch.full((len(ids),), weight, dtype=torch.float64))
                   for name, ids in rows.items()}
    dense = {"w": torch.zeros(3, dtype=torch.float64)} if dense is None else dense
    update = WeightedUpdate(dense, row_updates, weight, 1)
    context = ClientContext.__new__(ClientContext)
    context.metrics, context.client_id, context.round = {}, cid, RoundContext(0, 0)
    return update, context


def test_noise_split_keeps_the_effective_noise_multiplier():
    for z, ratio in [(1.0, 1.0), (0.7, 3.0), (2.5, 0.2)]:
        z1, z2 = split_noise(z, ratio)
        assert z1 / z2 == pytest.approx(ratio)
        assert (z1 ** -2 + z2 ** -2) ** -0.5 == pytest.approx(z)


def test_epsilon_is_the_two_composed_gaussians_of_dp_accounting(config, tmp_path):
    import dp_accounting
    from dp_accounting import rdp

    _, history = run(sparse_dp_config(config, selection_noise_ratio=2.0), tmp_path)
    q = config["fl"]["client_num_per_round"] / config["fl"]["num_workers"]
    z1, z2 = split_noise(1.0, 2.0)
    for row in history:
        accountant = rdp.RdpAccountant()
        both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z1), dp_accounting.GaussianDpEvent(z2)])
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, both), row["round"])
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1 / config["fl"]["num_workers"]), rel=1e-9)
        assert row["dp_noise_std"] == pytest.approx(z2 * 0.5)
        assert row["dp_count_noise_std"] == pytest.approx(z1 * 2.0)


def test_adaptive_clipping_splits_one_noise_multiplier_three_ways(config, tmp_path):
    """Clip-norm count, row selection and updates: z^-2 = z1^-2 + z2^-2 + (2 sigma_b)^-2,
    so epsilon is dp_gaussian's for the same z; the clip norm moves round by round."""
    adaptive = {"target_quantile": 0.5, "learning_rate": 0.5, "clipped_count_stddev": 2.0}
    dp = mechanism(adaptive_clipping=adaptive, noise_multiplier=1.5)
    z1, z2 = dp.selection_noise_multiplier, dp.update_noise_multiplier
    assert z1 ** -2 + z2 ** -2 + 4.0 ** -2 == pytest.approx(1.5 ** -2)
    fixed = mechanism(noise_multiplier=1.5)
    assert dp.epsilon_after(10) == fixed.epsilon_after(10)  # the same one Gaussian per round
    _, history = run(sparse_dp_config(config, adaptive_clipping=adaptive, noise_multiplier=0.5), tmp_path)
    assert history[0]["dp_clip_norm"] == 0.5 and history[1]["dp_clip_norm"] != 0.5
    assert history[1]["dp_noise_std"] == pytest.approx(
        split_noise((0.5 ** -2 - 4.0 ** -2) ** -0.5, 1.0)[1] * history[1]["dp_clip_norm"])


def test_contribution_map_is_clipped_over_all_tables():
    dp = mechanism(contribution_clip=2.0, tables={"a": 100, "b": 100})
    update, context = _client(0, {"a": range(10), "b": range(6)})
    out = dp.postprocess_client(update, context)
    assert out.rows["a"].values.shape == (10, 5)  # the 4 values, then the contribution
    values = torch.cat([out.rows["a"].values[:, -1], out.rows["b"].values[:, -1]])
    assert float(values.norm()) == pytest.approx(2.0)  # 16 rows of 2 / 4 each
    assert torch.all(values == 0.5)
    small, context = _client(1, {"a": [3], "b": []})
    assert float(dp.postprocess_client(small, context).rows["a"].values[0, -1]) == 1.0


def _server_round(dp, counts, round_idx=0, seed=5, dim=4):
    """Reduced update whose table ``t`` has contribution ``counts`` {row: value}."""
    ids = torch.tensor(sorted(counts), dtype=torch.int64)
    column = torch.tensor([[counts[i]] for i in sorted(counts)], dtype=torch.float64)
    rows = {"t": RowUpdate(ids, torch.cat([torch.zeros((len(counts), dim), dtype=torch.float64), column], 1),
                           torch.ones(len(counts), dtype=torch.float64))}
    update = WeightedUpdate({"w": torch.zeros(50_000, dtype=torch.float64)}, rows, 1.0, 1)
    return dp.postprocess_server(update, RoundContext(round_idx, seed))


def test_untouched_rows_pass_the_threshold_at_the_gaussian_tail_rate():
    dp = mechanism(threshold=3.0)  # count noise std = z1 * C1 = sqrt(2) * 2
    std = dp.count_noise_std
    expected = (1_000_000 - 100) * 0.5 * math.erfc(3.0 / std / math.sqrt(2))
    out = _server_round(dp, {i: 1.0 for i in range(100)})
    false_positives = int((out.rows["t"].ids >= 100).sum())
    assert abs(false_positives - expected) < 5 * math.sqrt(expected)
    assert dp.round_metrics(1)["dp_rows_noise_only"] == false_positives
    again = _server_round(dp, {i: 1.0 for i in range(100)})
    assert torch.equal(out.rows["t"].ids, again.rows["t"].ids)  # from the round's seed


def test_touched_rows_are_selected_with_probability_of_their_noisy_count():
    dp = mechanism(threshold=3.0, tables={"t": 4000})
    counts = {i: (3.0 if i < 2000 else 3.0 + 2 * dp.count_noise_std) for i in range(4000)}
    selected = set(_server_round(dp, counts).rows["t"].ids.tolist())
    at_threshold = sum(i in selected for i in range(2000)) / 2000
    two_sigma_above = sum(i in selected for i in range(2000, 4000)) / 2000
    assert at_threshold == pytest.approx(0.5, abs=0.05)
    assert two_sigma_above == pytest.approx(1 - 0.5 * math.erfc(2 / math.sqrt(2)), abs=0.02)  # Phi(2)


def test_update_noise_is_z2_times_s_on_selected_rows_and_mlps_only():
    dp = mechanism(threshold=3.0, tables={"t": 200_000}, selection_noise_ratio=0.5)
    out = _server_round(dp, {i: 100.0 for i in range(20_000)}, dim=8)  # all selected, plus false positives
    _, z2 = split_noise(1.0, 0.5)
    assert out.rows["t"].ids.numel() >= 20_000
    assert float(out.rows["t"].values.std()) == pytest.approx(z2 * 0.5, rel=0.03)
    assert float(out.dense["w"].std()) == pytest.approx(z2 * 0.5, rel=0.03)
    assert out.weight == pytest.approx(50.0)  # the fixed denominator q N


def test_rows_below_the_threshold_get_no_update():
    dp = mechanism(noise_multiplier=0.0, threshold=1.5, tables={"t": 10})
    out = _server_round(dp, {1: 1.0, 2: 2.0, 7: 1.6})
    assert out.rows["t"].ids.tolist() == [2, 7]
    state = {"t": torch.zeros(10, 4, dtype=torch.float64), "w": torch.zeros(50_000, dtype=torch.float64)}
    out.rows["t"] = RowUpdate(out.rows["t"].ids, torch.ones(2, 4, dtype=torch.float64), out.rows["t"].row_weight)
    out.apply_mean_(state)
    changed = torch.nonzero(state["t"].abs().sum(1)).flatten().tolist()
    assert changed == [2, 7]


def test_only_selected_rows_change_in_a_run(config, tmp_path):
    from fedrec.federated.simulation import Simulation
    from fedrec.utilities.logger import MemoryLogger

    sim = Simulation(sparse_dp_config(config), tmp_path, logger=MemoryLogger())
    try:
        tables = sim.runner.table_names
        before = {n: sim.global_state[n].clone() for n in tables}
        row = sim.run_round()
        changed = sum(int((sim.global_state[n] != before[n]).any(1).sum()) for n in tables)
    finally:
        sim.close()
    assert row["dp_rows_selected"] > 0
    assert changed == row["dp_rows_selected"]  # noise moves every selected row, nothing else moves
    assert row["dp_rows_touched"] > row["dp_rows_selected"] - row["dp_rows_noise_only"]


def _equal_clients(config, **fl):
    """50 clients of 128 rows each (a power of two), every client in every round (q = 1):
    weight-1 DP sums and FedAvg's sample-weighted sums are then the same floats."""
    config["fl"].update({"num_workers": 50, "client_num_per_round": 50, "partitioner": {"name": "iid"},
                         "sampler": {"name": "poisson"}, "num_rounds": 2, **fl})
    return config


@pytest.mark.parametrize("embedding_updates, dp", [
    ("dense", {"name": "dp_gaussian", "clip_norm": 1e30, "noise_multiplier": 0.0}),
    ("sparse", {"name": "dp_adafest", "clip_norm": 1e30, "noise_multiplier": 0.0, "threshold": 0.0}),
])
def test_without_noise_or_clipping_dp_is_fedavg_bit_for_bit(config, tmp_path, embedding_updates, dp):
    plain = _equal_clients(copy.deepcopy(config), embedding_updates=embedding_updates)
    a, plain_history = run(plain, tmp_path / "plain")
    assert {row["clients"] for row in plain_history} == {50}
    private = _equal_clients(copy.deepcopy(config), embedding_updates=embedding_updates, postprocessors=[dp])
    b, history = run(private, tmp_path / "dp")
    for name in a.global_state:
        assert torch.equal(a.global_state[name], b.global_state[name]), name
    assert [r["roc_auc"] for r in history] == [r["roc_auc"] for r in plain_history]


def test_bytes_up_are_the_two_phase_protocol(config, tmp_path):
    """Phase 1 sends each touched row's id and contribution (8 + 4 bytes); phase 2 the
    values of the selected ones (dim * 4 bytes, no ids): all rows selected costs 4 bytes a
    row more than plain sparse FedAvg, none selected leaves the ids and contributions."""
    base = copy.deepcopy(config)
    base["fl"].update({"sampler": {"name": "poisson"}, "embedding_updates": "sparse", "num_rounds": 1})
    plain, plain_history = run(copy.deepcopy(base), tmp_path / "plain")
    dim = config["model"]["arch_feature_emb_size"]
    dense_bytes = plain.runner._dense_bytes
    clients = plain_history[0]["clients"]
    pairs = (plain_history[0]["bytes_up"] - clients * dense_bytes) / (8 + 4 * dim)
    assert pairs == int(pairs) and pairs > 0
    dp = {**ADAFEST, "noise_multiplier": 0.0}
    _, all_rows = run(sparse_dp_config(copy.deepcopy(base), **dp, threshold=0.0), tmp_path / "all")
    _, no_rows = run(sparse_dp_config(copy.deepcopy(base), **dp, threshold=1e9), tmp_path / "none")
    assert all_rows[0]["bytes_up"] == plain_history[0]["bytes_up"] + 4 * pairs
    assert no_rows[0]["bytes_up"] == clients * dense_bytes + (8 + 4) * pairs
    assert no_rows[0]["dp_rows_selected"] == 0


@pytest.mark.parametrize("dp, fl, key", [
    ({}, {"embedding_updates": "dense"}, "embedding_updates: sparse"),
    ({}, {"embedding_aggregation": "per_row"}, "dense_equivalent"),
    ({}, {"sampler": {"name": "uniform"}}, "Poisson"),
    ({"contribution_clip": 0}, {}, "contribution_clip"),
    ({"selection_noise_ratio": -1}, {}, "selection_noise_ratio"),
    ({"threshold": -0.5}, {}, "threshold"),
    ({"mode": "local"}, {}, "mode"),
    ({}, {"postprocessors": [{**ADAFEST}, {"name": "l2_clip", "bound": 1.0}]}, "last entry"),
])
def test_bad_sparse_dp_config_is_one_line_before_round_one(config, tmp_path, capsys, dp, fl, key):
    config = sparse_dp_config(config, **dp)
    config["fl"].update(fl)
    assert_simulate_refuses(config, tmp_path, capsys, key)


def test_sparse_dp_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, assert_same_run, simulate

    from fedrec.federated.run import run_simulation

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    config = _config(synthetic_data["config"], backend="local", num_rounds=2, sampler={"name": "poisson"},
                     embedding_updates="sparse", postprocessors=[ADAFEST])
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")
