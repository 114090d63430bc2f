"""Simulated attacks (registry kind ``attack``), to test robust aggregation.

``fl.attack: {name: sign_flip, fraction: 0.1}`` makes a fixed set of clients malicious,
chosen by the run's seed (``round(fraction * num_workers)`` of them, the same in every
process and after a resume). A malicious client's upload goes through its attack before
the postprocessors (the server's defences, such as ``norm_bound``):

* ``label_flip``: trains honestly on flipped labels (``y -> 1 - y``);
* ``sign_flip``: uploads ``-scale`` times its honest delta;
* ``scale``: uploads ``scale`` times its honest delta (model replacement, boosting).
"""

from __future__ import annotations

from typing import Annotated, Any, Iterator, Mapping, Optional

import numpy as np
import pydantic

from fedrec.federated.context import ClientContext
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed

Fraction = Annotated[float, pydantic.Field(ge=0, lt=1)]
_ATTACK_STREAM = 0xA77AC4


class Attack:
    """Which clients are malicious, and what they do; honest by default."""

    def __init__(self, fraction: Fraction = 0.1) -> None:
        self.fraction = float(fraction)
        self.malicious = np.zeros(0, dtype=bool)

    def choose(self, num_workers: int, seed: int) -> None:
        count = int(round(self.fraction * num_workers))
        rng = np.random.default_rng(derive_seed(seed, _ATTACK_STREAM))
        self.malicious = np.zeros(num_workers, dtype=bool)
        self.malicious[rng.choice(num_workers, count, replace=False)] = True

    def is_malicious(self, client_id: int) -> bool:
        return bool(self.malicious[client_id])

    def poison_data(self, loader: Any) -> Any:
        return loader

    def poison_update(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        return update


class _FlippedLabels:
    """A client loader whose batches carry ``1 - label`` (epochs pass through)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield type(batch)(batch.dense, batch.sparse, 1.0 - batch.label)


@registry.load("attack", "label_flip")
class LabelFlip(Attack):
    def poison_data(self, loader):
        return _FlippedLabels(loader)


@registry.load("attack", "sign_flip")
class SignFlip(Attack):
    def __init__(self, fraction: Fraction = 0.1,
                 scale: Annotated[float, pydantic.Field(gt=0)] = 1.0) -> None:
        super().__init__(fraction)
        self.scale = float(scale)

    def poison_update(self, update, context):
        return update.scale_(-self.scale)


@registry.load("attack", "scale")
class ScaleUpdate(Attack):
    def __init__(self, fraction: Fraction = 0.1,
                 scale: Annotated[float, pydantic.Field(gt=0)] = 10.0) -> None:
        super().__init__(fraction)
        self.scale = float(scale)

    def poison_update(self, update, context):
        return update.scale_(self.scale)


def build_attack(config: Optional[Mapping[str, Any]], num_workers: int, seed: int) -> Optional[Attack]:
    """The configured attack with its malicious clients chosen, or None."""
    if not config:
        return None
    attack = registry.construct("attack", config)
    attack.choose(num_workers, seed)
    return attack
