"""`CheckpointSettings` (the YAML `checkpoint:` section, defined once in core/schema.py) and its validation.

The config layer calls `validate_checkpoint_settings` before any process starts, so a bad value is
reported as one line that names the field and the fix.
"""

from __future__ import annotations

from typing import get_args, get_type_hints

from meshweave.core.schema import CHECKPOINT_LEVELS, CheckpointConfig

# The YAML `checkpoint:` section is the one definition of the settings; the checkpointer takes it as is.
CheckpointSettings = CheckpointConfig
MODES: tuple[str, ...] = get_args(get_type_hints(CheckpointConfig)["mode"])
WRITERS: tuple[str, ...] = get_args(get_type_hints(CheckpointConfig)["writer"])
LEVELS = CHECKPOINT_LEVELS  # also the only valid flush order


def validate_checkpoint_settings(s: CheckpointSettings) -> list[str]:
    """Return one message per problem (empty when valid); each names the field and the fix."""
    problems: list[str] = []
    if s.dir is not None and (not isinstance(s.dir, str) or not s.dir):
        problems.append("checkpoint.dir: must be a non-empty path, or null to turn checkpointing off")
    if not isinstance(s.every_steps, int) or isinstance(s.every_steps, bool) or s.every_steps < 0:
        problems.append(f"checkpoint.every_steps: got {s.every_steps!r}; use an integer >= 0 (0 = only at the end)")
    if s.mode not in MODES:
        problems.append(f"checkpoint.mode: got {s.mode!r}; use one of {', '.join(MODES)}")
    if not isinstance(s.keep, int) or isinstance(s.keep, bool) or s.keep < 1:
        problems.append(f"checkpoint.keep: got {s.keep!r}; use an integer >= 1")
    if not isinstance(s.resume, bool):
        problems.append(f"checkpoint.resume: got {s.resume!r}; use true or false")
    if not isinstance(s.verify, bool):
        problems.append(f"checkpoint.verify: got {s.verify!r}; use true (check checksums on resume) or false")
    if s.writer not in WRITERS:
        problems.append(f"checkpoint.writer: got {s.writer!r}; use one of {', '.join(WRITERS)}")
    elif s.writer == "process" and s.mode != "lazy":
        problems.append("checkpoint.writer: 'process' needs checkpoint.mode: lazy (sync mode writes in the training process)")
    if not isinstance(s.node_local, bool):
        problems.append(f"checkpoint.node_local: got {s.node_local!r}; use true (the local level is per node) or false")
    elif s.node_local and "local" not in (s.levels if isinstance(s.levels, (list, tuple)) else []):
        problems.append("checkpoint.node_local: true needs 'local' in checkpoint.levels (it says where the local level lives)")
    problems += _level_problems(s)
    return problems


def _level_problems(s: CheckpointSettings) -> list[str]:
    levels = s.levels
    if not isinstance(levels, (list, tuple)) or not levels:
        return ["checkpoint.levels: use a non-empty list from memory, local, persistent"]
    unknown = [lvl for lvl in levels if lvl not in LEVELS]
    if unknown:
        return [f"checkpoint.levels: unknown level(s) {unknown}; use a subset of memory, local, persistent"]
    problems = []
    if len(set(levels)) != len(levels):
        problems.append(f"checkpoint.levels: {list(levels)} repeats a level; list each level once")
    elif list(levels) != sorted(levels, key=LEVELS.index):
        problems.append(f"checkpoint.levels: {list(levels)} is out of order; flush order is memory, local, persistent")
    if not [lvl for lvl in levels if lvl != "memory"]:
        problems.append("checkpoint.levels: 'memory' alone does not survive a restart; add 'local' and/or 'persistent'")
    if "persistent" in levels and not s.persistent_dir:
        problems.append("checkpoint.levels: 'persistent' needs checkpoint.persistent_dir")
    if s.persistent_dir and "persistent" not in levels:
        problems.append("checkpoint.persistent_dir: set but 'persistent' is not in checkpoint.levels; add it or drop the dir")
    if s.persistent_dir and s.dir and _same_path(s.persistent_dir, s.dir) and "persistent" in levels and "local" in levels:
        problems.append("checkpoint.persistent_dir: must differ from checkpoint.dir when both levels are used")
    return problems


def _same_path(a: str, b: str) -> bool:
    import os

    return os.path.abspath(a) == os.path.abspath(b)
