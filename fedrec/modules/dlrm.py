"""DLRM (Naumov et al. 2019) built from four small parts, TorchRec style.

    dense  [B, num_dense] --DenseArch (bottom MLP)--> x [B, d0]
    sparse [B, T] ids     --SparseArch (T tables)---> E [B, T, d]
    InteractionArch(x, E) -> [B, k]  --OverArch (top MLP + sigmoid)--> probs [B]

The maths follow the reference ``dlrm_s_pytorch.py`` (facebookresearch/dlrm): ReLU after
every bottom layer, ReLU between top layers and a sigmoid at the end, the ``dot`` or
``cat`` interaction, its initialisation, its losses and its ``loss_threshold`` clamp.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedrec.modules.interaction import InteractionArch, make_interaction
from fedrec.modules.losses import build_loss
from fedrec.modules.mlp import MLP
from fedrec.utilities import registry

__all__ = [
    "DEFAULT_EMBEDDING",
    "DLRM_Net",
    "DenseArch",
    "OverArch",
    "SparseArch",
    "build_tables",
]

DEFAULT_EMBEDDING: dict[str, Any] = {"name": "torch_bag", "mode": "sum", "sparse": False}
_EMBEDDING_TYPES_KEYS = ("threshold", "base", "custom")


class DenseArch(nn.Module):
    """The bottom MLP: ``sizes[0]`` dense features to ``sizes[-1]``, ReLU after every layer."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(sizes, final_activation="relu")
        self.out_features = self.mlp.out_features

    def forward(self, dense: Tensor) -> Tensor:
        return self.mlp(dense)


def build_tables(table_sizes: Sequence[int], embedding_dim: int,
                 embedding_types: Mapping[str, Any] | None = None) -> list[nn.Module]:
    """One embedding table per entry of ``table_sizes``, its type picked by ``embedding_types``.

    ``embedding_types = {"threshold": t, "base": cfg, "custom": cfg}``: a table of more
    than ``t`` rows uses ``custom`` when it is given, every other table ``base``. Missing
    ``base`` means ``torch_bag`` (sum, dense gradients); missing ``threshold`` means 0.
    """
    types = dict(embedding_types or {})
    unknown = sorted(set(types) - set(_EMBEDDING_TYPES_KEYS))
    if unknown:
        raise ValueError(f"embedding_types does not take key(s) {unknown}; "
                         f"it takes: {list(_EMBEDDING_TYPES_KEYS)}")
    threshold = types.get("threshold")
    threshold = 0 if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"embedding_types.threshold must be an integer, got {threshold!r}")
    base = types.get("base") or DEFAULT_EMBEDDING
    custom = types.get("custom")
    tables = []
    for n in table_sizes:
        cfg = custom if custom is not None and n > threshold else base
        tables.append(registry.construct("embedding", cfg, num_embeddings=int(n),
                                         embedding_dim=int(embedding_dim)))
    return tables


class SparseArch(nn.Module):
    """One embedding table per categorical feature: ``ids [B, T] -> [B, T, d]``."""

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int,
                 embedding_types: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.table_sizes = [int(n) for n in table_sizes]
        self.embedding_dim = int(embedding_dim)
        self.tables = nn.ModuleList(build_tables(self.table_sizes, self.embedding_dim, embedding_types))

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    def forward(self, sparse: Tensor) -> Tensor:
        if sparse.dim() != 2 or sparse.shape[1] != len(self.tables):
            raise ValueError(f"sparse ids must have shape [B, {len(self.tables)}] (one id per "
                             f"table), got {list(sparse.shape)}")
        return torch.stack([table(sparse[:, t]) for t, table in enumerate(self.tables)], dim=1)


class OverArch(nn.Module):
    """The top MLP: ReLU between layers, a sigmoid after the last (its size must be 1)."""

    def __init__(self, in_features: int, sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if not sizes or sizes[-1] != 1:
            raise ValueError(f"arch_mlp_top must end with an output size of 1, got {sizes}")
        self.mlp = MLP([int(in_features)] + sizes, final_activation="sigmoid")

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


@registry.load("model", "dlrm")
class DLRM_Net(nn.Module):
    """DLRM: ``forward(dense [B, num_dense] float32, sparse [B, T] int64) -> probs [B]``.

    ``arch_mlp_bot`` lists every bottom size from the input (``num_dense``) to the output;
    ``arch_mlp_top`` lists the top MLP's hidden and output sizes (its input width follows
    from the interaction). Parameter groups for optimizers and federated code:
    ``embedding_parameters()`` / ``dense_parameters()`` (and their ``named_`` forms),
    ``embedding_names`` (the set of table parameter names), ``sparse_tables()`` (each
    table parameter with its table index) and ``rows_touched(sparse)``.
    """

    def __init__(
        self,
        *,
        arch_feature_emb_size: int = 16,
        arch_mlp_bot: list[int] = [13, 512, 256, 64, 16],  # noqa: B006 (copied, never mutated)
        arch_mlp_top: list[int] = [512, 256, 1],  # noqa: B006
        arch_interaction_op: str = "dot",
        arch_interaction_itself: bool = False,
        loss_function: str = "bce",
        loss_weights: list[float] | None = None,
        loss_threshold: float = 0.0,
        embedding_types: dict | None = None,
        table_sizes: list[int],
        num_dense: int | None = None,
    ) -> None:
        super().__init__()
        arch_mlp_bot = [int(s) for s in arch_mlp_bot]
        arch_mlp_top = [int(s) for s in arch_mlp_top]
        table_sizes = [int(n) for n in table_sizes]
        if len(arch_mlp_bot) < 2:
            raise ValueError(f"arch_mlp_bot needs at least [num_dense, output_size], got {arch_mlp_bot}")
        if num_dense is not None and int(num_dense) != arch_mlp_bot[0]:
            raise ValueError(f"arch_mlp_bot starts with {arch_mlp_bot[0]} inputs but the data has "
                             f"{num_dense} dense features; set arch_mlp_bot[0] = {num_dense}")
        if not table_sizes:
            raise ValueError("table_sizes is empty: DLRM needs at least one categorical table")
        if any(n < 1 for n in table_sizes):
            raise ValueError(f"every table needs at least one row, got table_sizes={table_sizes}")
        if int(arch_feature_emb_size) < 1:
            raise ValueError(f"arch_feature_emb_size must be positive, got {arch_feature_emb_size}")
        if not 0.0 <= float(loss_threshold) < 0.5:
            raise ValueError(f"loss_threshold must be in [0, 0.5), got {loss_threshold}")

        self.arch_feature_emb_size = int(arch_feature_emb_size)
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = bool(arch_interaction_itself)
        self.loss_function = loss_function
        self.loss_threshold = float(loss_threshold)
        self.table_sizes = table_sizes
        self.num_dense = arch_mlp_bot[0]

        self.dense_arch = DenseArch(arch_mlp_bot)
        self.sparse_arch = SparseArch(table_sizes, self.arch_feature_emb_size, embedding_types)
        self.interaction_arch: InteractionArch = make_interaction(
            arch_interaction_op, len(table_sizes), self.dense_arch.out_features,
            self.arch_feature_emb_size, itself=self.arch_interaction_itself,
        )
        self.over_arch = OverArch(self.interaction_arch.output_dim, arch_mlp_top)
        self.loss_fn = build_loss(loss_function, loss_weights)

        self._sparse_tables: list[tuple[str, int]] = [
            (f"sparse_arch.tables.{t}.{suffix}", t)
            for t, table in enumerate(self.sparse_arch.tables)
            for suffix in table.row_parameters
        ]
        self.embedding_names = frozenset(name for name, _ in self._sparse_tables)
        missing = self.embedding_names - dict(self.named_parameters()).keys()
        if missing:  # an embedding class naming a row parameter it does not have
            raise RuntimeError(f"embedding row parameters not found: {sorted(missing)}")

    # ------------------------------------------------------------------ forward / loss
    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        x = self.dense_arch(dense)
        e = self.sparse_arch(sparse)
        p = self.over_arch(self.interaction_arch(x, e)).squeeze(-1)
        if self.loss_threshold > 0.0:
            p = torch.clamp(p, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        return p

    def loss(self, probs: Tensor, labels: Tensor) -> Tensor:
        """The configured loss (``bce`` | ``mse`` | ``wbce``) of probabilities against labels."""
        return self.loss_fn(probs, labels)

    # ------------------------------------------------------------------ parameter groups
    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def has_sparse_gradients(self) -> bool:
        """Whether any embedding table produces sparse (COO) gradients."""
        return any(getattr(t, "sparse", False) for t in self.sparse_arch.tables)

    def sparse_tables(self) -> list[tuple[str, int]]:
        """``(state_dict name, table index)`` for every parameter that holds embedding rows."""
        return list(self._sparse_tables)

    def named_embedding_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if name in self.embedding_names:
                yield name, p

    def named_dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if name not in self.embedding_names:
                yield name, p

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        """The embedding tables' parameters (sparse gradients when their table is sparse)."""
        return (p for _, p in self.named_embedding_parameters())

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter: the bottom and top MLPs."""
        return (p for _, p in self.named_dense_parameters())

    def rows_touched(self, sparse: Tensor) -> dict[str, Tensor]:
        """Sorted unique rows each table parameter's batch ``sparse [B, T]`` reads, by name."""
        out: dict[str, Tensor] = {}
        for t, table in enumerate(self.sparse_arch.tables):
            for suffix, rows in table.rows_touched(sparse[:, t]).items():
                out[f"sparse_arch.tables.{t}.{suffix}"] = rows
        return out
