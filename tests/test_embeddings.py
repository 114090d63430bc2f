"""Embedding tables (registry kind ``embedding``): torch_bag, hash_emb, qr_emb."""

from __future__ import annotations

import math

import pytest
import torch

import fedrec.modules  # noqa: F401  (registers the embedding classes)
from fedrec.modules.dlrm import SparseArch, build_tables
from fedrec.modules.embeddings import HashEmbedding, QREmbedding, TorchBagEmbedding
from fedrec.utilities import registry


@pytest.fixture(autouse=True)
def _only_this_package(monkeypatch):
    # These unit tests need only fedrec.modules' registrations (imported above); do not let
    # the registry import the other packages as well.
    monkeypatch.setattr(registry, "_builtins_loaded", True, raising=False)


def build(cfg, n=10, d=4):
    return registry.construct("embedding", cfg, num_embeddings=n, embedding_dim=d)


def test_registered_names():
    for name, cls in [("torch_bag", TorchBagEmbedding), ("hash_emb", HashEmbedding),
                      ("qr_emb", QREmbedding)]:
        assert registry.lookup("embedding", name) is cls


def test_unknown_name_and_unknown_key_fail():
    with pytest.raises(registry.RegistryError, match="torch_bag"):
        build({"name": "no_such_table"})
    with pytest.raises(registry.RegistryError, match="qr_colisions"):
        build({"name": "qr_emb", "qr_colisions": 4})


def test_bad_options_fail():
    with pytest.raises(ValueError, match="mode"):
        build({"name": "torch_bag", "mode": "median"})
    with pytest.raises(ValueError, match="operation"):
        build({"name": "qr_emb", "operation": "div"})
    with pytest.raises(ValueError, match="even"):
        build({"name": "qr_emb", "operation": "concat"}, d=5)
    with pytest.raises(registry.ConfigTypeError, match="sparse"):
        build({"name": "torch_bag", "sparse": "maybe"})


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_torch_bag_lookup_matches_embedding_bag(mode):
    torch.manual_seed(0)
    t = build({"name": "torch_bag", "mode": mode}, n=7, d=3)
    ids = torch.tensor([0, 6, 3, 3, 1])
    out = t(ids)
    assert out.shape == (5, 3)
    assert torch.equal(out, t.weight[ids])
    # The fast path equals the EmbeddingBag path with offsets and with a [B, 1] input.
    ref_off = torch.nn.functional.embedding_bag(ids, t.weight, torch.arange(5), mode=mode)
    assert torch.allclose(out, ref_off)
    assert torch.allclose(out, t(ids.unsqueeze(1)))
    assert t.rows_touched(ids)["weight"].tolist() == [0, 1, 3, 6]


def test_uniform_init_bounds():
    torch.manual_seed(0)
    n = 400
    t = build({"name": "torch_bag"}, n=n, d=50)
    bound = math.sqrt(1.0 / n)
    w = t.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound
    assert abs(w.mean().item()) < 0.05 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_hash_emb():
    torch.manual_seed(0)
    t = build({"name": "hash_emb", "num_buckets": 5}, n=100, d=3)
    assert t.weight.shape == (5, 3)
    ids = torch.tensor([0, 5, 7, 99, 12])
    assert torch.equal(t(ids), t.weight[torch.tensor([0, 0, 2, 4, 2])])
    assert t.row_map(ids)["weight"].tolist() == [0, 0, 2, 4, 2]
    assert t.rows_touched(ids)["weight"].tolist() == [0, 2, 4]
    assert t.weight.detach().abs().max() <= math.sqrt(1 / 5)
    with pytest.raises(TypeError):
        build({"name": "hash_emb"})  # num_buckets is required


def test_qr_emb_shapes_row_mapping_and_init():
    torch.manual_seed(0)
    t = build({"name": "qr_emb", "qr_collisions": 4}, n=10, d=6)
    assert t.weight_q.shape == (3, 6)  # ceil(10 / 4)
    assert t.weight_r.shape == (4, 6)
    assert t.weight_q.detach().abs().max() <= math.sqrt(1 / 3)
    assert t.weight_r.detach().abs().max() <= math.sqrt(1 / 4)
    ids = torch.tensor([0, 3, 4, 9, 9, 6])
    rows = t.row_map(ids)
    assert rows["weight_q"].tolist() == [0, 0, 1, 2, 2, 1]
    assert rows["weight_r"].tolist() == [0, 3, 0, 1, 1, 2]
    touched = t.rows_touched(ids)
    assert touched["weight_q"].tolist() == [0, 1, 2]
    assert touched["weight_r"].tolist() == [0, 1, 2, 3]
    assert t.row_parameters == ("weight_q", "weight_r")


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_emb_operations(operation):
    torch.manual_seed(0)
    t = build({"name": "qr_emb", "qr_collisions": 3, "operation": operation}, n=8, d=4)
    ids = torch.tensor([0, 1, 2, 3, 7, 5])
    q = t.weight_q.detach()[ids // 3]
    r = t.weight_r.detach()[ids % 3]
    expected = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], 1)}[operation]
    out = t(ids)
    assert out.shape == (6, 4)
    assert torch.equal(out, expected)
    if operation == "concat":
        assert t.weight_q.shape == (3, 2) and t.weight_r.shape == (3, 2)


@pytest.mark.parametrize("cfg", [
    {"name": "torch_bag", "sparse": True},
    {"name": "hash_emb", "num_buckets": 4, "sparse": True},
    {"name": "qr_emb", "sparse": True},
])
def test_sparse_gradients(cfg):
    t = build(cfg, n=9, d=3)
    ids = torch.tensor([1, 8, 1])
    t(ids).sum().backward()
    for name in t.row_parameters:
        grad = getattr(t, name).grad
        assert grad is not None and grad.is_sparse, name
        rows = grad.coalesce().indices()[0].unique()
        assert rows.tolist() == t.rows_touched(ids)[name].tolist()


def test_dense_gradients_by_default():
    t = build({"name": "torch_bag"}, n=9, d=3)
    ids = torch.tensor([1, 8, 1])
    t(ids).sum().backward()
    assert not t.weight.grad.is_sparse
    assert t.weight.grad[1].tolist() == [2.0, 2.0, 2.0]
    assert t.weight.grad.abs().sum(1).nonzero().flatten().tolist() == [1, 8]


def test_threshold_selection_per_table():
    types = {
        "threshold": 100,
        "base": {"name": "torch_bag", "mode": "sum", "sparse": True},
        "custom": {"name": "qr_emb", "qr_collisions": 4, "operation": "mult"},
    }
    tables = build_tables([5, 100, 101, 1000], 4, types)
    assert [type(t) for t in tables] == [TorchBagEmbedding, TorchBagEmbedding, QREmbedding, QREmbedding]
    assert tables[0].sparse and tables[1].sparse
    assert tables[3].weight_q.shape == (250, 4)
    # Without custom every table uses base; without embedding_types, torch_bag dense sum.
    tables = build_tables([5, 1000], 4, {"threshold": 100, "base": {"name": "hash_emb", "num_buckets": 3}})
    assert [type(t) for t in tables] == [HashEmbedding, HashEmbedding]
    tables = build_tables([5, 1000], 4, None)
    assert all(type(t) is TorchBagEmbedding and not t.sparse and t.mode == "sum" for t in tables)
    with pytest.raises(ValueError, match="treshold"):
        build_tables([5], 4, {"treshold": 3})


def test_sparse_arch_stacks_tables():
    torch.manual_seed(0)
    arch = SparseArch([3, 5], 2)
    ids = torch.tensor([[0, 4], [2, 1]])
    out = arch(ids)
    assert out.shape == (2, 2, 2)
    assert torch.equal(out[:, 0], arch.tables[0].weight[ids[:, 0]])
    assert torch.equal(out[:, 1], arch.tables[1].weight[ids[:, 1]])
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        arch(ids[:, :1])
