"""Scratch arrays on disk that know how to let go of their pages.

When the frames are streamed, the maps built once before the iterations
(border masks, star protection, variance) live in scratch files, memory
mapped. Every page a read or a write touches stays mapped, and so counts in
the process's resident memory, until it is released: streaming 8 GB of maps
through a mapping would grow the RSS by 8 GB. The array itself offers the
release (:meth:`ScratchMap.release_pages`), so the code that reads it, the
solver included, needs no knowledge of files: it calls ``release_pages()``
on any array that has one (:func:`release_pages`).

Scratch files are mfnumba's own: unlike the inputs (read with positioned
reads, see :mod:`mfnumba.io.raw`) nobody else changes their size.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


class ScratchMap(np.memmap):
    """A ``np.memmap`` of a scratch file; slices and views keep :meth:`release_pages`."""

    def release_pages(self) -> None:
        """Unmap the whole file's pages from this process after a read or a write.

        They stay in the OS page cache (written data are kept, a re-read is a
        cheap minor fault), but no longer count in the process's resident
        memory.
        """
        mm = getattr(self, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or not supported here
                pass


def open_scratch_map(path: str | os.PathLike, shape, dtype=np.float32) -> ScratchMap:
    """A new ``.npy`` scratch file of ``shape`` and ``dtype``, mapped for reading and writing."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    return arr.view(ScratchMap)


def release_pages(*arrays) -> None:
    """Call ``release_pages()`` on each array that has one (scratch maps); others are left alone."""
    for arr in arrays:
        release = getattr(arr, "release_pages", None)
        if release is not None:
            release()
