"""User-level DP-FedAvg (the ``dp_gaussian`` postprocessor) and its accountant.

Epsilon is recomputed here straight from ``dp-accounting``; the noise's spread, the
clipping bound and the fixed denominator are measured on the mechanism's own output.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml

from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.logger import MemoryLogger

from run_helpers import assert_simulate_refuses
from test_fl_simulation import run

DP = {"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 1.0}


def dp_config(config, **dp):
    config["fl"].update({"sampler": {"name": "poisson"}, "postprocessors": [{**DP, **dp}], "num_rounds": 3})
    return config


def independent_epsilon(q, z, rounds, delta):
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def mechanism(fl_overrides=None, **kwargs):
    from fedrec.federated.config import FLConfig

    fl = FLConfig(**{"num_workers": 1000, "client_num_per_round": 50, "num_rounds": 10,
                     "sampler": {"name": "poisson"}, **(fl_overrides or {})})
    dp = registry.construct("postprocessor", {**DP, **kwargs})
    dp.setup(fl, registry.construct("sampler", fl.sampler))
    return dp


def test_epsilon_in_every_metrics_line_matches_dp_accounting(config, tmp_path):
    sim, history = run(dp_config(config), tmp_path)
    q = config["fl"]["client_num_per_round"] / config["fl"]["num_workers"]
    delta = 1 / config["fl"]["num_workers"]
    for row in history:
        assert row["epsilon"] == pytest.approx(independent_epsilon(q, 1.0, row["round"], delta), rel=1e-9)
        assert row["dp_noise_std"] == pytest.approx(0.5)
    assert history[0]["epsilon"] < history[-1]["epsilon"]


def test_target_epsilon_calibrates_the_noise_to_spend_the_budget_in_num_rounds():
    dp = mechanism(noise_multiplier=None, target_epsilon=3.0, delta=1e-5)
    assert dp.epsilon_after(10) <= 3.0 + 1e-6
    assert dp.epsilon_after(10) == pytest.approx(3.0, rel=0.01)
    assert independent_epsilon(0.05, dp.noise_multiplier, 10, 1e-5) == pytest.approx(dp.epsilon_after(10))


def _one_client_update(values, weight):
    return WeightedUpdate({"w": torch.tensor(values, dtype=torch.float64) * weight}, {}, float(weight), 1)


def _client_context(cid=0):
    context = ClientContext.__new__(ClientContext)
    context.metrics, context.client_id, context.round = {}, cid, RoundContext(0, 0)
    return context


def test_clipping_weight_one_and_the_fixed_denominator():
    dp = mechanism(noise_multiplier=0.0)  # q = 50 / 1000: expected cohort 50
    deltas = [np.array([3.0, 4.0]), np.array([0.1, 0.0]), np.array([0.0, -0.2])]
    total = WeightedUpdate()
    for i, delta in enumerate(deltas):
        total.add_(dp.postprocess_client(_one_client_update(delta, weight=10 * (i + 1)), _client_context(i)))
    out = dp.postprocess_server(total, RoundContext(0, 0))
    state = {"w": torch.zeros(2, dtype=torch.float64)}
    out.apply_mean_(state)
    clipped = [d * min(1.0, 0.5 / np.linalg.norm(d)) for d in deltas]  # each user counts once, norm <= S
    np.testing.assert_allclose(state["w"].numpy(), sum(clipped) / 50.0, rtol=1e-12)


def test_noise_std_is_z_times_the_clip_norm_and_comes_from_the_round_seed():
    dp = mechanism(noise_multiplier=1.7)
    update = WeightedUpdate({"w": torch.zeros(200_000)}, {}, 1.0, 1)
    noisy = dp.postprocess_server(update, RoundContext(3, 11))
    std = float(noisy.dense["w"].std())
    assert std == pytest.approx(1.7 * 0.5, rel=0.02)
    again = dp.postprocess_server(WeightedUpdate({"w": torch.zeros(200_000)}, {}, 1.0, 1), RoundContext(3, 11))
    assert torch.equal(noisy.dense["w"], again.dense["w"])
    other = dp.postprocess_server(WeightedUpdate({"w": torch.zeros(200_000)}, {}, 1.0, 1), RoundContext(4, 11))
    assert not torch.equal(noisy.dense["w"], other.dense["w"])


def test_local_dp_noises_each_client_and_accounts_without_sampling():
    dp = mechanism(noise_multiplier=1.0, mode="local")
    out = dp.postprocess_client(_one_client_update([0.0] * 50_000, weight=3), _client_context(5))
    assert float(out.dense["w"].std()) == pytest.approx(0.5, rel=0.03)
    server = dp.postprocess_server(copy.deepcopy(out), RoundContext(0, 0))
    assert torch.equal(server.dense["w"], out.dense["w"])  # no second noise on the server
    assert dp.epsilon_after(10) > mechanism(noise_multiplier=1.0).epsilon_after(10)


def test_budget_stops_the_run_at_the_last_round_within_it(config, tmp_path):
    q = config["fl"]["client_num_per_round"] / config["fl"]["num_workers"]
    delta = 1 / config["fl"]["num_workers"]
    budget = (independent_epsilon(q, 1.0, 2, delta) + independent_epsilon(q, 1.0, 3, delta)) / 2
    config = dp_config(config, epsilon_budget=budget)
    config["fl"]["num_rounds"] = 5
    logger = MemoryLogger()
    sim = Simulation(config, tmp_path, logger=logger)
    history = sim.run()
    sim.close()
    assert [row["round"] for row in history] == [1, 2]
    assert history[-1]["epsilon"] <= budget and "roc_auc" in history[-1]
    assert CheckpointManager(tmp_path / "checkpoints").latest_step() == 2
    assert any("privacy budget allows 2 of fl.num_rounds 5" in m for m in logger.messages)


def test_noise_does_not_depend_on_the_backend_blocks(config, tmp_path):
    """The noise is drawn once on rank 0 from the round's seed: block layout is irrelevant."""
    config = dp_config(config)
    a, _ = run(copy.deepcopy(config), tmp_path / "a")
    config["fl"]["reduce_blocks"] = 1
    b, _ = run(config, tmp_path / "b")
    for name in a.global_state:
        assert torch.allclose(a.global_state[name], b.global_state[name], atol=1e-5), name


@pytest.mark.parametrize("dp, fl, key", [
    ({"clip_norm": 0}, {}, "clip_norm"),
    ({"delta": 1.5}, {}, "delta"),
    ({"noise_multiplier": None, "target_epsilon": -1}, {}, "target_epsilon"),
    ({"target_epsilon": 3.0}, {}, "exactly one of noise_multiplier"),
    ({}, {"sampler": {"name": "uniform"}}, "Poisson"),
    ({}, {"embedding_updates": "sparse"}, "embedding_updates: dense"),
    ({"epsilon_budget": 0.01}, {}, "raise it to at least"),
    ({"accountant": "moments"}, {}, "accountant"),
])
def test_bad_privacy_config_is_one_line_before_round_one(config, tmp_path, capsys, dp, fl, key):
    config = dp_config(config, **dp)
    config["fl"].update(fl)
    assert_simulate_refuses(config, tmp_path, capsys, key)


def test_epsilon_is_finite_and_grows_with_rounds():
    dp = mechanism()
    eps = [dp.epsilon_after(t) for t in (1, 5, 10)]
    assert all(math.isfinite(e) for e in eps) and eps == sorted(eps)


def test_dp_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, assert_same_run, simulate

    from fedrec.federated.run import run_simulation

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    config = _config(synthetic_data["config"], backend="local", num_rounds=2, sampler={"name": "poisson"},
                     postprocessors=[DP])
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


def _simulate_cli(config, logdir, *extra):
    from fedrec.cli import main

    path = logdir.parent / f"{logdir.name}.yml"
    path.write_text(yaml.safe_dump(config))
    return main(["simulate", "--config", str(path), "--logdir", str(logdir), *extra])


def test_resume_refuses_a_recalibrated_noise_multiplier_before_touching_the_logdir(config, tmp_path, capsys):
    config = dp_config(config, noise_multiplier=None, target_epsilon=3.0)
    config["fl"]["num_rounds"] = 2
    assert _simulate_cli(config, tmp_path / "run") == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and ".lock" not in p.name}
    capsys.readouterr()
    config["fl"]["num_rounds"] = 4  # target_epsilon would now give another noise multiplier
    assert _simulate_cli(config, tmp_path / "run", "--resume") == 2
    err = capsys.readouterr().err
    assert "noise_multiplier" in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in before} == before


def test_resume_of_a_run_stopped_by_its_budget_changes_nothing(config, tmp_path, capsys):
    q = config["fl"]["client_num_per_round"] / config["fl"]["num_workers"]
    delta = 1 / config["fl"]["num_workers"]
    config = dp_config(config, epsilon_budget=float(independent_epsilon(q, 1.0, 1, delta)
                                               + independent_epsilon(q, 1.0, 2, delta)) / 2)
    assert _simulate_cli(config, tmp_path / "run") == 0
    summary = (tmp_path / "run" / "summary.json").read_bytes()
    capsys.readouterr()
    assert _simulate_cli(config, tmp_path / "run", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "run" / "summary.json").read_bytes() == summary
