"""How the layers are cut into pipeline stages: evenly, or balanced by cost (pure arithmetic, torch-free)."""

from __future__ import annotations

from typing import Any

from meshweave.models.spec import ModelSpec


def split_even(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layers of each stage, n_layers / n_stages consecutive layers each (must divide)."""
    if n_layers % n_stages:
        raise ValueError(f"{n_layers} layers do not split evenly into {n_stages} stages")
    per = n_layers // n_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(n_stages)]


def split_by_cost(costs: list[float], n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous split of the layers into n_stages (>= 1 layer each) minimising the largest stage
    cost, where stage 0 also pays `first_extra` (embedding) and the last stage `last_extra` (head).
    Exact dynamic programme over cut points, O(stages * layers^2)."""
    n = len(costs)
    if n < n_stages:
        raise ValueError(f"{n} layers cannot fill {n_stages} stages with at least one layer each")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == n_stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][i]: first i layers in s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(lo, hi)) for lo, hi in reversed(bounds)]


def split_layers(spec: ModelSpec, model_cfg: Any, seq_len: int, n_stages: int, method: str) -> list[list[int]]:
    """Layers of every stage for the config's `pp_split` method ("even" or "cost")."""
    if method == "even":
        return split_even(spec.num_layers(model_cfg), n_stages)
    costs = spec.layer_costs(model_cfg, seq_len)
    return split_by_cost(costs.layers, n_stages, costs.first_extra, costs.last_extra)
