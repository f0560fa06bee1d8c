"""SWARM fault-tolerant pipelines: routing and rebalancing rules, and whole runs against one process.

Every run's committed losses and every peer's final weights must equal the same model trained by
`meshweave train` in one process on the same global batches (fp32 summation order aside), and the
ledger must show each microbatch of each committed step served exactly once by every stage.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from meshweave.launch.cli import main
from meshweave.swarm.coordinator import ledger_problem
from meshweave.swarm.rebalance import best_move
from meshweave.swarm.routing import ThroughputEMA, draw_routes, split_counts
from tests.swarm_support import (
    SeparateSwarm,
    assert_exactly_once,
    assert_matches_reference,
    reference,
    run_local,
    swarm_config,
)

STEPS = 6


@pytest.fixture(scope="module")
def ref2():
    return reference(layers=2, steps=STEPS)


# -- rules (torch-free) ------------------------------------------------------------------------------------
def test_split_counts_follow_the_weights_and_use_every_item():
    rng = random.Random(0)
    assert split_counts(4, [1.0, 1.0], rng) == [2, 2]
    assert split_counts(8, [3.0, 1.0], rng) == [6, 2]
    for _ in range(200):
        weights = [rng.uniform(0.1, 5) for _ in range(rng.randint(1, 5))]
        n = rng.randint(0, 40)
        counts = split_counts(n, weights, rng)
        assert sum(counts) == n
        for c, w in zip(counts, weights):
            assert abs(c - n * w / sum(weights)) < 1 + 1e-9


def test_routes_are_the_same_for_every_caller_and_weighted_by_throughput():
    peers, rates = [[0, 1], [2, 3, 4]], {0: 1.0, 1: 3.0, 2: 1.0, 3: 1.0, 4: 2.0}
    a = draw_routes(peers, rates, 12, seed=7, step=3, attempt=0)
    assert a == draw_routes(peers, rates, 12, seed=7, step=3, attempt=0)
    assert a != draw_routes(peers, rates, 12, seed=7, step=3, attempt=1)  # a redo gets new wiring
    served = Counter(p for route in a for p in route)
    assert (served[0], served[1]) == (3, 9) and (served[2], served[3], served[4]) == (3, 3, 6)
    assert all(route[0] in (0, 1) and route[1] in (2, 3, 4) for route in a)
    # the wiring itself is random: over many steps every pairing of stage peers occurs
    pairs = {tuple(r) for step in range(50) for r in draw_routes(peers, rates, 12, 7, step, 0)}
    assert pairs == {(a, b) for a in (0, 1) for b in (2, 3, 4)}


def test_throughput_ema_is_bias_corrected_and_counts_samples():
    ema = ThroughputEMA()
    assert ema.seconds is None and ema.rate(default=5.0) == 5.0
    ema.update(0.5)
    assert ema.seconds == pytest.approx(0.5) and ema.rate(1.0) == pytest.approx(2.0) and ema.samples == 1
    for _ in range(100):
        ema.update(2.0)
    assert ema.seconds == pytest.approx(2.0, rel=1e-3)


def test_rebalance_moves_a_peer_to_the_bottleneck_only_past_the_gain():
    rates = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    move = best_move([[0, 1, 2], [3]], rates, gain=1.25, min_peers=1)
    assert move is not None and move.target == 1 and move.source == 0
    assert move.old_bottleneck == pytest.approx(1.0) and move.new_bottleneck == pytest.approx(2.0)
    assert best_move([[0, 1], [2, 3]], rates, gain=1.25, min_peers=1) is None  # balanced: stay
    assert best_move([[0, 1, 2], [3]], rates, gain=2.5, min_peers=1) is None  # below the gain: hysteresis
    assert best_move([[0, 1], [3]], {0: 1.0, 1: 1.0, 3: 1.0}, gain=1.25, min_peers=2) is None  # keep min_peers
    # a stage twice as costly (its peers half as fast) is the bottleneck even with equal peer counts
    slow_stage = {0: 2.0, 1: 2.0, 2: 2.0, 3: 0.5, 4: 0.5}
    move = best_move([[0, 1, 2], [3, 4]], slow_stage, gain=1.25, min_peers=1)
    assert move is not None and move.target == 1 and move.new_bottleneck == pytest.approx(1.5)


def test_ledger_check_refuses_a_microbatch_served_twice_or_never():
    plan = {"routes": [[0, 2], [1, 3]]}
    good = {0: {"stage": 0, "done": [0]}, 1: {"stage": 0, "done": [1]}, 2: {"stage": 1, "done": [0]},
            3: {"stage": 1, "done": [1]}}
    assert ledger_problem(plan, good, 2) is None
    twice = {**good, 3: {"stage": 1, "done": [0]}}
    assert "stage 1 served microbatches [0, 0]" in ledger_problem(plan, twice, 2)


@pytest.mark.parametrize("setting, message", [
    ("fault_tolerance.stages=3", "does not divide the model's 2 layers"),
    ("fault_tolerance.peers=[2]", "must list >= 1 peer for each of the 2 stages"),
    ("fault_tolerance.microbatches=3", "does not divide train.global_batch 8"),
    ("fault_tolerance.dead_after_s=100", "need heartbeat_s < dead_after_s < transfer_timeout_s"),
    ("parallel.tp=2", "leave dp, tp, pp and sp at 1"),
])
def test_bad_swarm_configs_are_one_line_errors(tmp_path, capsys, setting, message):
    overrides = swarm_config(tmp_path, STEPS, extra=[setting])
    assert main(["train", *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "swarm").exists()


# -- whole runs -----------------------------------------------------------------------------------------------
def test_two_stages_two_peers_equal_one_process_and_a_slowed_peer_loses_routing_share(tmp_path):
    """One run of 2+2 peers, peer 0 three times slower: the committed losses and weights equal one process, every
    peer served microbatches, and the slow peer's share falls to about its speed. (Two runs before, a plain one
    and a slowed one: every peer process of a run costs seconds of start-up on the loaded 2-core suite, and
    slowing a peer changes the routing, never the arithmetic.)"""
    steps = 10
    ref = reference(layers=2, steps=steps)
    run = run_local(tmp_path, swarm_config(tmp_path, steps), MESHWEAVE_SWARM_FAULT="slow:factor=3:index=0")
    assert run.returncode == 0, run.output[-3000:]
    assert_exactly_once(run, steps, stages=2)
    assert_matches_reference(run, ref)
    assert "peers 2+2" in run.output
    # both peers of each stage did work: the routes spread the microbatches
    used = {p for e in run.ledger for by_stage in e["served"].values() for p in by_stage.values()}
    assert len(used) == 4
    peers = run.ledger[-1]["peers"]
    slow = next(p for p, info in peers.items() if info["index"] == "0")
    stage = str(peers[slow]["stage"])
    late = run.ledger[-4:]
    share = sum(by_stage[stage] == int(slow) for e in late for by_stage in e["served"].values()) / (4 * len(late))
    assert share <= 0.25 + 1e-9, (share, run.output[-2000:])  # equal share would be 0.5; 3x slower -> ~0.25


@pytest.mark.parametrize("point", ["backward", pytest.param("forward", marks=pytest.mark.slow),
                                   pytest.param("allreduce", marks=pytest.mark.slow),
                                   pytest.param("commit", marks=pytest.mark.slow)])
def test_a_peer_killed_mid_step_is_survived_with_every_sample_applied_once(tmp_path, ref2, point):
    step = random.Random(point).randint(1, STEPS - 2)  # random timing, reproducible per point
    run = run_local(tmp_path, swarm_config(tmp_path, STEPS), MESHWEAVE_SWARM_FAULT=f"kill:point={point}:step={step}:index=1")
    assert run.returncode == 0, run.output[-4000:]
    assert f"injected kill at {point} of step {step}" in run.output
    assert run.ledger[-1]["failures"] == 1
    if point != "commit":  # killed after its stage committed, the peer's step still counts once
        assert run.ledger[step]["attempt"] >= 1, run.output[-3000:]
    assert_exactly_once(run, STEPS, stages=2)
    assert_matches_reference(run, ref2)
    assert len(run.peers) == 3


@pytest.mark.slow
def test_three_stages_uneven_peers_equal_one_process(tmp_path):
    ref = reference(layers=3, steps=STEPS)
    run = run_local(tmp_path, swarm_config(tmp_path, STEPS, layers=3, stages=3, peers="[2,1,2]"))
    assert run.returncode == 0, run.output[-3000:]
    assert_exactly_once(run, STEPS, stages=3)
    assert_matches_reference(run, ref)


@pytest.mark.slow
def test_a_starved_stage_gains_a_peer_and_the_weights_stay_exact(tmp_path):
    ref = reference(layers=2, steps=8)
    run = run_local(tmp_path, swarm_config(tmp_path, 8, peers="[3,1]", extra=["fault_tolerance.rebalance_every_s=0.5"]))
    assert run.returncode == 0, run.output[-3000:]
    assert run.ledger[0]["peers_per_stage"] == "3+1" and run.ledger[-1]["peers_per_stage"] == "2+2", run.output[-3000:]
    assert run.ledger[-1]["moves"] == 1
    assert "moves from stage 0 to stage 1" in run.output
    assert_exactly_once(run, 8, stages=2)
    assert_matches_reference(run, ref)


@pytest.mark.slow
def test_a_killed_peer_restarted_with_the_same_command_rejoins(tmp_path):
    steps = 40
    ref = reference(layers=2, steps=steps)
    swarm = SeparateSwarm(tmp_path, swarm_config(tmp_path, steps))
    paced = "slow:seconds=0.5"  # ~2 s per step, so that the run is still going when the restarted peers are up
    try:
        swarm.start_coordinator()
        victim = swarm.start_peer(MESHWEAVE_SWARM_FAULT="kill:point=forward:step=3")
        for _ in range(3):
            swarm.start_peer(MESHWEAVE_SWARM_FAULT=paced)
        assert victim.wait(timeout=120) == -9
        # the same command again, twice at once: one is killed while it receives its stage's state, one stays
        doomed = swarm.start_peer(MESHWEAVE_SWARM_FAULT="kill:point=join:step=any")
        swarm.start_peer(MESHWEAVE_SWARM_FAULT=paced)
        assert doomed.wait(timeout=180) == -9, swarm.output()[-3000:]
        run = swarm.finish()
    finally:
        swarm.kill_all()
    assert run.returncode == 0, run.output[-4000:]
    assert "injected kill at join" in run.output
    assert run.ledger[-1]["joins"] == 2 and run.ledger[-1]["failures"] == 2, run.output[-3000:]
    assert "joins stage" in run.output
    assert_exactly_once(run, steps, stages=2)
    assert_matches_reference(run, ref)  # includes: the rejoined peer equals its stage's other peer bitwise
    assert len(run.peers) == 4


def _newest_step(run_dir) -> int:
    """The newest committed step (1-based) in the ledger, or 0."""
    path = run_dir / "swarm" / "ledger.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] + 1 for line in lines if '"step"' in line), default=0)


@pytest.mark.slow
def test_a_restarted_coordinator_resumes_and_a_stage_that_loses_every_peer_resumes_from_its_snapshot(tmp_path):
    """One run of separate processes, two drills: the coordinator is killed and restarted with the same command
    (the peers reconnect and the run resumes at the step it had committed); later the only peer of stage 1 is
    killed, the run pauses until a new peer joins, and every stage rolls back to the newest stage snapshot.
    (Two runs of their own before: each start of a coordinator and peers costs most of a minute of the loaded
    suite.)"""
    steps = 12
    ref = reference(layers=2, steps=steps)
    swarm = SeparateSwarm(tmp_path, swarm_config(tmp_path, steps, peers="[2,1]",
                                                 extra=["fault_tolerance.snapshot_every=2"]))
    try:
        swarm.start_coordinator()
        for _ in range(3):
            swarm.start_peer()
        entry = swarm.wait_for_step(3)
        lone = next(int(info["index"]) for info in entry["peers"].values() if info["stage"] == 1)
        swarm.coordinator.kill()
        swarm.coordinator.wait()
        restarted_at = _newest_step(tmp_path)
        swarm.start_coordinator()
        deadline = time.monotonic() + 120
        while _newest_step(tmp_path) < restarted_at + 2:  # the restarted coordinator commits again
            assert swarm.coordinator.poll() is None and time.monotonic() < deadline, swarm.output()[-3000:]
            time.sleep(0.05)
        swarm.peers[lone].kill()
        swarm.peers[lone].wait()
        deadline = time.monotonic() + 60
        while "paused at step" not in swarm.output():
            assert time.monotonic() < deadline, swarm.output()[-3000:]
            time.sleep(0.2)
        swarm.start_peer()
        run = swarm.finish()
    finally:
        swarm.kill_all()
    assert run.returncode == 0, run.output[-4000:]
    assert "coordinator resumes at step" in run.output
    assert "resuming from the stage snapshots of step" in run.output
    assert_exactly_once(run, steps, stages=2)
    assert_matches_reference(run, ref)
