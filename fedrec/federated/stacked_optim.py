"""A local optimizer for many clients at once: torch.optim's maths on stacked tensors.

The vectorized client engine keeps every client's copy of a parameter in one tensor
(clients along the first dimension, or client segments of an embedding block table).
Each client would have built its own ``torch.optim`` optimizer; its state is per element,
so one optimizer over the stacked tensor is every client's optimizer at once, provided
that (a) the clients updated together have taken the same number of steps (the engine
starts them together, so its step ``s`` is every active client's step ``s + 1``; each
call says which) and (b) a client that has finished moves
neither its weights nor its state: every update here touches only the slices of the
clients it is given (the engine keeps those still training as a prefix).

The formulas are torch.optim's ``SGD`` (momentum, dampening, Nesterov, weight decay),
``Adagrad`` (lr decay, initial accumulator, weight decay) and ``Adam`` (no amsgrad),
written out because they act on prefixes and on row-sparse gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

#: optimizer classes the engine can reproduce, by torch class name
SUPPORTED = ("SGD", "Adagrad", "Adam")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The local optimizer's kind and hyper-parameters, read off a built torch optimizer."""

    kind: str  # "SGD" | "Adagrad" | "Adam"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 0.0
    betas: tuple = (0.9, 0.999)

    @property
    def state_elements(self) -> int:
        """Optimizer state kept per parameter element (momentum, Adagrad's sum, Adam's two)."""
        return 2 if self.kind == "Adam" else 1 if self.kind == "Adagrad" or self.momentum else 0

    @property
    def stateless(self) -> bool:
        """Plain SGD: a row-sparse gradient updates only its rows (no per-element state)."""
        return self.kind == "SGD" and not self.momentum and not self.weight_decay


def spec_of(optimizer: torch.optim.Optimizer) -> "OptimizerSpec | str":
    """The spec of ``optimizer``, or a one-line reason the engine cannot reproduce it."""
    name = type(optimizer).__name__
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adam):
        return f"the local optimizer is {name}; the vectorized engine reproduces {', '.join(SUPPORTED)}"
    groups = optimizer.param_groups
    keys = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "lr_decay",
            "initial_accumulator_value", "eps", "betas", "amsgrad", "maximize")
    first = {k: groups[0].get(k) for k in keys}
    if any({k: g.get(k) for k in keys} != first for g in groups[1:]):
        return f"the local optimizer {name} has parameter groups with different settings"
    if first.get("maximize"):
        return f"the local optimizer {name} maximizes"
    if first.get("amsgrad"):
        return "the local optimizer is Adam with amsgrad"
    lr = float(first["lr"])
    wd = float(first.get("weight_decay") or 0.0)
    if name == "SGD":
        return OptimizerSpec("SGD", lr, wd, float(first.get("momentum") or 0.0),
                             float(first.get("dampening") or 0.0), bool(first.get("nesterov")))
    if name == "Adagrad":
        return OptimizerSpec("Adagrad", lr, wd, lr_decay=float(first.get("lr_decay") or 0.0),
                             initial_accumulator_value=float(first.get("initial_accumulator_value") or 0.0),
                             eps=float(first["eps"]))
    return OptimizerSpec("Adam", lr, wd, eps=float(first["eps"]), betas=tuple(float(b) for b in first["betas"]))


class StackedOptimizer:
    """``spec``'s optimizer over ``tensors`` (each the stack of many clients' copies)."""

    def __init__(self, spec: OptimizerSpec, tensors: List[Tensor]) -> None:
        self.spec = spec
        self.tensors = tensors
        self.state: List[Dict[str, Tensor]] = [self._initial_state(t) for t in tensors]

    def _initial_state(self, tensor: Tensor) -> Dict[str, Tensor]:
        spec = self.spec
        if spec.kind == "SGD" and spec.momentum:
            return {"momentum_buffer": torch.zeros_like(tensor)}
        if spec.kind == "Adagrad":
            return {"sum": torch.full_like(tensor, spec.initial_accumulator_value)}
        if spec.kind == "Adam":
            return {"exp_avg": torch.zeros_like(tensor), "exp_avg_sq": torch.zeros_like(tensor)}
        return {}

    @torch.no_grad()
    def apply(self, step: int, grads: List[Optional[Tensor]], ranges: List[tuple],
              row_grads: Optional[Dict[int, tuple]] = None) -> None:
        """Step ``step`` (1 for a client's first: torch.optim's step count) of some
        clients: ``tensors[i][start:stop]`` for
        ``ranges[i] = (start, stop)`` by ``grads[i]`` (or None: it comes as ``row_grads[i] =
        (rows, values, dense)``, a row-sparse gradient whose rows count from ``start`` and
        whose duplicate rows add up, as an embedding's backward adds them, plus ``dense``,
        a gradient of the whole range, or None). The clients of one
        step may come in several calls (disjoint ranges), from several threads at once:
        each element's maths is its own, and a call touches only its ranges.
        """
        spec = self.spec
        row_grads = row_grads or {}
        if spec.stateless:  # plain SGD: the dense slices in one fused call
            dense = [i for i, g in enumerate(grads) if g is not None and ranges[i][1] > ranges[i][0]]
            if dense:
                torch._foreach_add_([self.tensors[i][ranges[i][0]:ranges[i][1]] for i in dense],
                                    [grads[i] for i in dense], alpha=-spec.lr)
        for i, tensor in enumerate(self.tensors):
            start, stop = ranges[i]
            if stop <= start or (spec.stateless and grads[i] is not None):
                continue
            param = tensor[start:stop]
            grad = grads[i]
            if grad is None:
                rows, values, dense = row_grads[i]
                if spec.stateless:  # only the rows read move: no dense gradient needed
                    if dense is not None:
                        param.add_(dense, alpha=-spec.lr)
                    # (scaled first: index_add_ with an alpha takes a path several times slower)
                    param.index_add_(0, rows, values * -spec.lr)
                    continue
                grad = (torch.zeros_like(param) if dense is None else dense.clone()).index_add_(0, rows, values)
            self._update(param, grad, {k: v[start:stop] for k, v in self.state[i].items()}, step)

    def _update(self, param: Tensor, grad: Tensor, state: Dict[str, Tensor], step: int) -> None:
        spec = self.spec
        if spec.weight_decay:
            grad = grad.add(param, alpha=spec.weight_decay)
        if spec.kind == "SGD":
            if spec.momentum:
                buf = state["momentum_buffer"]
                if step == 1:  # torch.optim.SGD: the first step's buffer is the gradient
                    buf.copy_(grad)
                else:
                    buf.mul_(spec.momentum).add_(grad, alpha=1 - spec.dampening)
                grad = grad.add(buf, alpha=spec.momentum) if spec.nesterov else buf
            param.add_(grad, alpha=-spec.lr)
        elif spec.kind == "Adagrad":
            clr = spec.lr / (1 + (step - 1) * spec.lr_decay)
            state["sum"].addcmul_(grad, grad, value=1)
            std = state["sum"].sqrt().add_(spec.eps)
            param.addcdiv_(grad, std, value=-clr)
        else:  # Adam
            beta1, beta2 = spec.betas
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - beta1 ** step
            bias2_sqrt = math.sqrt(1 - beta2 ** step)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(spec.eps)
            param.addcdiv_(exp_avg, denom, value=-spec.lr / bias1)

