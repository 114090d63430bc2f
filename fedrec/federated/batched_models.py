"""One training step of K clients at once, each with its own weights.

Two ways to compute the K clients' losses and gradients in one pass:

* :class:`BatchedDLRM`: DLRM's forward written for stacked weights (``baddbmm`` for each
  client's MLP layers, one gather for every table's lookups, the interaction over all
  K x B samples), then one autograd backward. About 20 autograd operations per step for
  the whole block, whatever K is.
* :class:`FuncBatched`: any model with DLRM's interface (``forward(dense, sparse)``,
  ``loss``, ``sparse_tables()``), through ``torch.func``: ``vmap`` over clients of
  ``grad`` of ``functional_call``. Each client's tables are replaced by the rows its batch
  looks up (and its ids by their positions), so a client's table copy costs B rows.

Both take the step's lookups as one tensor ``[K, B, T, d]`` gathered from the engine's
block table, and return the gradient per lookup, which the engine adds back into the
block table's rows (duplicates add up, as an embedding's backward does).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

# (losses [K] of each client's weighted batch, their gradients by parameter name, the
# gradient of each lookup [K, B, T, d])
StepGrads = Tuple[Tensor, Dict[str, Tensor], Tensor]


def per_sample_loss(model: nn.Module):
    """``fn(probs, labels) -> [..]`` each sample's loss term, or None when the model's loss
    is not known to be a mean of per-sample terms (then the engine cannot weight it)."""
    loss_fn = getattr(model, "loss_fn", None)
    per_sample = getattr(loss_fn, "per_sample", None)
    return per_sample


class BatchedDLRM:
    """:class:`~fedrec.modules.dlrm.DLRM_Net`'s forward and backward for stacked weights."""

    name = "dlrm"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bottom = _mlp_plan(model.dense_arch.mlp.layers, "dense_arch.mlp.layers")
        self.top = _mlp_plan(model.over_arch.mlp.layers, "over_arch.mlp.layers")
        self.dot = model.arch_interaction_op == "dot"
        if self.dot:
            self.pairs = model.interaction_arch.flat_pairs
        self.threshold = float(model.loss_threshold)
        self.per_sample = per_sample_loss(model)

    @staticmethod
    def blocker(model: nn.Module) -> Optional[str]:
        from fedrec.modules.dlrm import DLRM_Net
        from fedrec.modules.interaction import CatInteraction, DotInteraction

        if type(model) is not DLRM_Net:
            return f"{type(model).__name__} is not DLRM_Net"
        if type(model.interaction_arch) not in (DotInteraction, CatInteraction):
            return f"interaction {type(model.interaction_arch).__name__}"
        for prefix, mlp in (("dense_arch", model.dense_arch.mlp), ("over_arch", model.over_arch.mlp)):
            for layer in mlp.layers:
                if type(layer) not in (nn.Linear, nn.ReLU, nn.Sigmoid):
                    return f"{prefix} has a {type(layer).__name__} layer"
        if per_sample_loss(model) is None:
            return f"loss {type(getattr(model, 'loss_fn', None)).__name__} has no per_sample"
        return None

    def step(self, params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
             weight: Tensor) -> StepGrads:
        names = list(params)
        leaves = {n: params[n].detach().requires_grad_() for n in names}
        lookups = lookups.detach().requires_grad_()
        k, b = dense.shape[0], dense.shape[1]
        x = _run_mlp(self.bottom, leaves, dense)  # [K, B, d]
        if self.dot:
            v = torch.cat((x.unsqueeze(2), lookups), dim=2).view(k * b, -1, x.shape[-1])  # [KB, F, d]
            z = torch.bmm(v, v.transpose(1, 2))
            features = torch.cat((x, z.flatten(1).index_select(1, self.pairs).view(k, b, -1)), dim=2)
        else:
            features = torch.cat((x, lookups.flatten(2)), dim=2)
        probs = _run_mlp(self.top, leaves, features).squeeze(-1)  # [K, B]
        if self.threshold > 0.0:
            probs = torch.clamp(probs, min=self.threshold, max=1.0 - self.threshold)
        losses = (self.per_sample(probs, label) * weight).sum(dim=1)  # [K]
        grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in names] + [lookups])
        return losses.detach(), dict(zip(names, grads[:-1])), grads[-1]


def _mlp_plan(layers: nn.Sequential, prefix: str) -> List[Tuple[str, str]]:
    plan = []
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            plan.append(("linear", f"{prefix}.{index}"))
        else:
            plan.append(("relu" if isinstance(layer, nn.ReLU) else "sigmoid", ""))
    return plan


def _run_mlp(plan: List[Tuple[str, str]], params: Dict[str, Tensor], x: Tensor) -> Tensor:
    for kind, name in plan:
        if kind == "linear":  # x [K, B, in] @ W[K]^T + b[K]: every client its own layer
            x = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, params[f"{name}.weight"].transpose(1, 2))
        elif kind == "relu":
            x = torch.relu(x)
        else:
            x = torch.sigmoid(x)
    return x


class FuncBatched:
    """Any DLRM-interface model, vmapped over clients with ``torch.func``."""

    name = "torch.func"

    def __init__(self, model: nn.Module, table_names: List[str]) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        self.model = model
        columns = dict(model.sparse_tables())
        self.table_names = sorted(table_names, key=lambda n: columns[n])
        self.buffers = {n: b for n, b in model.named_buffers()}
        per_sample = per_sample_loss(model)
        if per_sample is None:  # the model's own loss, one sample at a time
            per_sample = vmap(lambda p, y: model.loss(p.unsqueeze(0), y.unsqueeze(0)))
        table_names = self.table_names

        def client_loss(params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
                        weight: Tensor) -> Tuple[Tensor, Tensor]:
            batch = dense.shape[0]
            # each table becomes the B rows this batch looks up, each id its position
            tables = {name: lookups[:, t] for t, name in enumerate(table_names)}
            ids = torch.arange(batch, device=dense.device).unsqueeze(1).expand(batch, len(table_names))
            probs = functional_call(model, {**params, **tables, **self.buffers}, (dense, ids))
            loss = (per_sample(probs, label) * weight).sum()
            return loss, loss

        self._step = vmap(grad_and_value(client_loss, argnums=(0, 1), has_aux=True))

    def step(self, params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
             weight: Tensor) -> StepGrads:
        (param_grads, lookup_grads), (_, losses) = self._step(params, lookups, dense, label, weight)
        return losses.detach(), param_grads, lookup_grads
