"""ParallelDims: the parallel degrees of a layout, resolved and validated in one place (torch-free).

`ParallelDims.resolve(parallel_cfg, world_size)` turns the config's degrees into concrete ones
(`dp: -1` fills what tp*pp*sp leave of the world) and raises a ConfigError naming the field and the
fix for a layout that cannot exist. The live mesh over these dims is core/mesh.py.

Rank order: pp outermost, tp innermost (tensor-parallel peers are neighbours, i.e. on one node
with fast links), sp next to tp, dp between.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from meshweave.core.errors import ConfigError

MESH_AXES = ("pp", "dp", "sp", "tp")


def resolved_dp(parallel: Any, world_size: int) -> int:
    """The data-parallel degree: as configured, or (dp: -1) what tp*pp*sp leave of the world."""
    p = parallel
    return p.dp if p.dp != -1 else world_size // max(1, p.tp * p.pp * p.sp)


def layout_problems(parallel: Any, world: int) -> list[str]:
    """One-line problems of the degrees against the world size (empty when they fit)."""
    p = parallel
    if world < 1:
        return [f"world size: {world} must be >= 1"]
    for name in ("tp", "pp", "sp"):
        if getattr(p, name) < 1:
            return [f"parallel.{name}: {getattr(p, name)} must be >= 1"]
    if p.dp == 0 or p.dp < -1:
        return [f"parallel.dp: {p.dp} must be >= 1, or -1 to fill the world size"]
    other = p.tp * p.pp * p.sp
    if p.dp == -1 and world % other:
        return [f"parallel: tp*pp*sp = {p.tp}*{p.pp}*{p.sp} = {other} does not divide WORLD_SIZE {world}; "
                f"choose degrees whose product divides it"]
    dp = resolved_dp(p, world)
    if dp * other != world:
        return [f"parallel: dp*tp*pp*sp = {dp}*{p.tp}*{p.pp}*{p.sp} = {dp * other}, but WORLD_SIZE is {world}; "
                f"make the product equal the number of processes (or set dp: -1)"]
    return []


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int
    sp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.sp * self.tp

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def coordinate(self, rank: int) -> dict[str, int]:
        """Mesh coordinate of a global rank, by axis name."""
        coords = {}
        for axis in reversed(MESH_AXES):
            size = getattr(self, axis)
            coords[axis] = rank % size
            rank //= size
        return {a: coords[a] for a in MESH_AXES}

    def rank_of(self, **coords: int) -> int:
        rank = 0
        for axis in MESH_AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def groups(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every group of ranks that differ only along `axes` (a partition of the world), in a fixed order."""
        fixed = [a for a in MESH_AXES if a not in axes]
        out = []
        for fixed_coords in product(*(range(getattr(self, a)) for a in fixed)):
            base = dict(zip(fixed, fixed_coords))
            members = [self.rank_of(**base, **dict(zip(axes, c))) for c in product(*(range(getattr(self, a)) for a in axes))]
            out.append(members)
        return out

    @classmethod
    def resolve(cls, parallel: Any, world_size: int) -> ParallelDims:
        """Concrete degrees for the `parallel:` section on `world_size` ranks; ConfigError if impossible."""
        problems = layout_problems(parallel, world_size)
        if problems:
            raise ConfigError(problems[0])
        return cls(pp=parallel.pp, dp=resolved_dp(parallel, world_size), sp=parallel.sp, tp=parallel.tp)
