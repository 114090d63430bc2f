"""Feature interactions between the bottom-MLP output and the embedding vectors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "INTERACTION_OPS",
    "CatInteraction",
    "DotInteraction",
    "InteractionArch",
    "make_interaction",
]

INTERACTION_OPS = ("dot", "cat")


class InteractionArch(nn.Module):
    """``forward(dense [B, d0], sparse [B, T, d]) -> [B, output_dim]``."""

    output_dim: int


class DotInteraction(InteractionArch):
    """DLRM's ``dot``: ``x`` followed by the pairwise dot products of ``[x, e_1, ..., e_T]``.

    With ``F = T + 1`` feature vectors stacked as rows of ``V`` (``[B, F, d]``) and
    ``Z = V V^T``, the output is ``cat(x, Z[:, li, lj])`` where ``(li, lj)`` runs over the
    lower triangle row by row (``for i in range(F): for j in range(i + offset)``): strictly
    below the diagonal (``offset = 0``), or including it when ``itself`` (``offset = 1``),
    exactly the order of the reference ``dlrm_s_pytorch.py``.
    """

    def __init__(self, num_sparse: int, dense_dim: int, itself: bool = False) -> None:
        super().__init__()
        self.num_features = int(num_sparse) + 1
        self.itself = bool(itself)
        # torch.tril_indices enumerates row by row, left to right: the reference's order.
        idx = torch.tril_indices(self.num_features, self.num_features, offset=0 if itself else -1)
        self.register_buffer("li", idx[0].clone(), persistent=False)
        self.register_buffer("lj", idx[1].clone(), persistent=False)
        # the same pairs as positions in the flattened [F * F] products: one index_select,
        # whose backward (an index_add) is about twice as fast as z[:, li, lj]'s on CPU;
        # every pair is selected once, so values and gradients are the same bits
        self.register_buffer("flat_pairs", idx[0] * self.num_features + idx[1], persistent=False)
        self.num_pairs = int(idx.shape[1])
        self.output_dim = int(dense_dim) + self.num_pairs

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        v = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # [B, F, d]
        z = torch.bmm(v, v.transpose(1, 2))                   # [B, F, F]
        return torch.cat((dense, z.flatten(1).index_select(1, self.flat_pairs)), dim=1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, itself={self.itself}, output_dim={self.output_dim}"


class CatInteraction(InteractionArch):
    """DLRM's ``cat``: ``cat(x, e_1, ..., e_T)``."""

    def __init__(self, num_sparse: int, dense_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.output_dim = int(dense_dim) + int(num_sparse) * int(embedding_dim)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        return torch.cat((dense, sparse.flatten(1)), dim=1)

    def extra_repr(self) -> str:
        return f"output_dim={self.output_dim}"


def make_interaction(op: str, num_sparse: int, dense_dim: int, embedding_dim: int,
                     itself: bool = False) -> InteractionArch:
    """Build the interaction named ``op``; ``dot`` needs ``dense_dim == embedding_dim``."""
    if op == "dot":
        if dense_dim != embedding_dim:
            raise ValueError(
                f"the 'dot' interaction needs the bottom MLP's last size ({dense_dim}) to equal "
                f"arch_feature_emb_size ({embedding_dim})"
            )
        return DotInteraction(num_sparse, dense_dim, itself=itself)
    if op == "cat":
        return CatInteraction(num_sparse, dense_dim, embedding_dim)
    raise ValueError(f"arch_interaction_op must be one of {list(INTERACTION_OPS)}, got {op!r}")
