"""Pipeline P2P traffic routed through the project's CommLedger.

`torch.distributed.pipelining` builds its own isend/irecv ops, so they would be invisible to the
ledger. Each stage asks `get_{fwd,bwd}_{send,recv}_ops(chunk)` for the ops of one microbatch just
before the schedule posts them; `CountedPipelineStage` records every op it returns (same payload
convention as CommGroup: bytes this rank hands in, or receives into) and changes nothing else.
The one-time shape/dtype metadata exchange of the first step (pickled objects) is not counted.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from meshweave.core.comm import CommLedger


class CountedPipelineStage(PipelineStage):
    """A PipelineStage whose activation and gradient P2P ops are recorded in `ledger` under `group_name`."""

    def __init__(self, *args, ledger: CommLedger | None = None, group_name: str = "pp", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ledger, self.group_name = ledger, group_name

    def _record(self, ops: list[dist.P2POp], what: str) -> list[dist.P2POp]:
        if self.ledger is not None:
            for op in ops:
                self.ledger.record(self.group_name, what, op.tensor.numel() * op.tensor.element_size())
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._record(super().get_fwd_send_ops(fwd_chunk_id), "send_activation")

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._record(super().get_fwd_recv_ops(fwd_chunk_id), "recv_activation")

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._record(super().get_bwd_send_ops(bwd_chunk_id), "send_gradient")

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._record(super().get_bwd_recv_ops(bwd_chunk_id), "recv_gradient")


def pipeline_p2p_bytes(stage_ids: list[int], n_stages: int, tokens: int, dim: int, tp: int,
                       element_size: int = 4) -> dict[str, int]:
    """Analytic per-rank pipeline payload of one step over `tokens` tokens (all microbatches): each
    stage boundary crossing ranks carries every microbatch's (tokens/tp, dim) activation shard
    forward and its gradient backward. Boundaries between two stages on the same rank (the bend of
    a V schedule) carry nothing."""
    shard = tokens * dim // tp * element_size
    out = {"send_activation": 0, "recv_activation": 0, "send_gradient": 0, "recv_gradient": 0}
    mine = set(stage_ids)
    for s in stage_ids:
        if s + 1 < n_stages and (s + 1) not in mine:
            out["send_activation"] += shard
            out["recv_gradient"] += shard
        if s > 0 and (s - 1) not in mine:
            out["recv_activation"] += shard
            out["send_gradient"] += shard
    return {k: v for k, v in out.items() if v}
