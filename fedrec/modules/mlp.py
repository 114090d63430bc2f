"""Multi-layer perceptrons with DLRM's initialisation (bottom and top MLPs)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "dlrm_init_linear_"]


def dlrm_init_linear_(layer: nn.Linear) -> nn.Linear:
    """DLRM's init, in place: ``W ~ N(0, sqrt(2/(fan_in+fan_out)))``, ``b ~ N(0, sqrt(1/fan_out))``."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        if layer.bias is not None:
            layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))
    return layer


class MLP(nn.Module):
    """``Linear(sizes[0], sizes[1])``, activation, ..., ``Linear(sizes[-2], sizes[-1])``, activation.

    Every hidden layer is followed by ReLU; the last layer by ReLU when
    ``final_activation == "relu"`` (DLRM's bottom MLP), by a sigmoid when it is
    ``"sigmoid"`` (the top MLP), or by nothing when it is ``None``.
    Parameters are named ``layers.<k>.weight`` / ``layers.<k>.bias`` (``k`` counts the
    activations too, as in ``nn.Sequential``).
    """

    def __init__(self, sizes: Sequence[int], final_activation: str | None = "relu") -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be positive, got {sizes}")
        if final_activation not in ("relu", "sigmoid", None):
            raise ValueError(f"final_activation must be 'relu', 'sigmoid' or None, got {final_activation!r}")
        self.sizes = sizes
        layers: list[nn.Module] = []
        for k, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(dlrm_init_linear_(nn.Linear(n_in, n_out, bias=True)))
            last = k == len(sizes) - 2
            if not last or final_activation == "relu":
                layers.append(nn.ReLU())
            elif final_activation == "sigmoid":
                layers.append(nn.Sigmoid())
        self.layers = nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return self.sizes[0]

    @property
    def out_features(self) -> int:
        return self.sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
