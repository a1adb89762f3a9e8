"""Reading the next batch while this one computes.

A pass reads its frames a batch at a time (from files when they stream);
:func:`read_ahead` keeps one read in flight in a background thread, so the
disk's wait overlaps the kernels' work. Positioned reads release the GIL;
the memory model counts two batches read at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead_pool() -> ThreadPoolExecutor:
    """The one background reader a solver keeps."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mfnumba-read")


def read_ahead(read: Callable[[T], R], items: Sequence[T],
               pool: ThreadPoolExecutor) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in order, ``read`` of the next item running while the caller works.

    A loop cut short (a device failure, Ctrl-C) waits for the read in flight,
    so that no read outlives its pass and overlaps the next one's.
    """
    if not items:
        return
    nxt = pool.submit(read, items[0])
    try:
        for k, item in enumerate(items):
            got = nxt.result()
            nxt = pool.submit(read, items[k + 1]) if k + 1 < len(items) else None
            yield item, got
    finally:
        if nxt is not None:
            try:
                nxt.result()
            except Exception:  # noqa: BLE001 -- the pass is already being abandoned
                pass
