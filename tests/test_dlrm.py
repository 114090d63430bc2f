"""DLRM_Net against an independent numpy implementation of the reference maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedrec.modules  # noqa: F401  (registers the model and the embedding tables)
from fedrec.modules import DLRM_Net
from fedrec.modules.embeddings import QREmbedding, TorchBagEmbedding
from fedrec.modules.interaction import DotInteraction
from fedrec.modules.mlp import MLP
from fedrec.utilities import registry


@pytest.fixture(autouse=True)
def _only_this_package(monkeypatch):
    # These unit tests need only fedrec.modules' registrations (imported above); do not let
    # the registry import the other packages as well.
    monkeypatch.setattr(registry, "_builtins_loaded", True, raising=False)


def tiny(op="dot", itself=False, **kw):
    torch.manual_seed(0)
    args = {"arch_feature_emb_size": 2, "arch_mlp_bot": [3, 2], "arch_mlp_top": [4, 1],
            "arch_interaction_op": op, "arch_interaction_itself": itself, "table_sizes": [5, 7]}
    args.update(kw)
    return DLRM_Net(**args)


def linear_layers(state, prefix):
    """(W, b) pairs in order from a state dict, as float64 numpy arrays."""
    ks = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    return [(state[f"{prefix}{k}.weight"].double().numpy(), state[f"{prefix}{k}.bias"].double().numpy())
            for k in ks]


def numpy_dlrm(model, dense, sparse):
    """The reference dlrm_s_pytorch.py forward, written out with numpy loops."""
    state = model.state_dict()
    relu = lambda v: np.maximum(v, 0.0)
    x = dense.double().numpy()
    for w, b in linear_layers(state, "dense_arch.mlp.layers."):
        x = relu(x @ w.T + b)  # ReLU after every bottom layer
    ly = [state[f"sparse_arch.tables.{t}.weight"].double().numpy()[sparse[:, t].numpy()]
          for t in range(sparse.shape[1])]
    batch = x.shape[0]
    if model.arch_interaction_op == "dot":
        offset = 1 if model.arch_interaction_itself else 0
        rows = []
        for s in range(batch):
            vecs = [x[s]] + [e[s] for e in ly]
            feats = list(x[s])
            for i in range(len(vecs)):
                for j in range(i + offset):
                    feats.append(float(np.dot(vecs[i], vecs[j])))
            rows.append(feats)
        r = np.array(rows)
    else:
        r = np.concatenate([x] + ly, axis=1)
    top = linear_layers(state, "over_arch.mlp.layers.")
    for k, (w, b) in enumerate(top):
        r = r @ w.T + b
        r = 1.0 / (1.0 + np.exp(-r)) if k == len(top) - 1 else relu(r)
    p = r[:, 0]
    t = model.loss_threshold
    if t > 0:
        p = np.clip(p, t, 1 - t)
    return p


@pytest.mark.parametrize("op,itself", [("dot", False), ("dot", True), ("cat", False)])
def test_matches_numpy_reference(op, itself):
    model = tiny(op, itself)
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(6, 3, generator=g) * 3
    sparse = torch.stack([torch.randint(0, 5, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)], 1)
    probs = model(dense, sparse)
    assert probs.shape == (6,) and probs.dtype == torch.float32
    ref = numpy_dlrm(model, dense, sparse)
    np.testing.assert_allclose(probs.detach().double().numpy(), ref, atol=1e-6, rtol=0)


def test_matches_numpy_reference_bigger():
    torch.manual_seed(3)
    model = DLRM_Net(arch_feature_emb_size=4, arch_mlp_bot=[5, 8, 4], arch_mlp_top=[6, 3, 1],
                     table_sizes=[3, 9, 4], arch_interaction_itself=True, loss_threshold=0.01)
    dense = torch.rand(5, 5)
    sparse = torch.tensor([[0, 8, 3], [2, 0, 1], [1, 4, 0], [2, 2, 2], [0, 7, 3]])
    np.testing.assert_allclose(model(dense, sparse).detach().double().numpy(),
                               numpy_dlrm(model, dense, sparse), atol=1e-6, rtol=0)


def test_top_input_width():
    # Criteo shape: 26 tables, d=16: 16 + 27*26/2 (strict lower triangle) = 367.
    sizes = [10] * 26
    assert DLRM_Net(table_sizes=sizes).interaction_arch.output_dim == 367
    assert DLRM_Net(table_sizes=sizes, arch_interaction_itself=True).interaction_arch.output_dim == 16 + 27 * 28 // 2
    cat = DLRM_Net(table_sizes=sizes, arch_interaction_op="cat", arch_mlp_bot=[13, 8])
    assert cat.interaction_arch.output_dim == 8 + 26 * 16
    assert cat.over_arch.mlp.layers[0].in_features == 8 + 26 * 16


def test_dot_interaction_by_hand():
    inter = DotInteraction(num_sparse=2, dense_dim=2)
    x = torch.tensor([[1.0, 2.0]])
    e = torch.tensor([[[3.0, 4.0], [5.0, 6.0]]])
    # vectors x=(1,2), e1=(3,4), e2=(5,6); pairs in order (1,0), (2,0), (2,1)
    assert inter(x, e).tolist() == [[1.0, 2.0, 11.0, 17.0, 39.0]]
    inter_self = DotInteraction(num_sparse=2, dense_dim=2, itself=True)
    # (0,0), (1,0), (1,1), (2,0), (2,1), (2,2)
    assert inter_self(x, e).tolist() == [[1.0, 2.0, 5.0, 11.0, 25.0, 17.0, 39.0, 61.0]]


@pytest.mark.parametrize("itself", [False, True])
def test_pair_order_is_the_references(itself):
    ni = 6
    offset = 1 if itself else 0
    li = [i for i in range(ni) for j in range(i + offset)]
    lj = [j for i in range(ni) for j in range(i + offset)]
    inter = DotInteraction(num_sparse=ni - 1, dense_dim=3, itself=itself)
    assert inter.li.tolist() == li and inter.lj.tolist() == lj
    assert "li" not in inter.state_dict()


def test_losses_by_hand():
    p = torch.tensor([0.9, 0.2, 0.6, 0.5])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    per = [-math.log(0.9), -math.log(0.8), -math.log(0.4), -math.log(0.5)]
    assert tiny(loss_function="bce").loss(p, y).item() == pytest.approx(sum(per) / 4, rel=1e-6)
    mse = (0.1 ** 2 + 0.2 ** 2 + 0.6 ** 2 + 0.5 ** 2) / 4
    assert tiny(loss_function="mse").loss(p, y).item() == pytest.approx(mse, rel=1e-6)
    w = tiny(loss_function="wbce", loss_weights=[0.25, 2.0]).loss(p, y).item()
    assert w == pytest.approx((2.0 * per[0] + 0.25 * per[1] + 0.25 * per[2] + 2.0 * per[3]) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="loss_weights"):
        tiny(loss_function="wbce")
    with pytest.raises(ValueError, match="loss_function"):
        tiny(loss_function="hinge")


def test_loss_threshold_clamps_probabilities():
    model = tiny(loss_threshold=0.3)
    with torch.no_grad():
        model.over_arch.mlp.layers[2].bias.fill_(50.0)
    p = model(torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.long))
    assert torch.allclose(p, torch.full((4,), 0.7))
    with pytest.raises(ValueError, match="loss_threshold"):
        tiny(loss_threshold=0.5)


def test_linear_init_statistics():
    torch.manual_seed(0)
    mlp = MLP([600, 400, 300])
    first = mlp.layers[0]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (600 + 400)), rel=0.02)
    assert abs(first.weight.mean().item()) < 0.002
    assert mlp.layers[2].weight.std().item() == pytest.approx(math.sqrt(2 / (400 + 300)), rel=0.02)
    bias = torch.cat([MLP([10, 2000]).layers[0].bias for _ in range(5)])
    assert bias.std().item() == pytest.approx(math.sqrt(1 / 2000), rel=0.05)
    assert isinstance(mlp.layers[-1], torch.nn.ReLU)
    assert isinstance(MLP([3, 1], final_activation="sigmoid").layers[-1], torch.nn.Sigmoid)


def test_embedding_init_bounds_in_model():
    torch.manual_seed(0)
    model = DLRM_Net(table_sizes=[4, 10000], arch_mlp_bot=[2, 16])
    for t, n in enumerate([4, 10000]):
        w = model.sparse_arch.tables[t].weight.detach()
        assert w.abs().max() <= math.sqrt(1 / n)
    assert model.sparse_arch.tables[1].weight.abs().max() > 0.99 * math.sqrt(1 / 10000)


def test_registry_construct():
    cfg = {"name": "dlrm", "arch_feature_emb_size": 4, "arch_mlp_bot": [13, 8, 4],
           "arch_mlp_top": [8, 1], "loss_function": "mse",
           "embedding_types": {"threshold": 50, "base": {"name": "torch_bag", "sparse": True},
                               "custom": {"name": "qr_emb", "qr_collisions": 4}}}
    model = registry.construct("model", cfg, table_sizes=[10, 100, 3], num_dense=13)
    assert isinstance(model, DLRM_Net)
    types = [type(t) for t in model.sparse_arch.tables]
    assert types == [TorchBagEmbedding, QREmbedding, TorchBagEmbedding]
    probs = model(torch.rand(8, 13), torch.tensor([[9, 99, 2]] * 8))
    assert probs.shape == (8,) and ((probs > 0) & (probs < 1)).all()
    # preproc keys may ride along in the model config when named as unused
    model = registry.construct("model", {**cfg, "preproc": {"x": 1}}, unused_keys=("preproc",),
                               table_sizes=[10, 100, 3], num_dense=13)
    with pytest.raises(registry.RegistryError, match="arch_mlp_bottom"):
        registry.construct("model", {"name": "dlrm", "arch_mlp_bottom": [13, 16]},
                           table_sizes=[10], num_dense=13)
    with pytest.raises(registry.ConfigTypeError, match="arch_mlp_top"):
        registry.construct("model", {"name": "dlrm", "arch_mlp_top": "512-1"},
                           table_sizes=[10], num_dense=13)
    with pytest.raises(registry.RegistryError, match="dlrm"):
        registry.construct("model", {"name": "dlrn"}, table_sizes=[10], num_dense=13)


def test_clear_config_errors():
    with pytest.raises(ValueError, match="dense features"):
        DLRM_Net(table_sizes=[10], num_dense=12)
    with pytest.raises(ValueError, match="arch_feature_emb_size"):
        DLRM_Net(table_sizes=[10], arch_mlp_bot=[13, 8])  # dot needs bottom output == d
    with pytest.raises(ValueError, match="arch_interaction_op"):
        DLRM_Net(table_sizes=[10], arch_interaction_op="sum")
    with pytest.raises(ValueError, match="output size of 1"):
        DLRM_Net(table_sizes=[10], arch_mlp_top=[8, 2])
    with pytest.raises(ValueError, match="table"):
        DLRM_Net(table_sizes=[])


def test_gradients_flow_everywhere():
    model = tiny()
    sparse = torch.tensor([[0, 1], [4, 6], [2, 3]])
    with torch.no_grad():  # keep the ReLUs open so that every weight gets a gradient
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.abs_()
                m.bias.abs_()
    loss = model.loss(model(torch.rand(3, 3) + 0.1, sparse), torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not p.grad.is_sparse
    grad0 = model.sparse_arch.tables[0].weight.grad
    assert grad0.abs().sum(1).nonzero().flatten().tolist() == [0, 2, 4]


def test_sparse_tables_get_sparse_gradients():
    model = tiny(embedding_types={"base": {"name": "torch_bag", "sparse": True}})
    assert model.has_sparse_gradients
    sparse = torch.tensor([[0, 1], [4, 6], [0, 3]])
    model.loss(model(torch.rand(3, 3), sparse), torch.tensor([1.0, 0.0, 1.0])).backward()
    for name, p in model.named_embedding_parameters():
        assert p.grad.is_sparse, name
    for name, p in model.named_dense_parameters():
        assert p.grad is None or not p.grad.is_sparse, name
    rows = model.sparse_arch.tables[0].weight.grad.coalesce().indices()[0].unique().tolist()
    assert rows == [0, 4]


def test_parameter_groups_and_rows_touched():
    model = tiny(embedding_types={"threshold": 6, "custom": {"name": "qr_emb", "qr_collisions": 3}})
    assert model.sparse_tables() == [("sparse_arch.tables.0.weight", 0),
                                     ("sparse_arch.tables.1.weight_q", 1),
                                     ("sparse_arch.tables.1.weight_r", 1)]
    state = model.state_dict()
    assert all(name in state for name, _ in model.sparse_tables())
    assert model.embedding_names == {name for name, _ in model.sparse_tables()}
    emb = {id(p) for p in model.embedding_parameters()}
    dense = {id(p) for p in model.dense_parameters()}
    assert not emb & dense
    assert emb | dense == {id(p) for p in model.parameters()}
    assert len(emb) == 3
    assert all(n.startswith(("dense_arch.", "over_arch.")) for n, _ in model.named_dense_parameters())
    touched = model.rows_touched(torch.tensor([[4, 6], [4, 2], [1, 5]]))
    assert {k: v.tolist() for k, v in touched.items()} == {
        "sparse_arch.tables.0.weight": [1, 4],
        "sparse_arch.tables.1.weight_q": [0, 1, 2],
        "sparse_arch.tables.1.weight_r": [0, 2],
    }


def test_state_dict_roundtrip_and_determinism():
    a, b = tiny(), tiny()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    torch.manual_seed(99)
    c = DLRM_Net(arch_feature_emb_size=2, arch_mlp_bot=[3, 2], arch_mlp_top=[4, 1], table_sizes=[5, 7])
    c.load_state_dict(a.state_dict())
    x, s = torch.rand(2, 3), torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(a(x, s), c(x, s))
