"""MovieLens: preprocessing with counted drops, the leave-one-out split, ranking metrics,
sampled negatives, private user embeddings (never uploaded, persisted, resumed exactly)
and a short federated run on ml-latest-small (skipped where the data are absent)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from fedrec.data.errors import DataError
from fedrec.data.movielens import MovieLensOptions, RatingsDataset, preprocess_ratings
from fedrec.utilities.checkpoint import CheckpointManager
from fedrec.utilities.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ML_SMALL = PROJECT_ROOT.parent / "shared" / "data" / "movielens" / "ml-latest-small"

# A hand-written ratings file: user 1 has 5 ratings (one out of scale, one duplicated),
# user 2 has 3 (one bad line among them), user 3 only 2 (too few for leave-one-out),
# user 7 has 3 with a timestamp tie (broken by line order).
RATINGS = """userId,movieId,rating,timestamp
1,10,4.0,100
1,20,3.0,105
1,30,5.0,101
1,40,9.0,102
1,20,3.0,105
1,50,2.5,103
2,10,1.0,200
2,oops,4.0,201
2,30,4.5,202
2,60,3.5,199
3,10,4.0,300
3,20,2.0,301
7,60,4.0,50
7,10,4.0,50
7,20,0.5,40
"""


def _write(tmp_path: Path, text: str = RATINGS, name: str = "ratings.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _preprocess(tmp_path: Path, **options: Any) -> Dict[str, Any]:
    options.setdefault("skip_bad_lines", True)
    return preprocess_ratings(_write(tmp_path), tmp_path / "out", MovieLensOptions(**options))


# -- data ----------------------------------------------------------------------------------


def test_drops_are_counted_and_reported(tmp_path, capsys):
    from fedrec.runner import run_preprocess

    config = {"model": {"preproc": {"name": "movielens", "datafile": str(_write(tmp_path)),
                                    "output_file": str(tmp_path / "out"), "skip_bad_lines": True}}}
    meta = run_preprocess(config)
    report = meta["report"]
    assert report["bad_lines"] == 1 and report["out_of_scale"] == 1 and report["duplicates"] == 1
    assert report["users_too_few"] == 1 and report["interactions_of_users_too_few"] == 2
    assert report["ratings_read"] == 13  # 15 lines less the bad one and the out-of-scale one
    assert "line 6 repeats line 3" in report["examples"]["duplicates"]
    assert "line 9" in report["examples"]["bad_lines"]
    out = capsys.readouterr().out
    assert "ratings outside the scale 1" in out and "duplicate (user, item, timestamp) rows 1" in out
    assert "users with too few interactions 1" in out and "bad lines skipped 1" in out


def test_bad_line_error_names_file_and_line(tmp_path):
    with pytest.raises(DataError) as err:
        _preprocess(tmp_path, skip_bad_lines=False)
    message = str(err.value)
    assert "ratings.csv, line 9:" in message and "'oops'" in message and "skip_bad_lines" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("1,10,4.0,1\n1,20,9.5,2\n1,30,3.0,3\n", "line 2: rating 9.5 is outside rating_scale [0.5, 5]"),
    ("1,10,4.0,1\n1,10,4.0,1\n1,30,3.0,3\n", "line 2 repeats line 1"),
    ("1,10,4.0,1\n1,20,4.0,2\n", "user 1 has 2 interaction(s)"),
])
def test_invalid_error_mode_names_where(tmp_path, text, expected):
    path = _write(tmp_path, text, "r.csv")
    with pytest.raises(DataError, match=None) as err:
        preprocess_ratings(path, tmp_path / "out", MovieLensOptions(invalid="error"))
    assert expected in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_leave_one_out_split_by_hand(tmp_path):
    meta = _preprocess(tmp_path, feedback="explicit")
    data = RatingsDataset.open(tmp_path / "out")
    # users 1, 2, 7 -> 0, 1, 2; items 10, 20, 30, 50, 60 -> 0..4 (40 was out of scale)
    assert np.load(tmp_path / "out" / "user_ids.npy").tolist() == [1, 2, 7]
    assert np.load(tmp_path / "out" / "item_ids.npy").tolist() == [10, 20, 30, 50, 60]
    assert (meta["num_users"], meta["num_items"]) == (3, 5)
    got = {name: list(zip(data.split(name).user.tolist(), data.split(name).item.tolist(),
                          data.split(name).label.tolist())) for name in ("train", "val", "test")}
    # user 1 by time: 10@100, 30@101, 50@103, 20@105 -> test 20, val 50
    # user 2: 60@199, 10@200, 30@202 -> test 30, val 10
    # user 7: 20@40, 60@50 (line 14), 10@50 (line 15: the later line) -> test 10, val 60
    assert got["train"] == [(0, 0, 4.0), (0, 2, 5.0), (1, 4, 3.5), (2, 1, 0.5)]
    assert got["val"] == [(0, 3, 2.5), (1, 0, 1.0), (2, 4, 4.0)]
    assert got["test"] == [(0, 1, 3.0), (1, 2, 4.5), (2, 0, 4.0)]
    assert meta["splits"] == {"train": 4, "val": 3, "test": 3}  # future: the temporal split's only
    with pytest.raises(DataError, match="has no future split"):
        data.split("future")


def test_implicit_threshold_and_dat_format(tmp_path):
    text = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in
                   [(5, 1, 5, 1), (5, 2, 1, 2), (5, 3, 4, 3), (5, 4, 4, 4), (6, 1, 4, 1), (6, 2, 4, 2), (6, 3, 5, 3)])
    path = _write(tmp_path, text, "ratings.dat")
    meta = preprocess_ratings(path, tmp_path / "out", MovieLensOptions(threshold=4.0, rating_scale=(1, 5)))
    assert meta["report"]["below_threshold"] == 1 and meta["splits"] == {"train": 2, "val": 2, "test": 2}
    data = RatingsDataset.open(tmp_path / "out")
    assert data.split("train").label.tolist() == [1.0, 1.0]  # implicit: every kept rating is 1


def test_output_refuses_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a processed dataset"):
        _preprocess(tmp_path)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_synthetic_ratings_preprocess(tmp_path):
    from fedrec.data.synthetic_ratings import synthesize_ratings

    meta = synthesize_ratings(tmp_path / "s.csv", num_users=50, num_items=200, mean_per_user=8, seed=3)
    assert 0.0 < meta["oracle_hr@10"] <= 1.0 and json.loads((tmp_path / "s.csv.meta.json").read_text()) == meta
    out = preprocess_ratings(tmp_path / "s.csv", tmp_path / "out", MovieLensOptions(invalid="error"))
    assert out["num_users"] == 50 and sum(out["splits"].values()) == meta["rows"]


# -- metrics and negatives -------------------------------------------------------------------


def test_hr_ndcg_match_an_independent_computation():
    from fedrec.utilities.ranking import hit_and_ndcg, ranks

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 100)).round(1)  # rounded: ties happen
    scores[0] = 0.0  # all tied: the held-out item counts as last
    hit, ndcg = hit_and_ndcg(ranks(scores), k=10)
    for row, h, g in zip(scores, hit, ndcg):
        # independent: position of item 0 in a descending sort that puts it after its ties
        order = sorted(range(100), key=lambda j: (-row[j], j == 0))
        position = order.index(0)
        assert h == (position < 10)
        assert g == pytest.approx(1 / math.log2(position + 2) if position < 10 else 0.0)
    assert hit[0] == 0.0


def test_full_ranks_match_a_brute_force_count():
    from fedrec.utilities.ranking import full_ranks, rated_mask

    rng = np.random.default_rng(3)
    num_users, num_items = 12, 30
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, num_users, 80), rng.integers(0, num_items, 80))}
    keys = np.unique(np.array([u * num_items + i for u, i in pairs], np.int64))
    users = np.array([0, 3, 3, 7, 11, 5], np.int64)
    held = np.array([2, 9, 0, 29, 4, 4], np.int64)
    scores = rng.normal(size=(len(users), num_items)).round(1)  # ties happen
    mask = rated_mask(keys, users, num_items)
    assert mask.tolist() == [[(int(u), i) in pairs for i in range(num_items)] for u in users]
    got = full_ranks(torch.from_numpy(scores), torch.from_numpy(held), mask).tolist()
    for b, (u, h) in enumerate(zip(users.tolist(), held.tolist())):
        others = [i for i in range(num_items) if i != h and (u, i) not in pairs]
        assert got[b] == sum(scores[b, i] >= scores[b, h] for i in others), b


def test_full_ranking_metrics_of_the_trainer_by_brute_force(synthetic_config, tmp_path):
    from fedrec.runner import build_trainer

    trainer = build_trainer(copy.deepcopy(synthetic_config), tmp_path)
    trainer.train()
    metrics = trainer.evaluate("test", log=False)
    split, num_items = trainer.dataset.split("test"), trainer.dataset.num_items
    train = trainer.dataset.split("train")
    seen = set(zip(train.user.tolist(), train.item.tolist()))
    hits, gains = [], []
    with torch.no_grad():
        for u, h in zip(split.user.tolist(), split.item.tolist()):
            scores = [float(trainer.model(torch.tensor([u]), torch.tensor([i]))) for i in range(num_items)]
            rank = sum(scores[i] >= scores[h] for i in range(num_items) if i != h and (u, i) not in seen)
            hits.append(rank < 10)
            gains.append(1 / math.log2(rank + 2) if rank < 10 else 0.0)
    assert metrics["hr@10_full"] == pytest.approx(np.mean(hits))
    assert metrics["ndcg@10_full"] == pytest.approx(np.mean(gains))
    assert 0 < metrics["hr@10_full"] < metrics["hr@10"]  # about 140 competitors, not 49


def test_negatives_exclude_rated_items_and_are_seeded():
    from fedrec.data.negatives import RatedItems

    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, size=600)
    items = rng.integers(0, 40, size=600)
    rated = RatedItems([users], [items], 40)
    draw = rated.sample(np.arange(30), 50, np.random.default_rng(7))
    seen = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in seen for u in range(30) for i in draw[u].tolist())
    assert np.array_equal(draw, rated.sample(np.arange(30), 50, np.random.default_rng(7)))
    distinct = rated.sample_distinct(np.arange(30), 10, np.random.default_rng(2))
    assert all(len(set(row)) == 10 for row in distinct.tolist())


# -- federated -----------------------------------------------------------------------------


def small_ratings_config(root: Path, users: int, items: int, seed: int, train: Dict[str, Any],
                         fl: Dict[str, Any]) -> Dict[str, Any]:
    """configs/movielens_mf_fl.yml on a small synthetic ratings file under ``root``
    (written and preprocessed), with 8-dimensional embeddings and these train/fl keys."""
    from fedrec.data.synthetic_ratings import synthesize_ratings
    from fedrec.runner import run_preprocess

    synthesize_ratings(root / "ratings.csv", num_users=users, num_items=items, mean_per_user=10, seed=seed)
    config = load_config(PROJECT_ROOT / "configs" / "movielens_mf_fl.yml")
    config["model"]["embedding_dim"] = 8
    config["model"]["preproc"].update({"datafile": str(root / "ratings.csv"), "output_file": str(root / "out")})
    config["train"]["config"].update({"progress_bar": False, "eval_batch_size": 1000, "eval_negatives": 49, **train})
    config["fl"].update({"progress_bar": False, "local_batch_size": 8, **fl})
    run_preprocess(config, progress=False)
    return config


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory) -> Dict[str, Any]:
    config = small_ratings_config(tmp_path_factory.mktemp("ratings"), users=30, items=150, seed=5,
                                  train={"num_epochs": 1},
                                  fl={"num_rounds": 3, "client_num_per_round": 6, "local_epochs": 1,
                                      "eval_every_n_rounds": 1})
    return config


def _sim(config: Dict[str, Any], logdir: Path):
    from fedrec.federated.simulation import Simulation
    from fedrec.runner import with_data_defaults

    return Simulation(with_data_defaults(config), logdir)


def _assert_private_rows_never_sent(sim, logdir: Path, client: int = 3) -> Any:
    """Runs one client's round: its private rows are not in the global model, the update,
    the checkpoint or the bytes counted; they are in its own state. Returns the result."""
    from fedrec.federated.client_runner import RoundJob
    from fedrec.federated.context import RoundContext
    from fedrec.federated.update import RowSubset

    runner = sim.runner
    private = set(runner.private_names)
    assert private and not private & set(sim.global_state)  # the global model has no user rows at all
    job = RoundJob(RoundContext(0, sim.seed), [(0, [client, 11])], sim.global_state)
    result = runner.run_job(job)
    update = result.block_updates[0][1]
    assert not private & (set(update.dense) | set(update.rows))
    for stat in result.stats:
        assert stat.bytes_up == stat.bytes_down  # what came down goes up: no user rows either way
    state, _ = runner.store.get(client, 1)
    assert {f"private/{name}" for name in private} <= set(state)
    assert not any(isinstance(v, RowSubset) for v in sim.global_state.values())
    sim.save_checkpoint()
    saved = CheckpointManager.load(next((logdir / "checkpoints").glob("*.pt")))
    assert not private & set(saved["global"]) and not any("user_embedding" in n for n in saved["global"])
    return result


def test_private_embeddings_never_uploaded(synthetic_config, tmp_path):
    sim = _sim(copy.deepcopy(synthetic_config), tmp_path)
    assert sim.fl.num_workers == 30  # left out of the config: one client per user
    runner = sim.runner
    assert set(runner.private_names) == {"user_embedding.weight", "user_bias.weight"}
    result = _assert_private_rows_never_sent(sim, tmp_path)
    update = result.block_updates[0][1]
    assert set(update.dense) | set(update.rows) == {"global_bias", "item_embedding.weight", "item_bias.weight"}
    value_bytes = runner.fl.value_bytes
    for stat in result.stats:
        rows = runner._rows_of(stat.client_id, 0)
        expected = 4 + sum(len(ids) * (8 + (8 if name.startswith("item_embedding") else 1) * value_bytes)
                           for name, ids in rows.items())
        assert stat.bytes_up == expected == stat.bytes_down  # item rows and the global bias: nothing else
    # the item rows sent are the client's items plus its negatives, and only those
    client_rows = runner.partition.indices_of(3)
    items = set(np.asarray(runner.trainer.dataset.split("train").item[client_rows]).tolist())
    touched = set(runner._rows_of(3, 0)["item_embedding.weight"].tolist())
    assert items <= touched and len(touched) < runner.trainer.dataset.num_items
    # negatives are drawn from (seed, round, client): the same again, other ones next round
    assert torch.equal(runner._rows_of(3, 0)["item_embedding.weight"], runner._rows_of(3, 0)["item_embedding.weight"])
    assert not torch.equal(runner._rows_of(3, 0)["item_embedding.weight"], runner._rows_of(3, 1)["item_embedding.weight"])
    negatives = runner.trainer.client_loader(client_rows, 8, seed=123).negatives()
    user = int(runner.trainer.dataset.split("train").user[client_rows[0]])
    assert not runner.trainer.rated.contains(np.full(negatives.size, user), negatives.reshape(-1)).any()
    state, _ = runner.store.get(3, 1)
    assert state["private/user_embedding.weight"].shape == (1, 8)
    sim.close()


def _all_private(sim) -> Dict[str, torch.Tensor]:
    users = np.arange(sim.trainer.dataset.num_users)
    return sim.runner.private_rows(users, sim.round_idx + 1)


def test_private_embeddings_persist_and_resume_exactly(synthetic_config, tmp_path):
    from fedrec.federated.run import run_simulation

    config = copy.deepcopy(synthetic_config)
    config["fl"]["num_rounds"] = 4
    run_simulation(config, tmp_path / "whole", print_rounds=False)
    config["fl"]["num_rounds"] = 2
    run_simulation(config, tmp_path / "split", print_rounds=False)
    config["fl"]["num_rounds"] = 4
    run_simulation(config, tmp_path / "split", resume=True, print_rounds=False)

    whole, split = _sim(config, tmp_path / "w2"), _sim(config, tmp_path / "s2")
    whole.runner.attach_logdir(tmp_path / "whole")
    split.runner.attach_logdir(tmp_path / "split")
    whole.round_idx = split.round_idx = 4
    a, b = _all_private(whole), _all_private(split)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # users selected at some point moved away from their seeded start; the rest kept it
    start = whole.runner.private_rows_from({}, torch.arange(len(a["user_embedding.weight"])))
    moved = (a["user_embedding.weight"] != start["user_embedding.weight"]).any(dim=1)
    assert 0 < int(moved.sum()) < len(moved)
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    metrics_split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["phase"] == "fl"][-1]
    last_split = [m for m in metrics_split if m["phase"] == "fl"][-1]
    assert last["hr@10"] == last_split["hr@10"] and last["train_loss"] == last_split["train_loss"]
    clients = [m for m in metrics if m["phase"] == "client" and m["round"] == 4]
    assert len(clients) == 30 and {"hr@10", "ndcg@10", "client"} <= set(clients[0])
    ckpt = CheckpointManager(tmp_path / "split" / "checkpoints").load_newest_intact().state
    final = CheckpointManager(tmp_path / "whole" / "checkpoints").load_newest_intact().state
    assert ckpt["round"] == final["round"] == 4
    for name, tensor in final["global"].items():
        assert torch.equal(tensor, ckpt["global"][name]), name
    whole.close()
    split.close()


def test_config_errors_are_one_line(synthetic_config, tmp_path, capsys):
    from fedrec.cli import main

    config_path = tmp_path / "c.yml"
    import yaml

    def run(change: Dict[str, Any], command: str = "simulate") -> str:
        config = copy.deepcopy(synthetic_config)
        for dotted, value in change.items():
            node = config
            *parents, key = dotted.split(".")
            for p in parents:
                node = node[p]
            node[key] = value
        config_path.write_text(yaml.safe_dump(config))
        status = main([command, "--config", str(config_path), "--logdir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and "\n" not in err, err
        return err

    assert "fl.num_workers the number of users (30)" in run({"fl.num_workers": 12})
    assert "must be {name: natural}" in run({"fl.partitioner": {"name": "iid"}, "fl.num_workers": 30})
    assert "mse fits ratings" in run({"model.loss_function": "mse"}, "train")
    assert "unknown key 'feedbak'" in run({"model.preproc.feedbak": "implicit"}, "train")
    assert "embedding_dim" in run({"model.embedding_dim": "wide"}, "train")
    assert "lower eval_negatives" in run({"train.config.eval_negatives": 99}, "train")


@pytest.mark.parametrize("algo", [{"name": "scaffold"}, {"name": "fed_prox", "mu": 0.1}])
def test_stateful_algorithms_keep_private_rows_beside_their_state(synthetic_config, tmp_path, algo):
    from fedrec.federated.run import run_simulation

    config = copy.deepcopy(synthetic_config)
    config["fl"].update({"fl_algo": algo, "num_rounds": 2})
    history = run_simulation(config, tmp_path, print_rounds=False)
    assert math.isfinite(history[-1]["hr@10"])
    files = sorted((tmp_path / "client_state").rglob("r*.safetensors"))
    from safetensors import safe_open

    from fedrec.federated.client_state import ClientStateStore

    if algo["name"] == "scaffold":  # its control variates cover the item rows, never the user's
        with safe_open(str(files[0]), framework="pt") as handle:
            keys = set(handle.keys())
        assert any(k.startswith("item_embedding") for k in keys) and not any(
            k.startswith(("user_", "private/")) for k in keys)  # the user's rows are in the row slots
    else:  # FedProx keeps no state of its own: no file, only the row slots
        assert not files
    layout = {f"private/{n}": ((1, 8 if "embedding" in n else 1), torch.float32)
              for n in ("user_embedding.weight", "user_bias.weight")}
    store = ClientStateStore(tmp_path / "client_state", fixed_rows=layout)
    written = store.written(np.arange(30))
    client = int(files[0].parent.name) if files else int(np.flatnonzero(written)[0])
    assert written[client] and store.get(client, 2)[0]["private/user_embedding.weight"].shape == (1, 8)


def test_synth_ratings_cli(tmp_path, capsys):
    from fedrec.cli import main

    assert main(["synth-ratings", "--users", "20", "--items", "150", "--out", str(tmp_path / "r.csv")]) == 0
    assert "oracle sampled HR@10" in capsys.readouterr().out
    assert main(["synth-ratings", "--users", "20", "--items", "50", "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_items must be >= 110" in err and "\n" not in err


def test_centralized_train_and_mse_rmse(synthetic_config, tmp_path):
    from fedrec.runner import run_preprocess, run_train

    config = copy.deepcopy(synthetic_config)
    result = run_train(config, tmp_path / "bce")
    assert 0.0 <= result["test_hr@10"] <= 1.0 and "test_rmse" not in result
    config["model"].update({"loss_function": "mse", "name": "neumf", "variant": "gmf"})
    del config["model"]["embedding_dim"]
    config["model"]["preproc"].update({"feedback": "explicit", "output_file": str(tmp_path / "explicit")})
    run_preprocess(config, progress=False)
    result = run_train(config, tmp_path / "mse")
    assert 0.0 < result["test_rmse"] < 5.0


@pytest.mark.skipif(not (ML_SMALL / "ratings.csv").is_file(),
                    reason=f"MovieLens ml-latest-small is not at {ML_SMALL} (see its README.txt for the terms)")
def test_federated_run_on_ml_latest_small_improves_hr(tmp_path):
    from fedrec.runner import run_preprocess

    config = load_config(PROJECT_ROOT / "configs" / "movielens_mf_fl.yml")
    config["model"]["preproc"].update({"datafile": str(ML_SMALL / "ratings.csv"), "output_file": str(tmp_path / "ml")})
    config["train"]["config"]["progress_bar"] = False
    config["fl"].update({"num_rounds": 6, "progress_bar": False, "eval_every_n_rounds": 6})
    run_preprocess(config, progress=False)
    sim = _sim(config, tmp_path / "run")
    assert sim.fl.num_workers == 610  # one client per user, by default
    initial = sim.evaluate()["hr@10"]
    history = sim.run()
    sim.close()
    assert history[-1]["hr@10"] > initial + 0.05, (initial, history[-1]["hr@10"])


def _tree_digest(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reconstruction_refits_never_selected_users_for_evaluation_only(tmp_path):
    """Planted factors; the item side and half of the users' rows come from training
    (written to the client state store as a federated run would), the other half were
    never selected: their seeded rows score at popularity level until re-fitted."""
    from fedrec.data.synthetic_ratings import synthesize_ratings
    from fedrec.runner import build_trainer, run_preprocess
    from fedrec.trainers.rec_trainer import ReconstructConfig

    synthesize_ratings(tmp_path / "r.csv", num_users=200, num_items=200, mean_per_user=30, dim=4, scale=6.0,
                       seed=11)
    config = load_config(PROJECT_ROOT / "configs" / "movielens_mf_fl.yml")
    config["model"].update({"embedding_dim": 8})
    config["model"]["preproc"].update({"datafile": str(tmp_path / "r.csv"), "output_file": str(tmp_path / "out")})
    config["train"]["config"].update({"progress_bar": False, "eval_negatives": 49, "num_epochs": 5})
    config["train"]["optimizer"] = {"name": "split", "sparse": {"name": "sparse_adam", "lr": 0.01},
                                    "dense": {"name": "adam", "lr": 0.01}}
    run_preprocess(config, progress=False)
    trained = build_trainer(copy.deepcopy(config), tmp_path / "central")
    trained.train()
    weights = trained.model.state_dict()
    sim = _sim(config, tmp_path / "run")
    for name in sim.global_state:
        sim.global_state[name] = weights[name].clone()
    for user in range(100):  # users 0..99 trained; 100..199 never selected
        sim.runner.store.put(user, 0, {f"private/{n}": weights[n][user:user + 1].clone()
                                       for n in sim.runner.private_names})
    users = np.arange(sim.trainer.dataset.num_users)
    rows, stored = sim.runner.private_rows_and_stored(users, 1)
    assert stored.tolist() == [True] * 100 + [False] * 100
    global_before = {k: v.clone() for k, v in sim.global_state.items()}
    store_before = _tree_digest(tmp_path / "run" / "client_state")

    # any subset of users reads the same rows (evaluation reads them a chunk at a time)
    some = np.array([150, 3, 99, 100, 0])
    part, part_stored = sim.runner.private_rows_and_stored(some, 1)
    assert np.array_equal(part_stored, stored[some]) and all(torch.equal(part[k], rows[k][some]) for k in rows)
    assert sim.runner.store.written(some).tolist() == [False, True, True, False, True]

    def evaluate(reconstruct: Any, chunk: int = 4096) -> Dict[str, Any]:
        sim.trainer.train_config = sim.trainer.train_config.model_copy(update={"reconstruct_unseen": reconstruct})
        metrics, values = sim.trainer.evaluate_federated(
            sim.global_state, lambda u: sim.runner.private_rows_and_stored(u, 1), phase="test", chunk=chunk)
        return {"metrics": metrics, **values}

    plain = evaluate(None)
    chunked = evaluate(None, chunk=7)  # rows read 7 users at a time: the same numbers
    assert chunked["metrics"] == plain["metrics"] and all(np.array_equal(chunked[k], plain[k]) for k in plain
                                                          if k != "metrics")
    refit = evaluate(ReconstructConfig(steps=50, lr=1.0))
    unseen = ~stored[plain["user"]]
    assert refit["metrics"]["users_reconstructed"] == 100 and "users_reconstructed" not in plain["metrics"]
    for key, margin in (("hr@10", 0.2), ("hr@10_full", 0.2)):
        assert refit[key][unseen].mean() > plain[key][unseen].mean() + margin, (
            key, plain[key][unseen].mean(), refit[key][unseen].mean())
    assert np.array_equal(refit["hr@10"][~unseen], plain["hr@10"][~unseen])  # trained users: untouched
    # evaluation changes neither the global model nor the store; a second look re-fits the same
    for name, tensor in global_before.items():
        assert torch.equal(sim.global_state[name], tensor), name
    assert _tree_digest(tmp_path / "run" / "client_state") == store_before
    again, stored_again = sim.runner.private_rows_and_stored(users, 1)
    assert np.array_equal(stored, stored_again) and all(torch.equal(rows[k], again[k]) for k in rows)
    assert np.array_equal(evaluate(ReconstructConfig(steps=50, lr=1.0))["hr@10"], refit["hr@10"])
    sim.close()


def test_reconstruction_config_is_strict(synthetic_config, tmp_path):
    from fedrec.runner import build_train_config

    config = copy.deepcopy(synthetic_config)
    config["train"]["config"]["reconstruct_unseen"] = {"steps": 5, "lr": 0.5}
    assert build_train_config(config).reconstruct_unseen.steps == 5
    from fedrec.utilities.registry import ConfigTypeError

    config["train"]["config"]["reconstruct_unseen"] = {"step": 5}
    with pytest.raises(ConfigTypeError, match="unknown key 'reconstruct_unseen.step'"):
        build_train_config(config)


# -- temporal split ------------------------------------------------------------------------

TEMPORAL = """userId,movieId,rating,timestamp
1,1,4.0,10
1,2,4.0,20
1,3,4.0,30
1,4,4.0,40
1,5,4.0,50
1,6,4.0,60
2,1,4.0,15
2,2,4.0,25
2,6,4.0,45
3,3,4.0,5
3,4,4.0,12
3,5,4.0,22
4,1,4.0,35
4,2,4.0,45
4,3,4.0,55
"""


def test_temporal_split_by_hand(tmp_path, capsys):
    from fedrec.data.movielens import describe_report

    path = _write(tmp_path, TEMPORAL)
    meta = preprocess_ratings(path, tmp_path / "out", MovieLensOptions(split="temporal", cut_timestamp=32))
    data = RatingsDataset.open(tmp_path / "out")
    got = {name: list(zip(data.split(name).user.tolist(), data.split(name).item.tolist()))
           for name in ("train", "val", "test")}
    # users 1, 2, 3 -> 0, 1, 2 (user 4 starts after the cut: dropped); items 1..6 -> 0..5
    assert np.load(tmp_path / "out" / "user_ids.npy").tolist() == [1, 2, 3]
    assert got["train"] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 2), (2, 3), (2, 4)]
    assert got["val"] == [(0, 3)]  # user 1's first later item; user 2 has one later item: test only
    assert got["test"] == [(0, 4), (1, 5)]  # user 3 has nothing after the cut: evaluated nowhere
    report = meta["report"]
    assert report["users_only_after_cut"] == 1
    assert report["temporal"] == {"cut_timestamp": 32, "users_evaluated": 2, "users_not_evaluated": 1,
                                  "users_without_val": 1, "future_interactions": 1}  # user 1's 6th
    assert list(zip(data.split("future").user.tolist(), data.split("future").item.tolist())) == [(0, 5)]
    assert data.split("future").timestamp.tolist() == [60] and meta["splits"]["future"] == 1
    text = "\n".join(describe_report(meta))
    assert "temporal cut at 32: 2 users evaluated" in text and "not evaluated (nothing after the cut) 1" in text
    assert "future 1" in text and "(the future split: not trained on or scored, kept out of sampled negatives) 1" in text
    # a fraction of the interactions: 15 rows, 0.6 -> 9 before the cut, the 10th timestamp (40)
    meta = preprocess_ratings(path, tmp_path / "out2", MovieLensOptions(split="temporal", cut_fraction=0.6))
    assert meta["report"]["temporal"]["cut_timestamp"] == 40
    assert meta["report"]["users_only_after_cut"] == 0  # user 4 rated at 35, before this cut


def test_temporal_cut_past_the_data_and_bad_split_counts_are_one_line_errors(tmp_path):
    path = _write(tmp_path, TEMPORAL)
    with pytest.raises(DataError, match="no user has an interaction at or after the temporal cut 1000 "
                                        r"\(the last is at 60\).*cut_timestamp"):
        preprocess_ratings(path, tmp_path / "late", MovieLensOptions(split="temporal", cut_timestamp=1000))
    assert not (tmp_path / "late").exists()  # nothing half-written
    preprocess_ratings(path, tmp_path / "out", MovieLensOptions(split="temporal", cut_timestamp=32))
    meta_path = tmp_path / "out" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for splits in ({**meta["splits"], "future": "lots"}, {**meta["splits"], "past": 1}, {"train": 8}):
        meta_path.write_text(json.dumps({**meta, "splits": splits}))
        with pytest.raises(DataError, match=f"{meta_path}: splits should map train, val, test"):
            RatingsDataset.open(tmp_path / "out")


def test_ids_outside_the_metadata_counts_are_one_line_errors(tmp_path):
    """A processed folder whose ids do not fit its metadata (edited, or mixed from two
    runs) is refused when the split is opened, naming the file, row and range."""
    preprocess_ratings(_write(tmp_path, TEMPORAL), tmp_path / "out", MovieLensOptions())
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert RatingsDataset.open(tmp_path / "out").split("train")  # as written: fine
    items = tmp_path / "out" / "val" / "item.npy"
    values = np.load(items)
    values[1] = meta["num_items"]
    np.save(items, values)
    with pytest.raises(DataError) as err:
        RatingsDataset.open(tmp_path / "out").split("val")
    assert str(err.value).startswith(f"{items}: row 1 holds item id {meta['num_items']}, outside "
                                     f"0..{meta['num_items'] - 1} (metadata.json num_items {meta['num_items']})")
    users = tmp_path / "out" / "test" / "user.npy"
    values = np.load(users)
    values[0] = -1
    np.save(users, values)
    with pytest.raises(DataError, match=r"user.npy: row 0 holds user id -1, outside 0\.\."):
        RatingsDataset.open(tmp_path / "out").split("test")


@pytest.mark.parametrize("options, message", [
    ({"split": "temporal"}, "exactly one of cut_fraction"),
    ({"split": "temporal", "cut_fraction": 0.5, "cut_timestamp": 3}, "exactly one of cut_fraction"),
    ({"cut_fraction": 0.5}, "split: temporal only"),
    ({"split": "temporal", "cut_fraction": 1.5}, "less than 1"),
])
def test_temporal_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        MovieLensOptions(**options)


def test_temporal_split_trains_and_evaluates_federated(synthetic_config, tmp_path):
    from fedrec.federated.run import run_simulation
    from fedrec.runner import run_preprocess

    config = copy.deepcopy(synthetic_config)
    config["model"]["preproc"].update({"split": "temporal", "cut_fraction": 0.7, "output_file": str(tmp_path / "t")})
    meta = run_preprocess(config, progress=False)
    t = meta["report"]["temporal"]
    assert meta["splits"]["test"] == t["users_evaluated"] > 0
    assert meta["num_users"] == 30 - meta["report"]["users_only_after_cut"]
    assert meta["splits"]["future"] == t["future_interactions"] > 0
    # the future split's items are the user's: never sampled as a negative, in training or evaluation
    sim = _sim(config, tmp_path / "sim")
    future = sim.trainer.dataset.split("future")
    users, items = np.asarray(future.user), np.asarray(future.item)
    assert sim.trainer.rated.contains(users, items).all()
    rng = np.random.default_rng(0)
    drawn = sim.trainer.rated.sample(users, 50, rng)
    assert not np.isin(users[:, None] * 1000 + drawn, users * 1000 + items).any()
    sim.close()
    history = run_simulation(config, tmp_path / "run", print_rounds=False)
    assert math.isfinite(history[-1]["hr@10"]) and "hr@10_full" in history[-1]


# -- two-tower -----------------------------------------------------------------------------


def _two_tower(config: Dict[str, Any], loss: str = "bce") -> Dict[str, Any]:
    config = copy.deepcopy(config)
    config["model"] = {"name": "two_tower", "embedding_dim": 8, "user_layers": [8], "item_layers": [16, 8],
                       "loss_function": loss, "init_std": 0.1, "sparse": True, "preproc": config["model"]["preproc"]}
    return config


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_two_tower_trains_centrally(synthetic_config, tmp_path, loss):
    from fedrec.runner import build_trainer

    config = _two_tower(synthetic_config, loss)
    config["train"]["config"].update({"num_epochs": 10, "batch_size": 16})
    config["train"]["optimizer"] = {"name": "split", "sparse": {"name": "sparse_adam", "lr": 0.01},
                                    "dense": {"name": "adam", "lr": 0.01}}
    trainer = build_trainer(config, tmp_path)
    before = trainer.evaluate("test", log=False)
    trainer.train()
    after = trainer.evaluate("test", log=False)
    assert after["hr@10"] > before["hr@10"] + 0.1, (before, after)
    assert 0 <= after["hr@10_full"] <= after["hr@10"]
    users = torch.arange(5)  # the matrix-product full ranking agrees with the pairwise scores
    items = torch.arange(trainer.dataset.num_items).expand(5, -1)
    with torch.no_grad():
        assert torch.allclose(trainer.model.score_all_items(users), trainer.model(users, items), atol=1e-5)


def test_two_tower_federated_keeps_user_rows_private(synthetic_config, tmp_path):
    from fedrec.federated.run import run_simulation

    config = _two_tower(synthetic_config)
    sim = _sim(config, tmp_path / "one")
    assert sim.runner.private_names == ["user_embedding.weight"]
    result = _assert_private_rows_never_sent(sim, tmp_path / "one")
    update = result.block_updates[0][1]
    assert set(update.rows) == {"item_embedding.weight"}  # sparse rows; the towers' MLPs travel whole
    assert {n for n in update.dense if "tower" in n} == {n for n in sim.global_state if "tower" in n} != set()
    sim.close()
    config["fl"]["num_rounds"] = 4
    history = run_simulation(config, tmp_path / "run", print_rounds=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and math.isfinite(history[-1]["hr@10_full"])


def test_release_freed_memory_gives_heap_pages_back_where_glibc_can():
    """The full ranking trims the heap between chunks; on glibc RSS drops after freeing a
    large heap-allocated buffer, elsewhere the call is a harmless no-op."""
    import platform

    from fedrec.utilities.memory import release_freed_memory

    def rss_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2 ** 20

    if platform.system() != "Linux" or not release_freed_memory():
        pytest.skip("malloc_trim is glibc's (Linux)")
    blocks = [np.ones(1 << 16) for _ in range(1000)]  # 500 MiB of 512 KiB heap blocks
    held = rss_mib()
    del blocks[1:]  # (the first keeps the heap's top in use, so only a trim can return the rest)
    assert release_freed_memory()
    assert rss_mib() < held - 200


def test_rows_touched_by_mask_equal_the_sorted_unique():
    from fedrec.modules.recsys import BiasedMF

    model = BiasedMF(num_users=3, num_items=500, embedding_dim=4)
    rng = np.random.default_rng(0)
    for size in (1, 20, 400, 3000):  # below 500 / 32 items: torch.unique; above: the mask
        items = torch.from_numpy(rng.integers(0, 500, size=(size, 2)))
        rows = model.rows_touched(items)
        expected = torch.unique(items.reshape(-1), sorted=True)
        assert set(rows) == {"item_embedding.weight", "item_bias.weight"}
        for got in rows.values():
            assert got.dtype == torch.int64 and torch.equal(got, expected), size
