"""One-step equivalence of the suite's methods with their authors' code (issue 23).

Each ``fidelity/<method>.py`` takes the path of a local checkout of the official repository (never vendored: no
official code is committed), runs one to three iterations of the official training loop and of the suite's
``Method`` from the same weights, batch and random draws, in float64 on the CPU, and prints per-parameter-group
relative differences; ``--write-golden`` stores what the official code produced (small: per-group norms of the
parameter deltas and a few hundred fixed entries of them, with the official repository and commit) under
``tests/golden/fidelity/``, which ``tests/test_fidelity.py`` checks the suite against in CI. See docs/methods.md.
"""
