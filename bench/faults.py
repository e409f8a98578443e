"""Fault injection for the reliability tests: ``AFT_BENCH_KILL_AT=<point>[:<k>]`` makes the process kill itself
with SIGKILL the k-th time (default 1st) it reaches the named point — a real, uncatchable kill at a chosen place.

Points: ``step`` (after a training step), ``epoch`` (after an epoch's checkpoint), ``write`` (a file written to its
temporary name, fsynced, not yet renamed into place), ``attack`` (after one evaluation attack), ``aa_chunk`` (after
one AutoAttack chunk was saved). Unset (the normal case), :func:`point` costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("AFT_BENCH_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
