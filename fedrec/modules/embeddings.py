"""Embedding tables for DLRM's categorical features (registry kind ``embedding``).

Every table is built as::

    registry.construct("embedding", cfg, num_embeddings=n, embedding_dim=d)

and follows one small protocol (``EmbeddingTable``):

* ``forward(ids: LongTensor[B]) -> Tensor[B, d]``: one id per sample, ``0 <= id < n``.
* ``row_parameters``: the suffixes (``"weight"``, or ``"weight_q"`` and ``"weight_r"``) of
  the parameters that hold embedding rows.
* ``row_map(ids) -> {suffix: LongTensor[B]}``: the row of each such parameter that each
  raw id reads.
* ``rows_touched(ids) -> {suffix: LongTensor[k]}``: the sorted unique rows a batch reads,
  so federated code can send or merge only those rows.
* ``sparse``: whether the row parameters get sparse (COO) gradients.

A one-id-per-sample lookup gives the same values and gradients whether it goes through
``nn.EmbeddingBag`` (sum, mean or max of a bag of one) or through ``F.embedding``; on CPU
``F.embedding`` is the fastest of the three ways measured (EmbeddingBag with offsets,
EmbeddingBag with a ``[B, 1]`` input, and ``nn.Embedding``: forward + backward, B=128,
26 tables, d=16: about 0.75 ms against 1.3-1.6 ms with sparse gradients, and 2.2 ms
against 3.0-4.8 ms with dense gradients), so the tables use it for one-hot input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrec.utilities import registry

__all__ = [
    "EmbeddingTable",
    "HashEmbedding",
    "QREmbedding",
    "TorchBagEmbedding",
    "uniform_rows_",
]

_BAG_MODES = ("sum", "mean", "max")


def uniform_rows_(weight: Tensor, num_rows: int | None = None) -> Tensor:
    """DLRM's table init, in place: ``U(-sqrt(1/n), sqrt(1/n))`` for a table of ``n`` rows."""
    n = weight.shape[0] if num_rows is None else num_rows
    bound = math.sqrt(1.0 / n)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
    return weight


def _check_size(name: str, value: int) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class EmbeddingTable:
    """The protocol shared by the embedding classes (a mixin: not an ``nn.Module``)."""

    num_embeddings: int
    embedding_dim: int
    sparse: bool
    row_parameters: tuple[str, ...] = ("weight",)

    def row_map(self, ids: Tensor) -> dict[str, Tensor]:
        """The row of each row parameter that each raw id reads (same shape as ``ids``)."""
        raise NotImplementedError

    def rows_touched(self, ids: Tensor) -> dict[str, Tensor]:
        """Sorted unique rows a batch of raw ids reads, per row parameter suffix."""
        return {name: torch.unique(rows.reshape(-1).long()) for name, rows in self.row_map(ids).items()}


@registry.load("embedding", "torch_bag")
class TorchBagEmbedding(EmbeddingTable, nn.EmbeddingBag):
    """A plain table: ``nn.EmbeddingBag`` with DLRM's uniform init; row = id.

    One id per sample (a 1-D ``ids``) takes the faster ``F.embedding`` path, which is
    exactly a bag of one for every ``mode``; a 2-D input or ``offsets`` (multi-hot bags)
    goes through ``nn.EmbeddingBag`` itself.
    """

    row_parameters = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "sum",
                 sparse: bool = False) -> None:
        _check_size("num_embeddings", num_embeddings)
        _check_size("embedding_dim", embedding_dim)
        if mode not in _BAG_MODES:
            raise ValueError(f"torch_bag mode must be one of {list(_BAG_MODES)}, got {mode!r}")
        # nn.EmbeddingBag.__init__ calls reset_parameters (below): DLRM's uniform init.
        nn.EmbeddingBag.__init__(self, int(num_embeddings), int(embedding_dim), mode=mode,
                                 sparse=bool(sparse))

    def reset_parameters(self) -> None:
        uniform_rows_(self.weight)

    def forward(self, ids: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        if offsets is None and per_sample_weights is None and ids.dim() == 1:
            return F.embedding(ids, self.weight, sparse=self.sparse)
        return nn.EmbeddingBag.forward(self, ids, offsets, per_sample_weights)

    def row_map(self, ids: Tensor) -> dict[str, Tensor]:
        return {"weight": ids}


@registry.load("embedding", "hash_emb")
class HashEmbedding(EmbeddingTable, nn.Module):
    """The hashing trick: a table of ``num_buckets`` rows, row = id mod num_buckets."""

    row_parameters = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, num_buckets: int,
                 sparse: bool = False) -> None:
        super().__init__()
        _check_size("num_embeddings", num_embeddings)
        _check_size("embedding_dim", embedding_dim)
        _check_size("num_buckets", num_buckets)
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.num_buckets = int(num_buckets)
        self.sparse = bool(sparse)
        self.weight = nn.Parameter(torch.empty(self.num_buckets, self.embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_rows_(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(torch.remainder(ids, self.num_buckets), self.weight, sparse=self.sparse)

    def row_map(self, ids: Tensor) -> dict[str, Tensor]:
        return {"weight": torch.remainder(ids, self.num_buckets)}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, num_buckets={self.num_buckets}, "
                f"sparse={self.sparse}")


_QR_OPERATIONS = ("mult", "add", "concat")


@registry.load("embedding", "qr_emb")
class QREmbedding(EmbeddingTable, nn.Module):
    """Quotient-remainder compositional embedding (Shi et al. 2019, DLRM's QREmbeddingBag).

    ``q = id // qr_collisions`` indexes ``weight_q`` (``ceil(n / qr_collisions)`` rows) and
    ``r = id % qr_collisions`` indexes ``weight_r`` (``qr_collisions`` rows); the two rows
    combine by ``operation``: ``mult`` (element-wise product), ``add``, or ``concat``.
    The output always has ``embedding_dim`` columns: with ``concat`` each part has
    ``embedding_dim / 2`` (which must then be even). Each table is initialised
    ``U(-sqrt(1/m), sqrt(1/m))`` for its own row count ``m``.
    """

    row_parameters = ("weight_q", "weight_r")

    def __init__(self, num_embeddings: int, embedding_dim: int, qr_collisions: int = 4,
                 operation: str = "mult", sparse: bool = False) -> None:
        super().__init__()
        _check_size("num_embeddings", num_embeddings)
        _check_size("embedding_dim", embedding_dim)
        _check_size("qr_collisions", qr_collisions)
        if operation not in _QR_OPERATIONS:
            raise ValueError(f"qr_emb operation must be one of {list(_QR_OPERATIONS)}, got {operation!r}")
        if operation == "concat" and embedding_dim % 2:
            raise ValueError(f"qr_emb with operation 'concat' needs an even embedding_dim "
                             f"(each part has embedding_dim / 2), got {embedding_dim}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.qr_collisions = int(qr_collisions)
        self.operation = operation
        self.sparse = bool(sparse)
        part_dim = self.embedding_dim // 2 if operation == "concat" else self.embedding_dim
        num_q = -(-self.num_embeddings // self.qr_collisions)  # ceil(n / collisions)
        self.weight_q = nn.Parameter(torch.empty(num_q, part_dim))
        self.weight_r = nn.Parameter(torch.empty(self.qr_collisions, part_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_rows_(self.weight_q)
        uniform_rows_(self.weight_r)

    def forward(self, ids: Tensor) -> Tensor:
        q = F.embedding(torch.div(ids, self.qr_collisions, rounding_mode="floor"), self.weight_q,
                        sparse=self.sparse)
        r = F.embedding(torch.remainder(ids, self.qr_collisions), self.weight_r, sparse=self.sparse)
        if self.operation == "mult":
            return q * r
        if self.operation == "add":
            return q + r
        return torch.cat((q, r), dim=-1)

    def row_map(self, ids: Tensor) -> dict[str, Tensor]:
        return {
            "weight_q": torch.div(ids, self.qr_collisions, rounding_mode="floor"),
            "weight_r": torch.remainder(ids, self.qr_collisions),
        }

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, qr_collisions={self.qr_collisions}, "
                f"operation={self.operation!r}, sparse={self.sparse}")
