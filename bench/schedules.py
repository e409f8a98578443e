"""Learning-rate schedules, as data: a method's ``schedule`` hyper-parameter is a dict with a ``name`` and the
schedule's arguments, and :func:`lr_at` evaluates it at (epoch, step). Epochs are 0-based here; the sources count
from 1, and each schedule says how it maps.

* ``constant``
* ``multistep`` (milestones, gamma): lr₀·γ^k with k = number of milestones m ≤ e+1 — "×0.1 at epoch 75" in the
  1-based epoch count of TRADES' ``adjust_learning_rate`` (epochs 1..74 at lr₀, 75.. at 0.1·lr₀). Per epoch.
* ``cosine``: lr₀·½(1 + cos(π t/T)) per step, T = all steps.
* ``piecewise`` (points: [[epoch, factor], ...]): linear interpolation of lr₀·factor in fractional epochs, per step
  (GradAlign's cyclic schedule, Wong et al.'s triangular one).
* ``cyclic`` (peak = 0.5): the triangular one-cycle schedule of the fast-AT papers, linear from 0 to lr₀ at fraction
  ``peak`` of the run and back to 0 at its end, per step (Wong et al.'s ``CyclicLR`` with step_size_up = half of all
  iterations has peak 0.5; GradAlign's ``interp(t, [0, 2E//5, E], [0, lr_max, 0])`` has peak 0.4). Time is
  ``epoch + (step+1)/steps_per_epoch`` as in GradAlign's ``lr_schedule(epoch + (i+1)/len(loader))``;
  :func:`cyclic_factor` evaluates it at any fraction of the run (Free-AT steps it per replay). ``momentum``
  ([low, high], optional): SGD's momentum cycles inversely to the lr, ``high − (high − low)·lr/lr₀``, as torch's
  ``CyclicLR`` does by default (``cycle_momentum=True``, 0.8 / 0.9) in Wong et al.'s code (:func:`cyclic_momentum`).
* ``suzuki``: the AFT schedule of docs/methods.md §9 (AFD code ``tl+sl.py`` L106-113): epochs 1-10 at lr₀, ×0.8 at
  epoch 11, then halved at epochs 13, 15, 17, 19 (1-based); ``milestones`` (five 1-based epochs, default
  [11, 13, 15, 17, 19]) moves the ×0.8 and the four halvings, for a run shorter or longer than the paper's 20 epochs.

:func:`check_schedule` validates a schedule dict (its name, its keys and their values) when a run is planned.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import BenchError

NAMES = ("constant", "multistep", "cosine", "piecewise", "cyclic", "suzuki")
SUZUKI_MILESTONES = (11, 13, 15, 17, 19)
# the keys each schedule takes besides its name
KEYS = {"constant": (), "multistep": ("milestones", "gamma"), "cosine": (), "piecewise": ("points",),
        "cyclic": ("peak", "momentum"), "suzuki": ("milestones",)}


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_schedule(schedule: Any, where: str = "schedule") -> None:
    """A one-line :class:`BenchError` for a schedule :func:`lr_at` would reject or misread (an unknown name or key,
    a non-numeric or negative gamma, milestones that are not increasing positive integers, malformed points...),
    so that a run is refused when it is planned, not at its first learning rate."""
    if isinstance(schedule, str):
        schedule = {"name": schedule}
    if not isinstance(schedule, dict):
        raise BenchError(f"{where} = {schedule!r}; accepted: a schedule name ({', '.join(NAMES)}) or a table "
                         "{ name = ..., ... }")
    name = schedule.get("name")
    if name not in KEYS:
        raise BenchError(f"{where}: unknown schedule {name!r}; accepted: {', '.join(NAMES)}")
    extra = sorted(set(schedule) - {"name", *KEYS[name]})
    if extra:
        taken = ", ".join(KEYS[name]) or "none"
        raise BenchError(f"{where}: schedule {name!r} takes no {', '.join(map(repr, extra))}; accepted keys: {taken}")

    def milestones(n: int | None):
        ms = schedule.get("milestones", [])
        if (not isinstance(ms, (list, tuple)) or (n is not None and len(ms) != n)
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms)
                or any(b < a for a, b in zip(ms, ms[1:]))):
            count = f"{n} " if n is not None else ""
            raise BenchError(f"{where}: milestones = {ms!r}; accepted: a list of {count}non-decreasing positive "
                             "integers (1-based epochs)")

    if name == "multistep":
        milestones(None)
        g = schedule.get("gamma", 0.1)
        if not _real(g) or g < 0:
            raise BenchError(f"{where}: gamma = {g!r}; accepted: a non-negative number (0.1 = ×0.1 per milestone)")
    elif name == "suzuki" and "milestones" in schedule:
        milestones(len(SUZUKI_MILESTONES))
    elif name == "cyclic":
        peak = schedule.get("peak", 0.5)
        if not _real(peak) or not 0 < peak < 1:
            raise BenchError(f"{where}: peak = {peak!r}; accepted: a number strictly between 0 and 1")
        mom = schedule.get("momentum")
        if mom is not None and not (isinstance(mom, (list, tuple)) and len(mom) == 2 and all(map(_real, mom))
                                    and 0 <= mom[0] <= mom[1] < 1):
            raise BenchError(f"{where}: momentum = {mom!r}; accepted: [low, high] with 0 ≤ low ≤ high < 1 (the "
                             "momentum cycles inversely to the lr: high at lr 0, low at the peak)")
    elif name == "piecewise":
        pts = schedule.get("points")
        ok = isinstance(pts, (list, tuple)) and len(pts) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _real(p[0]) and _real(p[1]) and p[0] >= 0 and p[1] >= 0
            for p in pts)
        if not ok or any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
            raise BenchError(f"{where}: points = {pts!r}; accepted: [[epoch, factor], ...] with non-negative "
                             "numbers and non-decreasing epochs")


def cyclic_momentum(schedule: Any, lr: float, lr0: float) -> float | None:
    """The momentum that goes with ``lr`` under a ``cyclic`` schedule with ``momentum = [low, high]`` (None
    otherwise): ``high − (high − low)·lr/lr₀``, torch ``CyclicLR``'s ``cycle_momentum``."""
    if not isinstance(schedule, dict) or schedule.get("name") != "cyclic" or schedule.get("momentum") is None:
        return None
    low, high = schedule["momentum"]
    return high - (high - low) * (lr / lr0 if lr0 else 0.0)


def cyclic_factor(frac: float, peak: float = 0.5) -> float:
    """The triangle 0 → 1 → 0 of the ``cyclic`` schedule at ``frac`` ∈ [0, 1] of the run (peak at ``peak``)."""
    if not 0.0 < peak < 1.0:
        raise BenchError(f"schedule 'cyclic': peak {peak!r} must lie strictly between 0 and 1")
    frac = min(max(frac, 0.0), 1.0)
    return frac / peak if frac <= peak else (1.0 - frac) / (1.0 - peak)


def lr_at(lr0: float, schedule: dict[str, Any] | str | None, epoch: int, step: int, steps_per_epoch: int,
          epochs: int) -> float:
    """Learning rate at 0-based ``epoch`` and 0-based ``step`` within it."""
    if schedule is None:
        schedule = {"name": "constant"}
    if isinstance(schedule, str):
        schedule = {"name": schedule}
    name = schedule.get("name")
    if name == "constant":
        return lr0
    if name == "multistep":
        gamma = float(schedule.get("gamma", 0.1))
        k = sum(1 for m in schedule.get("milestones", []) if epoch + 1 >= m)
        return lr0 * gamma ** k
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch)
        t = epoch * steps_per_epoch + step
        return lr0 * 0.5 * (1 + math.cos(math.pi * t / total))
    if name == "piecewise":
        pts = schedule.get("points")
        if not pts:
            raise BenchError("schedule 'piecewise' needs points = [[epoch, factor], ...]")
        t = epoch + (step + 1) / max(1, steps_per_epoch)
        xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
        if t <= xs[0]:
            return lr0 * ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if t <= x1:
                return lr0 * (y0 + (y1 - y0) * (t - x0) / max(x1 - x0, 1e-12))
        return lr0 * ys[-1]
    if name == "cyclic":
        t = (epoch + (step + 1) / max(1, steps_per_epoch)) / max(1, epochs)
        return lr0 * cyclic_factor(t, float(schedule.get("peak", 0.5)))
    if name == "suzuki":
        e = epoch + 1
        first, *halvings = schedule.get("milestones", SUZUKI_MILESTONES)
        if e < first:
            return lr0
        lr = lr0 * 0.8
        for m in halvings:
            if e >= m:
                lr *= 0.5
        return lr
    raise BenchError(f"unknown schedule {name!r}; accepted: {', '.join(NAMES)}")
