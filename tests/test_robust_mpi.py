"""Robust aggregators under MPI: every client's update comes back from the worker
processes, and the result is the local backend's, bit for bit, for 1 and 2 worker
processes (median in sparse mode, Krum in dense mode, both with sign-flipping clients,
whose choice by seed must agree in every process). Skipped where mpi4py cannot run.
"""

from __future__ import annotations

import pytest

from tests.test_mpi import _config, assert_same_run, needs_mpi, simulate

CASES = {
    "median-sparse": {"fl_algo": {"name": "median"}, "embedding_updates": "sparse"},
    "krum-dense": {"fl_algo": {"name": "krum", "num_byzantine": 1, "multi_krum": 3}},
}


@pytest.fixture(scope="module")
def local_runs(synthetic_data, tmp_path_factory):
    from fedrec.federated.run import run_simulation

    runs = {}
    for name, fl in CASES.items():
        config = _config(synthetic_data["config"], backend="local", num_rounds=2,
                         attack={"name": "sign_flip", "fraction": 0.2, "scale": 3.0}, **fl)
        logdir = tmp_path_factory.mktemp("robust-mpi") / name
        run_simulation(config, logdir, print_rounds=False)
        runs[name] = (config, logdir)
    return runs


@needs_mpi
@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_robust_aggregators_under_mpi_give_the_local_result(local_runs, tmp_path, case, processes):
    config, reference = local_runs[case]
    config = dict(config, fl={**config["fl"], "backend": "auto"})
    result = simulate(config, tmp_path / "mpi", processes=processes)
    assert f"mpi backend: {processes - 1} MPI processes" in result.stderr + result.stdout
    assert_same_run(reference, tmp_path / "mpi")
