"""Console output that stays readable: a progress bar only on a terminal, plain lines
otherwise, and the small text tables that end a run.

A tqdm bar written to a file or a pipe (a CI log, ``| tee``, a sweep's point log) leaves
carriage-return fragments mixed with the log lines; there nobody watches it move, so the
bar is off and log lines are the record. On a terminal the bar stays, and log lines are
printed above it (``logger._ProgressSafeHandler`` writes them through ``tqdm.write``).
``FEDREC_PROGRESS=1`` (or ``0``) forces the bar on (or off) wherever the output goes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence, TextIO

__all__ = ["progress_enabled", "progress_bar", "format_table"]


def progress_enabled(wanted: bool = True, stream: Optional[TextIO] = None) -> bool:
    """Whether to draw a bar: ``wanted`` (the config's ``progress_bar``) and a terminal."""
    forced = os.environ.get("FEDREC_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    if not wanted:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def progress_bar(wanted: bool = True, **kwargs: Any):
    """A tqdm bar on stderr, disabled (a no-op) where :func:`progress_enabled` says no."""
    from tqdm.auto import tqdm

    return tqdm(disable=not progress_enabled(wanted), **kwargs)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_numberlike(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _is_numberlike(text: str) -> bool:
    try:
        float(text.replace(",", "").split(" ")[0])
        return True
    except ValueError:
        return text in ("-", "—")
