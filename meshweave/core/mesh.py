"""The live mesh of one rank: ParallelDims (core/dims.py) -> a named DeviceMesh (pp, dp, sp, tp) and CommGroups.

- "pp": pipeline stage peers (P2P activations).
- "dp": data-parallel replicas; "sp": sequence shards; "tp": tensor shards.
- "dp_sp": dp x sp flattened — the gradient-reduction / FSDP axis and the loss / token-count axis
  (SP ranks see different tokens of the same sequences, so they act like data parallelism for
  weights and gradients).
A degree-1 axis keeps its name, so code never has to ask whether an axis exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshweave.core.comm import CommGroup, CommLedger
from meshweave.core.dims import MESH_AXES, ParallelDims

__all__ = ["MESH_AXES", "Mesh", "ParallelDims", "backend_for", "build_mesh", "device_type_for"]


@dataclass
class Mesh:
    """The live mesh of one rank: DeviceMesh plus accounted CommGroups by axis name."""

    dims: ParallelDims
    device_mesh: DeviceMesh
    ledger: CommLedger
    flat_meshes: dict[str, DeviceMesh] = field(default_factory=dict)
    _groups: dict[str, CommGroup] = field(default_factory=dict)
    _owned_pgs: list[dist.ProcessGroup] = field(default_factory=list)

    def group(self, name: str) -> CommGroup:
        """CommGroup for an axis ("pp", "dp", "sp", "tp", "dp_sp", "world") containing this rank."""
        if name not in self._groups:
            raise KeyError(f"no mesh group {name!r}; valid: {', '.join(sorted(self._groups))}")
        return self._groups[name]

    def submesh(self, name: str) -> DeviceMesh:
        """DeviceMesh view for an axis or flattened axes (for FSDP2/DTensor), e.g. "tp" or "dp_sp"."""
        return self.flat_meshes[name] if name in self.flat_meshes else self.device_mesh[name]

    @property
    def coordinate(self) -> dict[str, int]:
        return self.dims.coordinate(dist.get_rank())

    def make_group(self, name: str, partition: list[list[int]]) -> CommGroup:
        """Create every group of `partition` (all ranks must call this with the same partition, in the
        same order, as gloo/NCCL require) and return the CommGroup that contains this rank."""
        me, mine = dist.get_rank(), None
        for ranks in partition:
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if pg is not None:
                self._owned_pgs.append(pg)
            if me in ranks:
                mine = CommGroup(name, pg, ranks, self.ledger)
        if mine is None:
            raise ValueError(f"rank {me} is in none of the groups of {name!r}: {partition}")
        return mine

    def carve_subgroups(self, axes: tuple[str, ...] = ("dp", "sp"), sizes: list[int] | None = None) -> dict[int, CommGroup]:
        """Sub-groups of varying size out of the ranks along `axes` (default dp x sp), created once.

        For each size s (default: every power of two dividing the axes' product), the ranks along
        `axes` are split into consecutive groups of s. Returns {size: this rank's group of that size}.
        """
        span = 1
        for a in axes:
            span *= getattr(self.dims, a)
        sizes = sizes or [1 << i for i in range(span.bit_length()) if span % (1 << i) == 0]
        lines = self.dims.groups(axes)
        for size in sizes:
            if span % size:
                raise ValueError(f"sub-group size {size} does not divide the {'x'.join(axes)} span {span}")
        return {size: self.make_group(f"{'_'.join(axes)}{size}",
                                      [line[i:i + size] for line in lines for i in range(0, span, size)])
                for size in sizes}

    def close(self) -> None:
        """Destroy the sub-groups this mesh created (the DeviceMesh's own groups live with the default group)."""
        for pg in self._owned_pgs:
            dist.destroy_process_group(pg)
        self._owned_pgs.clear()


def build_mesh(dims: ParallelDims, device_type: str, ledger: CommLedger | None = None) -> Mesh:
    """Create the DeviceMesh (needs the default process group) and a CommGroup per axis."""
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"mesh {dims} needs {dims.world_size} ranks but the world has {dist.get_world_size()}")
    ledger = ledger or CommLedger()
    device_mesh = init_device_mesh(device_type, dims.shape(), mesh_dim_names=MESH_AXES)
    mesh = Mesh(dims, device_mesh, ledger, {"dp_sp": device_mesh["dp", "sp"]._flatten("dp_sp")})
    for name in ("pp", "dp", "sp", "tp", "dp_sp"):
        pg = mesh.submesh(name).get_group()
        mesh._groups[name] = CommGroup(name, pg, dist.get_process_group_ranks(pg), ledger)
    mesh._groups["world"] = CommGroup("world", dist.group.WORLD, list(range(dims.world_size)), ledger)
    return mesh


def device_type_for(requested: str) -> str:
    """"auto" -> cuda when available, else cpu."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"
