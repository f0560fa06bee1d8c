"""The SWARM coordinator: membership, per-step plans, failure detection, commit, joins and rebalancing.

One small process owns the truth (peers, their stage and speed, the step) and hosts the TCPStore the
peers talk through. Per attempt of a step it publishes a plan (routes drawn from the seed and the
peers' throughput), then waits for every member's vote. It commits only when every member voted ok
and every microbatch was served exactly once by every stage (the ledger check); a dead peer (no
heartbeat for dead_after_s) or a failed transfer aborts the attempt, and the step is redone on the
live peers under a new epoch. Joins and moves happen only between steps. Its state is a small JSON
file written before each decision is published, so a restarted coordinator resumes the run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshweave.core.schema import Config
from meshweave.swarm import control as ctl
from meshweave.swarm import snapshots
from meshweave.swarm.rebalance import best_move
from meshweave.swarm.routing import ThroughputEMA, draw_routes

MIN_SAMPLES_TO_MOVE = 3  # steps measured on every peer before rebalancing trusts the rates


class SwarmStopped(RuntimeError):
    """The run cannot go on (a stage lost every peer and none joined in time)."""


@dataclass
class PeerInfo:
    stage: int
    index: str | None = None  # MESHWEAVE_SWARM_INDEX of a locally launched peer (drills target peers by it)
    ema: ThroughputEMA = field(default_factory=ThroughputEMA)
    last_beat: int = -1
    last_beat_at: float = field(default_factory=time.monotonic)


@dataclass
class Counters:
    failures: int = 0
    aborted_attempts: int = 0
    rerouted_microbatches: int = 0
    joins: int = 0
    moves: int = 0
    recoveries_s: list[float] = field(default_factory=list)


class Coordinator:
    def __init__(self, cfg: Config, state_dir: str | None = None) -> None:
        self.cfg, self.ft = cfg, cfg.fault_tolerance
        self.microbatches = self.ft.microbatches or cfg.train.global_batch
        self.dir = Path(state_dir or os.path.join(cfg.run_dir, "swarm"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = ctl.host_store(self.ft.coordinator)
        self.members: dict[int, PeerInfo] = {}
        self.known: set[int] = set()
        self.step, self.epoch, self.attempt, self.round = 0, 0, 0, 0
        self.last_commit: dict[str, Any] | None = None
        self.counters = Counters()
        self.last_move_at = time.monotonic()
        self.failed_at: float | None = None
        self.losses: list[float] = []
        self.joining: dict[int, dict[str, Any]] = {}
        self.restore: dict[str, int] | None = None  # the snapshot every peer loads before the next commit
        self.pauses = 0
        self.presumed_dead: dict[int, PeerInfo] = {}  # removed for silence; they rejoin if they beat again
        self.unsynced: set[int] = set()  # joined or moved peers that still need their stage's state
        self.restarted = self._load_state()

    # -- persisted state ---------------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.dir / "coordinator.json"

    def _save_state(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "round": self.round, "last_commit": self.last_commit, "losses": self.losses,
                 "members": {str(p): {"stage": i.stage, "seconds": i.ema.seconds} for p, i in self.members.items()},
                 "next_peer": max(self.known, default=-1) + 1}
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path())

    def _load_state(self) -> bool:
        if not self._state_path().exists():
            return False
        state = json.loads(self._state_path().read_text())
        self.step, self.epoch, self.last_commit = state["step"], state["epoch"] + 1, state["last_commit"]
        self.round = state["round"] + 1
        self.losses = state["losses"]
        self.store.add(ctl.NEXT_PEER, state["next_peer"])
        self.previous_members = {int(p): v for p, v in state["members"].items()}
        print(f"meshweave swarm: coordinator resumes at step {self.step}; waiting for "
              f"{len(self.previous_members)} peers to reconnect", file=sys.stderr, flush=True)
        return True

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> int:
        self._log_path = self.dir / "ledger.jsonl"
        if self.restarted:
            self._readmit()
        else:
            self._await_initial_peers()
        while self.step < self.cfg.train.steps:
            if not self.members or self._empty_stages():
                self._pause_for_peers()
            self._between_steps()
            self._run_step()
        ctl.put(self.store, ctl.CURRENT, {"done": True})
        time.sleep(max(1.0, 3 * self.ft.heartbeat_s))  # let peers read "done" before the store goes away
        return 0

    def _hellos(self) -> dict[int, dict[str, Any]]:
        n = int(self.store.add(ctl.NEXT_PEER, 0))
        found = {}
        for peer in range(n):
            if peer not in self.known:
                hello = ctl.get(self.store, ctl.hello_key(peer))
                if hello is not None:
                    found[peer] = hello
        return found

    def _await_initial_peers(self) -> None:
        """Start once the configured number of peers registered (or every stage has one after the wait)."""
        wanted = sum(self.ft.peers)
        deadline = time.monotonic() + self.ft.wait_for_peers_s
        while True:
            for peer, hello in self._hellos().items():
                self.known.add(peer)
                self.members[peer] = PeerInfo(self._initial_stage(), hello.get("index"))
            if len(self.members) >= wanted or (time.monotonic() > deadline and not self._empty_stages()):
                break
            if time.monotonic() > deadline * 2:
                raise SwarmStopped(f"only {len(self.members)} of {wanted} peers registered")
            time.sleep(0.05)
        self.epoch += 1
        self._say(f"{len(self.members)} peers: {self._stage_counts()} per stage")

    def _initial_stage(self) -> int:
        """The configured peers per stage, filled in order of registration."""
        counts = [0] * self.ft.stages
        for info in self.members.values():
            counts[info.stage] += 1
        wanted = list(self.ft.peers) + [1] * (self.ft.stages - len(self.ft.peers))
        short = [s for s in range(self.ft.stages) if counts[s] < wanted[s]]
        return short[0] if short else min(range(self.ft.stages), key=lambda s: counts[s])

    def _readmit(self) -> None:
        """After a restart: take back the peers that reconnect within dead_after_s, at the step they hold."""
        deadline = time.monotonic() + max(3 * self.ft.dead_after_s, 2.0)
        while time.monotonic() < deadline and len(self.members) < len(self.previous_members):
            for peer, hello in self._hellos().items():
                self.known.add(peer)
                old = self.previous_members.get(peer)
                applied = hello.get("applied_step", 0)
                caught_up = applied == self.step or (self.last_commit is not None and applied == self.last_commit["step"]
                                                     and hello.get("pending_step") == self.last_commit["step"])
                if old is not None and hello.get("stage") == old["stage"] and caught_up:
                    self.members[peer] = PeerInfo(old["stage"], hello.get("index"),
                                                  ThroughputEMA.restored(old["seconds"]))
                else:
                    self.joining[peer] = hello
            time.sleep(0.05)
        self._say(f"{len(self.members)} peers reconnected: {self._stage_counts()} per stage")

    # -- between steps: joins and moves --------------------------------------------------------------------
    def _between_steps(self) -> None:
        self._revive()
        for peer, hello in self._hellos().items():
            self.known.add(peer)
            self.joining[peer] = hello
        for peer in list(self.joining):
            self._admit(peer, self.joining[peer].get("index"))
            del self.joining[peer]
        if self.ft.rebalance_every_s > 0 and time.monotonic() - self.last_move_at >= self.ft.rebalance_every_s:
            self._maybe_move()

    def _revive(self) -> None:
        """A peer removed for silence that beats again (a stall, not a death) rejoins like a new peer."""
        for peer, info in list(self.presumed_dead.items()):
            key = ctl.heartbeat_key(peer)
            beat = int(self.store.get(key)) if self.store.check([key]) else info.last_beat
            if beat != info.last_beat:
                del self.presumed_dead[peer]
                self.joining[peer] = {"index": info.index}
                self._say(f"peer {peer} answers again after being declared dead; it rejoins")

    def _admit(self, peer: int, index: str | None) -> None:
        stage = self._bottleneck_stage()
        self.members[peer] = PeerInfo(stage, index)
        if self.step > 0:
            self.unsynced.add(peer)
        self.counters.joins += 1
        self.epoch += 1
        self._say(f"peer {peer} joins stage {stage}")

    def _rates(self) -> dict[int, float]:
        known = [i.ema.seconds for i in self.members.values() if i.ema.seconds]
        default = 1.0 / (sum(known) / len(known)) if known else 1.0
        return {p: i.ema.rate(default) for p, i in self.members.items()}

    def _stage_peers(self) -> list[list[int]]:
        return [sorted(p for p, i in self.members.items() if i.stage == s) for s in range(self.ft.stages)]

    def _bottleneck_stage(self) -> int:
        peers, rates = self._stage_peers(), self._rates()
        return min(range(self.ft.stages), key=lambda s: (sum(rates[p] for p in peers[s]), len(peers[s]), s))

    def _maybe_move(self) -> None:
        if any(i.ema.samples < MIN_SAMPLES_TO_MOVE for i in self.members.values()):
            return  # measure every peer a few times first
        move = best_move(self._stage_peers(), self._rates(), self.ft.rebalance_gain, self.ft.min_peers_per_stage)
        if move is None:
            return
        self.members[move.peer] = PeerInfo(move.target, self.members[move.peer].index)
        self.unsynced.add(move.peer)
        self.counters.moves += 1
        self.last_move_at = time.monotonic()
        self.epoch += 1
        self._say(f"peer {move.peer} moves from stage {move.source} to stage {move.target} (bottleneck "
                  f"{move.old_bottleneck:.2f} -> {move.new_bottleneck:.2f} microbatches/s)")

    # -- one step ------------------------------------------------------------------------------------------
    def _run_step(self) -> None:
        plan = self._plan()
        ctl.put(self.store, ctl.plan_key(self.round), plan)
        ctl.put(self.store, ctl.CURRENT, {"round": self.round, "step": self.step, "attempt": self.attempt})
        outcome = self._collect(plan)
        if outcome is None:
            return
        self._commit(plan, outcome)

    def _plan(self) -> dict[str, Any]:
        routes = draw_routes(self._stage_peers(), self._rates(), self.microbatches, self.cfg.train.seed, self.step,
                             self.attempt)
        plan = {"round": self.round, "step": self.step, "attempt": self.attempt, "epoch": self.epoch,
                "members": {str(p): i.stage for p, i in self.members.items()}, "routes": routes,
                "transfers": self._transfers()}
        if self.restarted and self.last_commit is not None:
            plan["apply"] = self.last_commit
        plan["snapshot_writers"] = {str(s): min(ps) for s, ps in enumerate(self._stage_peers()) if ps}
        if self.restore is not None:
            plan["restore"] = self.restore
        return plan

    def _transfers(self) -> list[dict[str, int]]:
        """A donor for every peer that joined or moved since the last commit: the lowest-id synced peer of its stage."""
        transfers = []
        for peer in sorted(self.unsynced):
            stage = self.members[peer].stage
            donors = [p for p, i in self.members.items() if i.stage == stage and p not in self.unsynced]
            if not donors:
                raise SwarmStopped(f"stage {stage} has no live peer holding its weights to give to peer {peer}; "
                                   "restart the run from its last checkpoint")
            transfers.append({"donor": min(donors), "receiver": peer, "stage": stage})
        return transfers

    def _collect(self, plan: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
        """Every member's vote, or None after aborting the attempt (dead peer, failed transfer, bad ledger)."""
        votes: dict[int, dict[str, Any]] = {}
        while len(votes) < len(self.members):
            dead = self._dead_members()
            if dead:
                return self._abort(plan, f"peer(s) {dead} stopped answering", dead)
            for peer in self.members:
                if peer not in votes:
                    vote = ctl.get(self.store, ctl.vote_key(self.round, peer))
                    if vote is not None:
                        votes[peer] = vote
            failed = {p: v for p, v in votes.items() if not v["ok"]}
            if failed:
                reason = "; ".join(f"peer {p}: {v['error']}" for p, v in failed.items())
                suspects = {p for v in failed.values() for p in v.get("suspects", []) if p in self.members}
                return self._abort(plan, reason, self._confirm_dead(suspects))
            time.sleep(0.01)
        problem = ledger_problem(plan, votes, self.ft.stages)
        if problem:
            return self._abort(plan, problem, [])
        return votes

    def _dead_members(self) -> list[int]:
        now = time.monotonic()
        dead = []
        for peer, info in self.members.items():
            key = ctl.heartbeat_key(peer)
            beat = int(self.store.get(key)) if self.store.check([key]) else 0
            if beat != info.last_beat:
                info.last_beat, info.last_beat_at = beat, now
            elif now - info.last_beat_at > self.ft.dead_after_s:
                dead.append(peer)
        return dead

    def _confirm_dead(self, suspects: set[int]) -> list[int]:
        """The suspects of a failed transfer that are dead: wait until each either beats again or is declared
        dead (so the redo does not route through a peer that died a moment ago)."""
        if not suspects:
            return []
        beats = {p: self.members[p].last_beat for p in suspects}
        deadline = time.monotonic() + self.ft.dead_after_s + 1.0
        while time.monotonic() < deadline:
            dead = [p for p in self._dead_members() if p in suspects]
            alive = {p for p in suspects if self.members[p].last_beat != beats[p]}
            if len(dead) + len(alive) == len(suspects):
                return dead
            time.sleep(0.02)
        return []

    def _abort(self, plan: dict[str, Any], reason: str, dead: list[int]) -> None:
        ctl.put(self.store, ctl.decision_key(self.round), {"commit": False, "reason": reason})
        self.round += 1
        for peer in dead:
            self.presumed_dead[peer] = self.members.pop(peer)
        self.counters.failures += len(dead)
        self.counters.aborted_attempts += 1
        self.counters.rerouted_microbatches += self.microbatches
        self.failed_at = self.failed_at or time.monotonic()
        self.attempt += 1
        self.epoch += 1
        self.unsynced &= set(self.members)
        self._say(f"step {self.step + 1} attempt {self.attempt} aborted: {reason[:300]}; redoing it on "
                  f"{self._stage_counts()} peers per stage")

    def _commit(self, plan: dict[str, Any], votes: dict[int, dict[str, Any]]) -> None:
        by_stage: dict[int, float] = {}
        loss_sum, targets = 0.0, 1
        for peer, vote in votes.items():
            by_stage[vote["stage"]] = float.fromhex(vote["squared_norm"])
            loss_sum += sum(float.fromhex(v) for v in vote["losses"].values())
            targets = vote["targets"]
            if vote["seconds_per_microbatch"] is not None:
                self.members[peer].ema.update(vote["seconds_per_microbatch"])
        norm = math.sqrt(sum(by_stage.values()))
        loss = loss_sum / targets
        self.last_commit = {"step": self.step, "norm": norm.hex()}
        self.losses.append(loss)
        self._write_ledger(plan, votes, loss)
        self.step, self.attempt, self.restarted = self.step + 1, 0, False
        self.unsynced.clear()
        self.restore = None
        self._save_state()  # before the decision: a restarted coordinator must know this step committed
        ctl.put(self.store, ctl.decision_key(plan["round"]), {"commit": True, **self.last_commit})
        self.round += 1
        if self.failed_at is not None:
            self.counters.recoveries_s.append(time.monotonic() - self.failed_at)
            self.failed_at = None
        if self.step == 1:
            self.last_move_at = time.monotonic()  # the rebalancing period counts from the first commit
        self._progress(loss)

    def _write_ledger(self, plan: dict[str, Any], votes: dict[int, dict[str, Any]], loss: float) -> None:
        served = {str(m): {str(v["stage"]): p for p, v in votes.items() if m in v["done"]} for m in range(self.microbatches)}
        rates = self._rates()
        entry = {"step": plan["step"], "attempt": plan["attempt"], "epoch": plan["epoch"], "loss": loss,
                 "served": served, "peers_per_stage": self._stage_counts(),
                 "peers": {str(p): {"stage": i.stage, "index": i.index} for p, i in self.members.items()},
                 "stage_rate": [sum(rates[p] for p in ps) for ps in self._stage_peers()],
                 "time": time.time(), **self.counters.__dict__}
        with open(self._log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # -- pauses and messages ---------------------------------------------------------------------------------
    def _empty_stages(self) -> list[int]:
        return [s for s, peers in enumerate(self._stage_peers()) if not peers]

    def _pause_for_peers(self) -> None:
        """A stage has no peer: wait for peers to fill it, then roll every stage back to the newest snapshot."""
        empty = self._empty_stages()
        if self.step > 0 and not self.ft.snapshot_every:
            raise SwarmStopped(f"stage(s) {empty} lost every peer and their weights with them (set "
                               "fault_tolerance.snapshot_every to survive this); restart the run from its last checkpoint")
        self._say(f"stage(s) {empty} have no live peer: paused at step {self.step}; start a peer "
                  f"(`meshweave swarm peer CONFIG`) within {self.ft.wait_for_peers_s:g} s")
        deadline = time.monotonic() + self.ft.wait_for_peers_s
        while self._empty_stages():
            if time.monotonic() > deadline:
                raise SwarmStopped(f"stage(s) {self._empty_stages()} got no peer within {self.ft.wait_for_peers_s:g} s")
            for peer, hello in self._hellos().items():
                self.known.add(peer)
                self._admit(peer, hello.get("index"))
            time.sleep(0.05)
        if self.step > 0:
            self._roll_back()

    def _roll_back(self) -> None:
        step = snapshots.newest_common_step(self.cfg.run_dir, self.ft.stages)
        self.pauses += 1
        self.restore = {"step": step, "id": self.pauses}
        self._say(f"resuming from the stage snapshots of step {step}: steps {step + 1}..{self.step} are redone")
        with open(self.dir / "ledger.jsonl", "a") as f:
            f.write(json.dumps({"rolled_back_to": step, "from": self.step}) + "\n")
        self.step, self.attempt, self.losses = step, 0, self.losses[:step]
        self.unsynced.clear()
        self.epoch += 1

    def _stage_counts(self) -> str:
        return "+".join(str(len(p)) for p in self._stage_peers())

    def _progress(self, loss: float) -> None:
        every = max(1, self.cfg.logging.every_steps)
        if self.step % every == 0 or self.step == self.cfg.train.steps:
            c = self.counters
            self._say(f"step {self.step}/{self.cfg.train.steps} | loss {loss:.4f} | peers {self._stage_counts()} | "
                      f"failures {c.failures} rerouted {c.rerouted_microbatches} joins {c.joins} moves {c.moves}")

    @staticmethod
    def _say(text: str) -> None:
        print(f"meshweave swarm: {text}", flush=True)


def ledger_problem(plan: dict[str, Any], votes: dict[int, dict[str, Any]], stages: int) -> str | None:
    """Why the votes do not show every microbatch served exactly once by every stage (None if they do)."""
    for s in range(stages):
        served = sorted(m for v in votes.values() if v["stage"] == s for m in v["done"])
        if served != list(range(len(plan["routes"]))):
            return f"stage {s} served microbatches {served}, not each of 0..{len(plan['routes']) - 1} once"
    return None
