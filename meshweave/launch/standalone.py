"""`meshweave train` without torchrun or srun: start the local workers through torch's elastic launcher
(what torchrun uses), and end with one line whatever happens to them.

- Failure: every rank leaves a JSON record in the error file torch elastic gives it (launch/errors.py);
  the launcher picks the root cause (a rank's own error before ranks that only lost that peer), prints
  one line and exits with that rank's status (2 config, 3 data/filesystem, 1 runtime). torch elastic's
  own log lines and its ChildFailedError report are silenced.
- Ctrl-C / SIGTERM: torch elastic forwards the signal to the workers and waits up to
  MESHWEAVE_SHUTDOWN_TIMEOUT seconds (default 60) while they stop at the same step and checkpoint;
  then one line, exit 130 / 143.
- Cleanup: torch elastic's log and error files go to a temporary directory removed at the end (no
  `torchelastic_*` directories are left in the temp dir), and any worker process still alive after the
  launcher is done is killed: no process outlives `meshweave train`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from meshweave.core.schema import Config
from meshweave.launch.env import free_port
from meshweave.launch.errors import (
    EXIT_RUNTIME,
    EXIT_SIGNAL,
    RankReport,
    died_report,
    format_report,
    interrupted_line,
    one_line_message,
    read_report,
    root_cause,
    say,
    write_traceback_log,
)

QUIET_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")
REAP_GRACE_S = 5.0  # a worker still alive this long after the launcher finished is killed


def run_standalone(cfg: Config, nproc: int) -> int:
    """Train on nproc local worker processes; the exit status of the whole job."""
    # Everything is imported while a signal still ends the process at once (see cli.py): from here on a
    # signal raises, which must not land inside an import.
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: F401
    from torch.distributed.launcher.api import elastic_launch  # noqa: F401

    import meshweave.launch.worker  # noqa: F401 - what the workers run

    status, created, workdir = EXIT_RUNTIME, None, None
    sys.unraisablehook = _ignore_rendezvous_thread_join
    try:
        with _quiet_torch_elastic(), _signals_raise():
            try:
                workdir = Path(tempfile.mkdtemp(prefix="meshweave-launch-"))
                created = make_run_dir(cfg)
                print(f"meshweave: training on {nproc} local process(es); run dir {Path(cfg.run_dir).resolve()}", flush=True)
                status, trained = _launch(cfg, nproc, workdir)
            except SignalException as err:  # after the checks, before torch elastic took over the signals
                status, trained = _report_interrupt({}, err.sigval), False
            if created is not None and not trained and status in EXIT_SIGNAL.values():
                shutil.rmtree(created, ignore_errors=True)  # interrupted before any step: nothing worth keeping
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reap_children(REAP_GRACE_S)
        _stop_resource_tracker()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if status in EXIT_SIGNAL.values():
        # torch elastic keeps its rendezvous alive after a signal (so that the job could rejoin it); its
        # keep-alive thread's finalizer then fails noisily at interpreter exit. Nothing is left to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def make_run_dir(cfg: Config) -> Path | None:
    """Create the run directory with its resolved config.yaml, once the start-up checks have passed (so a
    job refused at start-up leaves none, and a failed one leaves a complete one with its logs). Returns
    the topmost directory this created (None if the run directory existed)."""
    from meshweave.train.config import dump_yaml

    run_dir = Path(cfg.run_dir).absolute()
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return created


def _launch(cfg: Config, nproc: int, workdir: Path) -> tuple[int, bool]:
    """(exit status, whether any rank reached the training loop)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from meshweave.launch.worker import STANDALONE, run_worker
    from meshweave.train.config import to_dict

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"meshweave-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(workdir)),
                          shutdown_timeout=shutdown_timeout())
    try:
        elastic_launch(launch, run_worker)(to_dict(cfg), STANDALONE)
        return 0, True
    except ChildFailedError as err:
        exitcodes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        return _report_failure(_reports(workdir), exitcodes), True
    except (SignalException, KeyboardInterrupt) as err:
        signum = getattr(err, "sigval", signal.SIGINT)
        reports = _reports(workdir)
        trained = any(r.kind in ("interrupted", "finished") or r.phase == "train" for r in reports.values())
        return _report_interrupt(reports, signum), trained
    except Exception as err:  # noqa: BLE001 - torch elastic itself failed (rendezvous, a port taken, ...)
        log = write_traceback_log(cfg.run_dir, "launcher", "launch", err)
        say(f"meshweave: the launcher failed: {one_line_message(err)} "
            f"({f'full traceback in {log}' if log else 'no traceback log'})")
        return EXIT_RUNTIME, True


def shutdown_timeout() -> int:
    """Seconds torch elastic gives the workers to stop after a signal before it kills them."""
    try:
        return max(1, int(os.environ.get("MESHWEAVE_SHUTDOWN_TIMEOUT", "60")))
    except ValueError:
        return 60


def _reports(workdir: Path) -> dict[int, RankReport]:
    """Every rank's record, from the error files torch elastic gave the workers under `workdir`."""
    found: dict[int, RankReport] = {}
    for path in workdir.glob("*/attempt_*/*/error.json"):
        report = read_report(path)
        if report is not None:
            found[report.rank] = report
    return found


def _report_failure(reports: dict[int, RankReport], exitcodes: dict[int, int]) -> int:
    """One line for the root cause. torch elastic names the exit status of the failures it noticed first
    (often one rank); a rank whose last record is still a stage marker ended without reporting (killed)."""
    final = [r for r in reports.values() if r.kind not in ("started", "finished")]
    silent = {rank for rank, r in reports.items() if r.kind == "started"} | (set(exitcodes) - set(reports))
    for rank in sorted(silent, key=lambda r: r not in exitcodes):  # a known exit status first
        final.append(died_report(rank, exitcodes.get(rank), reports.get(rank), final))
    cause = root_cause(final)
    if cause is None:
        say("meshweave: training failed without a report from any rank")
        return EXIT_RUNTIME
    say(format_report(cause))
    return cause.exit_status


def _report_interrupt(reports: dict[int, RankReport], signum: int) -> int:
    stopped = [r for r in reports.values() if r.kind == "interrupted"]
    failed = root_cause([r for r in reports.values() if r.kind in ("error", "peer_lost")])
    if stopped:
        first = min(stopped, key=lambda r: r.rank)
        say(interrupted_line(first.step, first.checkpoint, first.checkpointing))
    elif failed is not None:
        say(format_report(failed))
    elif any(r.phase == "train" for r in reports.values()):
        say(f"meshweave: interrupted while training; the ranks did not stop within MESHWEAVE_SHUTDOWN_TIMEOUT "
            f"({shutdown_timeout()} s) and were killed; no final checkpoint")
    else:
        say("meshweave: interrupted before training started; nothing was saved")
    return EXIT_SIGNAL.get(signal.Signals(signum), 128 + int(signum))


@contextmanager
def _quiet_torch_elastic() -> Iterator[None]:
    """torch elastic logs each worker's exit and its own report at WARNING/ERROR: the one line replaces
    them. Its loggers set their own levels as they are created, so their records are stopped where they
    would propagate to a printing handler: at the top loggers, which get a NullHandler meanwhile."""
    saved = []
    for name in QUIET_LOGGERS:
        logger, sink = logging.getLogger(name), logging.NullHandler()
        saved.append((logger, logger.propagate, sink))
        logger.propagate = False
        logger.addHandler(sink)
    try:
        yield
    finally:
        for logger, propagate, sink in saved:
            logger.removeHandler(sink)
            logger.propagate = propagate


def _ignore_rendezvous_thread_join(unraisable: Any) -> None:
    """torch elastic's rendezvous keep-alive thread is stopped by a weakref finalizer; when the garbage
    collector runs that finalizer on the keep-alive thread itself it fails ("cannot join current thread")
    and Python prints the ignored exception after our one line. Only that one is dropped."""
    err, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = traceback.extract_tb(tb) if tb is not None else []
    if (isinstance(err, RuntimeError) and "cannot join current thread" in str(err)
            and any(f.filename.endswith("elastic/rendezvous/utils.py") for f in frames)):
        return
    sys.__unraisablehook__(unraisable)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise torch elastic's SignalException from the start (torch installs the same handler
    once the workers run); the agent then forwards the signal to the workers and waits for them."""
    from torch.distributed.elastic.multiprocessing import SignalException

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- processes -----------------------------------------------------------------------------
def reap_children(grace_s: float) -> list[int]:
    """Wait up to grace_s for this process's descendants to exit, then SIGKILL the rest; their pids.
    multiprocessing's resource tracker is spared: it exits with this process."""
    spared = _resource_tracker_pid()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = [p for p in descendants(os.getpid()) if p != spared]
        if not alive:
            return []
        time.sleep(0.1)
    alive = [p for p in descendants(os.getpid()) if p != spared]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in alive:
        _wait_reaped(pid)
    return alive


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc; zombies excluded."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _wait_reaped(pid: int) -> None:
    try:
        os.waitpid(pid, 0)  # our own child: collect it, so it does not linger as a zombie
    except ChildProcessError:
        deadline = time.monotonic() + 2.0  # a grandchild: its parent (or init) collects it
        while time.monotonic() < deadline:
            state = _stat(pid)
            if state is None or state[0] == "Z":
                return
            time.sleep(0.05)


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker (started for the workers) while we can still collect it."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError, ChildProcessError):
        pass


def _resource_tracker_pid() -> int | None:
    try:
        from multiprocessing import resource_tracker

        return resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return None
