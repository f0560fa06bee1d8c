"""Which peer of each stage serves each microbatch: random, weighted by measured throughput (torch-free).

SWARM wires every microbatch through a temporary random pipeline, one peer per stage, with a peer's
chance proportional to its throughput. We draw the *counts* per peer by largest remainder of
M x share (so four microbatches over two equal peers are always split 2/2, not 4/0 one time in
eight) and then shuffle which microbatches go where: random wiring with the variance taken out.
Every peer derives the same routes from (seed, step, attempt), so none are sent over the wire twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

EMA_ALPHA = 0.1  # SWARM's PerformanceEMA


@dataclass
class ThroughputEMA:
    """Bias-corrected exponential moving average of seconds per microbatch (SWARM's PerformanceEMA)."""

    alpha: float = EMA_ALPHA
    _value: float = 0.0
    _weight: float = 0.0
    samples: int = 0

    def update(self, seconds_per_microbatch: float) -> None:
        self._value = (1 - self.alpha) * self._value + self.alpha * seconds_per_microbatch
        self._weight = (1 - self.alpha) * self._weight + self.alpha
        self.samples += 1

    @classmethod
    def restored(cls, seconds: float | None) -> ThroughputEMA:
        """An average that continues from a persisted value (as one well-measured sample)."""
        ema = cls()
        if seconds is not None:
            ema._value, ema._weight, ema.samples = seconds, 1.0, 1
        return ema

    @property
    def seconds(self) -> float | None:
        return self._value / self._weight if self._weight > 0 else None

    def rate(self, default: float) -> float:
        """Microbatches per second; `default` before any sample (a new peer is tried at the stage's mean)."""
        s = self.seconds
        return default if s is None or s <= 0 else 1.0 / s


def split_counts(n: int, weights: list[float], rng: random.Random) -> list[int]:
    """n items over len(weights) bins in proportion to the weights, by largest remainder (ties broken by rng)."""
    total = sum(weights)
    if not weights or total <= 0:
        raise ValueError("routing needs at least one peer with a positive weight")
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (exact[i] - counts[i], rng.random()), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def draw_routes(stage_peers: list[list[int]], rates: dict[int, float], microbatches: int, seed: int, step: int,
                attempt: int) -> list[list[int]]:
    """routes[m][s]: the peer id that serves microbatch m at stage s (same result on every caller)."""
    rng = random.Random(seed * 1_000_003 + step * 1_009 + attempt)
    per_stage: list[list[int]] = []
    for peers in stage_peers:
        counts = split_counts(microbatches, [rates[p] for p in peers], rng)
        column = [p for p, c in zip(peers, counts) for _ in range(c)]
        rng.shuffle(column)
        per_stage.append(column)
    return [[column[m] for column in per_stage] for m in range(microbatches)]
