"""`fedrec report`: HTML + PNGs of runs, tables that match metrics.jsonl, bad input in one
line, and the page checked in a real headless browser."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from fedrec.cli import main
from fedrec.report import write_report
from fedrec.utilities.logger import read_metrics

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory) -> Dict[str, Path]:
    """Two 3-round FL runs with different configs and a short standard-training run."""
    from fedrec.federated.run import run_simulation
    from fedrec.runner import run_train

    root = tmp_path_factory.mktemp("report-runs")
    base = copy.deepcopy(synthetic_data["config"])
    other = copy.deepcopy(base)
    other["fl"]["local_lr"] = 0.3
    other["fl"]["client_num_per_round"] = 4
    run_simulation(base, root / "a", print_rounds=False)
    run_simulation(other, root / "b", print_rounds=False)
    train = copy.deepcopy(base)
    train["train"]["config"].update({"num_epochs": None, "num_batches": 30, "eval_every_n": 10,
                                     "report_every_n": 10, "save_every_n": 30})
    run_train(train, root / "t")
    return {"a": root / "a", "b": root / "b", "t": root / "t"}


def _report_json(out: Path) -> Dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _write_run(folder: Path, rows: List[Dict[str, Any]], config: Dict[str, Any] | None = None,
               tail: str = "") -> Path:
    """A run folder written by hand: metrics.jsonl (plus ``tail``, e.g. a torn line) and config.yml."""
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (folder / "metrics.jsonl").write_text(text)
    (folder / "config.yml").write_text(yaml.safe_dump(config or {"fl": {"local_lr": 0.1, "seed": 0}}))
    return folder


def _fl_rows(rounds: int, scale: float = 1.0, **extra: float) -> List[Dict[str, Any]]:
    return [{"phase": "fl", "step": r, "round": r, "roc_auc": 0.6 + 0.01 * r * scale,
             "log_loss": 0.6 - 0.01 * r * scale, "bytes_up": 1000, "bytes_down": 2000, **extra}
            for r in range(1, rounds + 1)]


# -- content --------------------------------------------------------------------------------
def test_report_of_one_run_writes_html_and_pngs_matching_metrics(runs, tmp_path):
    out = tmp_path / "report"
    page = write_report([runs["a"]], out)
    assert page == out / "report.html" and page.stat().st_size > 1_000_000  # plotly.js inside
    text = page.read_text()
    assert "<script src" not in text and text.count("<script") >= 2  # plotly.js inline: opens offline
    assert text.count("Plotly.newPlot") == len(_report_json(out)["charts"])
    report = _report_json(out)
    assert {"fl-roc_auc", "fl-log_loss", "fl-train_loss", "fl-bytes_up"} <= set(report["charts"])
    assert any(c.startswith("clients-a-sizes") for c in report["charts"])
    assert any(c.startswith("clients-a-label-skew") for c in report["charts"])
    assert any(c.startswith("clients-a-rows-touched") for c in report["charts"])
    for name in report["pngs"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {f"png/{c}.png" for c in report["charts"]} <= set(report["pngs"])
    assert "png/fl-roc_auc-vs-cumulative_MB.png" in report["pngs"]
    records = [r for r in read_metrics(runs["a"]) if r["phase"] == "fl"]
    cell = report["metrics"]["fl/roc_auc"]["a"]
    aucs = [r["roc_auc"] for r in records]
    assert cell["final"] == aucs[-1] and cell["best"] == max(aucs)
    assert cell["best_at"] == records[aucs.index(max(aucs))]["round"]
    losses = [r["log_loss"] for r in records]
    assert report["metrics"]["fl/log_loss"]["a"]["best"] == min(losses)
    assert report["metrics"]["fl/bytes_up"]["a"]["final"] == records[-1]["bytes_up"]
    assert report["metrics"]["fl/bytes_up"]["a"]["best"] is None  # "best" means nothing for bytes


def test_report_of_two_runs_and_training_through_the_cli(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs["a"]), str(runs["b"]), str(runs["t"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    report = _report_json(out)
    flat = {}
    for name in ("a", "b", "t"):
        from fedrec.report.tables import flatten

        flat[name] = flatten(yaml.safe_load((runs[name] / "config.yml").read_text()))
    differing = {k for k in set().union(*flat.values()) if len({json.dumps(f.get(k)) for f in flat.values()}) > 1}
    assert set(report["config_diff"]) == differing
    assert {"fl.local_lr", "fl.client_num_per_round", "train.config.num_batches"} <= differing
    assert report["config_diff"]["fl.local_lr"] == {"a": 0.1, "b": 0.3, "t": 0.1}
    # standard training: val AUC and log loss against steps; test values in the table
    assert {"val-roc_auc", "val-log_loss", "train-loss"} <= set(report["charts"])
    val = [r for r in read_metrics(runs["t"]) if r["phase"] == "val"]
    assert report["metrics"]["val/roc_auc"]["t"]["final"] == val[-1]["roc_auc"]
    assert "t" in report["metrics"]["test/roc_auc"]
    text = (out / "report.html").read_text()
    assert 'id="config-diff"' in text and 'data-key="fl.local_lr"' in text


def test_two_runs_with_equal_configs_say_so(tmp_path):
    a = _write_run(tmp_path / "a", _fl_rows(3))
    b = _write_run(tmp_path / "b", _fl_rows(3, scale=2))
    out = tmp_path / "out"
    write_report([a, b], out, pngs=False)
    assert _report_json(out)["config_diff"] == {}
    assert "configs do not differ" in (out / "report.html").read_text()
    assert _report_json(out)["pngs"] == []


# -- bad input ------------------------------------------------------------------------------
def test_truncated_last_line_is_left_out_with_a_note(tmp_path, capsys):
    run = _write_run(tmp_path / "killed", _fl_rows(4), tail='{"phase": "fl", "step": 5, "round": 5, "roc_au')
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    report = _report_json(out)
    assert report["metrics"]["fl/roc_auc"]["killed"]["final"] == pytest.approx(0.64)
    assert any("cut short" in n for n in report["notes"])
    assert "cut short" in (out / "report.html").read_text()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    sweep = tmp_path / "sweep"
    _write_run(sweep / "p1" / "inner", _fl_rows(2))
    cases = [(tmp_path / "empty", "is not a run folder: it has no metrics.jsonl"),
             (tmp_path / "missing", "no such folder"),
             (tmp_path / "file.txt", "is not a run folder"),
             (sweep, "is not a run folder")]  # runs two levels down are not looked for
    for path, needle in cases:
        capsys.readouterr()
        assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith("fedrec report: error: ") and needle in lines[0], lines[0]


def test_an_empty_metrics_file_is_one_line(tmp_path, capsys):
    run = _write_run(tmp_path / "fresh", [])
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "nothing to show" in capsys.readouterr().err


def test_runs_with_different_metric_sets_show_what_exists(tmp_path):
    a = _write_run(tmp_path / "dp", _fl_rows(3, epsilon=0.5), {"fl": {"postprocessors": ["dp"]}})
    b = _write_run(tmp_path / "plain", [{k: v for k, v in r.items() if k != "log_loss"} for r in _fl_rows(2)],
                   {"fl": {"postprocessors": []}})
    out = tmp_path / "out"
    write_report([a, b], out)
    report = _report_json(out)
    assert set(report["metrics"]["fl/epsilon"]) == {"dp"}
    assert set(report["metrics"]["fl/roc_auc"]) == {"dp", "plain"}
    assert "fl-epsilon" in report["charts"] and "png/fl-epsilon.png" in report["pngs"]
    text = (out / "report.html").read_text()
    assert "not recorded by: plain" in text
    assert report["config_diff"] == {"fl.postprocessors": {"dp": ["dp"], "plain": []}}
    assert any("no saved client split" in n for n in report["notes"])


def test_per_client_quality_and_seed_groups(tmp_path):
    client_rows = [{"phase": "client", "step": 3, "round": 3, "client": c, "roc_auc": 0.5 + c / 100}
                   for c in range(20)]
    for seed in (0, 1):
        _write_run(tmp_path / "sweep" / f"fl.local_lr=0.1__seed={seed}", _fl_rows(3, scale=1 + seed) + client_rows,
                   {"fl": {"local_lr": 0.1, "seed": seed}})
    _write_run(tmp_path / "sweep" / "fl.local_lr=0.3__seed=0", _fl_rows(3, scale=3),
               {"fl": {"local_lr": 0.3, "seed": 0}})
    out = tmp_path / "out"
    write_report([tmp_path / "sweep"], out, group_seeds=True)
    report = _report_json(out)
    assert report["groups"] == {"fl.local_lr=0.1": ["fl.local_lr=0.1__seed=0", "fl.local_lr=0.1__seed=1"],
                                "fl.local_lr=0.3": ["fl.local_lr=0.3__seed=0"]}
    cell = report["metrics"]["fl/roc_auc"]["fl.local_lr=0.1"]
    assert cell["final"] == pytest.approx((0.63 + 0.66) / 2) and cell["count"] == 2
    assert cell["final_spread"] == pytest.approx(0.0212132, rel=1e-4)
    assert report["config_diff"] == {"fl.local_lr": {"fl.local_lr=0.1": 0.1, "fl.local_lr=0.3": 0.3}}
    assert "per-client-roc_auc" in report["charts"]
    assert any("per-client quality is not recorded by: fl.local_lr=0.3__seed=0" in n for n in report["notes"])


# -- in a real browser ----------------------------------------------------------------------
def _browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Chromium and its driver (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_every_chart_renders_in_a_headless_browser_without_js_errors(runs, tmp_path):
    out = tmp_path / "report"
    for name in ("a", "b"):  # a copy with a torn line: the page must still render
        shutil.copytree(runs[name], tmp_path / "runs" / name)
    with open(tmp_path / "runs" / "b" / "metrics.jsonl", "a") as f:
        f.write('{"phase": "fl", "ro')
    page = write_report([tmp_path / "runs" / "a", tmp_path / "runs" / "b", runs["t"]], out)
    expected = _report_json(out)["charts"]
    driver = _browser()
    try:  # uncaught errors, recorded from before the page's first script
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
            "window.__errors = []; window.addEventListener('error', e => window.__errors.push(String(e.message)));")})
        driver.get(page.resolve().as_uri())
        rendered = driver.execute_script("""
            return Array.from(document.querySelectorAll('div.chart')).map(c => [
                c.dataset.chart, c.querySelectorAll('svg.main-svg').length,
                c.querySelectorAll('svg.main-svg g.trace').length]);""")
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        # the x-axis buttons switch a chart to cumulative bytes without an error
        driver.execute_script("document.querySelector('div.chart .updatemenu-button:nth-child(2)')"
                              ".dispatchEvent(new MouseEvent('click', {bubbles: true}));")
        severe += [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        errors = driver.execute_script("return window.__errors || []")
    finally:
        driver.quit()
    assert [r[0] for r in rendered] == expected
    not_drawn = [key for key, svgs, traces in rendered if svgs == 0 or traces == 0]
    assert not not_drawn, f"charts without SVG traces: {not_drawn}"
    assert severe == [] and errors == [], severe
