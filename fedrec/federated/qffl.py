"""q-FFL trained by q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated
Learning", Algorithm 3), registered as ``fl_algo: q_fedavg`` (alias ``q_ffl``).

q-FFL minimises ``sum_k p_k F_k^(q+1) / (q+1)``: a larger ``q`` puts more weight on the
clients with a high loss, so accuracy spreads more evenly over clients (``q = 0`` is the
FedAvg objective). q-FedAvg takes one step on it per round, each client's term scaled by
its loss ``F_k`` at the global model ``w`` and the step size set by a Lipschitz bound:

    Δw_k = L (w - w_k)                                      (w_k: after local training)
    Δ_k  = F_k^q Δw_k
    h_k  = q F_k^(q-1) ||Δw_k||^2 + L F_k^q
    w   <- w - sum_k Δ_k / sum_k h_k

``L`` (``lipschitz``) defaults to ``1 / fl.local_lr``, as the authors' code does. The norm
is over the MLPs and the embedding rows the client touched together (the rows it cannot
move have zero delta). Clients are weighted by their loss, not their data size: each
uploads with weight 1. The paper draws the cohort with probability ``p_k`` (data size):
``fl.sampler: {name: weighted}`` does that; the default sampler is uniform.

Linear: a client uploads ``-Δ_k`` (this codebase's deltas are ``w_k - w``) with weight 1
and the scalar ``h_k``; both sum, so the backend pre-reduces per process. The server's
step is the server optimizer's on the pseudo-gradient ``sum Δ_k / sum h_k`` (``scale =
m / sum h_k`` on the mean of ``m`` uploads): with the default sgd at lr 1 it is the
paper's. With ``q = 0``, ``h_k = L`` and the step is the unweighted mean of the clients'
``w_k - w``. With ``embedding_aggregation: per_row`` a row's mean runs over the clients
that touched it and is scaled by the cohort's ``m / sum h_k``.

A client with zero loss (``F_k = 0``): ``F_k^q`` is 0 for ``q > 0`` (1 for ``q = 0``), and
the term ``q F_k^(q-1) ||Δw_k||^2``, infinite times finite for ``0 < q < 1``, is taken as
its limit 0 (at a minimum of a smooth loss ``||∇F||^2`` vanishes like ``F``), so no NaN or
inf enters the sums. The authors' code adds 1e-10 to every loss instead, which moves
every client's terms by about ``q * 1e-10 / F_k`` relative; here a positive loss is used
as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import pydantic

from fedrec.federated.context import ClientContext
from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.update import WeightedUpdate
from fedrec.federated_worker import Cohort
from fedrec.utilities import registry

NonNegativeFloat = Annotated[float, pydantic.Field(ge=0)]
PositiveFloat = Annotated[float, pydantic.Field(gt=0)]

#: the uploaded scalar ``h_k`` (summed over the cohort)
CURVATURE = "q_ffl_h"


def q_terms(loss: float, sq_norm: float, q: float, lipschitz: float) -> tuple[float, float]:
    """``(F^q, h)`` for one client: the scale of its ``Δw`` and its ``h_k`` (Algorithm 3).

    ``sq_norm`` is ``||w - w_k||^2`` (without ``L``); ``||Δw_k||^2 = L^2 sq_norm``.
    """
    loss = max(float(loss), 0.0)
    loss_q = loss ** q  # Python: 0.0 ** 0 == 1.0
    if q == 0.0 or (loss == 0.0 and q < 1.0):
        curvature = 0.0  # q = 0, or its limit at a zero loss (see the module docstring)
    else:
        curvature = q * loss ** (q - 1.0) * lipschitz ** 2 * sq_norm
    return loss_q, curvature + lipschitz * loss_q


@registry.load("fl_algo", "q_ffl")
@registry.load("fl_algo", "q_fedavg")
class QFedAvgWorker(FedAvgWorker):
    """q-FedAvg: clients scale their step by their loss to the power ``q``.

    Config: ``fl_algo: {name: q_fedavg, q: 1.0, lipschitz: null}`` (``lipschitz`` null:
    ``1 / fl.local_lr``), optionally ``server_optimizer: {...}`` as for ``fed_avg``.
    """

    def __init__(self, *args: Any, q: NonNegativeFloat = 1.0, lipschitz: Optional[PositiveFloat] = None,
                 **kwargs: Any) -> None:
        self.q = float(q)
        self.lipschitz = None if lipschitz is None else float(lipschitz)
        self._global_loss: Optional[float] = None
        super().__init__(*args, **kwargs)

    def begin_local_training(self, context: ClientContext) -> None:
        """``F_k``: the client's mean loss at the global model, before it trains."""
        self._global_loss = float(context.evaluate_loss())

    def client_update(self, context: ClientContext) -> WeightedUpdate:
        """``F_k^q L (w_k - w)`` with weight 1, plus the scalar ``h_k``."""
        if self._global_loss is None:
            raise RuntimeError("q_fedavg: client_update before begin_local_training measured the loss")
        lipschitz = self.lipschitz if self.lipschitz is not None else 1.0 / context.local_lr
        update = context.model_delta(weight=1.0)
        loss_q, h = q_terms(self._global_loss, update.sq_norm(), self.q, lipschitz)
        update.scale_(loss_q * lipschitz)
        update.scalars[CURVATURE] = h
        return update

    def server_step(self, update: WeightedUpdate, cohort: Cohort) -> None:
        """``w -= sum Δ_k / sum h_k``: the mean upload scaled by ``m / sum h_k``."""
        total_h = update.scalars.get(CURVATURE, 0.0)
        if not update.num_clients or total_h <= 0.0:
            return  # every client at zero loss (q > 0): nothing to move by
        self.server_optimizer.step(update, per_row=self.runtime.per_row_embeddings,
                                   scale=update.weight / total_h)
