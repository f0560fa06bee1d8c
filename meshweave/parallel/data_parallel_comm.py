"""Data-parallel traffic routed through the project's CommLedger.

FSDP2 and DDP issue their collectives themselves, so they would be invisible to the ledger.
FSDP2 lets a module swap in its own all-gather / reduce-scatter objects
(`set_custom_all_gather` / `set_custom_reduce_scatter`), and DDP takes a communication hook: we use
both to record every call (same payload convention as CommGroup: the bytes this rank hands in)
and then do exactly what the defaults do.
"""


import torch
import torch.distributed as dist
import torch.nn as nn

from meshweave.core.comm import CommLedger

try:  # the interface classes live in a private module; without them FSDP2 traffic is simply not counted
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
except ImportError:  # pragma: no cover - depends on the torch release
    DefaultAllGather = DefaultReduceScatter = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


if DefaultAllGather is not None:

    class CountedAllGather(DefaultAllGather):
        def __init__(self, ledger: CommLedger, name: str) -> None:
            self.ledger, self.name = ledger, name

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            self.ledger.record(self.name, "all_gather", _nbytes(input_tensor))
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountedReduceScatter(DefaultReduceScatter):
        def __init__(self, ledger: CommLedger, name: str) -> None:
            self.ledger, self.name = ledger, name

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            self.ledger.record(self.name, "reduce_scatter", _nbytes(input_tensor))
            return super().__call__(output_tensor, input_tensor, group, op, async_op)


def count_fsdp_traffic(modules: list[nn.Module], ledger: CommLedger, name: str) -> bool:
    """Make every FSDP2 unit in `modules` record its all-gathers and reduce-scatters; False if unsupported."""
    if DefaultAllGather is None:
        return False
    for module in modules:
        module.set_custom_all_gather(CountedAllGather(ledger, name))
        module.set_custom_reduce_scatter(CountedReduceScatter(ledger, name))
    return True


class CountedAllReduceState:
    def __init__(self, group: dist.ProcessGroup, ledger: CommLedger, name: str) -> None:
        self.group, self.ledger, self.name = group, ledger, name
        self.size = dist.get_world_size(group)


def counted_allreduce_hook(state: CountedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default behaviour (average the bucket over the group), recorded in the ledger."""
    buffer = bucket.buffer()
    state.ledger.record(state.name, "all_reduce", _nbytes(buffer))
    buffer.div_(state.size)
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
