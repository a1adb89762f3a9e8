"""The map-reduce seam of one pass: what a set of frames adds, and how parts add up.

A pass over the frames (docs/architecture.md, *One iteration*) is a sum over
frames. :meth:`mfnumba.solver.Solver.partial_sums` computes, for a set of
frames and the current estimate, a :class:`Partial`:

* ``nd``: num and den over the extent (real space, the tiles' cores put
  together), when the pass accumulates;
* the residual and denominator samples of each of its planes, for the noise
  scales and the χ² of the pass;
* with the consensus rejection, the per-pixel statistics over its frames
  (Σz², the two largest z², frames without data), each plane's rejected and finite
  pixel counts, and each plane's own outliers (bit-packed ``hits``), which
  the driver grows into the next pass's ``near`` flags (sent back with the
  pass's inputs: a worker keeps no state between passes).

Every field adds (or takes the maximum) across disjoint sets of frames, so
parts reduce in any order and grouping (:func:`merge`). The solver's driver
half (:meth:`~mfnumba.solver.Solver.apply`) takes the reduced part and
updates x. An *executor* decides where the parts are computed:
:class:`LocalExecutor` asks the solver itself for one part over all frames;
a distributed executor asks its workers for theirs and merges them. Local
and distributed runs therefore share every line of the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Partial:
    """One set of frames' contribution to a pass (see the module docstring).

    Planes are numbered ``frame * C + channel`` over the whole stack; a
    worker that holds frames ``s..e`` of it numbers them the same way.
    """

    z: dict[int, np.ndarray] = field(default_factory=dict)  # plane -> residual samples
    q: dict[int, np.ndarray] = field(default_factory=dict)  # plane -> den samples
    nd: np.ndarray | None = None  # (2, C, E0, E1) float32: num, den
    cstat: np.ndarray | None = None  # (4, C, h, w) float32: Σz², max z², frames without data,
    # the second largest z²
    rej: dict[int, float] = field(default_factory=dict)  # plane -> rejected pixels
    fin: dict[int, float] = field(default_factory=dict)  # plane -> finite pixels
    hits: dict[int, np.ndarray] = field(default_factory=dict)  # plane -> own outliers, packed
    # (1, C, h, w) float32: the consensus level for the next pass, made from the statistics
    # where they stayed (on the device) by a part of every frame, in place of cstat
    cons: np.ndarray | None = None
    # the backend whose device holds nd (a local pass over one tile, read by the update
    # there; never merged or sent); None: nd is a host array
    nd_on: object | None = None
    # (P, h, ceil(w/8)) uint8: the next pass's near flags, grown by a part of every frame
    # from its hits where they stayed (on the device), in place of hits
    near: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays it carries (what a worker sends back per pass)."""
        arrays = [*self.z.values(), *self.q.values(), *self.hits.values(), self.nd, self.cstat,
                  self.cons, self.near]
        return sum(a.nbytes for a in arrays if a is not None)


def shifted(part: Partial, planes: int) -> Partial:
    """``part`` with its planes renumbered by ``planes`` (a worker's share → the stack)."""
    if planes:
        part.z = {k + planes: v for k, v in part.z.items()}
        part.q = {k + planes: v for k, v in part.q.items()}
        part.rej = {k + planes: v for k, v in part.rej.items()}
        part.fin = {k + planes: v for k, v in part.fin.items()}
        part.hits = {k + planes: v for k, v in part.hits.items()}
    return part


def merge(a: Partial, b: Partial) -> Partial:
    """The part of the union of two disjoint sets of frames (``a`` is reused)."""
    overlap = a.z.keys() & b.z.keys()
    if overlap:
        raise ValueError(f"parts overlap on plane(s) {sorted(overlap)[:5]}")
    if any(v is not None for p in (a, b) for v in (p.cons, p.nd_on, p.near)):
        raise ValueError("a part of every frame (with its consensus level, or num and den "
                         "on a device) has nothing to merge")
    a.z.update(b.z)
    a.q.update(b.q)
    a.hits.update(b.hits)
    for k, v in b.rej.items():
        a.rej[k] = a.rej.get(k, 0.0) + v
    for k, v in b.fin.items():
        a.fin[k] = a.fin.get(k, 0.0) + v
    if b.nd is not None:
        if a.nd is None:
            a.nd = b.nd
        else:
            a.nd += b.nd
    if b.cstat is not None:
        if a.cstat is None:
            a.cstat = b.cstat
        else:
            a.cstat[0] += b.cstat[0]
            a.cstat[2] += b.cstat[2]
            # the two largest of four: the larger max, and the larger of the smaller max and
            # both second largest
            second = np.maximum(np.minimum(a.cstat[1], b.cstat[1]),
                                np.maximum(a.cstat[3], b.cstat[3]))
            np.maximum(a.cstat[1], b.cstat[1], out=a.cstat[1])
            a.cstat[3] = second
    return a


def reduce_parts(parts) -> Partial:
    """Merge an iterable of parts (pairwise, left to right)."""
    out = None
    for p in parts:
        out = p if out is None else merge(out, p)
    return Partial() if out is None else out


class LocalExecutor:
    """Parts computed in this process: one part over all frames of the solver's problem."""

    name = "local"
    workers = 1

    def partials(self, solver, *, accumulate: bool, gather: bool) -> Partial:
        return solver.partial_sums(range(solver.problem.n_frames), accumulate=accumulate,
                                   gather=gather, out=solver.nd_buffer() if accumulate else None)
