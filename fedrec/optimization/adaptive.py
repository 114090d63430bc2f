"""Adam and Yogi as Reddi et al. (2021, "Adaptive Federated Optimization") write them.

``m = b1*m + (1-b1)*g``; Adam ``v = b2*v + (1-b2)*g^2``, Yogi
``v = v - (1-b2)*g^2*sign(v - g^2)``; ``p -= lr * m / (sqrt(v) + eps)``, with ``v``
starting at ``initial_accumulator_value`` and, by default, no bias correction: the form
FedAdam and FedYogi use as server optimizers (``eps`` is the paper's tau, the degree of
adaptivity). ``bias_correction=True`` divides ``m`` and ``v`` by ``1 - b^t`` as in
Kingma & Ba. Dense gradients only.
"""

from __future__ import annotations

from typing import Any, Iterable, Tuple

import torch


class ReddiAdaptive(torch.optim.Optimizer):
    """``method`` 'adam' or 'yogi' (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: Tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-3, initial_accumulator_value: float = 0.0,
                 bias_correction: bool = False, method: str = "adam") -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if eps <= 0:
            raise ValueError(f"eps (tau) must be > 0, got {eps}")
        if initial_accumulator_value < 0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        if method not in ("adam", "yogi"):
            raise ValueError(f"method must be 'adam' or 'yogi', got {method!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, initial_accumulator_value=initial_accumulator_value,
                        bias_correction=bias_correction, method=method)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{group['method']} (ReddiAdaptive) takes dense gradients only")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_accumulator_value"])
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                grad_sq = grad * grad
                if group["method"] == "adam":
                    v.mul_(beta2).add_(grad_sq, alpha=1 - beta2)
                else:  # yogi: v moves towards g^2 by at most (1 - b2) * g^2
                    v.addcmul_(torch.sign(v - grad_sq), grad_sq, value=-(1 - beta2))
                if group["bias_correction"]:
                    t = state["step"]
                    denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
                else:
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss
