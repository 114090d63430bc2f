"""fedrec.data: Criteo preprocessing, synthetic data, processed datasets and batch loading.

Names are imported on first use, so that preprocessing (pyarrow + numpy) does not pay
for importing torch, which only the loader needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedrec.data.errors import DataError

_EXPORTS = {
    "preprocess": "fedrec.data.criteo",
    "synthesize": "fedrec.data.synthetic",
    "ProcessedDataset": "fedrec.data.processed",
    "ProcessedSplit": "fedrec.data.processed",
    "Batch": "fedrec.data.loader",
    "BatchLoader": "fedrec.data.loader",
}

__all__ = ["Batch", "BatchLoader", "DataError", "ProcessedDataset", "ProcessedSplit", "preprocess",
           "synthesize"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fedrec.data.criteo import preprocess  # noqa: F401
    from fedrec.data.loader import Batch, BatchLoader  # noqa: F401
    from fedrec.data.processed import ProcessedDataset, ProcessedSplit  # noqa: F401
    from fedrec.data.synthetic import synthesize  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedrec.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
