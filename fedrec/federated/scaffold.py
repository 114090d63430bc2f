"""SCAFFOLD (Karimireddy et al. 2020), option II of its Algorithm 1.

Clients correct every local gradient by ``c - c_i`` (the server's and their own control
variates), then update ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` (K local steps at local
rate lr) and upload ``y_i - x`` (weighted by data size, as FedAvg) with ``c_i+ - c_i``
(weight 1). The server moves ``x`` by the mean delta through its server optimizer
(``server_lr``, the paper's eta_g, is its lr) and ``c += sum_i (c_i+ - c_i) / N`` over
all N clients.

``c`` is broadcast with the weights (in sparse mode: its MLP part and the rows a process's
clients use); each ``c_i`` lives in the client state store on disk, not in rank 0's memory.
Over embedding tables the control variates and the correction are kept for the rows a
client's data touch (the rows its gradients can reach), in dense and sparse mode alike,
so a round moves no row that no client touched.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, Mapping

import pydantic
import torch

from fedrec.federated.context import ClientContext
from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.local_terms import ParamView, dot, param_views, split_state, views_of_state
from fedrec.federated.update import RowUpdate, WeightedUpdate
from fedrec.federated_worker import Cohort
from fedrec.utilities import registry

CONTROL = "control"


@registry.load("fl_algo", "scaffold")
class ScaffoldWorker(FedAvgWorker):
    """Stochastic controlled averaging; ``fl_algo: {name: scaffold, server_lr: 1.0}``."""

    def __init__(self, *args: Any, server_lr: Annotated[float, pydantic.Field(gt=0)] = 1.0,
                 **kwargs: Any) -> None:
        if "server_optimizer" in kwargs:
            raise ValueError("scaffold sets its server optimizer from server_lr (sgd)")
        super().__init__(*args, server_optimizer={"name": "sgd", "lr": float(server_lr)}, **kwargs)
        self.c: Dict[str, torch.Tensor] = {}
        self._views: list[ParamView] = []
        self._correction: Dict[str, torch.Tensor] = {}
        self._client_c: Dict[str, torch.Tensor] = {}

    # -- aggregator ------------------------------------------------------------------------
    def _server_c(self) -> Dict[str, torch.Tensor]:
        if not self.c:
            self.c = {n: torch.zeros_like(t) for n, t in self.get_model().items() if t.is_floating_point()}
        return self.c

    def server_values(self) -> Dict[str, torch.Tensor]:
        return self._server_c()

    def server_step(self, update: WeightedUpdate, cohort: Cohort) -> None:
        control = update.aux.get(CONTROL)
        super().server_step(update, cohort)
        if control is not None and control.num_clients:
            with torch.no_grad():  # c += sum(delta c_i) / N, over all N clients
                control.apply_mean_(self._server_c(), denominator=float(len(self.in_neighbours)))

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "c": self._server_c()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "c" in state:
            server_c = self._server_c()
            for name, value in state["c"].items():
                server_c[name].copy_(value)

    # -- client ----------------------------------------------------------------------------
    def begin_local_training(self, context: ClientContext) -> None:
        self._views = param_views(context)
        self._client_c = views_of_state(context.state, self._views)
        self._correction = {}
        for view in self._views:
            server = context.server_value(view.name, view.rows).to(self._client_c[view.name].dtype)
            self._correction[view.name] = server - self._client_c[view.name]

    def local_objective(self, loss: torch.Tensor, context: ClientContext) -> torch.Tensor:
        # d/dw <c - c_i, w> = c - c_i: the corrected gradient of option II
        return loss + dot(self._views, self._correction)

    def client_update(self, context: ClientContext) -> WeightedUpdate:
        update = context.model_delta(weight=float(self.sample_num))
        steps = context.train_result.num_steps if context.train_result else 0
        dense: Dict[str, torch.Tensor] = {}
        rows: Dict[str, RowUpdate] = {}
        new_c: Dict[str, torch.Tensor] = {}
        from fedrec.federated.update import gather_rows

        with torch.no_grad():
            for view in self._views:
                start = context.start[view.name]
                if view.rows is None:
                    drift = start - context.weights[view.name]
                else:
                    drift = gather_rows(start, view.rows) - context.weights[view.name].index_select(0, view.rows)
                old = self._client_c[view.name]
                if steps:
                    # c_i+ - c_i = -c + (x - y_i) / (K lr)
                    delta_c = drift / (steps * context.local_lr) - (self._correction[view.name] + old)
                else:
                    delta_c = torch.zeros_like(old)
                new_c[view.name] = old + delta_c
                if view.rows is None:
                    dense[view.name] = delta_c
                else:
                    rows[view.name] = RowUpdate(view.rows, delta_c,
                                                torch.ones(view.rows.numel(), dtype=torch.float64))
        update.aux[CONTROL] = WeightedUpdate(dense, rows, 1.0, 1)
        context.save_state(split_state(new_c, self._views))
        return update
