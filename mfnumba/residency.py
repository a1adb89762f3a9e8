"""What stays on the device between the passes, where the image is one tile.

A mixin of the solver (with :class:`mfnumba.tilepass.TilePass`): the
frames' and maps' blocks, kept there for the whole run where they fit; the
own-outlier flags, packed (a bit per pixel) in device maps that the backend
packs, unpacks and grows into the next pass's near flags, of which only a
copy comes back; and the consensus level, made by the
pass from the statistics where the weights gathered them, so that those
never cross and the level crosses once per iteration. Where the image is
tiled the host does this work per tile, as before. On the CPU backend
``asarray`` is the host array itself, so keeping costs nothing there and is
not done; the packed flags and the level made in the pass are the same code
on either backend.
"""

from __future__ import annotations

import numpy as np

from .consensus import GROW_R, set_window, unpack_window
from .geometry import Tile


class Residency:
    """Needs ``be``, ``problem``, ``opt``, ``tiles``, ``cons_host``, ``host_buffer``,
    ``_batches``, ``_reads`` and the consensus statistics buffer ``_cacc``."""

    keep_blocks = True  # the frames may stay on the device across passes (off after an OOM)
    _blocks = None  # batch (start, stop) -> its blocks on the device; False: sent each pass
    _consdev = None  # the consensus level on the device (one tile), until it changes
    _level_dev = None  # the device's copy of the level the last pass made (one tile)
    _hits_dev = None  # the packed own-outlier flags a pass writes, on the device (one tile)
    _near_dev = None  # the packed near flags the next pass reads there; None: sent again
    _near_next = None  # the device's copy of the near flags the last pass grew there

    @property
    def whole_flags(self) -> bool:
        """One tile, the whole image: a batch's flags cross packed (an eighth of the
        bytes; the backend packs and unpacks them), and its flag buffers are the
        backend's. Else the host unpacks each tile's window into host buffers."""
        h, w = self.problem.shape
        t = self.tiles[0]
        return len(self.tiles) == 1 and t.rows == t.own_rows == (0, h) \
            and t.cols == t.own_cols == (0, w)

    @property
    def device_flags(self) -> bool:
        """One tile on a device: the packed flags stay there. The pass packs its hits
        into a device map and, where it holds every frame, grows them there into the
        next pass's near flags, of which only a copy comes back (for a checkpoint, a
        worker, a failover); elsewhere the hits come back and the host grows them."""
        return self.whole_flags and self.be.name != "cpu"

    def _pass_flags(self):
        """(hits, near), the packed maps a pass writes and reads: the device's where
        :attr:`device_flags` (near sent from the host copy when that changed), else the
        host's (:meth:`_flags`)."""
        hits, near = self._flags()
        if not self.device_flags:
            return hits, near
        if self._hits_dev is None:
            self._hits_dev = self.be.zeros(hits.shape, np.uint8)
        if self._near_dev is None:
            self._near_dev = self.be.asarray(near, np.uint8)
        return self._hits_dev, self._near_dev

    def _next_near(self) -> np.ndarray:
        """The next pass's near flags, grown on the device from this pass's hits there:
        the device's copy kept for :meth:`_take_near`, the host's into the host map of the
        hits, which such a pass leaves idle (their map is the device's), not into the
        current near: a pass recomputed after a device failure still reads that."""
        be, (hits, _) = self.be, self._pass_flags()
        self._near_next = be.grow_flags(hits, be.zeros(hits.shape, np.uint8),
                                        w=self.problem.shape[1], grow_r=GROW_R)
        return be.to_host(self._near_next, out=self._flags()[0])

    def _take_near(self, near: np.ndarray) -> None:
        """The near flags a pass grew (:meth:`_next_near`, in the hits' host map) become
        the next pass's; the old near's map holds the hits from now on."""
        hits, old = self._flags()
        if near is not hits:
            raise ValueError("near flags not grown by this solver's last pass")
        self.hits_host, self.near_host = old, near
        self._near_dev = self._near_next if self.device_flags else None
        self._near_next = None

    def _next_level(self) -> np.ndarray:
        """The consensus level for the next pass from this pass's statistics (one tile:
        ``_cacc`` holds them all), made on the backend; its host copy goes into the one
        of two host buffers that is not the current level (a pass recomputed after a
        device failure still reads that), the device's is kept for the next pass."""
        be, shape = self.be, (1, self.problem.channels) + tuple(self.problem.shape)
        host = self.host_buffer("_level_a", shape)
        if host is self.cons_host:
            host = self.host_buffer("_level_b", shape)
        kw = dict(n_frames=self.problem.n_frames, reject_z=self.opt.reject_z)
        if be.name == "cpu":
            self._level_dev = None
            return be.consensus_maps(self._cacc, host, **kw)
        self._level_dev = be.consensus_maps(self._cacc, be.zeros(shape), **kw)
        return be.to_host(self._level_dev, out=host)

    def _cons_block(self, tile: Tile):
        """The consensus level over the tile, for the weights of every batch: where the
        image is one tile, sent to the device once per iteration and kept there (a
        batch would send it again), else the tile's window of the host array."""
        cons = self.cons_host
        if cons is None:
            return None
        if self.whole_flags and self.be.name != "cpu":
            if self._consdev is None:
                self._consdev = self.be.asarray(cons)
            return self._consdev
        (r0, r1), (c0, c1) = tile.rows, tile.cols
        return np.ascontiguousarray(cons[:, :, r0:r1, c0:c1])

    def _get_flags(self, tile: Tile, packed, planes: slice, out) -> None:
        """``out`` := the near flags of ``planes`` over the tile, from the packed map."""
        if self.whole_flags:
            self.be.unpack_flags(packed[planes], out)
        else:
            unpack_window(packed, planes, tile.rows, tile.cols, out)

    def _put_flags(self, tile: Tile, packed, planes: slice, own, hits) -> None:
        """The packed map's flags of ``planes`` over the pixels the tile owns (``own``,
        its window in the tile) := ``hits``: assigned, so a recomputed pass rewrites them."""
        if self.whole_flags:
            self.be.pack_flags(hits, packed[planes])
        else:
            set_window(packed, planes, tile.own_rows, tile.own_cols,
                       hits[:, own.rows[0]:own.rows[1], own.cols[0]:own.cols[1]])

    def _device_blocks(self, tile: Tile, frames: range):
        """(batch, its blocks of the frames and maps on the device) for each batch.

        Sent once per pass for the samples and the weights; or, where the image is
        one tile and every frame's blocks take at most half of the device's free
        memory, sent once per run and kept there (on a GPU the frames would
        otherwise cross the bus twice per iteration). The CPU's are the host
        arrays themselves, read each pass.
        """
        be = self.be
        if self._blocks is None:
            self._blocks = {} if self._can_keep_blocks() else False
        kept = self._blocks
        if kept:
            batches = list(self._batches(frames))
            if all((i.start, i.stop) in kept for i in batches):
                for idx in batches:  # a copy: the caller pops the frames
                    yield idx, dict(kept[idx.start, idx.stop])
                return
        for idx, maps in self._reads(tile, frames):
            maps = {k: None if a is None else be.asarray(a) for k, a in maps.items()}
            if kept is not False:
                kept[idx.start, idx.stop] = dict(maps)
            yield idx, maps

    def _can_keep_blocks(self) -> bool:
        pr = self.problem
        if self.be.name == "cpu" or not self.keep_blocks or not self.whole_flags:
            return False
        arrays = [a for a in (pr.frames, pr.mask, pr.var, pr.protect) if a is not None]
        need = 4 * len(arrays) * pr.n_frames * pr.channels * int(np.prod(pr.shape))
        return 2 * need <= self.be.mem_info()[0]
