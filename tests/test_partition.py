"""Tests for fedrec.federated.partition (client partitioners)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fedrec.federated.partition import (
    ClientPartition,
    DirichletPartitioner,
    IIDPartitioner,
    NaturalPartitioner,
)
from fedrec.utilities import registry


@dataclass
class FakeSplit:
    label: np.ndarray
    sparse: np.ndarray
    user: np.ndarray | None = None

    def __len__(self) -> int:
        return self.label.shape[0]


def make_split(n: int = 20_000, seed: int = 0, users: int | None = 500,
               ctr: float = 0.25) -> FakeSplit:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < ctr).astype(np.float32)
    sparse = np.zeros((n, 26), dtype=np.int32)
    sparse[:, 0] = rng.integers(0, 7, n)              # C1: few values
    sparse[:, 1] = rng.zipf(1.3, n) % 100_000         # C2: many values, skewed
    sparse[:, 2:] = rng.integers(0, 50, (n, 24))
    user = rng.integers(0, users, n).astype(np.int64) * 3 + 11 if users else None
    return FakeSplit(label, sparse, user)


def assert_exact_cover(part: ClientPartition, n: int) -> None:
    """Every row of the split belongs to exactly one client; indices ascend per client."""
    assert part.indices.dtype == np.int64 and part.offsets.dtype == np.int64
    assert part.num_rows == n
    assert part.offsets[0] == 0 and part.offsets[-1] == n
    assert part.sizes.sum() == n
    np.testing.assert_array_equal(np.sort(part.indices), np.arange(n))
    part.check(n)
    for i in range(min(part.num_clients, 50)):
        rows = part.indices_of(i)
        assert np.all(np.diff(rows) > 0)


CLASSES = {"iid": IIDPartitioner, "dirichlet": DirichletPartitioner, "natural": NaturalPartitioner}


def build(name, cfg):
    """Build through the registry's strict, typed instantiation (as ``construct`` does)."""
    return registry.instantiate(CLASSES[name], {"name": name, **cfg}, kind="partitioner")


ALL = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet", {"alpha": 0.3, "column": "C2", "max_classes": 20}),
    ("natural", {}),
    ("natural", {"source": "C3"}),
]


@pytest.mark.parametrize("name,cfg", ALL)
def test_every_row_exactly_once_and_deterministic(name, cfg):
    split = make_split()
    part = build(name, cfg)
    a = part.split(split, 40, seed=3)
    assert a.num_clients == 40
    assert_exact_cover(a, len(split))
    b = part.split(split, 40, seed=3)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.indices, b.indices)
    c = part.split(split, 40, seed=4)
    assert not (np.array_equal(a.offsets, c.offsets) and np.array_equal(a.indices, c.indices))


def test_registry_construct_and_strict_keys(monkeypatch):
    # Construct without importing every other built-in package (they are tested on their
    # own); this module's import has already registered the partitioners.
    monkeypatch.setattr(registry, "_builtins_loaded", True)
    for name, cls in CLASSES.items():
        assert registry.lookup("partitioner", name) is cls
    part = registry.construct("partitioner", {"name": "dirichlet", "alpha": "0.2", "min_samples": 2})
    assert isinstance(part, DirichletPartitioner) and part.alpha == 0.2 and part.min_samples == 2
    assert isinstance(registry.construct("partitioner", "iid"), IIDPartitioner)
    assert isinstance(registry.construct("partitioner", {"name": "natural", "source": "C4"}),
                      NaturalPartitioner)
    with pytest.raises(registry.RegistryError, match="alpa"):
        registry.construct("partitioner", {"name": "dirichlet", "alpa": 0.2})
    with pytest.raises(registry.ConfigTypeError, match="alpha"):
        registry.construct("partitioner", {"name": "dirichlet", "alpha": "lots"})


def test_iid_sizes_near_equal():
    split = make_split(n=10_007)
    part = IIDPartitioner().split(split, 13, seed=0)
    assert_exact_cover(part, 10_007)
    assert part.sizes.max() - part.sizes.min() <= 1
    with pytest.raises(ValueError, match="at most 10,007 clients"):
        IIDPartitioner().split(split, 20_000, seed=0)


def test_dirichlet_heterogeneity_ordering():
    split = make_split(n=40_000)
    n_clients = 50
    tv = {}
    for alpha in (0.1, 100.0):
        p = DirichletPartitioner(alpha=alpha).split(split, n_clients, seed=1)
        assert_exact_cover(p, len(split))
        tv[alpha] = p.stats(split.label)["label_tv"]
    tv["iid"] = IIDPartitioner().split(split, n_clients, seed=1).stats(split.label)["label_tv"]
    assert tv[0.1] > 0.3, tv
    assert tv[100.0] < 0.1 and tv["iid"] < 0.1, tv
    assert tv[0.1] > 3 * tv[100.0] and tv[0.1] > 3 * tv["iid"], tv


def test_dirichlet_min_samples_respected():
    split = make_split(n=20_000)
    p = DirichletPartitioner(alpha=0.1, min_samples=50).split(split, 100, seed=0)
    assert_exact_cover(p, len(split))
    assert p.sizes.min() >= 50


def test_dirichlet_impossible_min_samples_message():
    split = make_split(n=1_000)
    with pytest.raises(ValueError) as err:
        DirichletPartitioner(min_samples=20).split(split, 100, seed=0)
    msg = str(err.value)
    assert "impossible" in msg and "1,000 rows" in msg and "100 clients" in msg
    assert "min_samples=20" in msg and "lower min_samples" in msg
    # Feasible on paper, but a heavily skewed draw never gives everyone 10 rows.
    with pytest.raises(ValueError) as err:
        DirichletPartitioner(alpha=0.05, min_samples=10, max_retries=5).split(split, 100, seed=0)
    msg = str(err.value)
    assert "impossible" in msg and "1,000 rows" in msg and "100 clients" in msg
    assert "min_samples=10" in msg and "raise alpha" in msg and "fewer clients" in msg


def test_dirichlet_categorical_column():
    split = make_split(n=30_000)
    p = DirichletPartitioner(alpha=0.05, column="C1").split(split, 20, seed=0)
    assert_exact_cover(p, len(split))
    assert p.info["column"] == "C1" and p.info["classes"] == 7
    c1 = split.sparse[:, 0]
    # Skewed over C1 values: clients see far fewer C1 values than iid clients do.
    assert p.stats(c1)["label_tv"] > 3 * IIDPartitioner().split(split, 20, 0).stats(c1)["label_tv"]
    # Many distinct values grouped into at most max_classes classes, both groupings.
    for grouping in ("frequency", "hash"):
        q = DirichletPartitioner(alpha=0.5, column="C2", max_classes=10, grouping=grouping)
        part = q.split(split, 20, seed=0)
        assert_exact_cover(part, len(split))
        assert part.info["classes"] <= 10
    with pytest.raises(ValueError, match="C1..C26"):
        DirichletPartitioner(column="C27").split(split, 5, 0)
    with pytest.raises(ValueError, match="'label' or 'C<k>'"):
        DirichletPartitioner(column="I3")


def test_natural_groups_by_user():
    split = make_split(n=20_000, users=300)
    n_users = np.unique(split.user).size
    # One client per user.
    p = NaturalPartitioner().split(split, 0, seed=0)
    assert p.num_clients == n_users
    assert_exact_cover(p, len(split))
    for i in range(p.num_clients):
        assert np.unique(split.user[p.indices_of(i)]).size == 1
    # Users grouped into fewer clients: no user split across clients, groups near-equal.
    q = NaturalPartitioner().split(split, 7, seed=0)
    assert_exact_cover(q, len(split))
    owner = q.client_of_row(len(split))
    users_per_client = [np.unique(split.user[q.indices_of(i)]).size for i in range(7)]
    assert sum(users_per_client) == n_users and max(users_per_client) - min(users_per_client) <= 1
    for u in np.unique(split.user)[:50]:
        assert np.unique(owner[split.user == u]).size == 1
    with pytest.raises(ValueError, match=f"only {n_users} users"):
        NaturalPartitioner().split(split, n_users + 1, seed=0)
    # By a categorical column's values.
    r = NaturalPartitioner(source="C1").split(split, 0, seed=0)
    assert r.num_clients == 7
    assert NaturalPartitioner(column="C1").source == "C1"


def test_natural_without_users_says_how_to_fix():
    split = make_split(n=1_000, users=None)
    with pytest.raises(ValueError, match="no user ids.*fedrec synth.*users_file"):
        NaturalPartitioner().split(split, 10, seed=0)


def test_indices_of_is_a_view_and_save_load(tmp_path):
    split = make_split(n=5_000)
    p = DirichletPartitioner(alpha=0.3).split(split, 25, seed=9)
    for i in (0, 12, 24, -1):
        v = p.indices_of(i)
        assert np.shares_memory(v, p.indices)
    with pytest.raises(IndexError):
        p.indices_of(25)
    path = tmp_path / "clients.part"  # saved at exactly this path, no ".npz" appended
    p.save(path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["clients.part"]
    q = ClientPartition.load(path)
    np.testing.assert_array_equal(p.offsets, q.offsets)
    np.testing.assert_array_equal(p.indices, q.indices)
    assert q.info == p.info and q.info["partitioner"] == "dirichlet" and q.info["seed"] == 9


def test_from_assignment_stats_and_describe():
    assign = np.array([2, 0, 2, 1, 0, 2, 2, 4], dtype=np.int64)
    p = ClientPartition.from_assignment(assign, 5)
    np.testing.assert_array_equal(p.offsets, [0, 2, 3, 7, 7, 8])
    np.testing.assert_array_equal(p.indices_of(2), [0, 2, 5, 6])
    np.testing.assert_array_equal(p.client_of_row(8), assign)
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 0], dtype=np.float32)
    s = p.stats(labels=labels)
    assert (s["clients"], s["rows"], s["min"], s["max"], s["empty"]) == (5, 8, 0, 4, 1)
    assert s["median"] == 1.0 and s["mean"] == pytest.approx(1.6)
    # Global P(1) = 0.5; clients 0, 1, 4 are all-0 (TV 0.5), client 2 all-1 (TV 0.5).
    assert s["label_tv"] == pytest.approx(0.5)
    text = p.describe(labels)
    assert "5 clients over 8 rows" in text and "1 empty" in text and "0.500" in text
    assert len(text.splitlines()) <= 2
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ClientPartition.from_assignment(np.array([0, 5]), 5)
    # Large client counts use the two-digit radix path; still stable (ascending rows).
    rng = np.random.default_rng(0)
    big = rng.integers(0, 200_000, 300_000)
    q = ClientPartition.from_assignment(big, 200_000)
    np.testing.assert_array_equal(q.indices, np.argsort(big, kind="stable"))


@pytest.mark.parametrize("name,cfg", [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("natural", {}),
])
def test_100k_clients_over_a_million_rows(name, cfg):
    n, clients = 1_000_000, 100_000
    rng = np.random.default_rng(0)
    split = FakeSplit(
        label=(rng.random(n) < 0.25).astype(np.float32),
        sparse=np.zeros((n, 26), dtype=np.int32),
        user=rng.permutation(np.arange(n) % 150_000).astype(np.int64),
    )
    part = build(name, cfg)
    p = part.split(split, clients, seed=0)
    assert p.num_clients == clients and p.num_rows == n
    assert p.sizes.min() >= 1
    assert p.indices.size == n and np.bincount(p.indices, minlength=n).max() == 1
    assert "100,000 clients" in p.describe(split.label)


def test_memory_mapped_split(tmp_path):
    """Partitioners read columns straight from memory-mapped .npy files."""
    src = make_split(n=8_000, users=100)
    for field in ("label", "sparse", "user"):
        np.save(tmp_path / f"{field}.npy", getattr(src, field))
    split = FakeSplit(*(np.load(tmp_path / f"{f}.npy", mmap_mode="r") for f in ("label", "sparse", "user")))
    for name, cfg in ALL:
        a = build(name, cfg).split(split, 30, seed=1)
        b = build(name, cfg).split(src, 30, seed=1)
        assert_exact_cover(a, len(split))
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.offsets, b.offsets)


def test_check_catches_broken_partitions():
    with pytest.raises(ValueError, match="more than one client"):
        ClientPartition(np.array([0, 2, 3]), np.array([0, 1, 1])).check()
    with pytest.raises(ValueError, match="ascending"):
        ClientPartition(np.array([0, 2]), np.array([1, 0])).check()
    with pytest.raises(ValueError, match="end at len"):
        ClientPartition(np.array([0, 3]), np.array([0, 1]))
    ClientPartition(np.array([0, 1, 1, 2]), np.array([5, 2])).check(6)  # empty client ok
