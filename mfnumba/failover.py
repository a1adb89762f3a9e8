"""A solver that survives its device: out of memory, a smaller batch; lost, the CPU.

:class:`DeviceGuard` is the part of :class:`~mfnumba.solver.Solver` that
meets ``DeviceOOM`` and ``DeviceLost`` (docs/architecture.md, *One
iteration*): a pass only reads the host estimate, so after the solver has
rebuilt its buffers on the new footing the same pass is computed again.
"""

from __future__ import annotations

import logging

from .backends.base import DeviceLost, DeviceOOM

log = logging.getLogger("mfnumba")


class DeviceGuard:
    """Mixin of the solver: needs ``be``, ``batch``, ``problem``, ``opt``, ``iteration``,
    ``events`` and the solver's ``_on_device`` and ``_cache`` (buffers, PSFs, OTFs)."""

    def _guarded(self, fn):
        """``fn()``, again after each device failure it recovers from (docs/architecture.md).

        ``DeviceOOM``: free the device's pools, halve the batch and retry; at
        batch 1, move to the CPU. ``DeviceLost``: move to the CPU at once.
        ``fn`` must not change the estimate before it can fail (a pass only
        reads x_host), so the retry recomputes the same thing.
        """
        rebuild = False
        while True:
            try:
                if rebuild:  # the buffers of the halved batch: they may not fit either
                    rebuild = False
                    self._on_device()
                    self._cache()
                return fn()
            except DeviceOOM as exc:
                self.keep_blocks = False  # the frames are sent each pass from now on
                self._blocks = None  # let go before the pools are freed, so they are
                free = getattr(self.be, "free_memory", None)
                if free is not None:
                    free()
                if self.batch > 1:
                    self.batch //= 2
                    self._event(f"{self.be.name}: out of device memory ({exc}); "
                                f"batch halved to {self.batch}, iteration {self.iteration + 1} "
                                "recomputed")
                    rebuild = True
                else:
                    self._to_cpu(f"out of device memory at batch 1 ({exc})")
            except DeviceLost as exc:
                self._to_cpu(f"device lost ({exc})")

    def _to_cpu(self, why: str) -> None:
        from .backends.cpu import CPUBackend

        old = self.be
        if old.name == "cpu":
            raise RuntimeError(f"the CPU backend reported a device failure: {why}")
        self.be = CPUBackend(getattr(old, "threads", None))
        self.batch = min(self.problem.n_frames, self.opt.batch or 8)
        self._event(f"{old.name}: {why}; moved to the CPU, iteration {self.iteration + 1} "
                    "recomputed there")
        free = getattr(old, "free_memory", None)
        if free is not None:
            try:
                free()
            except Exception:  # noqa: BLE001 -- a lost device may not even free
                pass
        self._on_device()
        self._cache()

    def _event(self, text: str) -> None:
        log.warning("%s", text)
        self.events.append(text)
