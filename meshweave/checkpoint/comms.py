"""The few collectives the checkpointer makes itself, over its dedicated group, with JSON payloads.

JSON (never pickle) travels as uint8 tensors: lengths are agreed first, then payloads are padded to
equal size because gloo cannot all-gather uneven tensors. Every call is accounted by a `CommGroup`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from meshweave.core.comm import CommGroup, CommLedger


class CheckpointComms:
    """Rank-0 agreement and gathering for checkpoint traffic; all calls are no-ops on one process."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int, ledger: CommLedger | None = None) -> None:
        if group is None and world_size > 1:
            raise ValueError(f"world_size={world_size} needs a dedicated checkpoint process group, got None")
        self.rank, self.world_size, self.pg = rank, world_size, group
        ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.group = CommGroup("checkpoint", group, ranks, ledger or CommLedger())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        self.group.barrier()

    def all_reduce_int(self, value: int, op: str = "sum") -> int:
        """Sum / min / max of an integer over ranks."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        t = torch.tensor([value], dtype=torch.int64)
        return int(self.group.all_reduce(t, op=reduce_op).item())

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able object, indexed by rank."""
        raw = json.dumps(obj).encode()
        if not self.distributed:
            return [json.loads(raw)]
        width = self.all_reduce_int(len(raw), "max")
        buf = torch.zeros(width + 8, dtype=torch.uint8)
        buf[:8] = torch.tensor([len(raw)], dtype=torch.int64).view(torch.uint8)
        buf[8:8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        rows = self.group.all_gather(buf).view(self.world_size, width + 8)
        return [json.loads(row[8:8 + int(row[:8].clone().view(torch.int64))].numpy().tobytes()) for row in rows]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s object on every rank."""
        if not self.distributed:
            return obj
        raw = json.dumps(obj).encode() if self.rank == src else b""
        size = torch.tensor([len(raw)], dtype=torch.int64)
        self.group.broadcast(size, src=src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.group.broadcast(buf, src=src)
        return json.loads(buf.numpy().tobytes())
