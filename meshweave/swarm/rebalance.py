"""When to move a peer to another stage (torch-free): Petals' rule with SWARM's goal.

The pipeline runs at the pace of its slowest stage, whose capacity is the sum of its peers'
microbatches per second. A peer's speed on another stage is estimated from its own speed relative
to its stage's mean, times the other stage's mean rate (stages cost differently). A move is made
only if the new bottleneck capacity beats the old by `gain` (hysteresis against oscillation), the
source keeps `min_peers`, and no stage is left empty; the caller enforces the time between moves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    peer: int
    source: int
    target: int
    old_bottleneck: float  # microbatches per second of the slowest stage, before
    new_bottleneck: float  # and after the move


def stage_capacity(stage_peers: list[list[int]], rates: dict[int, float]) -> list[float]:
    return [sum(rates[p] for p in peers) for peers in stage_peers]


def _mean_rate(peers: list[int], rates: dict[int, float]) -> float:
    return sum(rates[p] for p in peers) / len(peers)


def best_move(stage_peers: list[list[int]], rates: dict[int, float], gain: float, min_peers: int) -> Move | None:
    """The single peer move that most raises the bottleneck capacity, if it raises it by `gain`x."""
    capacity = stage_capacity(stage_peers, rates)
    old = min(capacity)
    means = [_mean_rate(peers, rates) if peers else 0.0 for peers in stage_peers]
    best: Move | None = None
    for source, peers in enumerate(stage_peers):
        if len(peers) <= min_peers:
            continue
        for peer in peers:
            relative = rates[peer] / means[source]
            for target in range(len(stage_peers)):
                if target == source or means[target] <= 0:
                    continue
                moved = list(capacity)
                moved[source] -= rates[peer]
                moved[target] += relative * means[target]
                new = min(moved)
                if new >= gain * old and (best is None or new > best.new_bottleneck):
                    best = Move(peer, source, target, old, new)
    return best
