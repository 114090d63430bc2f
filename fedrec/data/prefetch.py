"""Background threads that prepare the next batches while the model trains."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2, pin_memory: bool = False) -> Iterator[T]:
    """Yield ``items`` in order, produced up to ``depth`` ahead by a daemon thread.

    NumPy's gathers and torch's copies release the GIL, so slicing the next batch from
    the memory-mapped arrays overlaps with the current step. Errors are re-raised here.
    """
    buffer: "queue.Queue[object]" = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if pin_memory and hasattr(item, "pin_memory"):
                    item = item.pin_memory()
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as err:  # surfaced in the consumer
            buffer.put(err)

    thread = threading.Thread(target=produce, name="fedrec-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
