"""Adaptive clipping for user-level DP-FedAvg (``dp_gaussian``'s ``adaptive_clipping``).

Andrew, Thakkar, McMahan, Ramaswamy 2021: the clip norm follows a target quantile of the
clients' update norms through a noisy count of the unclipped clients; the updates' noise
multiplier drops to z_Delta so that the round still costs the configured total z.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedrec.federated.context import RoundContext
from fedrec.federated.postprocessors import chain_broadcast
from fedrec.federated.privacy import UNCLIPPED, update_noise_multiplier
from fedrec.federated.update import WeightedUpdate

from test_fl_simulation import assert_same_weights, resumed_after, run, without_timings
from test_privacy import _client_context, _one_client_update, _simulate_cli, dp_config, mechanism

ADAPTIVE = {"target_quantile": 0.3, "learning_rate": 0.2}


def client_context(dp, cid=0, round_idx=0, seed=0):
    """A client's context whose round carries rank 0's broadcast (as the simulation sends it)."""
    context = _client_context(cid)
    context.round = RoundContext(round_idx, seed, postprocessor_values=chain_broadcast([dp]))
    return context


def one_round(dp, norms, round_idx=0, seed=0):
    """Clients whose deltas have L2 norms ``norms``, through the mechanism: (reduced update,
    how many were clipped on the client side)."""
    total, clipped = WeightedUpdate(), 0
    for cid, norm in enumerate(norms):
        context = client_context(dp, cid, round_idx, seed)
        total.add_(dp.postprocess_client(_one_client_update([0.6 * norm, 0.8 * norm], weight=3), context))
        clipped += int(context.metrics["dp_clipped"])
    return dp.postprocess_server(total, RoundContext(round_idx, seed)), clipped


# -- the rule ---------------------------------------------------------------------------------------
def test_geometric_update_against_a_hand_computation():
    dp = mechanism(noise_multiplier=0.0, clip_norm=0.5, adaptive_clipping=ADAPTIVE)
    # C exp(-eta (b - gamma)): 0.5 exp(-0.2 * 0.5) and 0.5 exp(-0.2 * -0.2), by hand
    assert dp.next_clip_norm(0.5, 0.8) == pytest.approx(0.5 * 0.9048374180359595, rel=1e-14)  # e^-0.1
    assert dp.next_clip_norm(0.5, 0.1) == pytest.approx(0.5 * 1.0408107741923882, rel=1e-14)  # e^0.04
    assert dp.next_clip_norm(0.5, 0.3) == 0.5


def test_a_round_counts_the_unclipped_clients_over_the_expected_cohort_and_moves_c():
    dp = mechanism(noise_multiplier=0.0, clip_norm=0.5, adaptive_clipping={**ADAPTIVE, "clipped_count_stddev": 1e-12})
    out, clipped = one_round(dp, [0.1, 0.4, 2.0])  # two unclipped, one clipped; expected cohort 50
    assert clipped == 1 and UNCLIPPED not in out.scalars  # the count does not reach the algorithm
    fraction = (0.5 + 0.5 - 0.5) / 50 + 0.5  # the centred sum over q N, un-centred
    metrics = dp.round_metrics(1)
    assert metrics["dp_unclipped_fraction"] == pytest.approx(fraction, abs=1e-12)
    assert metrics["dp_clip_norm"] == 0.5  # the C this round used
    assert dp.clip_norm == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.3)), rel=1e-12)
    assert dp.broadcast() == {"clip_norm": dp.clip_norm}


def test_clients_clip_to_the_broadcast_bound_not_their_own_copy():
    """Under MPI a client's process has its own, stale, postprocessor: C must come with the round."""
    dp = mechanism(noise_multiplier=0.0, clip_norm=0.5, adaptive_clipping=ADAPTIVE)
    context = _client_context(0)
    context.round = RoundContext(0, 0, postprocessor_values={"0.clip_norm": 0.2})
    out = dp.postprocess_client(_one_client_update([3.0, 4.0], weight=2), context)
    assert math.sqrt(out.sq_norm()) == pytest.approx(0.2) and out.scalars == {UNCLIPPED: -0.5}
    with pytest.raises(KeyError, match="0.clip_norm"):
        dp.postprocess_client(_one_client_update([3.0, 4.0], weight=2), _client_context(0))


def test_clip_norm_converges_to_the_target_quantile_of_the_update_norms():
    """Stable update norms (uniform on [1, 3]) and almost no count noise: C climbs from 0.1
    to the 0.3-quantile, 1.6, and then about 30% of the clients stay unclipped."""
    dp = mechanism({"num_workers": 100, "client_num_per_round": 100}, noise_multiplier=0.0, clip_norm=0.1,
                   adaptive_clipping={**ADAPTIVE, "clipped_count_stddev": 1e-9})
    norms = np.linspace(1.0, 3.0, 100)
    bounds, unclipped = [], []
    for t in range(250):
        bounds.append(dp.clip_norm)
        _, clipped = one_round(dp, norms, round_idx=t)
        unclipped.append(1 - clipped / len(norms))
        assert dp.round_metrics(t + 1)["dp_unclipped_fraction"] == pytest.approx(unclipped[-1], abs=1e-6)
    assert unclipped[0] == 0.0 and bounds[1] > bounds[0]
    assert np.mean(unclipped[-100:]) == pytest.approx(0.3, abs=0.02)
    assert np.quantile(norms, 0.25) < np.mean(bounds[-100:]) < np.quantile(norms, 0.35)


# -- the noise split --------------------------------------------------------------------------------
def test_update_noise_multiplier_against_a_hand_computation_and_dp_accounting():
    import dp_accounting
    from dp_accounting import rdp

    # z = 2, sigma_b = 2.5: (2^-2 - 5^-2)^(-1/2) = 0.21^(-1/2)
    assert update_noise_multiplier(2.0, 2.5) == pytest.approx(2.1821789023599236, rel=1e-14)
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    # independently: the two Gaussian releases compose (RDP) to exactly one Gaussian at z
    for z, sigma_b in [(1.0, 2.5), (0.7, 0.5), (3.0, 10.0)]:
        z_delta = update_noise_multiplier(z, sigma_b)
        both, one = rdp.RdpAccountant(), rdp.RdpAccountant()
        both.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_delta),
                                                    dp_accounting.GaussianDpEvent(2 * sigma_b)]))
        one.compose(dp_accounting.GaussianDpEvent(z))
        assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    dp = mechanism(noise_multiplier=2.0, adaptive_clipping={"clipped_count_stddev": 2.5})
    assert dp.update_noise_multiplier == pytest.approx(2.1821789023599236, rel=1e-14)
    # the default sigma_b is TFF's: expected cohort / 20 = 50 / 20
    assert mechanism(noise_multiplier=2.0, adaptive_clipping={}).count_stddev == 2.5


def test_update_noise_std_is_z_delta_times_c_and_epsilon_is_the_total_zs():
    dp = mechanism(noise_multiplier=1.0, clip_norm=0.4, adaptive_clipping={"clipped_count_stddev": 2.0})
    z_delta = (1.0 - 0.25 ** 2) ** -0.5  # (1^-2 - (2 * 2)^-2)^(-1/2)
    update = WeightedUpdate({"w": torch.zeros(200_000)}, {}, 1.0, 1, scalars={UNCLIPPED: 0.5})
    noisy = dp.postprocess_server(update, RoundContext(3, 11))
    assert float(noisy.dense["w"].std()) == pytest.approx(z_delta * 0.4, rel=0.02)
    metrics = dp.round_metrics(5)
    assert metrics["dp_noise_std"] == pytest.approx(z_delta * 0.4, rel=1e-12)
    assert metrics["dp_clip_norm"] == 0.4 and dp.clip_norm != 0.4
    assert metrics["epsilon"] == mechanism(noise_multiplier=1.0).epsilon_after(5)  # adaptivity costs nothing extra


def test_count_noise_std_is_sigma_b_from_its_own_seed_stream():
    dp = mechanism(noise_multiplier=1.0, adaptive_clipping={"clipped_count_stddev": 3.0})
    counts = [dp.noisy_count(0.0, RoundContext(t, 7)) for t in range(4000)]
    assert np.std(counts) == pytest.approx(3.0, rel=0.04) and abs(np.mean(counts)) < 0.2
    assert dp.noisy_count(1.5, RoundContext(2, 7)) == counts[2] + 1.5  # deterministic per round
    # through a round: (estimate - true fraction) * q N has std sigma_b (no clamping at 0.5 +- 0.06)
    errors, update_noise = [], []
    for t in range(600):
        update = WeightedUpdate({"w": torch.zeros(1)}, {}, 1.0, 1, scalars={UNCLIPPED: 0.0})
        update_noise.append(float(dp.postprocess_server(update, RoundContext(t, 7)).dense["w"][0]))
        errors.append((dp.round_metrics(1)["dp_unclipped_fraction"] - 0.5) * 50)  # (epsilon cached)
    assert np.std(errors) == pytest.approx(3.0, rel=0.1)
    assert errors[:5] == pytest.approx(counts[:5], rel=1e-9)
    assert abs(np.corrcoef(errors, update_noise)[0, 1]) < 0.15  # a stream apart from the update noise


# -- in a run -------------------------------------------------------------------------------------------
def adaptive_config(config, **adaptive):
    config = dp_config(config, clip_norm=0.05, adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.5,
                                                                  "clipped_count_stddev": 1.0, **adaptive})
    config["fl"]["num_rounds"] = 4
    return config


def test_round_metrics_follow_the_rule_and_resume_equals_an_uninterrupted_run(config, tmp_path):
    config = adaptive_config(config)
    full, history = run(copy.deepcopy(config), tmp_path / "full")
    z_delta = update_noise_multiplier(1.0, 1.0)
    assert history[0]["dp_clip_norm"] == 0.05
    for row, following in zip(history, history[1:]):
        assert following["dp_clip_norm"] == full.postprocessors[0].next_clip_norm(row["dp_clip_norm"],
                                                                                   row["dp_unclipped_fraction"])
    for row in history:
        assert row["dp_noise_std"] == pytest.approx(z_delta * row["dp_clip_norm"], rel=1e-12)
        assert 0.0 <= row["dp_unclipped_fraction"] <= 1.0
    assert len({row["dp_clip_norm"] for row in history}) == len(history)  # C moved every round

    resumed, rest = resumed_after(config, tmp_path / "cut", rounds=2)
    assert without_timings(rest) == without_timings(history[2:])
    assert_same_weights(full.global_state, resumed.global_state)
    assert resumed.postprocessors[0].clip_norm == full.postprocessors[0].clip_norm


def test_adaptive_dp_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, assert_same_run, simulate

    from fedrec.federated.run import run_simulation

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    dp = {"name": "dp_gaussian", "clip_norm": 0.05, "noise_multiplier": 1.0,
          "adaptive_clipping": {"learning_rate": 0.5, "clipped_count_stddev": 1.0}}
    config = _config(synthetic_data["config"], backend="local", num_rounds=3, sampler={"name": "poisson"},
                     postprocessors=[dp])
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


# -- config errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dp, words", [
    ({"adaptive_clipping": {"target_quantile": 1.5}}, ["adaptive_clipping.target_quantile", "1.5"]),
    ({"adaptive_clipping": {"target_quantile": 0}}, ["adaptive_clipping.target_quantile", "0"]),
    ({"adaptive_clipping": {"learning_rate": 0}}, ["adaptive_clipping.learning_rate", "0"]),
    ({"adaptive_clipping": {"learning_rate": -0.2}}, ["adaptive_clipping.learning_rate", "-0.2"]),
    ({"adaptive_clipping": {"clipped_count_stddev": 0}}, ["adaptive_clipping.clipped_count_stddev", "0"]),
    ({"adaptive_clipping": {"clipped_count_stddev": -1.0}}, ["adaptive_clipping.clipped_count_stddev", "-1.0"]),
    ({"adaptive_clipping": {"quantile": 0.5}}, ["adaptive_clipping does not take", "quantile"]),
    # expected cohort 8: the default sigma_b is 0.4, too small for z = 1
    ({"adaptive_clipping": {}}, ["clipped_count_stddev 0.4 (the default", "above 0.5", "below 0.8"]),
    ({"adaptive_clipping": {"clipped_count_stddev": 0.3}}, ["clipped_count_stddev 0.3", "above 0.5"]),
    ({"noise_multiplier": None, "target_epsilon": 1.0, "adaptive_clipping": {"clipped_count_stddev": 0.5}},
     ["target_epsilon", "adaptive_clipping.clipped_count_stddev above"]),
    ({"mode": "local", "adaptive_clipping": {}}, ["adaptive_clipping needs mode: central"]),
])
def test_bad_adaptive_config_is_one_line_before_round_one(config, tmp_path, capsys, dp, words):
    config = dp_config(config, **dp)
    assert _simulate_cli(config, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "fl.postprocessors[0] (dp_gaussian)" in err and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_describe_names_the_adaptive_settings_and_z_delta():
    dp = mechanism(noise_multiplier=2.0, clip_norm=0.1, adaptive_clipping={"clipped_count_stddev": 2.5})
    line = dp.describe()
    for words in ("adaptive clip norm from 0.1", "0.5 quantile", "learning rate 0.2", "noise std 2.5",
                  "noise multiplier 2 in total", "2.182 on the updates"):
        assert words in line, line
    assert "adaptive" not in mechanism().describe()
