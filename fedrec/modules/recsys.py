"""Collaborative-filtering models over (user, item) pairs: biased MF, NeuMF / GMF / MLP, two-tower.

Plain PyTorch, the maths of the papers:

* ``biased_mf`` (Koren et al. 2009): ``r(u, i) = mu + b_u + b_i + p_u . q_i``;
* ``neumf`` (He et al. 2017, "Neural Collaborative Filtering"): GMF ``p_u * q_i`` (element-wise)
  and an MLP over ``[p'_u, q'_i]`` (separate embeddings), concatenated into one linear
  output; ``variant: gmf`` or ``mlp`` keeps one branch (the paper's GMF and MLP models).

Scores are logits for ``bce`` (sampled negatives) and ``bpr`` (pairwise), ratings for ``mse``.

A model says which parameters belong to users (``private_tables``: they never leave a
federated client) and which are item tables (``sparse_tables``: sent as the rows a client
touches); ``initial_rows`` gives a user's starting rows from (seed, table, user) alone, so
that any process can initialise a client's private embedding the same way.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed

LOSSES = ("bce", "bpr", "mse")


def sampled_bce(pos: Tensor, neg: Optional[Tensor]) -> Tensor:
    """Binary cross-entropy of logits: positives labelled 1, sampled negatives 0 (mean)."""
    parts = [F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")]
    count = pos.numel()
    if neg is not None and neg.numel():
        parts.append(F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum"))
        count += neg.numel()
    return sum(parts) / count


def bpr(pos: Tensor, neg: Tensor) -> Tensor:
    """Bayesian personalised ranking (Rendle et al. 2009): ``-log sigmoid(s_pos - s_neg)``."""
    return -F.logsigmoid(pos.unsqueeze(1) - neg).mean()


class RecModel(nn.Module):
    """What the rec trainer and the federated runtime need from a (user, item) model."""

    #: state-dict names of the user-side and of the item-side embedding tables
    user_tables: List[str]
    item_tables: List[str]

    def __init__(self, num_users: int, num_items: int, loss_function: str, init_std: float, l2: float,
                 sparse: bool) -> None:
        super().__init__()
        if loss_function not in LOSSES:
            raise ValueError(f"loss_function must be one of {', '.join(LOSSES)}, got {loss_function!r}")
        if num_users < 1 or num_items < 1:
            raise ValueError(f"the data must have users and items, got {num_users} users and {num_items} items")
        if init_std <= 0 or l2 < 0:
            raise ValueError(f"init_std must be > 0 and l2 >= 0, got {init_std} and {l2}")
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.loss_function = loss_function
        self.init_std, self.l2, self.sparse = float(init_std), float(l2), bool(sparse)

    def _table(self, rows: int, dim: int, bias: bool = False) -> nn.Embedding:
        table = nn.Embedding(rows, dim, sparse=self.sparse)
        with torch.no_grad():
            table.weight.zero_() if bias else table.weight.normal_(0.0, self.init_std)
        return table

    # -- what the federated runtime asks --------------------------------------------------
    def private_tables(self) -> List[str]:
        """User-side parameters: they stay on the user's device."""
        return list(self.user_tables)

    def sparse_tables(self) -> List[Tuple[str, int]]:
        """Item tables, sent and aggregated as the rows a client touches."""
        return [(name, k) for k, name in enumerate(self.item_tables)]

    def rows_touched(self, items: Tensor) -> Dict[str, Tensor]:
        """Sorted unique rows of every item table that ``items`` (any shape) read: marked
        in a mask over the items where that is cheaper than sorting them (a client's
        items and negatives against a few thousand items), else ``torch.unique``."""
        flat = items.reshape(-1)
        if flat.device.type == "cpu" and self.num_items <= 32 * flat.numel():
            mask = np.zeros(self.num_items, dtype=bool)
            mask[flat.numpy()] = True
            rows = torch.from_numpy(np.flatnonzero(mask).astype(np.int64, copy=False))
        else:
            rows = torch.unique(flat.to(torch.int64), sorted=True)
        return {name: rows for name in self.item_tables}

    def initial_rows(self, name: str, ids: Tensor, seed: int) -> Tensor:
        """Starting rows ``ids`` of user table ``name``, from (seed, table, user) only."""
        weight = self.get_parameter(name)
        if name.endswith("bias.weight"):
            return torch.zeros(len(ids), weight.shape[1], dtype=weight.dtype)
        table = self.user_tables.index(name)
        out = torch.empty(len(ids), weight.shape[1], dtype=weight.dtype)
        generator = torch.Generator()
        for k, user in enumerate(ids.tolist()):
            generator.manual_seed(derive_seed(seed, table, int(user)))
            out[k].normal_(0.0, self.init_std, generator=generator)
        return out

    # -- scores and losses -----------------------------------------------------------------
    def score(self, user: Tensor, item: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, user: Tensor, item: Tensor) -> Tensor:
        """Scores of (user, item) pairs; ``item`` [B] or [B, k] (k items per user)."""
        if item.dim() == 2:
            k = item.shape[1]
            return self.score(user.unsqueeze(1).expand(-1, k).reshape(-1), item.reshape(-1)).view(-1, k)
        return self.score(user, item)

    def score_all_items(self, user: Tensor) -> Tensor:
        """Scores [B, num_items] of each user against every item (full-ranking evaluation);
        pairwise through :meth:`score` here, a matrix product where the model allows it."""
        items = torch.arange(self.num_items, device=user.device)
        return self(user, items.unsqueeze(0).expand(len(user), -1))

    def loss(self, user: Tensor, item: Tensor, label: Tensor, negatives: Optional[Tensor]) -> Tensor:
        """The mean training loss of a batch (plus ``l2`` on the rows it used)."""
        pos = self(user, item)
        if self.loss_function == "mse":
            loss = F.mse_loss(pos, label)
        elif self.loss_function == "bce":
            loss = sampled_bce(pos, None if negatives is None else self(user, negatives))
        else:
            if negatives is None or not negatives.numel():
                raise ValueError("loss_function bpr needs sampled negatives (train.config.num_negatives >= 1)")
            loss = bpr(pos, self(user, negatives))
        if self.l2:
            loss = loss + self.l2 * self.penalty(user, item if negatives is None else torch.cat(
                [item.unsqueeze(1), negatives], dim=1))
        return loss

    def penalty(self, user: Tensor, items: Tensor) -> Tensor:
        """Squared norm of the embedding rows a batch used, per example."""
        total = sum(self.get_submodule(n.rsplit(".", 1)[0])(user).pow(2).sum() for n in self.user_tables)
        total = total + sum(self.get_submodule(n.rsplit(".", 1)[0])(items).pow(2).sum() for n in self.item_tables)
        return total / user.numel()


@registry.load("model", "biased_mf")
class BiasedMF(RecModel):
    """``mu + b_u + b_i + p_u . q_i`` (Koren, Bell and Volinsky 2009)."""

    def __init__(self, *, num_users: int, num_items: int, embedding_dim: int = 32,
                 loss_function: Literal["bce", "bpr", "mse"] = "bce", init_std: float = 0.01, l2: float = 0.0,
                 sparse: bool = False, rating_mean: float = 0.0) -> None:
        super().__init__(num_users, num_items, loss_function, init_std, l2, sparse)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.user_embedding = self._table(num_users, embedding_dim)
        self.item_embedding = self._table(num_items, embedding_dim)
        self.user_bias = self._table(num_users, 1, bias=True)
        self.item_bias = self._table(num_items, 1, bias=True)
        self.global_bias = nn.Parameter(torch.tensor(float(rating_mean) if loss_function == "mse" else 0.0))
        self.user_tables = ["user_embedding.weight", "user_bias.weight"]
        self.item_tables = ["item_embedding.weight", "item_bias.weight"]

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        p, q = self.user_embedding(user), self.item_embedding(item)
        return (self.global_bias + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1)
                + (p * q).sum(-1))

    def score_all_items(self, user: Tensor) -> Tensor:
        scores = self.user_embedding(user) @ self.item_embedding.weight.t()
        return scores + self.item_bias.weight.t() + self.user_bias(user) + self.global_bias


@registry.load("model", "neumf")
class NeuMF(RecModel):
    """NeuMF (He et al. 2017): ``h . [p_u * q_i, MLP([p'_u, q'_i])]``; ``variant: gmf`` or
    ``mlp`` keeps one branch. ``mlp_layers[0]`` is the MLP's input width (two embeddings of
    half of it); the last entry is its predictive factors."""

    def __init__(self, *, num_users: int, num_items: int, variant: Literal["neumf", "gmf", "mlp"] = "neumf",
                 gmf_dim: int = 8, mlp_layers: Sequence[int] = (32, 16, 8),
                 loss_function: Literal["bce", "bpr", "mse"] = "bce", init_std: float = 0.01, l2: float = 0.0,
                 sparse: bool = False, rating_mean: float = 0.0) -> None:
        super().__init__(num_users, num_items, loss_function, init_std, l2, sparse)
        if variant not in ("neumf", "gmf", "mlp"):
            raise ValueError(f"variant must be neumf, gmf or mlp, got {variant!r}")
        layers = [int(n) for n in mlp_layers]
        if variant != "gmf" and (len(layers) < 2 or layers[0] % 2 or min(layers) < 1):
            raise ValueError(f"mlp_layers must list >= 2 positive sizes, the first even, got {list(mlp_layers)}")
        self.variant = variant
        self.user_tables, self.item_tables = [], []
        width = 0
        if variant in ("neumf", "gmf"):
            self.gmf_user, self.gmf_item = self._table(num_users, gmf_dim), self._table(num_items, gmf_dim)
            self.user_tables.append("gmf_user.weight")
            self.item_tables.append("gmf_item.weight")
            width += gmf_dim
        if variant in ("neumf", "mlp"):
            half = layers[0] // 2
            self.mlp_user, self.mlp_item = self._table(num_users, half), self._table(num_items, half)
            self.user_tables.append("mlp_user.weight")
            self.item_tables.append("mlp_item.weight")
            blocks: List[nn.Module] = []
            for n_in, n_out in zip(layers[:-1], layers[1:]):
                linear = nn.Linear(n_in, n_out)
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
                blocks += [linear, nn.ReLU()]
            self.mlp = nn.Sequential(*blocks)
            width += layers[-1]
        self.predict = nn.Linear(width, 1)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        with torch.no_grad():
            self.predict.bias.fill_(float(rating_mean) if loss_function == "mse" else 0.0)

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        parts = []
        if self.variant in ("neumf", "gmf"):
            parts.append(self.gmf_user(user) * self.gmf_item(item))
        if self.variant in ("neumf", "mlp"):
            parts.append(self.mlp(torch.cat([self.mlp_user(user), self.mlp_item(item)], dim=-1)))
        return self.predict(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).squeeze(-1)


def _tower(width: int, layers: Sequence[int]) -> nn.Module:
    """Linear layers with ReLU between them (none after the last): a tower's output."""
    blocks: List[nn.Module] = []
    for k, n_out in enumerate(int(n) for n in layers):
        linear = nn.Linear(width, n_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        blocks += [linear] + ([nn.ReLU()] if k < len(layers) - 1 else [])
        width = n_out
    return nn.Sequential(*blocks)


@registry.load("model", "two_tower")
class TwoTower(RecModel):
    """Two towers scored by a dot product: the user tower is the user's private embedding
    (then ``user_layers``, an MLP shared by all users), the item tower the item's embedding
    then ``item_layers``. Item rows travel as the rows a client touches, the MLPs whole;
    every item's vector is computed once for full ranking."""

    def __init__(self, *, num_users: int, num_items: int, embedding_dim: int = 32,
                 user_layers: Sequence[int] = (), item_layers: Sequence[int] = (64, 32),
                 loss_function: Literal["bce", "bpr", "mse"] = "bce", init_std: float = 0.01, l2: float = 0.0,
                 sparse: bool = False, rating_mean: float = 0.0) -> None:
        super().__init__(num_users, num_items, loss_function, init_std, l2, sparse)
        if embedding_dim < 1 or min(list(user_layers) + list(item_layers) + [1]) < 1:
            raise ValueError(f"embedding_dim and the tower layers must be >= 1, got {embedding_dim}, "
                             f"{list(user_layers)} and {list(item_layers)}")
        user_out = int(user_layers[-1]) if len(user_layers) else embedding_dim
        item_out = int(item_layers[-1]) if len(item_layers) else embedding_dim
        if user_out != item_out:
            raise ValueError(f"the towers must end at the same width for their dot product, got user "
                             f"{user_out} (user_layers {list(user_layers)}) and item {item_out} "
                             f"(item_layers {list(item_layers)})")
        self.user_embedding = self._table(num_users, embedding_dim)
        self.item_embedding = self._table(num_items, embedding_dim)
        self.user_tower = _tower(embedding_dim, user_layers)
        self.item_tower = _tower(embedding_dim, item_layers)
        self.global_bias = nn.Parameter(torch.tensor(float(rating_mean) if loss_function == "mse" else 0.0))
        self.user_tables = ["user_embedding.weight"]
        self.item_tables = ["item_embedding.weight"]

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        u = self.user_tower(self.user_embedding(user))
        return self.global_bias + (u * self.item_tower(self.item_embedding(item))).sum(-1)

    def score_all_items(self, user: Tensor) -> Tensor:
        items = self.item_tower(self.item_embedding.weight)
        return self.global_bias + self.user_tower(self.user_embedding(user)) @ items.t()
