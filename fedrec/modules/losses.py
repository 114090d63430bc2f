"""DLRM's losses on probabilities: ``bce``, ``mse`` and ``wbce`` (all reduce by the mean)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_FUNCTIONS", "BCELoss", "MSELoss", "WeightedBCELoss", "build_loss"]

LOSS_FUNCTIONS = ("bce", "mse", "wbce")


class BCELoss(nn.Module):
    """Mean binary cross-entropy of probabilities against 0/1 labels."""

    def forward(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy(probs, labels.to(probs.dtype).view_as(probs), reduction="mean")

    def per_sample(self, probs: Tensor, labels: Tensor) -> Tensor:
        """Each sample's term of the mean (any shape; the vectorized client engine weights them)."""
        return F.binary_cross_entropy(probs, labels.to(probs.dtype).view_as(probs), reduction="none")


class MSELoss(nn.Module):
    """Mean squared error between probabilities and labels."""

    def forward(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(probs, labels.to(probs.dtype).view_as(probs), reduction="mean")

    def per_sample(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(probs, labels.to(probs.dtype).view_as(probs), reduction="none")


class WeightedBCELoss(nn.Module):
    """Per-sample BCE times ``weights[label]`` (``[w_neg, w_pos]``), then the mean.

    A label counts as positive when it is above 0.5, which for 0/1 labels is the
    reference's ``loss_ws[label.long()]``.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        weights = [float(w) for w in weights]
        if len(weights) != 2:
            raise ValueError(f"wbce needs loss_weights = [w_neg, w_pos], got {weights}")
        self.w_neg, self.w_pos = weights

    def forward(self, probs: Tensor, labels: Tensor) -> Tensor:
        return self.per_sample(probs, labels).mean()

    def per_sample(self, probs: Tensor, labels: Tensor) -> Tensor:
        labels = labels.to(probs.dtype).view_as(probs)
        per_sample = F.binary_cross_entropy(probs, labels, reduction="none")
        w = torch.where(labels > 0.5, self.w_pos, self.w_neg).to(probs.dtype)
        return w * per_sample

    def extra_repr(self) -> str:
        return f"weights=[{self.w_neg}, {self.w_pos}]"


def build_loss(name: str, loss_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss module named ``name`` (``bce`` | ``mse`` | ``wbce``)."""
    if name == "bce":
        return BCELoss()
    if name == "mse":
        return MSELoss()
    if name == "wbce":
        if loss_weights is None:
            raise ValueError("loss_function 'wbce' needs loss_weights = [w_neg, w_pos]")
        return WeightedBCELoss(loss_weights)
    raise ValueError(f"loss_function must be one of {list(LOSS_FUNCTIONS)}, got {name!r}")
