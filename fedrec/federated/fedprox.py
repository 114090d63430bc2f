"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Each client minimises its loss plus ``mu/2 * ||w - w_global||^2`` (the proximal term
keeps local models near the global one under heterogeneous data); the server is
FedAvg's. ``fl_algo: {name: fed_prox, mu: 0.01}``; ``mu: 0`` is FedAvg. The term runs
over the MLPs and the embedding rows the client touches (the only rows it can move).
"""

from __future__ import annotations

from typing import Annotated, Any, Dict

import pydantic
import torch

from fedrec.federated.context import ClientContext
from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.local_terms import ParamView, param_views, squared_distance, start_values
from fedrec.utilities import registry


@registry.load("fl_algo", "fed_prox")
class FedProxWorker(FedAvgWorker):
    """FedAvg with a proximal term in every client's local objective."""

    def __init__(self, *args: Any, mu: Annotated[float, pydantic.Field(ge=0)] = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mu = float(mu)
        self._views: list[ParamView] = []
        self._anchor: Dict[str, torch.Tensor] = {}

    def begin_local_training(self, context: ClientContext) -> None:
        self._views = param_views(context)
        self._anchor = start_values(self._views, context)

    def local_objective(self, loss: torch.Tensor, context: ClientContext) -> torch.Tensor:
        if not self.mu:
            return loss
        return loss + 0.5 * self.mu * squared_distance(self._views, self._anchor)
