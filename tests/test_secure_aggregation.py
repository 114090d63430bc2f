"""Secure aggregation (the ``secure_aggregation`` postprocessor): the server's unmasked sum
against the plain sum, with and without dropouts, what one masked upload shows, the real
key agreement and secret sharing, determinism across blocks and backends, config errors.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedrec.federated import client_runner, simulation
from fedrec.federated.config import FLConfig
from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.secure_aggregation import (
    KEY_BYTES,
    SHARE_MESSAGE_BYTES,
    SecureAggregationError,
    agree,
    client_secret,
    is_dropped,
    prg,
    private_key,
    public_bytes,
    self_mask_key,
)
from fedrec.federated.simulation import Simulation
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.logger import MemoryLogger

from run_helpers import assert_simulate_refuses
from test_fl_simulation import assert_same_weights, run

#: 24-bit quantization of [-1, 1]: the test clients' weights (data sizes) stay below 1,000
SA = {"name": "secure_aggregation", "max_weight": 1000.0, "quantization_bits": 24, "field_bits": 32}


def secagg_config(config, rounds=1, **sa):
    config["fl"].update({"postprocessors": [{**SA, **sa}], "num_rounds": rounds, "client_num_per_round": 10})
    return config


def plain_config(config, rounds=1):
    """The same run without secure aggregation, its embedding tables summed whole like the
    secure run's (the dense fast path would sum only the touched rows)."""
    config["fl"].update({"num_rounds": rounds, "client_num_per_round": 10, "dense_fast_path": "off"})
    return config


def value_step(sa=SA):
    """The quantization step of a value, in the update's own units."""
    return 2 * sa.get("clip_range", 1.0) / ((1 << sa["quantization_bits"]) - 1) * sa["max_weight"]


def weight_step(sa=SA):
    return sa["max_weight"] / ((1 << sa["quantization_bits"]) - 1)


@pytest.fixture
def recorded(monkeypatch):
    """What each round's server chain returned and what each client uploaded before the
    chain, by round: {"sums": [...], "clients": [{cid: update}, ...]}."""
    out = {"sums": [], "clients": []}

    def server_chain(chain, update, context):
        result = original_server(chain, update, context)
        out["sums"].append(copy.deepcopy(result))
        return result

    def client_chain(chain, update, context):
        while len(out["clients"]) <= context.round.round_idx:
            out["clients"].append({})
        out["clients"][context.round.round_idx][context.client_id] = copy.deepcopy(update)
        return original_client(chain, update, context)

    original_server, original_client = simulation.run_server_chain, client_runner.run_client_chain
    monkeypatch.setattr(simulation, "run_server_chain", server_chain)
    monkeypatch.setattr(client_runner, "run_client_chain", client_chain)
    return out


def assert_close_sums(secure, plain, clients, sa=SA):
    """Per coordinate within ``clients`` quantization steps (float32 rounding aside)."""
    assert secure.num_clients == plain.num_clients == clients
    assert abs(secure.weight - plain.weight) <= clients * weight_step(sa) + 1e-9
    assert set(secure.dense) == set(plain.dense)
    for name in plain.dense:
        diff = (secure.dense[name].double() - plain.dense[name].double()).abs().max()
        bound = clients * value_step(sa) + 1e-6 * float(plain.dense[name].abs().max())
        assert float(diff) <= bound, (name, float(diff), bound)


def test_secure_sum_and_global_model_match_plain_fedavg_within_the_step(config, tmp_path, recorded):
    plain_sim, _ = run(plain_config(copy.deepcopy(config)), tmp_path / "plain")
    plain_sum = recorded["sums"][0]
    secure_sim, history = run(secagg_config(config), tmp_path / "secure")
    secure_sum = recorded["sums"][1]
    row = history[0]
    assert row["secagg_clamped"] == 0 and row["secagg_dropped"] == 0
    for key in ("secagg_seconds_keys", "secagg_seconds_masking", "secagg_seconds_recovery", "secagg_seconds_sharing"):
        assert row[key] > 0, key
    n = row["clients"]
    assert_close_sums(secure_sum, plain_sum, n)
    # the global model: x + sum / weight, off by at most the sums' errors over the weight
    weight = plain_sum.weight
    for name, value in plain_sim.global_state.items():
        mean = plain_sum.dense[name].double().abs().max() / weight
        bound = n * (value_step() + float(mean) * weight_step()) / (weight - n * weight_step()) + 1e-6
        diff = float((secure_sim.global_state[name].double() - value.double()).abs().max())
        assert diff <= bound, (name, diff, bound)


def _setup(fl_overrides=None, **sa):
    fl = FLConfig(**{"num_workers": 40, "client_num_per_round": 8, "postprocessors": [{**SA, **sa}],
                     **(fl_overrides or {})})
    secagg = registry.construct("postprocessor", {**SA, **sa})
    secagg.setup(fl, registry.construct("sampler", fl.sampler))
    return secagg


def _context(cid, round_context):
    context = ClientContext.__new__(ClientContext)
    context.metrics, context.client_id, context.round = {}, cid, round_context
    return context


def _update(values, weight):
    return WeightedUpdate({"w": torch.as_tensor(values, dtype=torch.float32) * weight}, {}, float(weight), 1)


def test_pairwise_masks_of_three_clients_cancel_exactly_in_the_ring():
    seed, round_idx, cohort = 3, 4, [2, 5, 9]
    keys = {c: private_key(client_secret(seed, round_idx, c, "s")) for c in cohort}
    publics = {c: public_bytes(k) for c, k in keys.items()}
    total = np.zeros(1000, dtype=np.int64)
    for i in cohort:
        for j in cohort:
            if i == j:
                continue
            key = agree(keys[i], publics[j], b"mask")
            assert key == agree(keys[j], publics[i], b"mask")  # the X25519 exchange agrees
            mask = prg(key, 1000, 32)
            assert 0 <= mask.min() and mask.max() < 2 ** 32
            total += mask if j > i else -mask
    assert not np.any(total & (2 ** 32 - 1))
    # and through the postprocessor: masked uploads minus self masks = the quantized sum
    secagg = _setup(max_weight=10.0, quantization_bits=16)
    context = RoundContext(round_idx, seed, cohort=cohort)
    rng = np.random.default_rng(0)
    masked, quantized, selfs = 0, 0, 0
    for cid in cohort:
        update = _update(rng.normal(scale=0.1, size=500), weight=cid)
        quantized = quantized + secagg.quantize(copy.deepcopy(update), _context(cid, context))[1]
        out = secagg.postprocess_client(update, _context(cid, context))
        masked = masked + torch.cat([out.dense["w"], out.dense["secagg.weight"]]).numpy()
        selfs = selfs + prg(self_mask_key(client_secret(seed, round_idx, cid, "b")), 501, 32)
    assert np.array_equal((masked - selfs) & (2 ** 32 - 1), quantized)


def test_one_masked_upload_alone_looks_uniform_and_uncorrelated():
    secagg = _setup(max_weight=1.0, quantization_bits=16)
    context = RoundContext(0, 7, cohort=[1, 2, 3])
    values = np.linspace(-0.9, 0.9, 20_000)  # a strongly structured update
    out = secagg.postprocess_client(_update(values, 1.0), _context(2, context))
    masked = out.dense["w"].numpy().astype(np.float64)
    assert out.dense["w"].dtype == torch.int64 and out.weight == 0.0  # the weight is masked too
    assert abs(np.corrcoef(masked, values)[0, 1]) < 0.05
    quarters = np.histogram(masked, bins=4, range=(0, 2 ** 32))[0] / masked.size
    assert np.all(np.abs(quarters - 0.25) < 0.02), quarters


def test_dropouts_recover_the_survivors_sum(config, tmp_path, recorded):
    sa = {"dropout_rate": 0.3}
    _, history = run(secagg_config(config, **sa), tmp_path / "secure")
    row = history[0]
    cohort = sorted(recorded["clients"][0])
    dropped = [c for c in cohort if is_dropped(config["fl"]["seed"], 0, c, 0.3)]
    assert 0 < len(dropped) == row["secagg_dropped"] < len(cohort)
    survivors = [c for c in cohort if c not in dropped]
    plain = WeightedUpdate()
    for cid in survivors:
        plain.add_(recorded["clients"][0][cid])
    assert_close_sums(recorded["sums"][0], plain, len(survivors))


def test_too_few_survivors_is_a_clear_error(config, tmp_path):
    sim = Simulation(secagg_config(config, dropout_rate=0.9), tmp_path, logger=MemoryLogger())
    try:
        with pytest.raises(SecureAggregationError, match=r"round 0: .*survived.*threshold"):
            sim.run_round()
    finally:
        sim.close()


def test_dp_then_secure_aggregation_equals_dp_alone_within_the_step(config, tmp_path, recorded):
    dp = {"name": "dp_gaussian", "clip_norm": 1e6, "noise_multiplier": 0.0}
    sa = {**SA, "max_weight": 1.0, "quantization_bits": 20}
    config["fl"].update({"sampler": {"name": "poisson"}, "num_rounds": 1, "client_num_per_round": 10})
    config["fl"]["postprocessors"] = [dp]
    alone, _ = run(copy.deepcopy(config), tmp_path / "dp")
    config["fl"]["postprocessors"] = [dp, sa]
    both, history = run(config, tmp_path / "both")
    n = history[0]["clients"]
    assert_close_sums(recorded["sums"][1], recorded["sums"][0], n, sa)
    expected_cohort = 10.0  # dp_gaussian's fixed denominator q N
    for name, value in alone.global_state.items():
        diff = float((both.global_state[name].double() - value.double()).abs().max())
        assert diff <= n * value_step(sa) / expected_cohort + 1e-6, name


def test_identical_for_any_block_layout(config, tmp_path):
    config = secagg_config(config, rounds=2, dropout_rate=0.2, neighbours=6, threshold_fraction=0.3)
    a, ha = run(copy.deepcopy(config), tmp_path / "a")
    config["fl"]["reduce_blocks"] = 1
    b, hb = run(config, tmp_path / "b")
    assert_same_weights(a.global_state, b.global_state)
    assert [r["bytes_up"] for r in ha] == [r["bytes_up"] for r in hb]


def test_bytes_count_ring_elements_and_the_protocols_messages(config, tmp_path):
    sa = {"dropout_rate": 0.3, "neighbours": 6, "threshold_fraction": 0.4}
    sim, history = run(secagg_config(config, **sa), tmp_path)
    row = history[0]
    n, dropped = row["clients"], int(row["secagg_dropped"])
    numbers = sum(t.numel() for t in sim.global_state.values()) + 1  # the weight too
    survivors = n - dropped
    k = 6
    up = survivors * (numbers * 4 + (k + 1) * (4 + 16)) + n * (2 * KEY_BYTES + k * SHARE_MESSAGE_BYTES)
    assert row["bytes_up"] == up
    model_down = sum(t.numel() for t in sim.global_state.values()) * 4
    down = n * (model_down + k * (4 + 2 * KEY_BYTES) + k * SHARE_MESSAGE_BYTES) + survivors * k * 4
    assert row["bytes_down"] == down


def test_under_mpi_gives_the_local_result_bit_for_bit(synthetic_data, tmp_path):
    from test_mpi import _config, _mpi_missing, final_weights, fl_rows, simulate

    from fedrec.federated.run import run_simulation

    if _mpi_missing():
        pytest.skip(_mpi_missing())
    config = _config(synthetic_data["config"], backend="local", num_rounds=2, client_num_per_round=10,
                     postprocessors=[{**SA, "dropout_rate": 0.2, "neighbours": 6, "threshold_fraction": 0.3}])
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)

    def untimed(logdir):
        return [{k: v for k, v in row.items() if not k.startswith("secagg_seconds")} for row in fl_rows(logdir)]

    assert untimed(tmp_path / "local") == untimed(tmp_path / "mpi")
    assert_same_weights(final_weights(tmp_path / "local"), final_weights(tmp_path / "mpi"))


def test_an_algorithm_that_uploads_more_than_the_delta_is_refused(config, tmp_path):
    config = secagg_config(config)
    config["fl"]["fl_algo"] = {"name": "scaffold"}
    with pytest.raises(client_runner.ClientError, match="uploads"):
        run(config, tmp_path)


def test_a_client_heavier_than_max_weight_names_the_key(config, tmp_path):
    with pytest.raises(client_runner.ClientError, match="max_weight"):
        run(secagg_config(config, max_weight=1.0), tmp_path)


def test_default_max_weight_is_the_largest_client_or_one_after_dp(config, tmp_path):
    """Without max_weight, FedAvg's weights (sample counts) fit the grid, and after a DP
    mechanism (every user weighs 1) the grid is [0, 1]."""
    sa = {k: v for k, v in SA.items() if k != "max_weight"}
    config["fl"]["postprocessors"] = [sa]
    sim, history = run(plain_config(copy.deepcopy(config)), tmp_path / "a")
    secagg = sim.postprocessors[-1]
    assert secagg.max_weight == max(sim.partition.sizes) and history[-1]["clients"] > 0
    config["fl"].update({"sampler": {"name": "poisson"}, "client_num_per_round": 10, "num_rounds": 1,
                         "postprocessors": [{"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 0.0}, sa]})
    sim, _ = run(config, tmp_path / "b")
    assert sim.postprocessors[-1].max_weight == 1.0


@pytest.mark.parametrize("sa, fl, key", [
    ({"field_bits": 16}, {}, "field_bits: 28"),
    ({"clip_range": 0}, {}, "clip_range"),
    ({"quantization_bits": 1}, {}, "quantization_bits"),
    ({"field_bits": 64}, {}, "field_bits"),
    ({"neighbours": 1}, {}, "neighbours"),
    ({"dropout_rate": 1.0}, {}, "dropout_rate"),
    ({}, {"embedding_updates": "sparse"}, "embedding_updates: dense"),
    ({}, {"postprocessors": "append l2_clip"}, "last entry of fl.postprocessors"),
    ({}, {"fl_algo": {"name": "median"}}, "fed_avg"),
])
def test_bad_secure_aggregation_config_is_one_line_before_round_one(config, tmp_path, capsys, sa, fl, key):

    config = secagg_config(config, **sa)
    if fl.get("postprocessors") == "append l2_clip":
        config["fl"]["postprocessors"].append({"name": "l2_clip", "bound": 1.0})
    else:
        config["fl"].update(fl)
    assert_simulate_refuses(config, tmp_path, capsys, key)


def test_poisson_cohorts_get_headroom_in_the_field_check():
    """20 expected clients of 40: a Poisson cohort may reach 40 (3x, at most everyone)."""
    poisson = {"sampler": {"name": "poisson"}, "client_num_per_round": 20}
    with pytest.raises(ValueError, match="field_bits: 33"):
        _setup(poisson, quantization_bits=27)
    assert _setup({"client_num_per_round": 20}, quantization_bits=27).max_clients == 20  # uniform: exactly 20
    assert _setup(poisson, quantization_bits=26).max_clients == 40
    assert math.isclose(_setup().step, 2 / (2 ** 24 - 1))
