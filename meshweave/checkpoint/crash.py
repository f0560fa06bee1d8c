"""Crash-point hooks: make the save path kill its own process at a named point (for tests).

`MESHWEAVE_CKPT_CRASH_AT=<point>[@<step>]` makes `maybe_crash(point, step)` SIGKILL the calling
process when the point (and the step, if given) matches; `MESHWEAVE_CKPT_CRASH_RANK=<r>` limits it
to one rank. SIGKILL (not an exception) because that is what a preempted or OOM-killed job sees:
no `finally`, no flush, no atexit.

Points: "copy" (halfway through the host copy), "write:<level>" (this rank's data files written,
checkpoint not committed), "before_manifest:<level>", "after_manifest:<level>" (manifest written,
directory not yet renamed), "before_pointer:<level>" (committed, "latest" not yet moved),
"before_retention:<level>" (pointer moved, old checkpoints not yet removed).
"""

from __future__ import annotations

import os
import signal

ENV_POINT = "MESHWEAVE_CKPT_CRASH_AT"
ENV_RANK = "MESHWEAVE_CKPT_CRASH_RANK"


def crash_requested(point: str, step: int, rank: int) -> bool:
    """True when the environment asks for a crash at this point, step and rank."""
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return False
    name, _, at_step = spec.partition("@")
    if name != point or (at_step and int(at_step) != step):
        return False
    only_rank = os.environ.get(ENV_RANK)
    return only_rank is None or int(only_rank) == rank


def maybe_crash(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if the environment asks for a crash here."""
    if crash_requested(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
