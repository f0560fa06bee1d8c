"""Fault injection for SWARM drills: kill or slow a peer at a named point.

MESHWEAVE_SWARM_FAULT="kill:point=P:step=S[:attempt=A][:index=I]" SIGKILLs this peer when it reaches
point P of step S (attempt A, default 0; step=any: whichever step and attempt it first reaches P in); P is
one of forward, backward, allreduce, commit, join.
"slow:factor=F[:seconds=X][:index=I]" makes every microbatch's compute take F times as long, plus X
seconds (a sleep).
`index` matches MESHWEAVE_SWARM_INDEX, which the local launcher sets per peer (0, 1, ...), so one
environment can target one peer; without it the fault applies to whichever process carries it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV, INDEX_ENV = "MESHWEAVE_SWARM_FAULT", "MESHWEAVE_SWARM_INDEX"
POINTS = ("forward", "backward", "allreduce", "commit", "join")


def _fault() -> tuple[str, dict[str, str]] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, *fields = spec.split(":")
    values = dict(f.split("=", 1) for f in fields)
    if kind not in ("kill", "slow"):
        raise ValueError(f"{ENV}: unknown fault {kind!r}; expected kill:point=P:step=S or slow:factor=F")
    if kind == "kill" and values.get("point") not in POINTS:
        raise ValueError(f"{ENV}: point must be one of {', '.join(POINTS)}")
    if kind == "kill" and values.get("step", "0") != "any" and not values.get("step", "0").isdigit():
        raise ValueError(f"{ENV}: step must be a step number or any")
    if "index" in values and values["index"] != os.environ.get(INDEX_ENV):
        return None
    return kind, values


def maybe_kill(point: str, step: int, attempt: int) -> None:
    """SIGKILL this process if the fault names this point, step and attempt."""
    fault = _fault()
    if fault is None or fault[0] != "kill":
        return
    values = fault[1]
    anywhere = values.get("step") == "any"
    step_matches = anywhere or int(values.get("step", 0)) == step
    # step=any: also any attempt (a peer may first reach the point in a redo, e.g. a join during one)
    attempt_matches = int(values["attempt"]) == attempt if "attempt" in values else anywhere or attempt == 0
    if values["point"] == point and step_matches and attempt_matches:
        print(f"meshweave swarm: injected kill at {point} of step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def slow_down(seconds_computed: float) -> None:
    """Sleep so that a microbatch takes `factor` times its compute time (plus `seconds`), if this peer is slowed."""
    fault = _fault()
    if fault is not None and fault[0] == "slow":
        values = fault[1]
        time.sleep(max(0.0, float(values.get("factor", 1)) - 1.0) * seconds_computed + float(values.get("seconds", 0)))
