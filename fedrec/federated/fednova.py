"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"), registered as ``fl_algo: fed_nova``.

With FedAvg, a client that takes more local steps moves the global model further, so the
server converges to a mix of the clients' optima weighted by their step counts, not the
true objective. FedNova divides each client's delta by its normaliser ``a_i`` (the l1
norm of the weights its local steps carry) and moves by the effective step count instead
(the paper's generalised update rule, its aggregation weights set to ``p_i``):

    d_i      = (w_i - w) / a_i                         (normalised delta)
    tau_eff  = sum_i p_i a_i,      p_i = n_i / sum_j n_j
    w       <- w + tau_eff * sum_i p_i d_i              (server lr 1)

``a_i = tau_i`` for plain local SGD and, with heavy-ball momentum ``rho`` (torch's SGD,
no dampening, no Nesterov), ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``
(the paper's momentum case; the authors' code accumulates the same sum step by step).
The local lr cancels: it is in both ``d_i`` and the server step. With equal ``tau_i``
the step is FedAvg's. Other local optimizers (adam, ...) have no such ``a_i``: the
formula for SGD is then only a heuristic.

Linear: a client uploads ``n_i d_i`` (weight ``n_i``) and the scalar ``n_i a_i``; both
sum, so the backend pre-reduces per process, and ``tau_eff = sum n_i a_i / sum n_i``.
The step goes through the server optimizer (``scale = tau_eff``): with the default sgd
at lr 1 it is the paper's; another optimizer sees ``tau_eff`` times the pseudo-gradient.
A client with no local steps has no ``d_i`` and contributes nothing (weight 0).
With ``embedding_aggregation: per_row`` a row averages ``d_i`` over the clients that
touched it and is scaled by the cohort's ``tau_eff``.
"""

from __future__ import annotations

from fedrec.federated.context import ClientContext
from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.update import RowUpdate, WeightedUpdate
from fedrec.federated_worker import Cohort
from fedrec.utilities import registry

#: the uploaded scalar ``n_i * a_i`` (summed over the cohort)
NORMALISED_STEPS = "fed_nova_n_a"


def normaliser(num_steps: int, momentum: float = 0.0) -> float:
    """``a_i``: the l1 norm of the local steps' weights in the client's delta.

    Plain SGD: ``tau``. Momentum ``rho``: step ``t`` carries ``sum_{k<t} rho^k`` of each
    gradient, so ``a = sum_{t=1..tau} (1 - rho^t) / (1 - rho)``.
    """
    tau = int(num_steps)
    if tau <= 0:
        return 0.0
    rho = float(momentum)
    if rho == 0.0:
        return float(tau)
    return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def nothing(update: WeightedUpdate) -> WeightedUpdate:
    """``update`` with zero weight and no rows: a client in the cohort that moves nothing."""
    update.scale_(0.0)
    update.rows = {name: RowUpdate(row.ids[:0], row.values[:0], row.row_weight[:0])
                   for name, row in update.rows.items()}
    update.weight = 0.0
    return update


@registry.load("fl_algo", "fed_nova")
class FedNovaWorker(FedAvgWorker):
    """FedAvg with each client's delta normalised by its local step count (``a_i``).

    Config: ``fl_algo: {name: fed_nova}`` (optionally ``server_optimizer: {...}`` as for
    ``fed_avg``). No hyper-parameters: ``tau_i`` and ``rho`` come from local training.
    """

    def client_update(self, context: ClientContext) -> WeightedUpdate:
        """``n_i (w_i - w) / a_i`` with weight ``n_i``, plus the scalar ``n_i a_i``."""
        steps = context.train_result.num_steps if context.train_result is not None else 0
        a = normaliser(steps, context.local_momentum)
        n = float(self.sample_num)
        update = context.model_delta(weight=n)
        if a <= 0.0:
            update = nothing(update)
        else:
            update.scale_(1.0 / a)
        update.scalars[NORMALISED_STEPS] = n * a if a > 0.0 else 0.0
        return update

    def server_step(self, update: WeightedUpdate, cohort: Cohort) -> None:
        """``w += tau_eff * sum p_i d_i`` through the server optimizer."""
        if not update.num_clients or update.weight <= 0.0:
            return  # no client took a step: nothing to move by
        tau_eff = update.scalars[NORMALISED_STEPS] / update.weight
        self.server_optimizer.step(update, per_row=self.runtime.per_row_embeddings, scale=tau_eff)
