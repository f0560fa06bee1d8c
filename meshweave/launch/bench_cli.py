"""`meshweave bench NAME` (the benchmark scripts as subcommands) and `meshweave recipe` (issue 14).

`meshweave bench NAME [--quick] [--out DIR] [script args...]` runs NAME's script in benchmarks/ of the
source checkout this package was imported from, in a subprocess (each script starts its own worker
processes), with the script's own arguments passed through. `--quick` is every script's small setting;
`--out` goes to the script as `--out` where it has one and as MESHWEAVE_BENCH_OUT otherwise (the
scripts read it for their results directory). Afterwards it lists the Markdown, JSON and PNG files
the run wrote. From an installed wheel (no benchmarks/ beside the package) it says so: exit 2.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from meshweave.launch.errors import EXIT_CONFIG

# subcommand -> (script, whether it takes --out DIR)
SCRIPTS: dict[str, tuple[str, bool]] = {
    "scaling": ("bench_scaling.py", True),
    "attention": ("bench_attention.py", False),
    "pipeline": ("bench_pipeline.py", True),
    "checkpoint": ("bench_checkpoint.py", True),
    "dsp": ("bench_dsp.py", False),
    "linear_attention": ("bench_linear_attention.py", False),
    "adaptive": ("bench_adaptive_sp.py", False),
    "swarm": ("bench_swarm.py", True),
    "swarm_drills": ("swarm_drills.py", True),
}
OUT_ENV = "MESHWEAVE_BENCH_OUT"
REPORT_SUFFIXES = (".md", ".json", ".png")


def benchmarks_dir() -> Path | None:
    """benchmarks/ of the source tree beside the imported package, or None (an installed wheel)."""
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    return here if (here / "bench_scaling.py").is_file() else None


def register(sub: argparse._SubParsersAction, with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `bench` and `recipe` to the `meshweave` parser."""
    bench = sub.add_parser("bench", help="run a benchmark script: bench {" + ",".join(SCRIPTS) + "} [--quick] [--out DIR]",
                           description="Run one of the benchmark scripts in benchmarks/; arguments after NAME other "
                                       "than --quick/--out go to the script (see its --help).")
    bench.add_argument("name", choices=list(SCRIPTS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="--quick, --out DIR, and the script's own arguments")
    bench.set_defaults(func=cmd_bench)
    recipe = sub.add_parser("recipe", help="run a staged (long-context) recipe: one `train` per stage, each resuming "
                                           "the previous one")
    recipe.add_argument("recipe", help="recipe YAML (e.g. configs/long_context/recipe.yaml)")
    recipe.add_argument("--nproc", type=int, help="local worker processes of every stage (default: train.nproc)")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every stage (repeatable)")
    recipe.add_argument("--dry-run", action="store_true", help="check every stage and print the commands; run nothing")
    recipe.set_defaults(func=cmd_recipe)


def split_bench_args(rest: list[str]) -> tuple[bool, str | None, list[str]]:
    """(--quick, --out DIR, what goes to the script) from the words after NAME."""
    quick, out, passed, i = False, None, [], 0
    while i < len(rest):
        word = rest[i]
        if word == "--quick":
            quick = True
        elif word == "--out" or word.startswith("--out="):
            if word == "--out":
                if i + 1 >= len(rest) or rest[i + 1].startswith("-"):
                    raise _UsageError("--out needs a directory")
                i += 1
                out = rest[i]
            else:
                out = word.split("=", 1)[1]
            if not out:
                raise _UsageError("--out needs a directory")
        else:
            passed.append(word)
        i += 1
    return quick, out, passed


class _UsageError(Exception):
    pass


def bench_command(name: str, bench_dir: Path, quick: bool, out: Path, passed: list[str]) -> list[str]:
    script, takes_out = SCRIPTS[name]
    cmd = [sys.executable, str(bench_dir / script)]
    if quick:
        cmd.append("--quick")
    if takes_out:
        cmd += ["--out", str(out)]
    return cmd + passed


def written_reports(out: Path, since: float) -> list[Path]:
    """The Markdown, JSON and PNG files under `out` written at or after `since`."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.rglob("*") if p.suffix in REPORT_SUFFIXES and p.is_file() and p.stat().st_mtime >= since)


def cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = benchmarks_dir()
    if bench_dir is None:
        print("meshweave: bench needs the benchmarks/ directory of a source checkout (it is not part of the installed "
              "package); run it from a clone: pip install -e . in the repository", file=sys.stderr)
        return EXIT_CONFIG
    try:
        quick, out_arg, passed = split_bench_args(args.rest)
    except _UsageError as err:
        print(f"meshweave: usage error: bench {args.name}: {err} (see meshweave bench --help)", file=sys.stderr)
        return EXIT_CONFIG
    if "-h" in passed or "--help" in passed:
        return subprocess.run([sys.executable, str(bench_dir / SCRIPTS[args.name][0]), "--help"]).returncode
    out = Path(out_arg).resolve() if out_arg else bench_dir / "results"
    if out.exists() and not out.is_dir():
        print(f"meshweave: filesystem error: --out {out} exists and is not a directory", file=sys.stderr)
        return 3
    out.mkdir(parents=True, exist_ok=True)
    cmd = bench_command(args.name, bench_dir, quick, out, passed)
    print(f"meshweave bench {args.name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time() - 1.0  # file times may be rounded down to the second
    env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": os.pathsep.join(
        [str(bench_dir.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    status = subprocess.run(cmd, env=env, cwd=bench_dir.parent).returncode
    if status != 0:
        print(f"meshweave: bench {args.name} failed (exit {status})", file=sys.stderr)
        return status
    reports = written_reports(out, start)
    by_kind = {s: [p for p in reports if p.suffix == s] for s in REPORT_SUFFIXES}
    print(f"meshweave bench {args.name}: wrote to {out}")
    for suffix, label in ((".md", "Markdown"), (".json", "JSON"), (".png", "PNG")):
        print(f"  {label:>8}: " + (", ".join(str(p) for p in by_kind[suffix]) or "none"))
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from meshweave.launch.recipe import load_recipe, run_recipe

    nproc = args.nproc
    if nproc is not None and nproc < 1:
        print(f"meshweave: usage error: --nproc {nproc} must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    return run_recipe(load_recipe(args.recipe), nproc, list(args.set), dry_run=args.dry_run)
