"""FL plans (fedrec/plans): export, the runner against the simulator, bad plans and data.

The runner's update must equal the simulated client's (the issue allows 1e-5 relative;
the exported graph gives the same operations, so these tests ask for bit equality and
report the worst relative difference when it fails).
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.data.errors import DataError
from fedrec.federated.client_runner import RoundJob, build_client_runner
from fedrec.federated.context import RoundContext
from fedrec.federated.update import submodel
from fedrec.plans.data import export_client_data, read_client_data, write_client_data
from fedrec.plans.export import export_plan
from fedrec.plans.format import CHECKSUM, MANIFEST, PlanError, read_plan, sha256
from fedrec.plans.runner import PlanRunner
from fedrec.utilities.config import ConfigError
from tests.run_helpers import cli, write_config


@pytest.fixture(scope="module")
def plans(synthetic_data, tmp_path_factory):
    """A dense-mode and a sparse-mode plan of the small config, and client data files."""
    root = tmp_path_factory.mktemp("plans")
    config = copy.deepcopy(synthetic_data["config"])
    dense = export_plan(config, root / "dense.plan")
    sparse_config = copy.deepcopy(config)
    sparse_config["fl"]["embedding_updates"] = "sparse"
    export_plan(sparse_config, root / "sparse.plan")
    export_client_data(config, None, root / "data", [0, 3, 7], ["val"])
    return {"root": root, "config": config, "sparse_config": sparse_config, "manifest": dense}


def _simulated_update(config, logdir: Path, cid: int, round_idx: int, global_state=None):
    logdir.mkdir(parents=True, exist_ok=True)
    runner = build_client_runner(config, logdir, new_partition=True)
    state = global_state or {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    result = runner.run_job(RoundJob(RoundContext(round_idx, runner.seed, cohort=[cid]), [(0, [cid])], state))
    return result.block_updates[0][1], result.stats[0], state


def _dense(update, name, like):
    if name in update.dense:
        return update.dense[name]
    out = torch.zeros_like(like)
    out[update.rows[name].ids] = update.rows[name].values
    return out


def _worst_relative(a, b, names, shapes):
    worst = 0.0
    for name in names:
        x, y = _dense(a, name, shapes[name]), _dense(b, name, shapes[name])
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize("cid, round_idx", [(0, 0), (3, 2), (7, 5)])
def test_runner_update_equals_the_simulated_clients_dense(plans, tmp_path, cid, round_idx):
    runner = PlanRunner(plans["root"] / "dense.plan")
    expected, stats, state = _simulated_update(plans["config"], tmp_path, cid, round_idx)
    data = read_client_data(plans["root"] / "data" / f"client-{cid}.safetensors", runner.manifest)
    result = runner.train(state, data, round_idx, cid)
    assert (result.num_steps, result.num_samples, result.sample_num) == (stats.num_steps, stats.num_samples,
                                                                         stats.sample_num)
    assert result.loss_sum == stats.loss_sum
    shapes = {n: state[n] for n in runner.names}
    worst = _worst_relative(result.update, expected, runner.names, shapes)
    assert worst == 0.0, f"worst relative difference {worst:.3g}"
    assert result.update.weight == expected.weight


def test_runner_update_equals_the_simulated_clients_sparse(plans, tmp_path):
    """Sparse mode: the client gets only its rows; ids, values, row weights and the
    upload's bytes equal the simulator's."""
    runner = PlanRunner(plans["root"] / "sparse.plan")
    assert runner.sparse_mode
    for cid in (0, 3):
        expected, stats, state = _simulated_update(plans["sparse_config"], tmp_path / str(cid), cid, 1)
        data = read_client_data(plans["root"] / "data" / f"client-{cid}.safetensors", runner.manifest)
        rows = runner.rows_needed(data)
        result = runner.train(submodel(state, rows), data, 1, cid)
        assert set(result.update.rows) == set(expected.rows)
        for name, row in result.update.rows.items():
            want = expected.rows[name]
            assert torch.equal(row.ids, want.ids) and torch.equal(row.values, want.values), name
            assert torch.equal(row.row_weight, want.row_weight), name
        for name, delta in result.update.dense.items():
            assert torch.equal(delta, expected.dense[name]), name
        assert result.bytes_up == stats.bytes_up
        assert runner.download_bytes(data) == stats.bytes_down


def test_local_steps_and_evaluation_match(plans, tmp_path):
    """local_steps (passes repeat until the count) and validate: the simulator's metrics."""
    config = copy.deepcopy(plans["config"])
    config["fl"].update({"local_epochs": None, "local_steps": 7})
    export_plan(config, tmp_path / "steps.plan")
    runner = PlanRunner(tmp_path / "steps.plan")
    expected, stats, state = _simulated_update(config, tmp_path / "sim", 7, 4)  # client 7 has few rows
    data = read_client_data(plans["root"] / "data" / "client-7.safetensors", runner.manifest)
    result = runner.train(state, data, 4, 7)
    assert result.num_steps == stats.num_steps == 7
    assert _worst_relative(result.update, expected, runner.names, {n: state[n] for n in runner.names}) == 0.0
    from fedrec.utilities.metrics import compute_metrics

    sim_runner = build_client_runner(config, None, new_partition=True)
    labels, probs = sim_runner.trainer.predict(sim_runner.trainer.dataloaders["val"])
    val = read_client_data(plans["root"] / "data" / "val.safetensors", runner.manifest)
    assert runner.evaluate(runner.initial_weights(), val) == pytest.approx(compute_metrics(labels, probs), rel=1e-6)


def test_plan_starts_from_the_runs_newest_checkpoint(plans, tmp_path):
    from fedrec.federated.simulation import Simulation
    from fedrec.utilities.checkpoint import CheckpointManager
    from fedrec.utilities.logger import MemoryLogger

    config = copy.deepcopy(plans["config"])
    config["fl"]["num_rounds"] = 1
    sim = Simulation(config, tmp_path / "run", logger=MemoryLogger())
    sim.run()
    sim.close()
    manifest = export_plan(config, tmp_path / "p.plan", logdir=tmp_path / "run")
    assert manifest["source"]["round"] == 1
    saved = CheckpointManager.load(CheckpointManager(tmp_path / "run" / "checkpoints").latest())["global"]
    weights = PlanRunner(tmp_path / "p.plan").initial_weights()
    assert all(torch.equal(weights[k], saved[k]) for k in weights)
    with pytest.raises(ConfigError, match="no checkpoints/ folder"):
        export_plan(config, tmp_path / "q.plan", logdir=tmp_path / "empty")


# -- bad plans --------------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_truncated_and_corrupted_plans_are_refused(plans, tmp_path):
    plan = plans["root"] / "dense.plan"
    data = plan.read_bytes()
    (tmp_path / "cut.plan").write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanError, match="truncated or corrupted"):
        read_plan(tmp_path / "cut.plan")

    def flip_weight(members):
        blob = bytearray(members["weights.safetensors"])
        blob[-5] ^= 0xFF
        members["weights.safetensors"] = bytes(blob)

    _rewrite(plan, tmp_path / "flipped.plan", flip_weight)
    with pytest.raises(PlanError, match="weights.safetensors does not match its checksum"):
        PlanRunner(tmp_path / "flipped.plan")

    def edit_manifest(members):
        members[MANIFEST] = members[MANIFEST].replace(b'"local_batch_size": 16', b'"local_batch_size": 32')

    _rewrite(plan, tmp_path / "edited.plan", edit_manifest)
    with pytest.raises(PlanError, match="does not match its checksum"):
        read_plan(tmp_path / "edited.plan")
    with pytest.raises(PlanError, match="does not exist"):
        read_plan(tmp_path / "missing.plan")


def _resealed(members, manifest):
    members[MANIFEST] = json.dumps(manifest).encode()
    members[CHECKSUM] = (sha256(members[MANIFEST]) + "\n").encode()


def test_a_newer_format_is_refused_naming_both_versions(plans, tmp_path):
    def newer(members):
        manifest = json.loads(members[MANIFEST])
        manifest.update(format_version=99, fedrec_version="9.0.0")
        _resealed(members, manifest)

    _rewrite(plans["root"] / "dense.plan", tmp_path / "newer.plan", newer)
    with pytest.raises(PlanError) as err:
        PlanRunner(tmp_path / "newer.plan")
    text = str(err.value)
    assert "format version 99" in text and "fedrec 9.0.0" in text and "version 1 at most" in text
    assert "fedrec 0.1.0" in text


def test_a_program_that_would_unpickle_is_refused(plans, tmp_path):
    """A .pt2 whose sample inputs or payloads are pickles never reaches torch.export.load."""
    import io

    def pickled_inputs(members):
        inner = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(members["evaluate.pt2"])) as src, zipfile.ZipFile(inner, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if "sample_inputs" in info.filename:
                    data = b"\x80\x04cos\nsystem\n."  # a pickle calling os.system
                dst.writestr(info.filename, data)
        members["evaluate.pt2"] = inner.getvalue()
        manifest = json.loads(members[MANIFEST])
        manifest["files"]["evaluate.pt2"] = sha256(members["evaluate.pt2"])
        _resealed(members, manifest)

    _rewrite(plans["root"] / "dense.plan", tmp_path / "pickle.plan", pickled_inputs)
    with pytest.raises(PlanError, match="pickled sample inputs"):
        PlanRunner(tmp_path / "pickle.plan")


# -- bad data ----------------------------------------------------------------------------------------
def test_data_that_does_not_fit_the_plan_is_refused(plans, tmp_path):
    manifest = read_plan(plans["root"] / "dense.plan").manifest
    good = read_client_data(plans["root"] / "data" / "client-0.safetensors", manifest)
    n = len(good)
    write_client_data(tmp_path / "narrow.safetensors", good.dense[:, :12].numpy(), good.sparse.numpy(),
                      good.label.numpy())
    with pytest.raises(DataError, match=r"dense has shape \[\d+, 12\], the plan expects \['rows', 13\]"):
        read_client_data(tmp_path / "narrow.safetensors", manifest)
    sparse = good.sparse.numpy().copy()
    sparse[5, 2] = manifest["inputs"]["sparse"]["ids_below"][2]
    write_client_data(tmp_path / "ids.safetensors", good.dense.numpy(), sparse, good.label.numpy())
    with pytest.raises(DataError, match="row 5, categorical column 2 holds id"):
        read_client_data(tmp_path / "ids.safetensors", manifest)
    from safetensors.numpy import save_file

    save_file({"dense": good.dense.numpy(), "label": good.label.numpy()}, str(tmp_path / "nosparse.safetensors"))
    with pytest.raises(DataError, match=r"lacks \['sparse'\]"):
        read_client_data(tmp_path / "nosparse.safetensors", manifest)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        read_client_data(tmp_path / "junk.safetensors", manifest)
    assert n > 0 and np.isfinite(good.dense.numpy()).all()


def test_export_refuses_what_a_plan_cannot_carry(plans, tmp_path):
    config = copy.deepcopy(plans["config"])
    config["fl"]["fl_algo"] = {"name": "fed_prox", "mu": 0.1}
    with pytest.raises(ConfigError, match="fl.fl_algo 'fed_prox'.*local_objective"):
        export_plan(config, tmp_path / "x.plan")
    config = copy.deepcopy(plans["config"])
    config["fl"]["local_optimizer"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    with pytest.raises(ConfigError, match="fl.local_optimizer.*plain sgd"):
        export_plan(config, tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not a fedrec plan"):
        export_plan(plans["config"], tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- the command line ----------------------------------------------------------------------------------
def test_cli_export_info_run_evaluate(plans, tmp_path, capsys):
    config = write_config(plans["config"], tmp_path / "c.yml")
    status, out, err = cli(capsys, "plan", "export", "--config", config, "--out", tmp_path / "c.plan")
    assert status == 0, err
    assert "plan format 1" in out and "sha256" in out
    status, out, _ = cli(capsys, "plan", "info", tmp_path / "c.plan")
    assert status == 0 and json.loads(out)["train"]["local_batch_size"] == 16
    data = plans["root"] / "data" / "client-3.safetensors"
    status, out, err = cli(capsys, "plan", "run", "--plan", tmp_path / "c.plan", "--data", data, "--client", 3,
                           "--round", 2, "--out", tmp_path / "u.safetensors")
    assert status == 0, err
    report = json.loads(out)
    assert report["sample_num"] == len(read_client_data(data, read_plan(tmp_path / "c.plan").manifest))
    from safetensors.torch import load_file

    assert any(k.startswith("dense/") for k in load_file(tmp_path / "u.safetensors"))
    status, out, _ = cli(capsys, "plan", "evaluate", "--plan", tmp_path / "c.plan", "--data",
                         plans["root"] / "data" / "val.safetensors")
    assert status == 0 and 0.0 < json.loads(out)["roc_auc"] < 1.0
    # bad input: one line, exit status 2
    (tmp_path / "bad.plan").write_bytes(b"PK\x03\x04 not really")
    status, _, err = cli(capsys, "plan", "run", "--plan", tmp_path / "bad.plan", "--data", data, "--client", 3)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "bad.plan" in err and "Traceback" not in err


def test_plan_run_out_never_replaces_a_foreign_file_or_a_folder(plans, tmp_path, capsys):
    config = write_config(plans["config"], tmp_path / "c.yml")
    assert cli(capsys, "plan", "export", "--config", config, "--out", tmp_path / "c.plan")[0] == 0
    data = plans["root"] / "data" / "client-3.safetensors"
    run = ("plan", "run", "--plan", tmp_path / "c.plan", "--data", data, "--client", 3)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    for out, needle in ((tmp_path / "notes.txt", "is not an update written by fedrec plan run"),
                        (tmp_path / "folder", "is a folder")):
        status, _, err = cli(capsys, *run, "--out", out)
        assert status == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not any((tmp_path / "folder").iterdir())
    for _ in range(2):  # an earlier update of its own is replaced, through a temporary file
        assert cli(capsys, *run, "--out", tmp_path / "u.safetensors")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("u.")) == ["u.safetensors"]
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal
        cli(capsys, "plan", "run", "--plan", tmp_path / "c.plan", "--data", data, "--client", -1)
    assert exited.value.code == 2 and "--client: expected a whole number >= 0, got -1" in capsys.readouterr().err
