"""Seeds and reproducible randomness.

Every random choice in fedrec comes from a seed the config names, so the same config and
seed give the same result whatever the backend or the number of processes.
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers, e.g. ``derive_seed(seed, round_idx, client_id)``.

    Uses numpy's SeedSequence so that nearby inputs give unrelated streams.
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> Dict[str, Any]:
    """The global RNG states (for checkpoints and :class:`RandomContext`)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class RandomContext:
    """Run a block under fixed global seeds, then restore the previous RNG states.

    ``with RandomContext(round_idx): np.random.choice(...)`` draws the same sample for the
    same round every time, without disturbing the random stream around it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._saved: Dict[str, Any] | None = None

    def __enter__(self) -> "RandomContext":
        self._saved = get_rng_state()
        seed_everything(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        set_rng_state(self._saved)
        self._saved = None
