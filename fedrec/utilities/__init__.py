"""Shared utilities: the registry, configs, seeds, logging and checkpoints."""

from fedrec.utilities import registry  # noqa: F401  (the tutorial's `from fedrec.utilities import registry`)
from fedrec.utilities.random_state import RandomContext  # noqa: F401
