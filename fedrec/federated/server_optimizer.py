"""The server step: any registered ``optimizer`` applied to the pseudo-gradient.

The pseudo-gradient of a round is the negated mean client delta (Reddi et al. 2021), so
``sgd`` at lr 1 is FedAvg, ``sgd`` with momentum FedAvgM, ``adam``/``yogi``/``adagrad``
FedAdam/FedYogi/FedAdagrad. The optimizer's parameters are the global weights
themselves, and its state goes into the simulation's checkpoint.

Plain SGD (no momentum or weight decay) takes a fast path that adds the mean delta in
place, touching only the rows a sparse round uploaded: bit for bit the FedAvg of before
the seams. Every other optimizer sees the dense-equivalent pseudo-gradient (untouched
rows have zero gradient), so sparse and dense rounds give the same results.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry

DEFAULT = {"name": "sgd", "lr": 1.0}


class ServerOptimizer:
    """A registry optimizer over the global weights, stepped with ``-mean_delta``."""

    def __init__(self, config: Mapping[str, Any], global_state: Mapping[str, Tensor]) -> None:
        self.config = dict(config)
        self.params: Dict[str, Tensor] = {n: t for n, t in global_state.items() if t.is_floating_point()}
        try:
            self.optimizer = registry.construct("optimizer", self.config, model=list(self.params.values()))
        except (ValueError, TypeError) as err:  # torch's own checks (lr < 0, ...)
            raise ValueError(f"server_optimizer {self.config}: {err}") from None
        group = self.optimizer.param_groups[0]
        self._plain_sgd = (isinstance(self.optimizer, torch.optim.SGD) and not group.get("momentum")
                           and not group.get("weight_decay"))

    def step(self, update: WeightedUpdate, per_row: bool = False, denominator: Optional[float] = None,
             scale: float = 1.0) -> None:
        """Move the global weights by the mean of ``update`` (times ``scale``). The update
        is consumed: it may be scaled in place (read what you need from it first)."""
        if not update.num_clients:
            return
        if self._plain_sgd:
            lr = float(self.optimizer.param_groups[0]["lr"]) * scale
            if lr != 1.0:
                update.scale_(lr)
            with torch.no_grad():
                update.apply_mean_(self.params, per_row=per_row, denominator=denominator)
            return
        delta = update.mean_delta(self.params, per_row=per_row, denominator=denominator)
        self.step_with_delta(delta, scale)

    def step_with_delta(self, delta: Mapping[str, Tensor], scale: float = 1.0) -> None:
        """One optimizer step with pseudo-gradient ``-scale * delta`` (dense tensors)."""
        for name, param in self.params.items():
            grad = delta.get(name)
            param.grad = None if grad is None else grad.neg_() if scale == 1.0 else grad.mul_(-scale)
        self.optimizer.step()
        for param in self.params.values():
            param.grad = None

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
