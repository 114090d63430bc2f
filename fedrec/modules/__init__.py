"""fedrec.modules: DLRM (registry kind ``model``, name ``dlrm``), its embedding tables
(kind ``embedding``: ``torch_bag``, ``hash_emb``, ``qr_emb``), MLPs, interactions and losses.

Importing this package registers those components.
"""

from fedrec.modules import embeddings, interaction, losses, mlp, recsys  # noqa: F401  (registrations)
from fedrec.modules.dlrm import DenseArch, DLRM_Net, OverArch, SparseArch
from fedrec.modules.embeddings import (
    EmbeddingTable,
    HashEmbedding,
    QREmbedding,
    TorchBagEmbedding,
)
from fedrec.modules.interaction import CatInteraction, DotInteraction, InteractionArch
from fedrec.modules.losses import build_loss
from fedrec.modules.mlp import MLP

__all__ = [
    "MLP",
    "CatInteraction",
    "DLRM_Net",
    "DenseArch",
    "DotInteraction",
    "EmbeddingTable",
    "HashEmbedding",
    "InteractionArch",
    "OverArch",
    "QREmbedding",
    "SparseArch",
    "TorchBagEmbedding",
    "build_loss",
]
