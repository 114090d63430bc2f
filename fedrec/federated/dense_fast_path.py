"""Dense FedAvg computed with the sparse internals, where that provably changes nothing.

In dense mode (``fl.embedding_updates: dense``) every client downloads every embedding
table whole into the replica and uploads a full-table delta, most of it zeros: the rows
its data never read cannot move. When that is provable, the runner computes the round
like sparse mode (it loads the MLPs and the client's rows, uploads those rows as a
``RowUpdate``) and counts the bytes as dense mode sends them. The results are the dense
path's bit for bit:

* local training: an untouched row gets an exactly zero gradient and the local
  optimizer leaves it unchanged, so its delta is ``(g - g) * w = +0.0`` in the dense path
  and absent in the fast one; it is never read, so its stale value in the replica is
  never seen;
* block and cohort sums: per row, the dense path adds ``+0.0`` for every client that did
  not touch the row, the ``RowUpdate`` sum skips it; ``x + 0.0 == x`` for every float but
  ``-0.0``, and a delta of ``-0.0`` cannot arise (``a - b`` of finite floats is ``-0.0``
  only for ``a = -0.0, b = +0.0``), so the sums are the same floats in the same order;
* the server step: ``apply_mean_`` adds ``values / weight`` to the touched rows where the
  dense path adds ``total / weight`` everywhere (``+0.0`` to untouched rows), and an
  adaptive optimizer gets the dense-equivalent pseudo-gradient from ``mean_delta``
  (rows scattered into zeros: the same tensor the dense path builds).

The conditions, checked once at set-up (:func:`choose`); anything not proved here keeps
the dense path, and the run log says which path was chosen and why:

* ``fl.dense_fast_path: auto`` (``off`` forces the dense path, for comparison);
* the local optimizer is ``torch.optim.SGD`` without weight decay (``maximize`` off).
  Momentum and Nesterov are fine: the optimizer is built afresh for each client, so an
  untouched row's momentum buffer starts at its zero gradient and stays zero. (Adagrad
  and Adam without weight decay would also leave such rows put, but are not enabled:
  they are not tested here);
* the algorithm is FedAvg or one of its server-optimizer presets (``fed_avgm``,
  ``fed_adam``, ``fed_yogi``, ``fed_adagrad``), or FedProx, whose proximal term is taken
  over the client's touched rows only (``local_terms``) in both paths; no other client
  hook (SCAFFOLD's correction moves every row, FedNova and q-FFL upload their own
  values) and FedAvg's own server step;
* ``embedding_aggregation: dense_equivalent`` (``per_row`` would divide rows by their own
  weights, which dense mode never does);
* no postprocessors (noise and masks need every coordinate, and even clipping's norm
  would be summed in another order), no attack, not asynchronous (FedBuff);
* the model reports its rows (``rows_touched``) for every shared table, no private user
  tables or per-round negatives (rec trainers), and no table mutates itself in forward
  (``max_norm``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def choose(runner: Any) -> tuple[bool, str]:
    """(use the fast path, a line for the run log) for a dense-mode ``ClientRunner``;
    ``(False, "")`` in sparse mode (the question does not arise)."""
    fl = runner.fl
    if fl.embedding_updates != "dense":
        return False, ""
    reason = _blocker(runner)
    if reason is None:
        return True, ("dense updates: fast path (each client loads and uploads only the embedding rows its data "
                      "touch, bytes counted as dense; results identical to fl.dense_fast_path: off)")
    return False, f"dense updates: full-table path ({reason})"


def _blocker(runner: Any) -> str | None:
    from fedrec.federated.fed_avg import FedAvgWorker
    from fedrec.federated.fedprox import FedProxWorker
    from fedrec.federated_worker import FederatedWorker

    fl = runner.fl
    if fl.dense_fast_path == "off":
        return "fl.dense_fast_path: off"
    algorithm = runner.algorithm
    name = fl.fl_algo.get("name")
    if not (isinstance(algorithm, type) and issubclass(algorithm, FedAvgWorker)) or runner.mode != "sum":
        return f"fl_algo {name!r} is not FedAvg, a FedAvg server-optimizer preset or FedProx"
    if (algorithm.aggregate is not FedAvgWorker.aggregate or algorithm.server_step is not FedAvgWorker.server_step
            or algorithm.server_values is not FederatedWorker.server_values
            or algorithm.client_update is not FederatedWorker.client_update):
        return f"fl_algo {name!r} has its own aggregation or client upload"
    hooks = (algorithm.begin_local_training, algorithm.local_objective)
    if hooks not in ((FederatedWorker.begin_local_training, FederatedWorker.local_objective),
                     (FedProxWorker.begin_local_training, FedProxWorker.local_objective)):
        return f"fl_algo {name!r} has its own local training hooks"
    if fl.embedding_aggregation != "dense_equivalent":
        return "fl.embedding_aggregation is per_row"
    if runner.postprocessors:
        return "fl.postprocessors need the full update"
    if fl.attack is not None:
        return "fl.attack"
    if fl.async_ is not None:
        return "fl.async (FedBuff)"
    optimizer = runner._make_optimizer(model=runner.model)
    if type(optimizer) is not torch.optim.SGD:
        return f"the local optimizer is {type(optimizer).__name__}, not SGD"
    if any(group.get("weight_decay") or group.get("maximize") for group in optimizer.param_groups):
        return "the local optimizer has weight decay"
    model = runner.model
    if not hasattr(model, "rows_touched"):
        return f"{type(model).__name__} has no rows_touched"
    if runner.private_names or getattr(runner.trainer, "client_touched_rows", None) is not None:
        return "the model has private user rows or draws rows in training"
    if not runner.table_names:
        return "the model has no embedding tables"
    for module_name, module in model.named_modules():
        if getattr(module, "max_norm", None) is not None:
            return f"embedding {module_name} has max_norm (rows change in forward)"
    train = runner.trainer.dataset.split("train")
    if len(train) == 0:
        return "no training data"
    sample = torch.from_numpy(np.asarray(train.sparse[np.arange(1)], dtype=np.int64))
    reported = set(model.rows_touched(sample))
    missing = [n for n in runner.table_names if n not in reported]
    if missing:
        return f"rows_touched does not report table {missing[0]}"
    return None
