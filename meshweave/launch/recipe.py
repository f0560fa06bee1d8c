"""`meshweave recipe RECIPE`: a long-context pretraining schedule, run as one `meshweave train` per stage.

A recipe file (configs/long_context/recipe.yaml) names one base config and a list of stages; each
stage sets its own overrides (train.seq_len, model.rope_theta, parallel.sp, ...) and its number of
steps. Every stage trains into the same checkpoint directory, so stage k+1 resumes stage k's final
checkpoint: the step counter and LR schedule state continue, the model and optimizer are resharded
onto the new layout on load (checkpoint/loader.py), and the data position carries over in tokens
(data/text.py: a different train.seq_len resumes at the same number of tokens consumed).

    base: long_context.yaml          # relative to the recipe file
    run_dir: runs/long_context       # each stage writes run_dir/<stage name>; checkpoints in run_dir/checkpoints
    set: [train.global_batch=8]      # overrides for every stage (optional)
    stages:
      - {name: 1k, steps: 200, set: [train.seq_len=1024, model.rope_theta=10000, parallel.sp=1]}
      - {name: 8k, steps: 50,  set: [train.seq_len=8192, model.rope_theta=500000, parallel.sp=4]}

Every stage's config is loaded and checked for the process count before the first stage starts, so
a bad stage is one line and exit status 2 up front, not after hours of the first stage.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshweave.core.yaml_safe import YamlRefused, load_yaml_config
from meshweave.train.config import ConfigError, load_config

_KEYS = {"base", "run_dir", "set", "stages"}
_STAGE_KEYS = {"name", "steps", "set"}


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int  # steps of this stage
    end_step: int  # the step counter when it ends (the stage's train.steps)
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    path: Path
    base: Path
    run_dir: Path
    overrides: tuple[str, ...]
    stages: tuple[Stage, ...]

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def stage_overrides(self, stage: Stage, extra: list[str] = ()) -> list[str]:
        """The --set list of one stage: recipe-wide, the stage's own, the command line's, then what the recipe
        fixes (steps, where checkpoints go, resume on)."""
        return [*self.overrides, *stage.overrides, *extra, f"train.steps={stage.end_step}",
                f"run_dir={self.run_dir / stage.name}", f"checkpoint.dir={self.checkpoint_dir}",
                "checkpoint.resume=true"]


def _set_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={_yaml_scalar(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: give a list of KEY=VALUE strings or a mapping of KEY: VALUE")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check the shape of a recipe file (the stage configs are checked by `check_recipe`)."""
    p = Path(path)
    try:
        raw = load_yaml_config(p)
    except YamlRefused as err:
        raise ConfigError(str(err)) from None
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{p}: unknown key {unknown[0]!r}; a recipe has {sorted(_KEYS)}")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{p}: stages: give a list of at least one stage ({{name, steps, set}})")
    base = raw.get("base")
    base_path = (p.parent / base) if isinstance(base, str) else None
    if base is not None and (base_path is None or not base_path.is_file()):
        raise ConfigError(f"{p}: base: {base!r} is not a file (the path is relative to the recipe)")
    stages, end, names = [], 0, set()
    for i, st in enumerate(raw["stages"]):
        where = f"{p}: stages[{i}]"
        if not isinstance(st, dict) or set(st) - _STAGE_KEYS:
            raise ConfigError(f"{where}: a stage is a mapping of {sorted(_STAGE_KEYS)}")
        name, steps = str(st.get("name", f"stage{i + 1}")), st.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{where}.steps: {steps!r} must be an integer >= 1 (the steps of this stage)")
        if name in names or "/" in name or name in ("", ".", "..", "checkpoints"):
            raise ConfigError(f"{where}.name: {name!r} must be unique and usable as a directory name")
        names.add(name)
        end += steps
        stages.append(Stage(name, steps, end, _set_list(st.get("set"), f"{where}.set")))
    run_dir = Path(str(raw.get("run_dir", f"runs/{p.stem}")))
    return Recipe(p, base_path, run_dir, _set_list(raw.get("set"), f"{p}: set"), tuple(stages))


def check_recipe(recipe: Recipe, nproc: int | None, extra: list[str]) -> list[Any]:
    """Every stage's resolved config, checked for `nproc` processes (ConfigError naming the stage)."""
    from meshweave.train.validate import check

    configs = []
    for stage in recipe.stages:
        try:
            cfg = load_config(recipe.base, recipe.stage_overrides(stage, extra))
            check(cfg, nproc if nproc is not None else cfg.train.nproc)
        except ConfigError as err:
            raise ConfigError(f"recipe stage {stage.name!r}: {err}") from None
        configs.append(cfg)
    return configs


def describe(recipe: Recipe, configs: list[Any]) -> str:
    lines = [f"recipe {recipe.path}: {len(recipe.stages)} stage(s), checkpoints in {recipe.checkpoint_dir}"]
    for stage, cfg in zip(recipe.stages, configs):
        first = stage.end_step - stage.steps + 1
        lines.append(f"  {stage.name:>8}: steps {first}-{stage.end_step}  seq_len {cfg.train.seq_len}  "
                     f"sp {cfg.parallel.sp} ({cfg.parallel.sp_method})  rope_theta {getattr(cfg.model, 'rope_theta', 'n/a')}")
    return "\n".join(lines)


def train_command(recipe: Recipe, stage: Stage, nproc: int | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "meshweave", "train"]
    if recipe.base is not None:
        cmd.append(str(recipe.base))
    for item in recipe.stage_overrides(stage, extra):
        cmd += ["--set", item]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    return cmd


def newest_step(recipe: Recipe) -> int:
    """The newest committed checkpoint step of the recipe's checkpoint directory (0 if none): a rerun of the
    recipe skips the stages that ended at or before it and resumes the stage it lies in."""
    from meshweave.checkpoint.layout import committed_steps

    if not recipe.checkpoint_dir.is_dir():
        return 0
    return max(committed_steps(recipe.checkpoint_dir), default=0)


def run_recipe(recipe: Recipe, nproc: int | None, extra: list[str], dry_run: bool = False) -> int:
    """Check every stage, then run them in order (each resumes the previous one); the first failing
    stage's exit status ends the recipe."""
    configs = check_recipe(recipe, nproc, extra)
    print(describe(recipe, configs), flush=True)
    done = newest_step(recipe)
    for stage in recipe.stages:
        if stage.end_step <= done:
            print(f"meshweave recipe: stage {stage.name}: done (checkpoint at step {done})", flush=True)
            continue
        cmd = train_command(recipe, stage, nproc, extra)
        print(f"meshweave recipe: stage {stage.name}: {' '.join(cmd[2:])}", flush=True)
        if dry_run:
            continue
        status = subprocess.run(cmd).returncode
        if status != 0:
            print(f"meshweave recipe: stage {stage.name} failed (exit {status}); rerun the recipe to resume from "
                  f"the newest checkpoint in {recipe.checkpoint_dir}", file=sys.stderr)
            return status
    if not dry_run:
        print(f"meshweave recipe: done; stages in {recipe.run_dir}, checkpoints in {recipe.checkpoint_dir}")
    return 0
