"""The accounted communication layer and the multi-process harness itself."""

import pytest
import torch
import torch.distributed as dist

from meshweave.core.comm import P2P, CommError, CommGroup, CommLedger, PendingAllGather, single_process_group
from meshweave.testing import DistributedTestError, run_distributed


def _world_group() -> CommGroup:
    return CommGroup("world", dist.group.WORLD, list(range(dist.get_world_size())), CommLedger())


def _collectives_and_volumes():
    g = _world_group()
    n, r = g.size, g.rank
    t = torch.full((3, 2), float(r + 1))
    g.all_reduce(t)
    gathered = g.all_gather(torch.full((2, 5), float(r)), dim=1)
    scattered = g.reduce_scatter(torch.ones(2 * n, 3), dim=0)
    out = torch.empty(n * 2)
    g.all_to_all_single(out, torch.arange(n * 2, dtype=torch.float32) + 100 * r)
    nxt, prv = (r + 1) % n, (r - 1) % n
    buf = torch.empty(4)
    g.batch_isend_irecv([P2P("send", torch.full((4,), float(r)), nxt), P2P("recv", buf, prv)]).wait()
    return {
        "reduced": t[0, 0].item(), "gathered": gathered, "scattered": scattered, "a2a": out, "ring": buf[0].item(),
        "stats": g.ledger.snapshot(),
    }


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # fast subset: no 4-rank pool
def test_collectives_results_and_counted_bytes(world):
    results = run_distributed(_collectives_and_volumes, world)
    f32 = 4
    for r, res in enumerate(results):
        assert res["reduced"] == sum(range(1, world + 1))
        assert res["gathered"].shape == (2, 5 * world)
        assert torch.equal(res["gathered"][0, ::5], torch.arange(world, dtype=torch.float32))
        assert torch.equal(res["scattered"], torch.full((2, 3), float(world)))
        # rank r receives element block r (2 elements) from every rank s: value 2r + j + 100 s
        expect = torch.tensor([2 * r + j + 100 * s for s in range(world) for j in range(2)], dtype=torch.float32)
        assert torch.equal(res["a2a"], expect)
        assert res["ring"] == float((r - 1) % world)
        st = res["stats"]
        assert st["world/all_reduce"] == {"calls": 1, "bytes": 6 * f32}
        assert st["world/all_gather"] == {"calls": 1, "bytes": 10 * f32}
        assert st["world/reduce_scatter"] == {"calls": 1, "bytes": 2 * world * 3 * f32}
        assert st["world/all_to_all"] == {"calls": 1, "bytes": 2 * world * f32}
        assert st["world/send"] == {"calls": 1, "bytes": 4 * f32}
        assert st["world/recv"] == {"calls": 1, "bytes": 4 * f32}


def _async_and_blocking_gathers():
    """The same gathers blocking and async (overlapped with local work), each with its own ledger."""
    blocking, async_ = _world_group(), _world_group()
    r = blocking.rank
    shard = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * r
    pending = async_.all_gather_async(shard, dim=1)
    local = shard.sum()  # work while the gather is in flight
    gathered = pending.wait()
    return {
        "same": torch.equal(gathered, blocking.all_gather(shard, dim=1)), "shape": tuple(gathered.shape),
        "again": pending.wait() is gathered, "local": local.item(),
        "blocking": blocking.ledger.snapshot(), "async_": async_.ledger.snapshot(),
    }


def test_all_gather_async_equals_all_gather_in_result_and_ledger():
    for res in run_distributed(_async_and_blocking_gathers, 2):
        assert res["same"] and res["shape"] == (2, 6) and res["again"]
        assert res["async_"] == res["blocking"] == {"world/all_gather": {"calls": 1, "bytes": 6 * 4}}


class _FailingWork:
    def wait(self) -> None:
        raise RuntimeError("Connection closed by peer")


def test_all_gather_async_failure_names_rank_group_and_op():
    group = CommGroup("sp", None, [0, 1], CommLedger())
    pending = PendingAllGather(torch.empty(2), _FailingWork(), torch.empty(1), group)
    with pytest.raises(CommError) as info:
        pending.wait()
    text = str(info.value)
    assert text.startswith("rank 0: all_gather_async on group 'sp' (global ranks [0, 1]) failed: Connection closed")


def test_size_one_group_never_communicates():
    g = single_process_group("sp")
    t = torch.ones(3)
    assert g.all_reduce(t) is t and g.all_gather(t) is t and g.reduce_scatter(t) is t
    assert g.all_gather_async(t).wait() is t
    assert g.ledger.calls() == 0


def _fails_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 blocks here: the harness must not wait for the full timeout
    return "unreachable"


@pytest.mark.slow
def test_harness_reports_failing_rank_traceback_and_recovers():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fails_on_rank_one, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1 traceback" in msg and "boom on rank one" in msg
    assert run_distributed(dist.get_rank, 2) == [0, 1]  # the pool is rebuilt after a failure


def _hang_on_rank_zero():
    if dist.get_rank() == 0:
        import time
        time.sleep(30)
    return True


@pytest.mark.slow
def test_harness_watchdog_names_hung_rank():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_zero, 2, timeout=3)
    assert "still running" in str(info.value) and "[0]" in str(info.value)


def _device_refusals():
    """Each call with a tensor on the wrong device for the backend fails in one line, before the backend."""
    ranks = list(range(dist.get_world_size()))
    as_nccl = CommGroup("dp", dist.group.WORLD, ranks, CommLedger(), backend="nccl")
    gloo = CommGroup("sp", dist.group.WORLD, ranks, CommLedger())
    cpu, elsewhere = torch.ones(4), torch.ones(4, device="meta")  # meta: a stand-in for a CUDA tensor here
    calls = {
        "nccl all_reduce": lambda: as_nccl.all_reduce(cpu),
        "nccl all_gather": lambda: as_nccl.all_gather(cpu),
        "nccl all_gather_async": lambda: as_nccl.all_gather_async(cpu),
        "gloo all_gather_async": lambda: gloo.all_gather_async(elsewhere),
        "nccl reduce_scatter": lambda: as_nccl.reduce_scatter(torch.ones(2 * len(ranks))),
        "nccl all_to_all": lambda: as_nccl.all_to_all_single(torch.empty(2 * len(ranks)), torch.ones(2 * len(ranks))),
        "nccl broadcast": lambda: as_nccl.broadcast(cpu),
        "nccl batch_isend_irecv": lambda: as_nccl.batch_isend_irecv([P2P("send", cpu, 1)]),
        "gloo all_reduce": lambda: gloo.all_reduce(elsewhere),
        "gloo send": lambda: gloo.send(elsewhere, 1),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except Exception as err:  # noqa: BLE001 - the test inspects what was raised
            messages[name] = (type(err).__name__, str(err))
    gloo.all_reduce(cpu)  # the right device still works after the refusals (nothing was left half-sent)
    return messages, cpu.tolist(), gloo.device_type


def test_comm_group_refuses_tensors_on_the_wrong_device():
    for rank, (messages, reduced, device_type) in enumerate(run_distributed(_device_refusals, 2)):
        assert device_type == "cpu" and reduced == [2.0] * 4
        for name, outcome in messages.items():
            assert outcome is not None, f"{name} was not refused"
            kind, text = outcome
            group, op = ("dp", name.split()[1]) if name.startswith("nccl") else ("sp", name.split()[1])
            assert kind == "CommError" and "\n" not in text
            assert text.startswith(f"rank {rank}: ") and f"group '{group}'" in text
            assert op.split("_")[0] in text and ("cpu tensor" in text or "meta tensor" in text)
