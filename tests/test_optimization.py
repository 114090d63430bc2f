"""Optimizers and LR schedulers (registry kinds ``optimizer`` and ``lr_scheduler``)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from fedrec.optimization import (
    DLRMScheduler,
    RowWiseAdagrad,
    SplitOptimizer,
    dlrm_lr_scale,
    embedding_parameters,
)
from fedrec.utilities import registry

SPLIT_CFG = {
    "name": "split",
    "sparse": {"name": "rowwise_adagrad", "lr": 0.1},
    "dense": {"name": "adam", "lr": 0.01},
}


class Toy(nn.Module):
    """An EmbeddingBag (sparse grads) feeding a Linear (dense grads)."""

    def __init__(self, rows: int = 20, dim: int = 4, sparse: bool = True) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse)
        self.lin = nn.Linear(dim, 1)

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(idx, offsets)).squeeze(-1)


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw)


def batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    idx = torch.randint(0, 10, (12,), generator=g)  # rows 10..19 are never touched
    offsets = torch.arange(0, 12, 3)
    target = torch.rand(4, generator=g)
    return idx, offsets, target


def train(model, opt, steps, start=0, sched=None):
    for i in range(start, start + steps):
        idx, offsets, target = batch(i)
        opt.zero_grad(set_to_none=True)
        loss = ((model(idx, offsets) - target) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def build(cfg, model):
    return registry.construct("optimizer", cfg, model=model)


# --------------------------------------------------------------------------------------
# registry


def test_all_optimizers_registered():
    assert set(registry.known("optimizer")) >= {
        "sgd", "adagrad", "adam", "sparse_adam", "split", "rowwise_adagrad"}
    assert set(registry.known("lr_scheduler")) >= {"noop", "step", "cosine", "dlrm"}


def test_unknown_optimizer_lists_known_names():
    with pytest.raises(registry.RegistryError) as err:
        build({"name": "adamw_typo", "lr": 0.1}, toy())
    msg = str(err.value)
    assert "adamw_typo" in msg
    for name in ("sgd", "adam", "split", "rowwise_adagrad"):
        assert name in msg


def test_unknown_key_and_bad_type_refused():
    with pytest.raises(registry.RegistryError, match="momentun"):
        build({"name": "sgd", "lr": 0.1, "momentun": 0.9}, toy())
    with pytest.raises(registry.ConfigTypeError, match="lr"):
        build({"name": "sgd", "lr": "fast"}, toy())


def test_adam_betas_from_yaml_list():
    opt = build({"name": "adam", "lr": 0.01, "betas": [0.8, 0.9]}, toy(sparse=False))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's Adagrad, sparse grads
@pytest.mark.parametrize("cfg", [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    {"name": "adagrad", "lr": 0.1},
    {"name": "rowwise_adagrad", "lr": 0.1},
])
def test_sparse_capable_optimizers_train_toy(cfg):
    model = toy()
    before = copy.deepcopy(model.state_dict())
    train(model, build(cfg, model), 2)
    after = model.state_dict()
    assert not torch.equal(before["emb.weight"], after["emb.weight"])
    assert not torch.equal(before["lin.weight"], after["lin.weight"])


def test_sparse_adam_refuses_dense_params_and_suggests_split():
    with pytest.raises(ValueError, match="split") as err:
        build({"name": "sparse_adam", "lr": 0.01}, toy())
    assert "lin.weight" in str(err.value)


def test_sparse_adam_dense_grad_at_step_is_clear():
    model = toy(sparse=False)
    opt = build({"name": "sparse_adam", "lr": 0.01}, list(model.emb.parameters()))
    idx, offsets, _ = batch(0)
    model(idx, offsets).sum().backward()
    with pytest.raises(RuntimeError, match="split"):
        opt.step()


def test_sparse_adam_on_sparse_only_model():
    model = nn.EmbeddingBag(10, 3, sparse=True)
    opt = build({"name": "sparse_adam", "lr": 0.01}, model)
    before = model.weight.detach().clone()
    model(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    opt.step()
    changed = (model.weight != before).any(dim=1)
    assert changed.tolist() == [i in (1, 2) for i in range(10)]


# --------------------------------------------------------------------------------------
# rowwise adagrad


def test_rowwise_adagrad_matches_hand_computation_sparse():
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(6, 3, mode="sum", sparse=True)
    w0 = emb.weight.detach().clone()
    lr, eps = 0.5, 1e-8
    opt = RowWiseAdagrad(emb.parameters(), lr=lr, eps=eps)
    coef = torch.tensor([[1.0, -2.0, 0.5]])
    # row 1 appears twice: its gradient is the sum of both occurrences
    idx, offsets = torch.tensor([1, 3, 1]), torch.tensor([0])
    (emb(idx, offsets) * coef).sum().backward()
    opt.step()

    g = coef[0]
    expected = w0.clone()
    acc = torch.zeros(6)
    for row, grad in ((1, 2 * g), (3, g)):
        acc[row] += grad.pow(2).mean()
        expected[row] -= lr * grad / (acc[row].sqrt() + eps)
    torch.testing.assert_close(emb.weight.detach(), expected)
    torch.testing.assert_close(opt.state[emb.weight]["sum"], acc)

    # a second step accumulates
    opt.zero_grad()
    (emb(torch.tensor([3]), offsets) * coef).sum().backward()
    opt.step()
    acc[3] += g.pow(2).mean()
    expected[3] -= lr * g / (acc[3].sqrt() + eps)
    torch.testing.assert_close(emb.weight.detach(), expected)


def test_rowwise_adagrad_dense_matches_sparse():
    results = []
    for sparse in (True, False):
        torch.manual_seed(0)
        emb = nn.EmbeddingBag(10, 4, mode="sum", sparse=sparse)
        opt = RowWiseAdagrad(emb.parameters(), lr=0.1)
        for i in range(3):
            opt.zero_grad()
            idx, offsets, target = batch(i)
            ((emb(idx, offsets).sum(1) - target) ** 2).sum().backward()
            opt.step()
        results.append((emb.weight.detach().clone(), opt.state[emb.weight]["sum"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_rowwise_adagrad_bias_is_elementwise():
    b = nn.Parameter(torch.zeros(3))
    opt = RowWiseAdagrad([b], lr=1.0, eps=0.0)
    (b * torch.tensor([2.0, -1.0, 0.5])).sum().backward()
    opt.step()
    # g / sqrt(g^2) = sign(g)
    torch.testing.assert_close(b.detach(), torch.tensor([-1.0, 1.0, -1.0]))


# --------------------------------------------------------------------------------------
# split


def test_split_routes_parameters():
    model = toy()
    opt = build(SPLIT_CFG, model)
    assert isinstance(opt, SplitOptimizer)
    assert isinstance(opt, torch.optim.Optimizer)
    sparse_params = [p for g in opt.sparse.param_groups for p in g["params"]]
    dense_params = [p for g in opt.dense.param_groups for p in g["params"]]
    assert [id(p) for p in sparse_params] == [id(model.emb.weight)]
    assert {id(p) for p in dense_params} == {id(model.lin.weight), id(model.lin.bias)}
    assert len(opt.param_groups) == 2
    assert type(opt.sparse).__name__ == "RowWiseAdagrad"
    assert isinstance(opt.dense, torch.optim.Adam)


def test_split_updates_each_part_with_its_optimizer():
    model = toy()
    opt = build(SPLIT_CFG, model)
    before = copy.deepcopy(model.state_dict())
    train(model, opt, 1)
    emb_changed = (model.emb.weight != before["emb.weight"]).any(dim=1)
    assert emb_changed[:10].any() and not emb_changed[10:].any()  # only touched rows
    assert not torch.equal(model.lin.weight, before["lin.weight"])
    # state lives in the right sub-optimizer: row-wise sum vs Adam moments
    assert set(opt.sparse.state[model.emb.weight]) == {"step", "sum"}
    assert "exp_avg" in opt.dense.state[model.lin.weight]
    assert model.emb.weight in opt.state and model.lin.weight in opt.state
    assert len(opt.state) == 3

    # the same update as running the two optimizers by hand
    ref = toy()
    ref.load_state_dict(before)
    sparse = RowWiseAdagrad([ref.emb.weight], lr=0.1)
    dense = torch.optim.Adam(ref.lin.parameters(), lr=0.01)
    idx, offsets, target = batch(0)
    ((ref(idx, offsets) - target) ** 2).mean().backward()
    sparse.step()
    dense.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_split_uses_model_embedding_parameters_method():
    class Custom(Toy):
        def embedding_parameters(self):
            return [self.emb.weight, self.lin.bias]

    torch.manual_seed(0)
    model = Custom(sparse=False)
    assert [id(p) for p in embedding_parameters(model)] == [id(model.emb.weight), id(model.lin.bias)]
    opt = build({"name": "split", "sparse": {"name": "rowwise_adagrad", "lr": 0.1},
                 "dense": {"name": "sgd", "lr": 0.1}}, model)
    assert len(opt.sparse.param_groups[0]["params"]) == 2
    assert len(opt.dense.param_groups[0]["params"]) == 1


def test_split_refuses_bad_sub_optimizers():
    with pytest.raises(registry.RegistryError, match="adam"):
        build({"name": "split", "sparse": {"name": "adam", "lr": 0.1},
               "dense": {"name": "sgd", "lr": 0.1}}, toy())
    with pytest.raises(registry.RegistryError, match="sparse_adam"):
        build({"name": "split", "sparse": {"name": "rowwise_adagrad", "lr": 0.1},
               "dense": {"name": "sparse_adam", "lr": 0.1}}, toy())
    with pytest.raises(registry.RegistryError, match="momentun"):
        build({"name": "split", "sparse": {"name": "sgd", "lr": 0.1, "momentun": 1.0},
               "dense": {"name": "sgd", "lr": 0.1}}, toy())


def test_split_zero_grad_set_to_none():
    model = toy()
    opt = build(SPLIT_CFG, model)
    train(model, opt, 1)
    assert model.emb.weight.grad is not None and model.lin.weight.grad is not None
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cfg", [
    SPLIT_CFG,
    {"name": "split", "sparse": {"name": "sparse_adam", "lr": 0.05},
     "dense": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    {"name": "rowwise_adagrad", "lr": 0.1},
])
def test_state_dict_round_trip_resumes_identically(cfg):
    sched_cfg = {"name": "dlrm", "num_warmup_steps": 2, "decay_start_step": 3,
                 "num_decay_steps": 5}
    model = toy()
    opt = build(cfg, model)
    sched = registry.construct("lr_scheduler", sched_cfg, optimizer=opt)
    train(model, opt, 3, sched=sched)

    # save through a weights_only round trip, as a checkpoint would
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    train(model, opt, 2, start=3, sched=sched)

    model2 = toy(seed=123)  # different init: everything must come from the checkpoint
    opt2 = build(cfg, model2)
    sched2 = registry.construct("lr_scheduler", sched_cfg, optimizer=opt2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(model2, opt2, 2, start=3, sched=sched2)

    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_lr_schedulers_scale_both_split_lrs():
    model = toy()
    opt = build(SPLIT_CFG, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        train(model, opt, 2, sched=sched)
    assert opt.sparse.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert opt.dense.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)
    assert sched.get_last_lr() == pytest.approx([0.025, 0.0025])


# --------------------------------------------------------------------------------------
# schedulers


def test_dlrm_schedule_key_steps():
    w, d, n = 4, 10, 5
    assert dlrm_lr_scale(1, w, d, n) == pytest.approx(0.25)
    assert dlrm_lr_scale(3, w, d, n) == pytest.approx(0.75)
    assert dlrm_lr_scale(4, w, d, n) == 1.0
    assert dlrm_lr_scale(9, w, d, n) == 1.0
    assert dlrm_lr_scale(10, w, d, n) == 1.0
    assert dlrm_lr_scale(11, w, d, n) == pytest.approx((4 / 5) ** 2)
    assert dlrm_lr_scale(12, w, d, n) == pytest.approx((3 / 5) ** 2)
    assert dlrm_lr_scale(14, w, d, n) == pytest.approx((1 / 5) ** 2)
    assert dlrm_lr_scale(15, w, d, n) == 0.0
    assert dlrm_lr_scale(100, w, d, n) == 0.0
    # no warm-up, no decay: constant
    assert dlrm_lr_scale(1, 0, 0, 0) == 1.0
    assert dlrm_lr_scale(10**6, 0, 0, 0) == 1.0


def test_dlrm_scheduler_follows_the_schedule():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = registry.construct("lr_scheduler", {"name": "dlrm", "num_warmup_steps": 4,
                                                "decay_start_step": 10, "num_decay_steps": 5},
                               optimizer=opt)
    assert isinstance(sched, DLRMScheduler)
    used = []
    for _ in range(20):
        used.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        opt.step()
        sched.step()
    expected = [2.0 * dlrm_lr_scale(s, 4, 10, 5) for s in range(1, 21)]
    assert used == pytest.approx(expected)
    assert used[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    assert used[10] == pytest.approx(2.0 * 0.64)
    assert used[14:] == [0.0] * 6


def test_dlrm_scheduler_rejects_decay_before_warmup_end():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warm-up"):
        registry.construct("lr_scheduler", {"name": "dlrm", "num_warmup_steps": 10,
                                            "decay_start_step": 5, "num_decay_steps": 5},
                           optimizer=opt)


@pytest.mark.parametrize("cfg,expected", [
    ({"name": "noop"}, [1.0] * 6),
    ({"name": "step", "step_size": 2, "gamma": 0.5}, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
    ({"name": "cosine", "T_max": 4, "eta_min": 0.0},
     [0.5 * (1 + math.cos(math.pi * min(s, 4) / 4)) if s <= 4 else None for s in range(6)]),
])
def test_simple_schedulers(cfg, expected):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = registry.construct("lr_scheduler", cfg, optimizer=opt)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for got, want in zip(used, expected, strict=True):
        if want is not None:
            assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("cfg", [
    {"name": "noop"},
    {"name": "step", "step_size": 2, "gamma": 0.5},
    {"name": "cosine", "T_max": 7},
    {"name": "dlrm", "num_warmup_steps": 3, "decay_start_step": 4, "num_decay_steps": 4},
])
def test_scheduler_state_dict_round_trip(cfg):
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, registry.construct("lr_scheduler", cfg, optimizer=opt)

    opt, sched = make()
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, sched2 = make()
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_scheduler_unknown_key():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(registry.RegistryError, match="warmup"):
        registry.construct("lr_scheduler", {"name": "dlrm", "warmup": 3}, optimizer=opt)


def test_split_sparse_adam_needs_sparse_tables():
    with pytest.raises(ValueError, match="sparse=True.*emb"):
        build({"name": "split", "sparse": {"name": "sparse_adam", "lr": 0.1},
               "dense": {"name": "sgd", "lr": 0.1}}, toy(sparse=False))
    # rowwise_adagrad takes dense-gradient tables
    model = toy(sparse=False)
    opt = build(SPLIT_CFG, model)
    before = model.emb.weight.detach().clone()
    train(model, opt, 1)
    assert not torch.equal(model.emb.weight, before)
