"""Fault injection for tests and drills: make a chosen rank die at a chosen step.

Set MESHWEAVE_FAULT="crash:rank=R:step=S" (optionally ":attempt=A", default 0, matched against
torchrun's TORCHELASTIC_RESTART_COUNT) and rank R exits abruptly (os._exit, no cleanup, like a
killed process) right after optimizer step S. Without the variable this does nothing.
"""

from __future__ import annotations

import os
import sys


def parse_fault(spec: str) -> dict[str, int]:
    kind, *fields = spec.split(":")
    if kind != "crash":
        raise ValueError(f"MESHWEAVE_FAULT: unknown fault kind {kind!r}; expected crash:rank=R:step=S")
    values = dict(f.split("=", 1) for f in fields)
    return {"rank": int(values["rank"]), "step": int(values["step"]), "attempt": int(values.get("attempt", 0))}


def maybe_inject_fault(step: int, rank: int, env: dict[str, str] | os._Environ = os.environ) -> None:
    spec = env.get("MESHWEAVE_FAULT")
    if not spec:
        return
    fault = parse_fault(spec)
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if fault["rank"] == rank and fault["step"] == step and fault["attempt"] == attempt:
        print(f"meshweave: injected crash on rank {rank} after step {step} (attempt {attempt})", file=sys.stderr, flush=True)
        os._exit(13)
