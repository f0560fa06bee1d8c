"""Raised-error drills for the worker error path (tests): make a chosen rank raise in a chosen phase.

Set MESHWEAVE_RAISE="<where>:rank=R[:step=S]" and rank R raises, where <where> is
- "build": a RuntimeError before the rank builds its trainer (a runtime failure, exit status 1),
- "data": a DataError before it builds (as an unreadable corpus would: exit status 3),
- "step": a RuntimeError before optimizer step S (default 1) runs (exit status 1).
Without the variable this does nothing. (train/faults.py kills a rank instead: os._exit, no report.)
"""

from __future__ import annotations

import os

ENV = "MESHWEAVE_RAISE"
WHERE = ("build", "data", "step")


class InjectedFailure(RuntimeError):
    """The error a drill raises."""


def _requested(where: str, rank: int) -> dict[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, *fields = spec.split(":")
    if name not in WHERE:
        raise ValueError(f"{ENV}: unknown place {name!r}; expected one of {', '.join(WHERE)}")
    values = {k: int(v) for k, v in (f.split("=", 1) for f in fields)}
    return values if name == where and values.get("rank", 0) == rank else None


def maybe_raise_before_build(rank: int) -> None:
    """Raise the requested "build" or "data" failure on this rank."""
    if _requested("build", rank) is not None:
        raise InjectedFailure(f"injected build failure on rank {rank} ({ENV})")
    if _requested("data", rank) is not None:
        from meshweave.data.text import DataError

        raise DataError(f"data.path: injected data failure on rank {rank} ({ENV})")


def maybe_raise_before_step(rank: int, step: int) -> None:
    """Raise the requested "step" failure when optimizer step `step` (1-based) is about to run."""
    values = _requested("step", rank)
    if values is not None and values.get("step", 1) == step:
        raise InjectedFailure(f"injected failure on rank {rank} before step {step} ({ENV})")
