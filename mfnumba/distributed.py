"""The same solve on a Dask cluster (``--scheduler dask`` or ``--scheduler tcp://host:port``).

The update is a sum over frames (:mod:`mfnumba.partials`), so a pass is a
map-reduce: each worker holds a share of the frames and returns its part,
the parts are merged in a tree on the workers, and the driver's solver
applies the reduced part. What moves:

* **once**, per worker: its share's description (frame paths, PSFs, maps,
  photometry, the driver's settings) as the graph of one task whose result,
  a :class:`~mfnumba.worker.FrameWorker`, stays in that worker's memory;
  the worker opens and reads its own frames by tiles;
* **per pass**: x (and, with the consensus rejection, the last pass's
  consensus maps) scattered to the workers, the parts' num/den and samples
  merged pairwise on the workers, one reduced part back to the driver.

A worker that dies loses its FrameWorker and the parts it held; Dask
recomputes them from their lineage on the workers that remain (the share
is re-read there), so the pass completes with the same sums. The driver
sees the worker set change, logs it and writes it to HISTORY.

Dask is an optional extra (``pip install mfnumba[dask]``) and imported only
here, only when a scheduler other than ``local`` is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from .errors import OptionError
from .partials import merge

log = logging.getLogger("mfnumba")

_CONNECT_TIMEOUT = 20  # s to reach an existing scheduler


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise OptionError("--scheduler: Dask is not installed (pip install 'mfnumba[dask]'): "
                          f"{exc}") from None
    return distributed


def check_scheduler(spec: str) -> None:
    """Refuse an unknown ``--scheduler``, a missing Dask or a scheduler that does not answer,
    before any pixel work."""
    if spec == "local":
        return
    if spec != "dask" and "://" not in spec:
        raise OptionError(f"--scheduler {spec!r}: expected local, dask or an address such as "
                          "tcp://host:8786")
    _dask()
    if spec.startswith("tcp://"):  # a TCP probe: seconds, no client yet
        import socket
        from urllib.parse import urlsplit

        where = urlsplit(spec)
        try:
            with socket.create_connection((where.hostname, where.port or 8786),
                                          timeout=_CONNECT_TIMEOUT / 4):
                pass
        except (OSError, ValueError) as exc:
            raise OptionError(f"--scheduler {spec}: cannot reach the scheduler ({exc})") from None


@dataclass
class Cluster:
    """A Dask client, and the LocalCluster behind it when this run started one."""

    client: object
    local: object = None

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()


def connect(spec: str, *, n_frames: int, threads: int | None = None) -> Cluster:
    """A client for ``--scheduler``: ``dask`` starts a LocalCluster sized to the machine.

    The LocalCluster has one single-threaded process per CPU, at most one per
    frame, and no dashboard; an address connects to the cluster running there.
    """
    d = _dask()
    _register_sizes()
    if spec == "dask":
        cpus = threads or os.cpu_count() or 1
        n = max(1, min(cpus, n_frames))
        try:
            cluster = d.LocalCluster(n_workers=n, threads_per_worker=max(1, cpus // n),
                                     processes=True, dashboard_address=None)
        except Exception as exc:  # noqa: BLE001 -- Dask raises bare RuntimeErrors here
            raise OptionError(f"--scheduler dask: the local cluster's {n} worker processes did "
                              f"not start ({type(exc).__name__}: {exc}); a script that starts "
                              "one needs `if __name__ == \"__main__\":`") from None
        return Cluster(d.Client(cluster), cluster)
    try:
        client = d.Client(spec, timeout=_CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise OptionError(f"--scheduler {spec}: cannot reach the scheduler ({exc})") from None
    return Cluster(client)


_REGISTERED = []


def _register_sizes() -> None:
    """Tell Dask how big our objects are: its memory management and accounting use it.

    Without this Dask counts a part or a worker's share as the ~56 bytes of a
    Python object; with it, as the arrays they hold (measured by Dask's own
    ``sizeof`` of each array). Called on the driver and in every task, once
    per process.
    """
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    from dask.sizeof import sizeof

    from .partials import Partial
    from .worker import FrameWorker

    @sizeof.register(Partial)
    def _(part):
        return part.nbytes + 64 * len(part.z)  # its arrays, and a little per plane

    @sizeof.register(FrameWorker)
    def _(worker):
        s = worker.solver
        held = [v for v in vars(s).values() if isinstance(v, np.ndarray)]
        pr = s.problem
        held += [a for a in (pr.frames, pr.var, pr.protect, pr.mask) if isinstance(a, np.ndarray)]
        return sum(sizeof(a) for a in held)


def _make_worker(spec: dict):
    """Runs on a worker: its share's problem and FrameWorker (kept there across passes)."""
    from .api import get_backend
    from .solver import Problem
    from .worker import FrameWorker

    from distributed import get_worker

    _register_sizes()
    worker = get_worker()
    plan = _worker_plan(spec, worker)
    source = spec["source"]
    frames = source.materialize() if plan.in_memory else source
    problem = Problem(frames, spec["psfs"], sr=spec["sr"], var=spec["var"],
                      protect=spec["protect"], mask=spec["mask"])
    # the worker's own threads, not every core of its machine in every worker
    threads = spec["threads"] or worker.state.nthreads
    backend = get_backend(spec["backend"], threads)
    return FrameWorker(problem, spec["options"].replace(batch=plan.batch), backend,
                       offset=spec["offset"], settings=spec["settings"],
                       extent_shape=spec["extent_shape"], tile=plan.tile,
                       cache_otfs=plan.cache_otfs)


def _worker_plan(spec: dict, worker):
    """The memory plan of this worker's share, under its Dask memory limit (the model per worker)."""
    from . import memory

    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None) or None
    plan = memory.plan(budget=limit, n_frames=spec["source"].n_frames, setup=False,
                       **spec["plan"])
    log.info("dask worker %s: frames %d-%d, %s", worker.address, spec["offset"],
             spec["offset"] + spec["source"].n_frames - 1, plan.describe())
    return plan


def _sizes(dask_scheduler, keys):
    """Runs on the scheduler: the bytes of the data under each key."""
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        out[k] = 0 if ts is None else int(ts.nbytes or 0)
    return out


def _part(worker, x, inputs, accumulate, gather):
    _register_sizes()
    return worker.part(x, inputs, accumulate=accumulate, gather=gather)


def _merge(a, b):
    _register_sizes()
    # a is Dask's stored result: merged into a copy, so that a rerun of this task (after a
    # worker loss elsewhere) cannot count it twice
    return merge(dataclasses.replace(a, z=dict(a.z), q=dict(a.q), rej=dict(a.rej),
                                     fin=dict(a.fin),
                                     nd=None if a.nd is None else a.nd.copy(),
                                     cstat=None if a.cstat is None else a.cstat.copy()), b)


def split(n_frames: int, n_workers: int) -> list[range]:
    """Contiguous shares of frames, as equal as they can be, at most one per frame."""
    k = max(1, min(n_workers, n_frames))
    edges = np.linspace(0, n_frames, k + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class DaskExecutor:
    """A pass's parts computed by the workers of a Dask cluster, merged in a tree.

    Parameters
    ----------
    cluster : Cluster
    source : WorkSource
        The driver's working frames; each worker gets :meth:`WorkSource.share`.
    problem : Problem
        The driver's problem (its PSFs and maps are split into the shares).
    options : Options
    backend : str
        ``--backend`` for the workers (each resolves it on its own machine).
    threads : int, optional
        Threads of each worker's backend (default: the Dask worker's own).

    Each worker plans its share's memory under its Dask memory limit
    (:func:`_worker_plan`): frames in memory or read by tiles, tile, batch
    and OTF cache are chosen there, per worker, as the local planner does.
    """

    name = "dask"

    def __init__(self, cluster: Cluster, source, problem, options, *, backend: str = "cpu",
                 threads: int | None = None):
        self.cluster, self.client = cluster, cluster.client
        self.source, self.problem, self.opt = source, problem, options
        self.backend = backend
        self.threads = threads
        self.shares: list[range] = []
        self.states = None
        self.addresses: set[str] = set()
        # per pass, as the scheduler counts them: bytes of x (and the consensus maps) times the
        # workers they reached, and the bytes of the reduced part that came back
        self.sent: list[int] = []
        self.received: list[int] = []
        self.events: list[str] = []

    @property
    def workers(self) -> int:
        return max(1, len(self.addresses))

    def _start(self, solver) -> None:
        info = self.client.scheduler_info()["workers"]
        if not info:
            raise OptionError("--scheduler: the cluster has no workers")
        addrs = sorted(info)
        self.addresses = set(addrs)
        self.shares = split(self.problem.n_frames, len(addrs))
        settings = solver.settings()
        pr = self.problem
        n_maps = sum(a is not None for a in (pr.var, pr.protect, pr.mask))
        plan_sizes = dict(h=pr.shape[0], w=pr.shape[1], r=pr.sr, p=pr.radius, channels=pr.channels,
                          n_maps=n_maps, low_mem=self.opt.low_mem,
                          channels_in=getattr(self.source.reader, "channels", pr.channels))
        sub = lambda a, r: None if a is None else np.ascontiguousarray(a[r.start:r.stop])  # noqa: E731
        self.states = []
        for r, addr in zip(self.shares, addrs):
            spec = {"source": self.source.share(r), "sr": self.problem.sr,
                    "psfs": sub(self.problem.psfs, r), "var": sub(self.problem.var, r),
                    "protect": sub(self.problem.protect, r), "mask": sub(self.problem.mask, r),
                    "backend": self.backend, "threads": self.threads, "options": self.opt,
                    "offset": r.start, "settings": settings, "extent_shape": solver.x_host.shape,
                    "plan": plan_sizes}
            # the share lives in the task's graph: Dask can rebuild it on another worker
            self.states.append(self.client.submit(_make_worker, spec, workers=[addr],
                                                  allow_other_workers=True, pure=False,
                                                  key=f"mfnumba-share-{r.start}-{r.stop}-"
                                                      f"{time.monotonic_ns()}"))
        log.info("dask: %d worker(s), frames in shares of %s", len(addrs),
                 ", ".join(str(len(r)) for r in self.shares))

    def _watch(self) -> None:
        now = set(self.client.scheduler_info()["workers"])
        gone, new = self.addresses - now, now - self.addresses
        for a in sorted(gone):
            self._event(f"dask: worker {a} left; its frames are re-read and its parts recomputed "
                        "on the others")
        for a in sorted(new):
            log.info("dask: worker %s joined", a)
        self.addresses = now

    def _event(self, text: str) -> None:
        log.warning("%s", text)
        self.events.append(text)

    def partials(self, solver, *, accumulate: bool, gather: bool):
        if self.states is None:
            self._start(solver)
        self._watch()
        c = self.client
        # broadcast to the workers there are (as _watch just read them); counted as sent to each,
        # since Dask's active memory manager may drop replicas before the scheduler is asked
        to = self.addresses
        x = c.scatter(solver.x_host, broadcast=True, hash=False)
        cons = None
        if solver.cons_host is not None:
            cons = c.scatter(solver.cons_host, broadcast=True, hash=False)
        parts, flags = [], 0
        for st, r in zip(self.states, self.shares):
            inputs = solver.pass_inputs(r)
            if inputs.get("near") is not None:  # the share's own flags, 1 bit a pixel, in the task
                flags += inputs["near"].nbytes
            inputs["cons"] = cons  # a future: Dask resolves it on the worker
            parts.append(c.submit(_part, st, x, inputs, accumulate, gather, pure=False))
        while len(parts) > 1:  # pairwise on the workers: a tree, not N parts to the driver
            nxt = [c.submit(_merge, a, b, pure=False) for a, b in zip(parts[::2], parts[1::2])]
            parts = nxt + ([parts[-1]] if len(parts) % 2 else [])
        part = parts[0].result()
        self._watch()  # a worker lost during this pass: said now, not only before the next
        # Dask's own accounting of each piece's bytes, times the workers it was scattered to
        out = [f for f in (x, cons) if f is not None]
        sizes = c.run_on_scheduler(_sizes, keys=[f.key for f in out] + [parts[0].key])
        self.sent.append(sum(sizes[f.key] for f in out) * len(to) + flags)
        self.received.append(sizes[parts[0].key])
        del x, cons, parts
        return part
