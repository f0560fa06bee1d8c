"""Running SWARM drills from tests: a local run through `meshweave train`, or a coordinator and peers as
separate processes; reading the ledger and the peers' final weights; the one-process reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meshweave.launch.env import free_port
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import SMALL_TEST_CONFIG
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config

FAST_TIMEOUTS = ["fault_tolerance.heartbeat_s=0.25", "fault_tolerance.dead_after_s=5",
                 "fault_tolerance.transfer_timeout_s=20", "fault_tolerance.rebalance_every_s=0"]


def swarm_config(run_dir: Path, steps: int, layers: int = 2, stages: int = 2, peers: str = "[2,2]",
                 extra: list[str] | None = None) -> list[str]:
    return [*SMALL_TEST_CONFIG, f"model.n_layers={layers}", f"train.steps={steps}", f"run_dir={run_dir}",
            "fault_tolerance.mode=swarm", f"fault_tolerance.stages={stages}", f"fault_tolerance.peers={peers}",
            "fault_tolerance.microbatches=4", "logging.every_steps=1", *FAST_TIMEOUTS, *(extra or [])]


def as_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def meshweave(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshweave", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHWEAVE_SWARM_FAULT", "MESHWEAVE_SWARM_INDEX")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@dataclass
class SwarmRun:
    returncode: int
    output: str
    ledger: list[dict[str, Any]]
    peers: list[dict[str, Any]]  # each peer's final {"stage", "step", "params"}

    @property
    def losses(self) -> list[float]:
        return [e["loss"] for e in self.ledger]


def read_run(run_dir: Path, returncode: int, output: str) -> SwarmRun:
    ledger_path = run_dir / "swarm" / "ledger.jsonl"
    ledger: list[dict[str, Any]] = []
    for line in ledger_path.read_text().splitlines() if ledger_path.exists() else []:
        entry = json.loads(line)
        if "rolled_back_to" in entry:  # steps after a restored snapshot were redone: keep the redo
            ledger = [e for e in ledger if e["step"] < entry["rolled_back_to"]]
        else:
            ledger.append(entry)
    peers = [torch.load(p, weights_only=True) for p in sorted((run_dir / "swarm" / "peers").glob("*.pt"))] \
        if (run_dir / "swarm" / "peers").exists() else []
    return SwarmRun(returncode, output, ledger, peers)


def run_local(run_dir: Path, overrides: list[str], timeout: float = 240, **env: str) -> SwarmRun:
    """`meshweave train` with fault_tolerance.mode: swarm (coordinator here, peers as processes)."""
    proc = subprocess.run(meshweave("train", *as_args(overrides)), capture_output=True, text=True, timeout=timeout, check=False,
                          env=child_env(**env))
    logs = "".join(p.read_text() for p in sorted((run_dir / "swarm").glob("peer-index*.log")))
    return read_run(run_dir, proc.returncode, proc.stdout + proc.stderr + logs)


class SeparateSwarm:
    """`meshweave swarm coordinator` and `meshweave swarm peer` processes started one by one (a cluster's way)."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.run_dir = run_dir
        self.overrides = [*overrides, f"fault_tolerance.coordinator=127.0.0.1:{free_port()}"]
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.coordinator: subprocess.Popen | None = None
        self.peers: list[subprocess.Popen] = []

    def _start(self, role: str, name: str, **env: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(meshweave("swarm", role, *as_args(self.overrides)), stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(**env))

    def start_coordinator(self) -> None:
        self.coordinator = self._start("coordinator", f"coordinator-{time.monotonic_ns()}")

    def start_peer(self, **env: str) -> subprocess.Popen:
        env = {"MESHWEAVE_SWARM_INDEX": str(len(self.peers)), **env}
        proc = self._start("peer", f"peer-{len(self.peers)}", **env)
        self.peers.append(proc)
        return proc

    def wait_for_step(self, step: int, timeout: float = 120) -> dict[str, Any]:
        """The ledger entry of committed step `step` (1-based), once it is there."""
        ledger = self.run_dir / "swarm" / "ledger.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = ledger.read_text().splitlines() if ledger.exists() else []
            if len(lines) >= step:
                return json.loads(lines[step - 1])
            time.sleep(0.1)
        raise TimeoutError(f"the swarm did not commit step {step} within {timeout} s:\n{self.output()}")

    def finish(self, timeout: float = 240) -> SwarmRun:
        assert self.coordinator is not None
        try:
            code = self.coordinator.wait(timeout=timeout)
            for p in self.peers:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:  # a peer that never got in waits for a coordinator: stop it
                    p.kill()
        finally:
            self.kill_all()
        return read_run(self.run_dir, code, self.output())

    def kill_all(self) -> None:
        for p in [self.coordinator, *self.peers]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def output(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*.log")))


def _train_one_process(overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(load_config(None, [*SMALL_TEST_CONFIG, *overrides, f"run_dir={run_dir}"]))
        losses = trainer.train()
        params = {n: p.detach().clone() for part in trainer.p.model_parts for n, p in part.named_parameters()}
        trainer.p.mesh.close()
        return {"losses": losses, "params": params}


def reference(layers: int, steps: int) -> dict[str, Any]:
    """Losses and final weights of the same model on the same global batches in one process (`train`)."""
    return run_distributed(_train_one_process, 1, [f"model.n_layers={layers}", f"train.steps={steps}"])[0]


def assert_exactly_once(run: SwarmRun, steps: int, stages: int, microbatches: int = 4) -> None:
    """The ledger: steps 0..steps-1 committed once each, every microbatch served once by every stage."""
    assert [e["step"] for e in run.ledger] == list(range(steps)), run.output[-3000:]
    for entry in run.ledger:
        assert sorted(entry["served"]) == sorted(str(m) for m in range(microbatches))
        for m, by_stage in entry["served"].items():
            assert sorted(by_stage) == [str(s) for s in range(stages)], (entry["step"], m, by_stage)


def assert_matches_reference(run: SwarmRun, ref: dict[str, Any], rtol: float = 2e-5) -> None:
    """Losses of the committed steps and every peer's final weights equal one process's (fp32 sums)."""
    n = len(ref["losses"])
    torch.testing.assert_close(torch.tensor(run.losses[:n], dtype=torch.float64),
                               torch.tensor(ref["losses"], dtype=torch.float64), rtol=rtol, atol=0)
    assert run.peers, "no peer wrote its final weights"
    by_stage: dict[int, dict[str, torch.Tensor]] = {}
    for peer in run.peers:
        first = by_stage.setdefault(peer["stage"], peer["params"])
        for name, value in peer["params"].items():
            torch.testing.assert_close(value, first[name], rtol=0, atol=0)  # peers of a stage: bitwise equal
            torch.testing.assert_close(value, ref["params"][name], rtol=1e-4, atol=1e-5)
    held = {name for params in by_stage.values() for name in params}
    assert held == set(ref["params"]), "the stages together must hold the whole model"
