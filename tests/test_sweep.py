"""`fedrec sweep`: the grid's points run once each, in parallel, resumable, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedrec.cli import main
from fedrec.sweep import make_points, parse_grid, run_sweep
from fedrec.utilities.logger import read_metrics


def _base(config, tmp_path: Path, rounds: int = 2) -> str:
    config["fl"].update({"num_rounds": rounds, "client_num_per_round": 4})
    path = tmp_path / "base.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_grid_runs_every_point_once_then_skips_finished_ones(config, tmp_path, capsys):
    base = _base(config, tmp_path)
    logdir = tmp_path / "sweep"
    argv = ["sweep", "--config", base, "--grid", "fl.local_lr=0.1,0.3", "--grid", "fl.local_epochs=1",
            "--seeds", "2", "--jobs", "2", "--logdir", str(logdir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = sorted(f"fl.local_lr={lr}__fl.local_epochs=1__seed={s}" for lr in ("0.1", "0.3") for s in (0, 1))
    assert sorted(p.parent.name for p in logdir.glob("*/metrics.jsonl")) == names
    assert "sweep: 4 run, 0 finished before, 0 failed" in out
    for name in names:
        rounds = [r["round"] for r in read_metrics(logdir / name) if r["phase"] == "fl"]
        assert rounds == [1, 2]
        saved = yaml.safe_load((logdir / name / "config.yml").read_text())
        assert saved["fl"]["local_lr"] == float(name.split("=")[1].split("__")[0])
        assert saved["fl"]["seed"] == int(name[-1])
    report = json.loads((logdir / "report" / "report.json").read_text())
    assert report["groups"] == {"fl.local_lr=0.1__fl.local_epochs=1": names[:2],
                                "fl.local_lr=0.3__fl.local_epochs=1": names[2:]}
    assert report["metrics"]["fl/roc_auc"]["fl.local_lr=0.1__fl.local_epochs=1"]["count"] == 2
    assert f"report: {logdir / 'report' / 'report.html'}" in out
    before = {n: (logdir / n / "metrics.jsonl").read_bytes() for n in names}
    assert main(argv) == 0  # again: nothing to run
    assert "sweep: 0 run, 4 finished before, 0 failed" in capsys.readouterr().out
    assert before == {n: (logdir / n / "metrics.jsonl").read_bytes() for n in names}


def test_an_interrupted_point_is_resumed(config, tmp_path, capsys):
    from fedrec.federated.run import run_simulation
    from fedrec.utilities.config import load_config

    base = _base(config, tmp_path, rounds=3)
    logdir = tmp_path / "sweep"
    # a point stopped after round 1 of 3: its checkpoint is there, no finished summary
    partial = load_config(base, sets=["fl.local_lr=0.2", "fl.num_rounds=1"])
    run_simulation(partial, logdir / "fl.local_lr=0.2", print_rounds=False)
    (logdir / "fl.local_lr=0.2" / "summary.json").unlink()
    outcomes, page = run_sweep(base, ["fl.local_lr=0.2"], logdir, echo=lambda line: None)
    assert [o.status for o in outcomes] == ["done"]
    assert [r["round"] for r in read_metrics(logdir / "fl.local_lr=0.2") if r["phase"] == "fl"] == [1, 2, 3]
    assert "resumed from" in (logdir / "fl.local_lr=0.2" / "run.log").read_text()
    assert not (logdir / "fl.local_lr=0.2" / "previous").exists()
    assert page is not None and page.is_file()
    # a point finished for fewer rounds than the grid's config asks for is not finished
    summary = json.loads((logdir / "fl.local_lr=0.2" / "summary.json").read_text())
    assert summary["finished"] is True and summary["num_rounds"] == 3


def test_unknown_grid_key_or_bad_value_is_one_line_before_any_run(config, tmp_path, capsys):
    base = _base(config, tmp_path)
    cases = [(["fl.bogus=1,2"], "bogus"),
             (["model.arch_mlp_botom=[13,8]"], "unknown config key 'model.arch_mlp_botom'"),
             (["fl.local_lr=0.1", "fl.local_epochs=many"], "local_epochs"),
             (["fl.local_lr"], "expected KEY=V1,V2")]
    for grid, needle in cases:
        logdir = tmp_path / "never"
        argv = ["sweep", "--config", base, "--logdir", str(logdir)]
        for item in grid:
            argv += ["--grid", item]
        capsys.readouterr()
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith("fedrec sweep: error: ") and needle in lines[0], lines[0]
        assert not logdir.exists()


def test_point_names_are_safe_and_distinct():
    grid = parse_grid(["fl.fl_algo={name: fed_avg},{name: fed_prox, mu: 0.1}", "fl.partitioner.alpha=0.1,1"])
    assert grid[0][1] == ["{name: fed_avg}", "{name: fed_prox, mu: 0.1}"]
    points = make_points(grid, seeds=1, seed_keys=["fl.seed"])
    names = [p.name for p in points]
    assert len(set(names)) == 4
    assert all(all(c.isalnum() or c in "._=+-" for c in name) for name in names), names
    assert names[0] == "fl.fl_algo=name_fed_avg__fl.partitioner.alpha=0.1"
    assert points[0].sets == ["fl.fl_algo={name: fed_avg}", "fl.partitioner.alpha=0.1"]
    seeded = make_points(parse_grid(["fl.local_lr=0.1"]), seeds=3, seed_keys=["fl.seed"])
    assert [p.sets[-1] for p in seeded] == ["fl.seed=0", "fl.seed=1", "fl.seed=2"]
