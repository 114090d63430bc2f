"""Learning-rate schedulers (registry kind ``lr_scheduler``).

Each entry is a factory ``f(optimizer, **config) -> torch.optim.lr_scheduler.LRScheduler``::

    sched = registry.construct("lr_scheduler", {"name": "dlrm", "num_warmup_steps": 100,
                                                "decay_start_step": 1000,
                                                "num_decay_steps": 500}, optimizer=opt)

All schedulers here are stepped once per optimizer step (``opt.step(); sched.step()``)
and their ``state_dict()`` round-trips through ``load_state_dict()`` (and through a
``weights_only=True`` checkpoint).
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

from fedrec.utilities import registry

__all__ = ["ConstantScheduler", "DLRMScheduler", "dlrm_lr_scale", "build_lr_scheduler"]


class ConstantScheduler(LRScheduler):
    """Keeps every group's initial learning rate (the ``noop`` schedule)."""

    def get_lr(self) -> List[Any]:
        return list(self.base_lrs)

    def _get_closed_form_lr(self) -> List[Any]:
        return list(self.base_lrs)


def dlrm_lr_scale(step: int, num_warmup_steps: int, decay_start_step: int,
                  num_decay_steps: int) -> float:
    """The DLRM LR policy's multiplier for the optimizer step number ``step`` (1-based).

    * warm-up: ``step / num_warmup_steps`` while ``step < num_warmup_steps``;
    * then 1 until ``decay_start_step``;
    * then ``((num_decay_steps - (step - decay_start_step)) / num_decay_steps) ** 2``
      while ``decay_start_step <= step < decay_start_step + num_decay_steps``;
    * 0 from ``decay_start_step + num_decay_steps`` on (when ``num_decay_steps > 0``).

    As in the reference scheduler, the first optimizer step (``step == 1``, right after the
    scheduler is built) already uses ``1 / num_warmup_steps`` of the base rate, and each
    ``scheduler.step()`` advances ``step`` by one.
    """
    if num_warmup_steps > 0 and step < num_warmup_steps:
        return step / num_warmup_steps
    if num_decay_steps > 0 and step >= decay_start_step:
        decayed = step - decay_start_step
        if decayed >= num_decay_steps:
            return 0.0
        return ((num_decay_steps - decayed) / num_decay_steps) ** 2
    return 1.0


class DLRMScheduler(LRScheduler):
    """The reference DLRM ``LRPolicyScheduler``: linear warm-up, constant, quadratic decay.

    The learning rate used by the ``s``-th optimizer step (``s = 1`` for the first, i.e.
    after ``s - 1`` calls to :meth:`step`) is ``base_lr * dlrm_lr_scale(s, ...)``.
    Unlike the reference (which freezes at the last decayed value), the rate is 0 once the
    decay is over.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 decay_start_step: int = 0, num_decay_steps: int = 0,
                 last_epoch: int = -1) -> None:
        for key, value in (("num_warmup_steps", num_warmup_steps),
                           ("decay_start_step", decay_start_step),
                           ("num_decay_steps", num_decay_steps)):
            if value < 0:
                raise ValueError(f"dlrm lr_scheduler: {key} must be >= 0, got {value}")
        if num_decay_steps > 0 and decay_start_step < num_warmup_steps:
            raise ValueError(
                "dlrm lr_scheduler: the warm-up must finish before the decay starts "
                f"(decay_start_step={decay_start_step} < num_warmup_steps={num_warmup_steps})"
            )
        self.num_warmup_steps = int(num_warmup_steps)
        self.decay_start_step = int(decay_start_step)
        self.num_decay_steps = int(num_decay_steps)
        super().__init__(optimizer, last_epoch)

    def scale(self, step: int) -> float:
        return dlrm_lr_scale(step, self.num_warmup_steps, self.decay_start_step,
                             self.num_decay_steps)

    def get_lr(self) -> List[Any]:
        factor = self.scale(self.last_epoch + 1)
        return [base_lr * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


@registry.load("lr_scheduler", "noop")
def noop(optimizer: Any) -> LRScheduler:
    """A constant learning rate."""
    return ConstantScheduler(optimizer)


@registry.load("lr_scheduler", "step")
def step_lr(optimizer: Any, step_size: int, gamma: float = 0.1) -> LRScheduler:
    """Multiply the rate by ``gamma`` every ``step_size`` optimizer steps."""
    if step_size <= 0:
        raise ValueError(f"step lr_scheduler: step_size must be > 0, got {step_size}")
    return StepLR(optimizer, step_size=step_size, gamma=gamma)


@registry.load("lr_scheduler", "cosine")
def cosine(optimizer: Any, T_max: int, eta_min: float = 0.0) -> LRScheduler:
    """Cosine annealing from the base rate to ``eta_min`` over ``T_max`` optimizer steps."""
    if T_max <= 0:
        raise ValueError(f"cosine lr_scheduler: T_max must be > 0, got {T_max}")
    return CosineAnnealingLR(optimizer, T_max=T_max, eta_min=eta_min)


@registry.load("lr_scheduler", "dlrm")
def dlrm(optimizer: Any, num_warmup_steps: int = 0, decay_start_step: int = 0,
         num_decay_steps: int = 0) -> LRScheduler:
    """The DLRM warm-up / constant / quadratic-decay policy (:class:`DLRMScheduler`)."""
    return DLRMScheduler(optimizer, num_warmup_steps=num_warmup_steps,
                         decay_start_step=decay_start_step, num_decay_steps=num_decay_steps)


def build_lr_scheduler(config: Any, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """``registry.construct("lr_scheduler", config, optimizer=optimizer)``; None -> noop."""
    if config is None:
        config = "noop"
    return registry.construct("lr_scheduler", config, optimizer=optimizer)
