"""Repeated SWARM kill drills with random timing: does every run still commit each sample exactly once and
end with the weights of one process?

Each trial is one local SWARM run (`meshweave train` with fault_tolerance.mode: swarm: a coordinator and
2 stages x 2 peers) in which one peer is SIGKILLed:
- at a named point (forward, backward, allreduce, commit) of a step and peer drawn at random, through the
  MESHWEAVE_SWARM_FAULT hook; or
- from outside, at a random moment after the first commit (wherever that peer happens to be).
A trial passes when the run exits 0, its ledger shows steps 0..N-1 committed once with every microbatch
served once per stage, the committed losses equal one process's (rtol 2e-5) and every peer's final weights
equal one process's (peers of a stage: bitwise). The checks are the test suite's (tests/swarm_support.py);
the suite runs each point once, this runs many. Writes swarm_drills.{md,json}: per kind, trials, passes,
and the recovery times the ledger recorded.

    python benchmarks/swarm_drills.py [--trials 3] [--quick] [--seed 0] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the suite's drill helpers: one definition of what a passing run is

from tests.swarm_support import (
    as_args,
    assert_exactly_once,
    assert_matches_reference,
    child_env,
    meshweave,
    read_run,
    reference,
    swarm_config,
)

POINTS = ("forward", "backward", "allreduce", "commit")
STEPS, LAYERS, PEERS = 24, 2, 4  # a step takes ~0.1 s here: 24 leave time for a kill from outside to land mid-run


def _peer_pids(parent: int) -> list[int]:
    """The `meshweave swarm peer` processes started by `parent` (from /proc: no extra dependency)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == parent and b"peer" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _committed(run_dir: Path) -> int:
    ledger = run_dir / "swarm" / "ledger.jsonl"
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0


def _run(run_dir: Path, fault: str | None, kill_after_s: float | None, rng: random.Random) -> tuple[int, str, bool]:
    """One local SWARM run; `fault` goes to every peer's environment, `kill_after_s` SIGKILLs a random peer
    that long after the first commit. Returns (exit status, output, whether a kill from outside was sent)."""
    sent = False
    env = child_env(**({"MESHWEAVE_SWARM_FAULT": fault} if fault else {}))
    proc = subprocess.Popen(meshweave("train", *as_args(swarm_config(run_dir, STEPS, LAYERS))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after_s is not None:
        deadline = time.monotonic() + 180
        while _committed(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(kill_after_s)
        pids = _peer_pids(proc.pid)
        if pids and _committed(run_dir) < STEPS:
            os.kill(rng.choice(pids), signal.SIGKILL)
            sent = True
    out, _ = proc.communicate(timeout=300)
    logs = "".join(p.read_text() for p in sorted((run_dir / "swarm").glob("peer-index*.log")))
    return proc.returncode, out + logs, sent


def _trial(kind: str, rng: random.Random, ref: dict) -> dict:
    step, index = rng.randrange(1, STEPS - 1), rng.randrange(PEERS)
    fault = None if kind == "outside" else f"kill:point={kind}:step={step}:index={index}"
    kill_after = rng.uniform(0.1, 0.8) if kind == "outside" else None
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        code, output, sent = _run(run_dir, fault, kill_after, rng)
        wall = time.perf_counter() - start
        run = read_run(run_dir, code, output)
    last = run.ledger[-1] if run.ledger else {}  # the coordinator's counters are cumulative in each entry
    gaps = sorted(b["time"] - a["time"] for a, b in zip(run.ledger, run.ledger[1:]))
    result = {"kind": kind, "fault": fault or f"SIGKILL from outside {kill_after:.2f} s after the first commit",
              "killed": sent if kind == "outside" else f"injected kill at {kind}" in output,
              "exit": code, "wall_s": wall, "failures": last.get("failures", 0),
              "recovery_s": last.get("recoveries_s", []),  # abort -> next commit (the coordinator's figure)
              "longest_gap_s": gaps[-1] if gaps else None, "median_gap_s": gaps[len(gaps) // 2] if gaps else None}
    try:
        assert code == 0, f"exit status {code}"
        assert_exactly_once(run, STEPS, stages=2)
        assert_matches_reference(run, ref)
        result["passed"], result["problem"] = True, ""
    except AssertionError as err:
        result["passed"], result["problem"] = False, str(err).splitlines()[0][:300] if str(err) else "assertion"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per kind of kill")
    parser.add_argument("--quick", action="store_true", help="one trial per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("MESHWEAVE_BENCH_OUT", "benchmarks/results"))
    args = parser.parse_args()
    trials = 1 if args.quick else args.trials
    rng = random.Random(args.seed)
    started = time.perf_counter()
    ref = reference(LAYERS, STEPS)
    results = []
    for kind in (*POINTS, "outside"):
        for i in range(trials):
            res = _trial(kind, rng, ref)
            results.append(res)
            print(f"{kind} {i + 1}/{trials}: {'pass' if res['passed'] else 'FAIL ' + res['problem']} "
                  f"({res['fault']}; {res['wall_s']:.1f} s)", flush=True)
    write(results, trials, args, time.perf_counter() - started, Path(args.out))


def _median(values: list[float | None]) -> str:
    real = sorted(v for v in values if v is not None)
    return f"{real[len(real) // 2]:.2f}" if real else "-"


def write(results: list[dict], trials: int, args: argparse.Namespace, wall: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# SWARM kill drills, repeated with random timing", "",
             (f"{STEPS} steps, 2 stages x 2 peers, 4 microbatches per step; one peer SIGKILLed per run; {trials} trial(s) "
              f"per kind, seed {args.seed}. A pass: exit 0, exactly-once ledger, losses (rtol 2e-5) and every peer's final "
              "weights equal to one process (tests/swarm_support.py)."), "",
             ("Longest gap: the longest time between two commits of a run (the kill's detection and the redo); a "
              "step takes the median gap otherwise. Recovery: from the abort to the next commit (the ledger's figure)."), "",
             ("| kill | trials | kills landed | passed | peers declared dead | longest gap s (median) | median gap s | "
              "recovery s (median) | run s (median) |"), "|---|---|---|---|---|---|---|---|---|"]
    for kind in (*POINTS, "outside"):
        mine = [r for r in results if r["kind"] == kind]
        lines.append(f"| {kind} | {len(mine)} | {sum(bool(r['killed']) for r in mine)} | {sum(r['passed'] for r in mine)} | "
                     f"{sum(r['failures'] for r in mine)} | {_median([r['longest_gap_s'] for r in mine])} | "
                     f"{_median([r['median_gap_s'] for r in mine])} | {_median([t for r in mine for t in r['recovery_s']])} | "
                     f"{_median([r['wall_s'] for r in mine])} |")
    failed = [r for r in results if not r["passed"]]
    lines += ["", f"{len(results) - len(failed)} of {len(results)} trials passed."]
    lines += [f"- FAILED: {r['fault']}: {r['problem']}" for r in failed]
    lines += ["", "Each trial: " + "; ".join(f"{r['kind']}: {r['fault']}" for r in results) + ".", "",
              (f"Command: `python benchmarks/swarm_drills.py {' '.join(sys.argv[1:])}`; wall {wall:.0f} s; load average at "
               f"the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}."), ""]
    (out / "swarm_drills.md").write_text("\n".join(lines))
    (out / "swarm_drills.json").write_text(json.dumps({"steps": STEPS, "trials": trials, "seed": args.seed,
                                                       "results": results, "wall_s": wall}, indent=1))
    print("\n".join(lines))
    print(f"Markdown: {out / 'swarm_drills.md'}\nJSON: {out / 'swarm_drills.json'}")


if __name__ == "__main__":
    main()
