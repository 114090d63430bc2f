"""CheckpointManager, weights_only loading, RNG state packing, safetensors exports."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from fedrec.utilities import checkpoint as ckpt_mod
from fedrec.utilities.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_weights_only_safe,
    load_checkpoint,
    load_safetensors,
    pack_rng_state,
    save_safetensors,
    unpack_rng_state,
)
from fedrec.utilities.random_state import get_rng_state, seed_everything, set_rng_state


def state_for(step: int) -> dict:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "progress": {"step": step, "epoch": 0, "best": None, "done": False},
        "history": [0.5, 0.25],
        "rng": pack_rng_state(),
    }


def test_save_load_round_trip_weights_only(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpts")
    state = state_for(7)
    path = mgr.save(7, state)
    assert path.name == "ckpt-000000007.pt"
    loaded = CheckpointManager.load(path)  # a staticmethod, as the trainer calls it
    assert loaded["progress"] == state["progress"]
    assert loaded["history"] == [0.5, 0.25]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # the file really is loadable with weights_only=True by torch itself
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert raw["step"] == 7


def test_keep_last_pruning_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None and mgr.best() is None
    for step in (100, 200, 300, 400, 500):
        mgr.save(step, {"step": step, "w": torch.full((2,), float(step))},
                 is_best=(step == 200))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "ckpt-000000400.pt", "ckpt-000000500.pt"]
    assert mgr.latest() == tmp_path / "ckpt-000000500.pt"
    assert mgr.latest_step() == 500
    best = CheckpointManager.load(mgr.best())
    assert best["step"] == 200 and torch.equal(best["w"], torch.full((2,), 200.0))

    # a later best replaces best.pt
    mgr.save(600, {"step": 600}, is_best=True)
    assert CheckpointManager.load(tmp_path / "best.pt")["step"] == 600
    assert [s for s, _ in mgr.checkpoints()] == [500, 600]


def test_keep_all_and_validation(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in range(5):
        mgr.save(step, {"step": step})
    assert len(mgr.checkpoints()) == 5
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_atomic_save_leaves_no_temp_files(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"a": torch.zeros(3)}, is_best=True)
    mgr.save(2, {"a": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "ckpt-000000001.pt", "ckpt-000000002.pt"]

    # a crash while writing leaves the previous checkpoint intact and no temp file
    def exploding_save(obj, f, *a, **k):
        f.write(b"partial")  # checkpoints are written through a Python file object
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, {"a": torch.full((3,), 9.0)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "ckpt-000000001.pt", "ckpt-000000002.pt"]
    assert torch.equal(CheckpointManager.load(tmp_path / "ckpt-000000002.pt")["a"], torch.ones(3))


def test_unsafe_state_refused_at_save(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\].*ndarray"):
        mgr.save(1, {"rng": {"numpy": np.zeros(3)}})
    with pytest.raises(TypeError, match="object"):
        mgr.save(1, {"x": object()})
    assert not list(tmp_path.iterdir())
    check_weights_only_safe({"ok": [1, 2.0, "s", None, True, (1, 2), torch.zeros(1)]})


def test_invalid_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt.*not a valid"):
        CheckpointManager.load(garbage)

    # a pickle that weights_only refuses (arbitrary objects)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Unsafe()}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_checkpoint(unsafe)

    not_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), not_dict)
    with pytest.raises(CheckpointError, match="tensor.pt"):
        load_checkpoint(not_dict)

    # a plain torch.save'd dict is accepted as is
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    assert torch.equal(load_checkpoint(plain)["w"], torch.ones(1))


class Unsafe:
    pass


def test_rng_pack_unpack_round_trip(tmp_path):
    seed_everything(1234)
    random.random(), np.random.rand(), torch.rand(1)
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    np.random.standard_normal()  # and a cached gaussian in numpy's
    packed = pack_rng_state()
    check_weights_only_safe(packed)

    # through a checkpoint file, weights_only
    mgr = CheckpointManager(tmp_path)
    restored = CheckpointManager.load(mgr.save(1, {"rng": packed}))["rng"]

    expected = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(),
                np.random.standard_normal(), torch.rand(3).tolist())
    seed_everything(99)  # scramble
    set_rng_state(unpack_rng_state(restored))
    again = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(),
             np.random.standard_normal(), torch.rand(3).tolist())
    assert again == expected

    # the unpacked state equals the original structure exactly
    seed_everything(5)
    original = get_rng_state()
    unpacked = unpack_rng_state(pack_rng_state(original))
    assert unpacked["python"] == original["python"]
    assert unpacked["numpy"][0] == original["numpy"][0]
    np.testing.assert_array_equal(unpacked["numpy"][1], original["numpy"][1])
    assert unpacked["numpy"][1].dtype == original["numpy"][1].dtype
    assert unpacked["numpy"][2:] == original["numpy"][2:]
    assert torch.equal(unpacked["torch"], original["torch"])


def test_safetensors_export(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    path = save_safetensors(tmp_path / "model.safetensors", model.state_dict(),
                            metadata={"step": 3})
    loaded = load_safetensors(path)
    assert set(loaded) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    assert not list(tmp_path.glob("*.tmp"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_safetensors(bad)


def test_pickle_module_is_not_used_for_loading(tmp_path, monkeypatch):
    # load must not fall back to an unsafe full unpickle
    path = CheckpointManager(tmp_path).save(3, {"x": 1})
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "load", spy)
    assert CheckpointManager.load(path) == {"x": 1}
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert os.path.exists(path)
