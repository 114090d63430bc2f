"""The ``mpi`` backend: identical results to the local backend for 1, 2 and 3 worker
processes, errors and crashes named, ``--resume`` after a killed worker.

The MPI runs are real: ``mpiexec -n K python -m mpi4py.futures -m fedrec.cli simulate``
as subprocesses (mpiexec from the mpich wheel, beside this Python), on the conftest's
8,000 synthetic rows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import yaml

from fedrec.federated.backends import assign_blocks, make_blocks
from fedrec.federated.launch import make_backend
from fedrec.federated.mpi_backend import MPIUnavailableError, pack, report_crashed_processes, unpack
from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.logger import read_metrics

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMING_KEYS = {"round_seconds", "eval_seconds", "time", "wall_time", "timestamp"}
RUN_TIMEOUT = 180


def _mpi_missing() -> str:
    if not MPIEXEC.exists():
        return f"no mpiexec beside {sys.executable} (pip install 'fedrec[mpi]')"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'fedrec[mpi]')"
    return ""


needs_mpi = pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "mpi")


def _config(base: Dict[str, Any], **fl: Any) -> Dict[str, Any]:
    config = copy.deepcopy(base)
    config["fl"].update({"num_rounds": 3, "backend": "auto", "imports": ["tests.mpi_algorithms"],
                         "local_epochs": 1})  # the plumbing is under test, not convergence
    config["fl"].update(fl)
    return config


def simulate(config: Dict[str, Any], logdir: Path, processes: int = 0, resume: bool = False,
             check: bool = True) -> subprocess.CompletedProcess:
    """``fedrec simulate`` in a subprocess: plain Python (processes=0) or under mpiexec."""
    logdir.mkdir(parents=True, exist_ok=True)
    config_file = logdir.parent / f"{logdir.name}.yml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "fedrec.cli", "simulate", "--config", str(config_file),
               "--logdir", str(logdir)] + (["--resume"] if resume else [])
    if processes:
        command = [str(MPIEXEC), "-n", str(processes), sys.executable, "-m", "mpi4py.futures"] + command[1:]
    # One torch thread in every process: rank 0's evaluation as in this pytest process,
    # and no oversubscription of a small machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {RUN_TIMEOUT}s:\n{out[-3000:]}\n{err[-3000:]}")
    result = subprocess.CompletedProcess(command, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}:\n{out[-3000:]}\n{err[-5000:]}")
    return result


def fl_rows(logdir: Path) -> List[Dict[str, Any]]:
    rows = {}
    for row in read_metrics(logdir / "metrics.jsonl"):
        if row.get("phase") == "fl":
            rows[row["round"]] = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    return [rows[k] for k in sorted(rows)]


def final_weights(logdir: Path) -> Dict[str, torch.Tensor]:
    path = CheckpointManager(logdir / "checkpoints").latest()
    assert path is not None, f"no checkpoint in {logdir}"
    return CheckpointManager.load(path)["global"]


def assert_same_run(reference: Path, other: Path) -> None:
    ref_rows, rows = fl_rows(reference), fl_rows(other)
    assert [r["round"] for r in rows] == [r["round"] for r in ref_rows]
    for a, b in zip(ref_rows, rows):
        assert a == b, f"round {a['round']} differs"
    ref, weights = final_weights(reference), final_weights(other)
    assert ref.keys() == weights.keys()
    for name in ref:
        assert torch.equal(ref[name], weights[name]), name


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory):
    """The local backend's run, in this process (one torch thread, as conftest sets)."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local")
    logdir = tmp_path_factory.mktemp("mpi") / "local"
    run_simulation(config, logdir, print_rounds=False)
    return {"config": config, "logdir": logdir}


# -- without MPI -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Reply:
    blocks: List[Any]
    stats: Dict[int, float]


def test_pack_unpack_is_exact_and_keeps_structure():
    dense = {"w": torch.randn(3, 5), "b": torch.randn(5, dtype=torch.float64)}
    shared = torch.arange(6, dtype=torch.int32)
    reply = _Reply(blocks=[(0, dense, (torch.tensor([1, 4]), shared)), (1, {"empty": torch.zeros(0, 4)}, None)],
                   stats={3: 0.25, "again": shared, "scalar": torch.tensor(1.5)})
    packed = pack(reply)
    assert packed.data.nbytes >= 3 * 5 * 4 + 5 * 8 and len(packed.header) < 2000
    back = unpack(packed)
    assert isinstance(back, _Reply) and back.stats[3] == 0.25 and back.blocks[1][2] is None
    for name, tensor in dense.items():
        got = back.blocks[0][1][name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert torch.equal(back.blocks[0][2][0], torch.tensor([1, 4]))
    assert back.blocks[0][2][1] is back.stats["again"]  # one tensor, sent once
    assert torch.equal(back.stats["again"], shared)
    assert back.blocks[1][1]["empty"].shape == (0, 4) and back.stats["scalar"].item() == 1.5
    param = torch.nn.Parameter(torch.ones(2))
    assert isinstance(unpack(pack({"p": param}))["p"], torch.nn.Parameter)


def test_blocks_are_fixed_by_the_cohort_and_balanced_by_samples():
    blocks = make_blocks([9, 3, 7, 1, 5, 11, 13, 2], 4)
    assert [ids for _, ids in blocks] == [[1, 2], [3, 5], [7, 9], [11, 13]]
    sizes = np.zeros(20, dtype=np.int64)
    sizes[[1, 2, 3, 5, 7, 9, 11, 13]] = [100, 100, 10, 10, 10, 10, 90, 90]
    groups = assign_blocks(blocks, sizes, 2)
    loads = [sum(int(sizes[ids].sum()) for _, ids in g) for g in groups]
    assert sorted(loads) == [200, 220] and all(g == sorted(g) for g in groups)


def test_mpi_backend_without_mpi4py_says_how_to_install(monkeypatch, tmp_path):
    from fedrec.federated.mpi_backend import MPIBackend

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.futures", None)
    with pytest.raises(MPIUnavailableError, match=r"pip install 'fedrec\[mpi\]'"):
        MPIBackend({}, tmp_path, np.ones(4, dtype=np.int64))


def test_simulate_with_backend_mpi_without_mpi4py_fails_clearly(config, monkeypatch, tmp_path, capsys):
    from fedrec.cli import main

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.futures", None)
    config_file = tmp_path / "c.yml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["simulate", "--config", str(config_file), "--backend", "mpi", "--logdir", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "needs mpi4py" in err and "pip install 'fedrec[mpi]'" in err


def test_ranks_without_mpi4py_futures_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PMI_SIZE", "3")
    monkeypatch.delitem(sys.modules, "mpi4py.futures", raising=False)
    from fedrec.utilities.registry import RegistryError

    with pytest.raises(RegistryError, match="python -m mpi4py.futures"):
        make_backend("auto", None, {}, tmp_path)  # type: ignore[arg-type]


def test_fl_imports_registers_user_algorithms_from_modules_and_files(tmp_path, monkeypatch):
    from fedrec.federated.config import import_modules
    from fedrec.utilities import registry

    source = tmp_path / "my_algos.py"
    source.write_text("from fedrec.federated.fed_avg import FedAvgWorker\n"
                      "from fedrec.utilities import registry\n"
                      "@registry.load('fl_algo', 'test_file_algo')\n"
                      "class A(FedAvgWorker):\n    pass\n")
    import_modules(["tests.mpi_algorithms", str(source)])
    import_modules([str(source)])  # twice is fine
    assert registry.lookup("fl_algo", "test_kill_in_round")
    assert registry.lookup("fl_algo", "test_file_algo")
    with pytest.raises(registry.RegistryError, match="fl.imports: cannot import 'no_such_module_x'"):
        import_modules(["no_such_module_x"])


def test_crash_markers_are_reported_once(tmp_path):
    (tmp_path / "mpi").mkdir()
    (tmp_path / "mpi" / "rank-2.json").write_text(json.dumps(
        {"rank": 2, "pid": 99, "host": "h", "round": 4, "clients": list(range(12))}))
    (message,) = report_crashed_processes(tmp_path)
    assert "rank 2 (pid 99 on h)" in message and "round 4" in message and "2 more" in message
    assert report_crashed_processes(tmp_path) == []


# -- real MPI runs ---------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("processes", [2, 3, 4])
def test_mpi_gives_the_local_result_bit_for_bit(reference, tmp_path, processes):
    """1, 2 and 3 MPI processes: every round's metrics and the final weights."""
    config = copy.deepcopy(reference["config"])
    config["fl"]["backend"] = "auto"  # mpi, as launched under mpi4py.futures
    result = simulate(config, tmp_path / "mpi", processes=processes)
    assert f"mpi backend: {processes - 1} MPI processes (direct channel)" in result.stderr + result.stdout
    assert_same_run(reference["logdir"], tmp_path / "mpi")
    assert not list((tmp_path / "mpi" / "mpi").glob("rank-*.json"))  # no markers left


@needs_mpi
def test_sparse_submodels_under_mpi_give_the_local_result(synthetic_data, tmp_path):
    """Sparse mode: each process downloads only its clients' rows; results stay identical."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local", num_rounds=2,
                     embedding_updates="sparse")
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


@needs_mpi
def test_non_linear_algorithm_receives_every_model_under_mpi(synthetic_data, tmp_path):
    """The tutorial's FedAvg aggregates the clients' models itself (no pre-reduction)."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local", num_rounds=2,
                     fl_algo={"name": "tutorial_fed_avg"},
                     imports=["tests.user_algorithms.tutorial_fedavg"])
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


@needs_mpi
def test_client_error_on_a_worker_names_rank_round_and_client(synthetic_data, tmp_path):
    config = _config(synthetic_data["config"], client_num_per_round=40, num_rounds=1,
                     fl_algo={"name": "test_raise_in_client", "fail_client": 3, "fail_round": 0})
    result = simulate(config, tmp_path / "err", processes=3, check=False)
    assert result.returncode != 0
    assert "a client failed" in result.stderr and "Traceback" not in result.stderr
    assert "round 0, client 3: RuntimeError: disk full" in result.stderr
    assert "rank 1: round 0" in result.stderr or "rank 2: round 0" in result.stderr
    assert not list((tmp_path / "err" / "mpi").glob("rank-*.json"))


@needs_mpi
def test_killed_worker_stops_the_run_and_resume_finishes_it_identically(reference, tmp_path):
    once = tmp_path / "killed-client.txt"
    config = copy.deepcopy(reference["config"])
    config["fl"]["fl_algo"] = {"name": "test_kill_in_round", "kill_round": 1, "once_file": str(once)}
    config["fl"]["backend"] = "mpi"
    logdir = tmp_path / "run"
    crashed = simulate(config, logdir, processes=3, check=False)
    assert crashed.returncode != 0 and once.exists()
    killed_client = int(once.read_text())
    # the last round's checkpoint is intact: round 1 of 3 done
    assert CheckpointManager(logdir / "checkpoints").latest_step() == 1
    assert CheckpointManager.load(CheckpointManager(logdir / "checkpoints").latest())["round"] == 1
    assert list((logdir / "mpi").glob("rank-*.json"))

    resumed = simulate(config, logdir, processes=3, resume=True)
    report = [line for line in resumed.stderr.splitlines() if "an earlier run stopped while MPI rank" in line]
    assert report, resumed.stderr[-3000:]
    named = [[int(c) for c in re.search(r"clients \[([^\]]*)\]", line).group(1).split(",")]
             for line in report if "round 1 (0-based)" in line]
    assert any(killed_client in clients for clients in named), report
    assert_same_run(reference["logdir"], logdir)


@needs_mpi
@pytest.mark.parametrize("fl_algo, mode, processes", [
    ({"name": "scaffold"}, "sparse", 3),
    ({"name": "scaffold"}, "dense", 2),
    ({"name": "fed_adam", "server_lr": 0.01}, "dense", 3),
    ({"name": "fed_prox", "mu": 0.5}, "sparse", 2),
])
def test_server_values_client_state_and_server_optimizers_under_mpi(synthetic_data, tmp_path, fl_algo, mode,
                                                                    processes):
    """SCAFFOLD's broadcast c (cut to rows in sparse mode), its per-client state written
    by the MPI processes, and an adaptive server optimizer give the local result."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local", num_rounds=3, fl_algo=fl_algo,
                     embedding_updates=mode, client_num_per_round=12)
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=processes)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")
