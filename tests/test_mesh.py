"""The live mesh: named groups match the analytic rank layout; carved sub-groups of varying size work."""

import pytest
import torch
import torch.distributed as dist

from meshweave.core.mesh import ParallelDims, build_mesh
from meshweave.testing import run_distributed


def _mesh_groups(pp, dp, sp, tp):
    dims = ParallelDims(pp=pp, dp=dp, sp=sp, tp=tp)
    mesh = build_mesh(dims, "cpu")
    me = dist.get_rank()
    named = {name: mesh.group(name).ranks for name in ("pp", "dp", "sp", "tp", "dp_sp", "world")}
    expected = {name: next(g for g in dims.groups(axes) if me in g)
                for name, axes in (("pp", ("pp",)), ("dp", ("dp",)), ("sp", ("sp",)), ("tp", ("tp",)),
                                   ("dp_sp", ("dp", "sp")))}
    carved = mesh.carve_subgroups()
    sums = {size: int(g.all_reduce(torch.tensor([me])).item()) for size, g in carved.items()}
    ledger = mesh.ledger.snapshot()
    mesh.close()
    return {"named": named, "expected": expected, "carved": {s: g.ranks for s, g in carved.items()},
            "sums": sums, "ledger": ledger, "coord": mesh.coordinate}


@pytest.mark.slow  # four processes (the fast subset starts no pool above two ranks)
def test_mesh_groups_and_carved_subgroups_on_4_ranks():
    results = run_distributed(_mesh_groups, 4, 1, 2, 2, 1)
    for rank, res in enumerate(results):
        for name, ranks in res["expected"].items():
            assert res["named"][name] == ranks, name
        assert res["named"]["world"] == [0, 1, 2, 3]
        assert sorted(res["carved"]) == [1, 2, 4]
        for size, ranks in res["carved"].items():
            assert rank in ranks and len(ranks) == size
            assert res["sums"][size] == sum(ranks)  # the carved group really reduces over exactly its members
        # size-1 groups never communicate; sizes 2 and 4 each did one 8-byte all-reduce
        assert res["ledger"] == {"dp_sp2/all_reduce": {"calls": 1, "bytes": 8}, "dp_sp4/all_reduce": {"calls": 1, "bytes": 8}}


@pytest.mark.slow  # eight processes; the 4-rank mesh test stays in the fast subset
def test_mesh_with_tp_and_pp_axes_on_8_ranks():
    results = run_distributed(_mesh_groups, 8, 2, 2, 1, 2)
    for rank, res in enumerate(results):
        for name, ranks in res["expected"].items():
            assert res["named"][name] == ranks, name
        assert res["coord"] == ParallelDims(2, 2, 1, 2).coordinate(rank)
        assert set(res["carved"]) == {1, 2}  # dp x sp span is 2
