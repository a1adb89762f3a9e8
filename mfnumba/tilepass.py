"""The pass over the frames: tiles, batches, the transforms and the weights.

:class:`TilePass` is the part of :class:`~mfnumba.solver.Solver` that walks
the extent tile by tile and the frames batch by batch (docs/architecture.md,
*One iteration*): ŷ by FFT or direct convolution, residual samples, the
weights (robust or by consensus, with each plane's own-outlier flags), and
num/den into a :class:`~mfnumba.partials.Partial` (:meth:`partial_sums`,
the map-reduce seam). It also gives the rejection maps at the current
estimate, with the same machinery. It changes nothing of the solver but its
work buffers and this pass's flags, so a pass can be recomputed.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from . import interrupt
from .backends.base import DeviceLost, DeviceOOM, SampleGrid
from . import consensus as _cons
from .consensus import GROW as _GROW
from .geometry import Tile
from .partials import Partial
from .problem import read_block
from .readahead import read_ahead, read_ahead_pool
from .residency import Residency

log = logging.getLogger("mfnumba")


class TilePass(Residency):
    """Mixin of the solver: needs ``be``, ``problem``, ``opt``, ``tiles``, ``grid``,
    ``batch``, ``conv``, ``otfs``, ``psfs``, the noise scales, the consensus maps and
    flags (``cons_host``, ``_flags``), ``_x_device`` and the work buffers of ``_alloc``."""

    def _choose_conv(self) -> str:
        method = self.opt.conv
        if method != "auto":
            return method
        if self.problem.psfs.shape[-1] > 15:
            return "fft"
        timings = {}
        tile = self.tiles[0]
        for cand in ("fft", "direct"):
            self.conv = cand
            self.otfs = self._otf_cache(range(self.batch)) if cand == "fft" else None
            self._load_tile(tile)
            for _ in range(2):  # the first run pays for JIT and caches
                t0 = time.perf_counter()
                self._tile_pass(tile, range(self.batch), None, accumulate=True)
                timings[cand] = time.perf_counter() - t0
        self.otfs = None
        log.debug("conv timing: %s", timings)
        return min(timings, key=timings.get)

    # one pass over the extent -------------------------------------------------
    def _batches(self, frames: range):
        b = self.batch
        for s in range(frames.start, frames.stop, b):
            yield range(s, min(frames.stop, s + b))

    def _load_tile(self, tile: Tile) -> None:
        """Copy the tile's model window into the FFT buffer (zero beyond it)."""
        ys, xs = tile.model
        if self._last != (tile.geom.h, tile.geom.w):
            self._x.fill(0)
            self._wbuf.fill(0)
            self._last = (tile.geom.h, tile.geom.w)
        e0, e1 = tile.geom.extent
        xd = self._x_device()
        self._x[:, :e0, :e1] = (self.be.asarray(self._x_host[:, ys, xs]) if xd is None
                                else xd[:, ys, xs])  # on the device: no transfer

    def _otf_cache(self, idx: range):
        """OTFs of frames ``idx`` in one array, filled in place (no list-then-stack copy)."""
        g0, g1 = self.grid
        out = self.be.zeros((len(idx), g0, g1 // 2 + 1), np.complex64)
        for k, i in enumerate(idx):
            out[k] = self.be.otf(self.problem.psfs[i], self.grid)
        return out

    def _otf(self, idx: range):
        if self.otfs is not None:
            return self.otfs[idx.start:idx.stop]
        return self._otf_cache(idx)

    def _predict(self, tile: Tile, idx: range, otf):
        """ŷ of a batch on the tile's grid: (nb, C, g0, g1)."""
        be, g, nb = self.be, tile.geom, len(idx)
        if self.conv == "fft":
            P = be.spectral_multiply(self._X, otf, self._P[:nb])
            # only the frame's rows of ŷ are read (by the weights, the samples, D)
            return be.irfft2(P, self.grid, out=self._yhat[:nb], overwrite_input=True,
                             rows=(g.p, g.p + g.r * g.h))
        psf = self.psfs[idx.start:idx.stop]
        return be.conv_forward_direct(self._x, psf, self._yhat[:nb], g.p, g.fine_shape)

    def _tile_pass(self, tile: Tile, frames: range, part: Partial | None,
                   accumulate: bool = True, gather: bool = False):
        """Frames ``frames`` over the tile: samples and consensus statistics into ``part``,
        num/den into ``self._nd`` when ``accumulate``.

        ``part`` None (timing the convolutions): nothing is sampled or gathered.
        ``gather``: the consensus statistics too (always with ``accumulate``
        when rejecting by consensus).
        """
        be, pr, g = self.be, self.problem, tile.geom
        C = pr.channels
        gather = self._consensus and (gather or accumulate) and part is not None
        if gather:  # the first batch sets the statistics (init), the others add to them
            acc = self._cacc[:, :, :g.h, :g.w]
            cons = self._cons_block(tile)
            unit = self._scale / self.sigma
            hits_map, near_map = self._pass_flags()
        if self.conv == "fft":
            be.rfft2(self._x, out=self._X, rows=(0, g.extent[0]))  # x: zero beyond its window
        else:
            self._nd.fill(0)
        # the window this tile owns, sampled on the frame's global residual grid
        own = SampleGrid(step=self.res_step, origin=(tile.rows[0], tile.cols[0]),
                         rows=(tile.own_rows[0] - tile.rows[0], tile.own_rows[1] - tile.rows[0]),
                         cols=(tile.own_cols[0] - tile.cols[0], tile.own_cols[1] - tile.cols[0]))
        for idx, maps in self._device_blocks(tile, frames):
            first = idx.start == frames.start  # sets the sums the later batches add to
            interrupt.check()  # a signal during the kernels is raised here, between batches
            nb, planes = len(idx), slice(idx.start * C, idx.stop * C)
            otf = self._otf(idx) if self.conv == "fft" else None
            yhat = self._predict(tile, idx, otf).reshape(nb * C, *self.grid)
            y = maps.pop("frames")
            py = g.p
            if g.r > 1:  # residuals live on the native grid: ŷ = D(h * x)
                yhat = be.block_sum(yhat, g.r, g.p,
                                    self._ynat[: nb * C * g.h * g.w].reshape(nb * C, g.h, g.w))
                py = 0
            if part is not None:  # left where the backend keeps them until the pass ends
                self._pending.append((planes.start, be.residual_samples(
                    y, yhat, p=py, noise=self.noise, grid=own, var=maps["var"])))
            if not (accumulate or gather):
                pr.release_maps()
                continue
            out = self._wbuf[:, : nb * C]
            # the weighted planes' spectra, made by the weights where the backend fuses them
            S = self._S[:, : nb * C] if accumulate and self.conv == "fft" else None
            if gather:
                near, hits = self._tflags[:, : nb * C, :g.h, :g.w]
                self._get_flags(tile, near_map, planes, near)
                rej, fin = be.consensus_weights(
                    y, yhat, out, acc, p=py, noise=self.noise, sigma=self.sigma[planes],
                    unit=unit[planes], delta=self.delta[planes], huber=self._huber, cons=cons,
                    zt=self.opt.reject_z, lo_frac=_GROW, channels=C, p_out=g.p, r=g.r,
                    mask=maps["mask"], var=maps["var"], near=near, hits=hits,
                    sharp=_cons.SHARP, neg=_cons.NEG, spectra=S, init=first)
                self._put_flags(tile, hits_map, planes, own, hits)
                # counted over the tile's frame window: approximate where tiles overlap
                for k in range(nb * C):
                    p = planes.start + k
                    part.rej[p] = part.rej.get(p, 0.0) + float(rej[k])
                    part.fin[p] = part.fin.get(p, 0.0) + float(fin[k])
            else:
                be.robust_weights(y, yhat, out, p=py, noise=self.noise, sigma=self.sigma[planes],
                                  delta=self.delta[planes], huber=self._huber, p_out=g.p, r=g.r,
                                  spectra=S, **maps)
            pr.release_maps()  # maps in scratch files: their pages leave our resident memory
            if not accumulate:
                continue
            if self.conv == "fft":
                S = S.reshape((2, nb, C) + self._X.shape[-2:])
                be.spectral_accumulate(self._acc, otf, S, init=first)
            else:
                be.conv_adjoint_direct(out.reshape((2, nb, C) + self.grid),
                                       self.psfs[idx.start:idx.stop], self._nd, g.p, g.extent)
        if accumulate and self.conv == "fft":
            be.irfft2(self._acc, self.grid, out=self._nd, overwrite_input=True)
        if gather and part.cstat is not None:  # this tile's own rows and columns of them
            (r0, r1), (c0, c1) = tile.own_rows, tile.own_cols
            be.to_host(acc[:, :, own.rows[0]:own.rows[1], own.cols[0]:own.cols[1]],
                       out=part.cstat[:, :, r0:r1, c0:c1])

    def _reads(self, tile: Tile, frames: range):
        """(batch, its blocks of the frames and maps) for each batch of ``frames`` over the tile.

        Frames read from files (a reader, not an array): the next batch is
        read in a background thread while this one computes (the memory
        model counts two batches read at once), and the maps' blocks are
        copied there, so that the batch's pages can be let go after it.
        """
        pr, g, C = self.problem, tile.geom, self.problem.channels
        batches = list(self._batches(frames))
        ahead = not isinstance(pr.frames, np.ndarray) and len(batches) > 1

        def read(idx):
            out = {}
            for k in ("frames", "mask", "var", "protect"):
                a = read_block(getattr(pr, k), idx, tile.rows, tile.cols)
                if a is not None and ahead and k != "frames":
                    a = np.array(a)  # out of the scratch map while the other batch computes
                out[k] = None if a is None else a.reshape(len(idx) * C, g.h, g.w)
            return out

        if not ahead:
            return ((idx, read(idx)) for idx in batches)
        if getattr(self, "_io", None) is None:
            self._io = read_ahead_pool()
        return read_ahead(read, batches, self._io)

    def partial_sums(self, frames: range, *, accumulate: bool = True, gather: bool = False,
                     out: np.ndarray | None = None) -> Partial:
        """The part of frames ``frames`` in one pass at the current estimate: the seam.

        The pass reads ``x_host`` and changes no state of the solver but its
        work buffers, so it can be recomputed after a device failure, and
        parts of disjoint frame sets add up (:func:`mfnumba.partials.merge`)
        to the part of their union. ``out``: the (2, C, E0, E1) array num
        and den go into (else a new one); where a local pass of every frame
        over one tile runs on a device they stay there instead (``nd_on``),
        until the update.
        """
        C = self.problem.channels
        gather = self._consensus and (gather or accumulate)
        self._pending = []  # (first plane, the backend's samples) of every batch and tile
        part = Partial()
        # a local pass of every frame over one tile: the statistics stay where the weights
        # gathered them, and the pass makes the next consensus level from them there; on a
        # device, num and den stay there too, for the update
        local_whole = (out is not None and self.whole_flags
                       and (frames.start, frames.stop) == (0, self.problem.n_frames))
        level_here = gather and local_whole
        nd_here = accumulate and local_whole and self.be.name != "cpu"
        if accumulate and not nd_here:
            # the cores partition the extent, so every pixel of nd is rewritten
            part.nd = np.empty((2,) + self.x_host.shape, np.float32) if out is None else out
        if gather and not level_here:  # every pixel is rewritten by its own tile
            shape = (4, C) + tuple(self.problem.shape)
            # a local pass (out given) reuses one buffer; a worker's part leaves it
            part.cstat = (np.empty(shape, np.float32) if out is None
                          else self.host_buffer("_cstat_host", shape))
        for tile in self.tiles:
            self._load_tile(tile)
            self._tile_pass(tile, frames, part, accumulate=accumulate, gather=gather)
            cy, cx = tile.core_in_model
            if nd_here:  # the one tile's core is the extent: a view of the device's buffer
                part.nd, part.nd_on = self._nd[:, :, cy, cx], self.be
            elif accumulate:
                a, b, c, d = tile.core
                self.be.to_host(self._nd[:, :, cy, cx], out=part.nd[:, :, a:b, c:d])
        if level_here:
            part.cons = self._next_level()
        if gather and level_here and self.device_flags:  # grown where the hits stayed
            part.near = self._next_near()
        elif gather:  # each plane's own outliers of this pass, for the driver's growth
            hits = self._flags()[0]
            if self.device_flags:  # a worker's, or the setup's: written on the device
                self.be.to_host(self._pass_flags()[0], out=hits)
            part.hits = {k: hits[k] for k in range(frames.start * C, frames.stop * C)}
        zs = {p: [] for p in range(frames.start * C, frames.stop * C)}
        qs = {p: [] for p in zs}
        for start, samples in self._pending:  # back to the host once per pass
            z, q = self.be.samples_to_host(samples)
            for k, (zk, qk) in enumerate(zip(z, q)):
                zs[start + k].append(zk)
                qs[start + k].append(qk)
        self._pending = None
        # float32 is ample for a median and a MAD, and halves what a worker sends back
        part.z = {p: _joined(v) for p, v in zs.items()}
        part.q = {p: _joined(v) for p, v in qs.items()}
        return part

    def rejection_maps(self, idx: range) -> np.ndarray:
        """(n, C, h, w) uint8: 1 where frames ``idx`` (at most one batch) get weight 0
        from the consensus at the current estimate (finite pixels only).

        A device failure here moves the solver to the CPU, as in a pass, and
        the maps are computed there.
        """
        try:
            return self._rejection_maps(idx)
        except (DeviceOOM, DeviceLost) as exc:
            self._to_cpu(f"{type(exc).__name__} while writing the rejection maps ({exc})")
            return self._rejection_maps(idx)

    def _rejection_maps(self, idx: range) -> np.ndarray:
        pr, be, C = self.problem, self.be, self.problem.channels
        if not self._consensus:
            raise ValueError("rejection maps need --reject consensus")
        if len(idx) > self.batch:
            raise ValueError(f"at most {self.batch} frames at a time")
        out = np.zeros((len(idx), C) + tuple(pr.shape), np.uint8)
        nb = len(idx)
        for tile in self.tiles:
            g = tile.geom
            self._load_tile(tile)
            if self.conv == "fft":
                be.rfft2(self._x, out=self._X)
            yhat = self._predict(tile, idx, self._otf(idx) if self.conv == "fft" else None)
            yhat = yhat.reshape(nb * C, *self.grid)
            py = g.p
            if g.r > 1:
                yhat = be.block_sum(yhat, g.r, g.p,
                                    self._ynat[: nb * C * g.h * g.w].reshape(nb * C, g.h, g.w))
                py = 0
            y, mask, var = (None if a is None else a.reshape(nb * C, g.h, g.w) for a in (
                read_block(getattr(pr, k), idx, tile.rows, tile.cols)
                for k in ("frames", "mask", "var")))
            cons = self._cons_block(tile)
            planes = slice(idx.start * C, idx.stop * C)
            w = self._wbuf[:, : nb * C]
            near, hits = self._tflags[:, : nb * C, :g.h, :g.w]
            self._get_flags(tile, self._pass_flags()[1], planes, near)
            be.consensus_weights(y, yhat, w, self._cacc[:, :, :g.h, :g.w], p=py, noise=self.noise,
                                 sigma=self.sigma[planes],
                                 unit=(self._scale / self.sigma)[planes],
                                 delta=self.delta[planes], huber=False, cons=cons,
                                 zt=self.opt.reject_z, lo_frac=_GROW, channels=C, p_out=g.p,
                                 r=g.r, var=var, near=near, hits=hits, sharp=_cons.SHARP,
                                 neg=_cons.NEG)
            wy = be.to_host(w[1])[:, g.p:g.p + g.r * g.h:g.r, g.p:g.p + g.r * g.w:g.r]
            rej = (np.isfinite(np.asarray(y)) & (wy == 0)).reshape(nb, C, g.h, g.w)
            (r0, r1), (c0, c1) = tile.own_rows, tile.own_cols
            a0, b0 = r0 - tile.rows[0], c0 - tile.cols[0]
            out[:, :, r0:r1, c0:c1] = rej[:, :, a0:a0 + r1 - r0, b0:b0 + c1 - c0]
        self._last = None  # the buffers hold this pass: the next one starts from zero
        return out


def _joined(parts: list) -> np.ndarray:
    """One float32 array of a plane's samples from its tiles (no copy for one tile)."""
    if len(parts) == 1:
        return np.asarray(parts[0], dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.empty(0, np.float32)
