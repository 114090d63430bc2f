"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Input data or a processed folder that cannot be used.

    The message always says where (file, 1-based line, field) and what to do about it,
    so the command line can print it as is, without a traceback.
    """
