"""Shared fixtures: a small synthetic Criteo dataset, preprocessed once per session."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from fedrec.utilities.config import load_config

# Tiny test models gain nothing from a second thread, and OpenMP threads that spin on an
# oversubscribed machine (CI runs beside other jobs) slow every step many times over.
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo" / "kaggle-train-head.txt"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Dict[str, Any]:
    """8,000 synthetic rows with latent users, preprocessed (80/10/10 split)."""
    from fedrec.data import synthesize
    from fedrec.runner import run_preprocess

    root = tmp_path_factory.mktemp("synthetic")
    datafile = root / "synthetic.txt"
    meta = synthesize(8000, str(datafile), seed=1, num_users=300)
    config = small_config(datafile, root / "processed")
    run_preprocess(config, progress=False)
    return {"root": root, "datafile": datafile, "processed": root / "processed", "meta": meta,
            "config": config}


def small_config(datafile: Path, processed: Path) -> Dict[str, Any]:
    """configs/dlrm_fl.yml pointed at the given files, sized for fast tests."""
    config = load_config(PROJECT_ROOT / "configs" / "dlrm_fl.yml")
    config["model"]["preproc"].update({"datafile": str(datafile), "output_file": str(processed)})
    config["model"]["arch_mlp_bot"] = [13, 16, 8]
    config["model"]["arch_feature_emb_size"] = 8
    config["model"]["arch_mlp_top"] = [16, 1]
    config["train"]["config"].update({"batch_size": 64, "eval_batch_size": 4096, "progress_bar": False,
                                       "eval_every_n": 50, "report_every_n": 20, "save_every_n": 50})
    config["fl"].update({"fl_algo": {"name": "fed_avg"}, "num_workers": 40, "num_rounds": 3, "client_num_per_round": 8,
                         "local_epochs": 1, "local_lr": 0.1,
                         "local_batch_size": 16, "progress_bar": False, "backend": "local",
                         "partitioner": {"name": "dirichlet", "alpha": 0.5}})
    return config


@pytest.fixture
def config(synthetic_data) -> Dict[str, Any]:
    """A fresh copy of the small config (tests may change it freely)."""
    return copy.deepcopy(synthetic_data["config"])
