"""Ctrl-C and SIGTERM on a training rank: every rank stops at the same step boundary and saves once.

Before training starts (joining the group, building) SIGINT and SIGTERM keep their default action:
the process ends at once. There is nothing to save yet, and torch elastic's teardown of the other
ranks after one rank failed arrives as SIGTERM too, which must not wait for anything.

Once the loop runs, a signal only sets a flag. Before each step the ranks agree on it with one
all-reduce of one integer on a CPU gloo group (no device sync, no GPU stream is touched); when any
rank was asked to stop, all of them save a final checkpoint of the last finished step (when
checkpointing is configured and that step has none yet) and raise `TrainingInterrupted`. The loop
itself lives in train/trainer.py; `StepGuard` wraps the trainer's `train_step`, so the loop is not
duplicated here.

A rank that cannot reach the next step boundary after a signal (stuck in a collective whose peer is
gone: NCCL waits for its timeout where gloo fails at once) is ended by a watchdog after 3 x the
longest step so far (the first excepted; at least STUCK_MIN_S seconds), through `on_stuck` -- and
before the standalone launcher's MESHWEAVE_SHUTDOWN_TIMEOUT would kill it without a report.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STUCK_MIN_S = 10.0  # the least time a rank gets to reach the next step boundary after a signal


class TrainingInterrupted(Exception):
    """Every rank stopped at `step` because one of them got `signum`; `checkpoint` is the newest saved one."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, saving: bool) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint, self.saving = signum, step, checkpoint, saving


class StopRequest:
    """The first SIGINT/SIGTERM this process got while training (0 = none), and the watchdog that ends the
    process through `on_stuck(signum, waited_s)` if the next step boundary is not reached in time."""

    def __init__(self, on_stuck: Callable[[int, float], None] | None = None) -> None:
        self.signum = 0
        self.on_stuck = on_stuck
        self.longest_step_s = 0.0
        self.boundary = threading.Event()  # set once the ranks agreed at a step boundary after the signal
        self._lock = threading.RLock()  # the handler may interrupt itself on the main thread

    def use_default_action(self) -> None:
        """Start-up and build: a signal ends the process at once."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def arm(self) -> None:
        """Training: a signal is noted and acted on at the next step boundary (see StepGuard).

        Python runs a signal handler only when the main thread returns to the interpreter, which a
        rank blocked in a collective never does; the C-level handler also writes the signal number to
        the wakeup fd at once, so a thread reading it notes the signal and starts the watchdog then."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)
        if self.on_stuck is not None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            threading.Thread(target=self._read_wakeups, args=(read_fd,), name="meshweave-signals", daemon=True).start()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._requested(signum)

    def _read_wakeups(self, read_fd: int) -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._requested(signum)

    def _requested(self, signum: int) -> None:
        with self._lock:
            if self.signum:
                return
            self.signum = signum
        if self.on_stuck is not None:
            wait_s = min(max(STUCK_MIN_S, 3 * self.longest_step_s), max(1.0, _shutdown_timeout() - 5))
            threading.Thread(target=self._watch, args=(signum, wait_s), name="meshweave-stop-watchdog",
                             daemon=True).start()

    def _watch(self, signum: int, wait_s: float) -> None:
        if not self.boundary.wait(wait_s) and self.on_stuck is not None:
            self.on_stuck(signum, wait_s)


class StepGuard:
    """Agrees on stop requests before every step of `trainer` and tracks the step in progress."""

    def __init__(self, trainer: Any, stop: StopRequest, group: dist.ProcessGroup,
                 before_step: Callable[[int], None] | None = None) -> None:
        self.trainer, self.stop, self.group, self.before_step = trainer, stop, group, before_step
        self.first_step: int | None = None  # the step the loop started from (after a resume); None before it
        self._step: Callable[[], Any] = trainer.train_step
        trainer.train_step = self._guarded

    def step_in_progress(self) -> int | None:
        """The optimizer step being run (1-based), or None before the loop (e.g. while resuming)."""
        return None if self.first_step is None else self.trainer.step + 1

    def _guarded(self) -> Any:
        if self.first_step is None:
            self.first_step = self.trainer.step
        signum = self.agreed_signal()
        if signum:
            self.stop_now(signum)
        if self.before_step is not None:
            self.before_step(self.trainer.step + 1)
        start = time.perf_counter()
        result = self._step()
        if self.trainer.step > self.first_step + 1:  # the first step pays one-time costs
            self.stop.longest_step_s = max(self.stop.longest_step_s, time.perf_counter() - start)
        return result

    def agreed_signal(self) -> int:
        """The largest signal number any rank noted (0 when none): one all-reduce over the gloo group."""
        flag = torch.tensor([self.stop.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        signum = int(flag.item())
        if signum:
            self.stop.boundary.set()
        return signum

    def stop_now(self, signum: int) -> None:
        """Save the last finished step (if it has no checkpoint yet) and raise TrainingInterrupted; the
        trainer's `finally` then flushes the checkpointer."""
        p, step = self.trainer.p, self.trainer.step
        ckpt, settings = p.checkpointer, p.cfg.checkpoint
        first = self.first_step if self.first_step is not None else step
        saved: str | None = None
        if ckpt is not None and settings.enabled:
            if step > first and not _saved_periodically(step, settings.every_steps, p.cfg.train.steps):
                ckpt.after_optimizer_step(step, p.app_state, final_step=True)
            if step > 0 and (step > first or first > 0):  # a new save, or the checkpoint the run resumed from
                saved = checkpoint_dir(settings, step)
        raise TrainingInterrupted(signum, step, saved, saving=ckpt is not None)


def _shutdown_timeout() -> float:
    try:
        return float(os.environ.get("MESHWEAVE_SHUTDOWN_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def _saved_periodically(step: int, every: int, last: int) -> bool:
    """Whether the trainer's own call already saved `step` (the Checkpointer's rule: every N, and the last)."""
    return (every > 0 and step % every == 0) or step == last


def checkpoint_dir(settings: Any, step: int) -> str:
    """The directory of step `step` on the first disk level (where a resume looks first)."""
    from meshweave.checkpoint import layout

    first = settings.disk_levels()[0]
    where = Path(settings.level_dir(first))
    if settings.node_local and first == "local":
        where = where / "rank_*"  # each rank's own copy, on its node
    return str(where / layout.step_dirname(step))
