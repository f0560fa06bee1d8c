"""What every rank runs: join the process group from the environment, build, train, tear down.

A rank that fails does not print a traceback: it writes it to RUN_DIR/logs/rank<R>.log, leaves a
one-line record for the launcher (see launch/errors.py) and exits at once with the failure's status
(2 config, 3 data/filesystem, 1 runtime), so that no background thread or dead peer can hold it.
Under the standalone launcher the launcher prints the line; under torchrun or srun the rank prints
it itself (only the first rank to fail, when the job's store can tell). Ctrl-C / SIGTERM while
training stop every rank at the same step with a final checkpoint (launch/interrupt.py): 130 / 143.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from meshweave.core.mesh import backend_for, device_type_for
from meshweave.launch.errors import (
    EXIT_SIGNAL,
    RankReport,
    exit_status_for,
    format_report,
    is_peer_lost,
    one_line_message,
    phase_of,
    say,
    write_report,
    write_traceback_log,
)
from meshweave.launch.faults import maybe_raise_before_build, maybe_raise_before_step
from meshweave.launch.interrupt import StepGuard, StopRequest, TrainingInterrupted, checkpoint_dir
from meshweave.train.build import build_trainer
from meshweave.train.config import from_dict

STANDALONE = "standalone"  # launched by `meshweave train` itself: the launcher prints the one line


class _Rank:
    """This rank's identity and where it is (stage: start / build / train), for its reports."""

    def __init__(self, cfg_dict: dict[str, Any], launcher: str) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.run_dir = str(cfg_dict.get("run_dir", "."))
        self.launcher, self.stage = launcher, "start"
        self.guard: StepGuard | None = None

    def enter(self, stage: str) -> None:
        """Record the stage; the marker left in the error file names it if the process is killed."""
        self.stage = stage
        kind = "finished" if stage == "finished" else "started"
        write_report(RankReport(self.rank, kind, stage, f"rank {self.rank} entered {stage}", 1))


def run_worker(cfg_dict: dict[str, Any], launcher: str = "external") -> list[float]:
    """Train with the config on this rank; RANK/WORLD_SIZE/MASTER_* must be set. Returns step losses;
    on a failure or an interruption the process exits (see the module docstring) instead of returning."""
    me = _Rank(cfg_dict, launcher)
    stop = StopRequest(on_stuck=lambda signum, waited: _leave_stuck(me, signum, waited))
    stop.use_default_action()
    try:
        me.enter("start")
        cfg = from_dict(cfg_dict)
        device_type = device_type_for(cfg.train.device)
        dist.init_process_group(backend_for(device_type),
                                timeout=timedelta(seconds=int(os.environ.get("MESHWEAVE_PG_TIMEOUT", "300"))))
        me.enter("build")
        if device_type == "cuda":
            from meshweave.launch.preflight import check_device_memory

            check_device_memory(cfg, dist.get_world_size(), me.local_rank)
        maybe_raise_before_build(me.rank)
        trainer = build_trainer(cfg, local_rank=me.local_rank)
        me.guard = StepGuard(trainer, stop, dist.new_group(backend="gloo"),
                             before_step=lambda step: maybe_raise_before_step(me.rank, step))
        me.enter("train")
        stop.arm()
        losses = trainer.train()
        signum = me.guard.agreed_signal()  # a signal during the last step: report it like any interruption
        if signum:
            last = trainer.step
            raise TrainingInterrupted(signum, last, checkpoint_dir(cfg.checkpoint, last) if cfg.checkpoint.enabled
                                      else None, saving=cfg.checkpoint.enabled)
    except TrainingInterrupted as stopped:
        _leave_interrupted(me, stopped)
    except BaseException as err:  # noqa: BLE001 - every failure leaves one line and a log, never a traceback
        _leave_failed(me, err)
    dist.destroy_process_group()
    me.enter("finished")
    return losses


def _leave_failed(me: _Rank, err: BaseException) -> None:
    step = me.guard.step_in_progress() if me.guard is not None else None
    phase = phase_of(err, me.stage, None if step is None else step - 1)
    kind = "peer_lost" if is_peer_lost(err) else "error"
    log = write_traceback_log(me.run_dir, me.rank, phase, err)
    report = RankReport(me.rank, kind, phase, one_line_message(err), exit_status_for(err), log=log,
                        step=None if step is None else step - 1)
    write_report(report)
    if me.launcher != STANDALONE and _first_to_report():
        say(format_report(report))
    _exit(report.exit_status)


def _leave_interrupted(me: _Rank, stopped: TrainingInterrupted) -> None:
    report = RankReport(me.rank, "interrupted", me.stage, str(stopped), EXIT_SIGNAL.get(stopped.signum, 128 + stopped.signum),
                        step=stopped.step, checkpoint=stopped.checkpoint, checkpointing=stopped.saving)
    write_report(report)
    if me.launcher != STANDALONE and me.rank == 0:
        say(format_report(report))
    _exit(report.exit_status)


def _leave_stuck(me: _Rank, signum: int, waited_s: float) -> None:
    """The watchdog's way out (another thread): the rank did not reach a step boundary after a signal."""
    step = me.guard.step_in_progress() if me.guard is not None else None
    report = RankReport(me.rank, "peer_lost", f"train step {step}" if step else me.stage,
                        f"did not reach the next step boundary within {waited_s:.0f} s of "
                        f"{signal.Signals(signum).name} (waiting on a rank that is gone?); stopped",
                        EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum), step=None if step is None else step - 1)
    write_report(report)
    _exit(report.exit_status)


def _first_to_report() -> bool:
    """Whether this rank is the first of the job to report a failure (one line on the console, not one per
    rank): a counter in the job's store when it is reachable, else True."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return True
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=3), wait_for_workers=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"meshweave/failures_reported/{attempt}", 1) == 1
    except Exception:  # noqa: BLE001 - the store went down with its host rank: report anyway
        return True


def _exit(status: int) -> None:
    """Leave now: flush the console, skip atexit and thread joins (a thread may wait on a dead peer)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
