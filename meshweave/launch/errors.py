"""How a failed or interrupted rank is reported: exit statuses, the rank's record, the one console line.

A rank that fails writes its full traceback to RUN_DIR/logs/rank<R>.log and a small JSON record
(rank, phase, one-line message, exit status, log path) to the file torch elastic names in
TORCHELASTIC_ERROR_FILE (torchrun and the standalone launcher set it), then exits at once. The
standalone launcher reads every rank's record, picks the root cause (a rank's own error before a
rank that only lost its peers) and prints one line; under torchrun the record's message is what
torchrun shows as the root cause. Records are JSON: nothing read back here is unpickled.

Exit statuses: 2 config, 3 data or filesystem, 1 runtime, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import meshweave
from meshweave.core.errors import ConfigError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_DATA = 3  # unusable data, checkpoint or directory: the files, not the code, need a change
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it
MESSAGE_LIMIT = 300  # characters of an exception's message kept in the one-line report

# errno values of a filesystem problem (as opposed to a socket's): disk full, permissions, missing files
FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                     errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.EEXIST, errno.ENAMETOOLONG}
# How gloo (and TCP) report that a peer process is gone: the rank saying so only lost its peer.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Connection refused", "ECONNRESET", "EPIPE")
_PACKAGE = Path(meshweave.__file__).resolve().parent
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


@dataclass
class RankReport:
    """What one rank says about how it ended (written as JSON beside torch elastic's error file)."""

    rank: int
    kind: str  # error | peer_lost | interrupted | died; "started" marks each stage (a killed rank leaves it), "finished"
    phase: str  # "start" | "build" | "data" | "train step N" | "checkpoint (...)"
    message: str  # one line, bounded
    exit_status: int
    log: str | None = None  # the full traceback
    step: int | None = None  # last completed optimizer step
    checkpoint: str | None = None  # interrupted: the final checkpoint's directory
    checkpointing: bool = False  # interrupted: whether checkpoint.dir is set
    time: float = dataclasses.field(default_factory=time.time)


def exit_status_for(err: BaseException) -> int:
    """2 for a config error, 3 for unusable data, checkpoints or files (also when that is the cause of
    the error raised, e.g. a checkpoint write that failed on a full disk), 1 for anything else."""
    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if is_peer_lost(err):
        return EXIT_RUNTIME
    if any(_is_data_error(e) or _is_filesystem_error(e) for e in _causes(err)):
        return EXIT_DATA
    return EXIT_RUNTIME


def _causes(err: BaseException, depth: int = 8) -> list[BaseException]:
    """The error, what caused it (`raise ... from`, the exception being handled) and, for DCP's
    CheckpointException, each rank's wrapped exception; a bounded walk."""
    found, todo = [], [err]
    while todo and len(found) < 4 * depth:
        e = todo.pop(0)
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [getattr(w, "exc", None) for w in failures.values()]
    return found


def _is_data_error(err: BaseException) -> bool:
    from meshweave.data.text import DataError, SamplerStateError

    name = type(err).__name__
    return isinstance(err, (DataError, SamplerStateError)) or name in ("CheckpointLoadError", "ManifestError",
                                                                       "CheckpointWriteError")


def _is_filesystem_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, (ConnectionError, TimeoutError)) and (
        err.errno in FILESYSTEM_ERRNOS or err.filename is not None)


def is_peer_lost(err: BaseException) -> bool:
    """True when the error only says that another rank's process went away (a consequence, not a cause)."""
    return any(marker in str(err) for marker in PEER_LOST_MARKERS)


def phase_of(err: BaseException, stage: str, step: int | None) -> str:
    """Where a rank failed: checkpoint or data code anywhere on the traceback wins over the stage
    (start / build / train), and a training failure names the step in progress."""
    parts = {_subpackage(frame.filename) for frame in traceback.extract_tb(err.__traceback__)}
    if "checkpoint" in parts or type(err).__name__ == "CheckpointLoadError":
        return "checkpoint (resume)" if stage != "train" or step is None else f"checkpoint (at step {step})"
    if "data" in parts or _is_data_error(err):
        return "data"
    if stage == "train" and step is not None:
        return f"train step {step + 1}"
    return stage


def _subpackage(filename: str) -> str | None:
    try:
        return Path(filename).resolve().relative_to(_PACKAGE).parts[0]
    except (ValueError, IndexError, OSError):
        return None


def one_line_message(err: BaseException) -> str:
    """The exception as one bounded line: its own message for meshweave's errors, else type: message. A
    message that embeds other ranks' tracebacks (DCP's CheckpointException) keeps its head and the first
    exception line of those tracebacks."""
    raw = str(err)
    head, marker, rest = raw.partition("Traceback (most recent call last)")
    text = " ".join(head.split()) or "(no message)"
    if marker:
        last = next((line.strip() for line in rest.splitlines() if _EXCEPTION_LINE.match(line.strip())), "")
        text = f"{text.rstrip(':')} ... {last}" if last else text
    if not isinstance(err, ConfigError) and not _is_data_error(err):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."


def write_traceback_log(run_dir: str, who: int | str, phase: str, err: BaseException) -> str | None:
    """Append the full traceback to RUN_DIR/logs/rank<R>.log (or <who>.log for the launcher); its path, or
    None if it cannot be written."""
    name, title = (f"rank{who}", f"rank {who}") if isinstance(who, int) else (who, who)
    path = Path(run_dir) / "logs" / f"{name}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"=== {title} failed in {phase} at {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n")
            f.write("".join(traceback.format_exception(err)))
        return str(path)
    except OSError:
        return None


def write_report(report: RankReport, path: str | None = None) -> None:
    """Write the record where torch elastic looks for this rank's error (TORCHELASTIC_ERROR_FILE), in its
    format (`message`, `timestamp`) with meshweave's fields beside; nothing without that variable."""
    path = path or os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": format_report(report), "timestamp": int(report.time), "meshweave": dataclasses.asdict(report)}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # the console line (or the launcher's view of the exit status) still reports it


def read_report(path: str | os.PathLike) -> RankReport | None:
    """The record a rank left in its error file; None when there is none or it is not one of ours."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = data["meshweave"]
        known = {f.name for f in dataclasses.fields(RankReport)}
        return RankReport(**{k: v for k, v in fields.items() if k in known})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_report(report: RankReport) -> str:
    """The one console line for a rank's record."""
    if report.kind == "interrupted":
        return interrupted_line(report.step, report.checkpoint, report.checkpointing)
    where = f"full traceback in {report.log}" if report.log else "no traceback"
    return f"meshweave: rank {report.rank} failed in {report.phase}: {report.message} ({where})"


def interrupted_line(step: int | None, checkpoint: str | None, checkpointing: bool) -> str:
    """The one line of an interrupted run: the step every rank stopped at and where its checkpoint is."""
    at = f"at step {step}" if step else "before the first step"
    if checkpoint:
        return f"meshweave: interrupted {at}; final checkpoint in {checkpoint} (run the same command to resume)"
    if not checkpointing:
        return f"meshweave: interrupted {at}; no checkpoint written (set checkpoint.dir to save one)"
    return f"meshweave: interrupted {at}; nothing new to checkpoint"


def died_report(rank: int, exitcode: int | None, started: RankReport | None, peers: list[RankReport]) -> RankReport:
    """A record for a rank that ended without writing one (killed, or exited from native code); the
    exit status is None when the launcher did not see it."""
    if exitcode is None:
        how = "ended"
    elif exitcode < 0 and -exitcode in signal.valid_signals():
        how = f"was killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with status {exitcode}"
    phase = started.phase if started is not None else "start"
    steps = [r.step for r in peers if r.step is not None]
    if phase == "train" and steps:
        phase = f"train step {max(steps) + 1}"
    return RankReport(rank, "died", phase, f"the process {how} without reporting an error", EXIT_RUNTIME)


def root_cause(reports: list[RankReport]) -> RankReport | None:
    """The report to show: a rank's own error (the earliest), else a rank that died without one (in the
    given order), else a rank that only lost its peers, else an interruption."""
    for kind in ("error", "died", "peer_lost", "interrupted"):
        found = [r for r in reports if r.kind == kind]
        if kind != "died":
            found.sort(key=lambda r: r.time)
        if found:
            return found[0]
    return None


def say(line: str) -> None:
    """Print one line on stderr now (workers are about to leave with os._exit, which flushes nothing)."""
    print(line, file=sys.stderr, flush=True)
