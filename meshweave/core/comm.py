"""`CommGroup`: a named process group whose calls are counted and whose failures say where.

Every collective and P2P call the project itself makes goes through a CommGroup, so that
(1) the `CommLedger` can account for bytes and calls per group and operation, (2) a group of
size 1 never communicates, and (3) a failed or timed-out call raises an error naming the rank,
the group and the operation instead of a bare gloo/NCCL message, and (4) a tensor on the wrong
device for the group's backend (a CPU tensor on NCCL, a CUDA tensor on a CPU-only gloo group) is
refused with one line before the backend sees it. Peers are given as ranks *within the group*; the
wrapper translates them to global ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshweave.core.ledger import CommLedger

# torch 2.13 deprecates the *_tensor forms in favour of *_single; older releases only have the former.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class CommError(RuntimeError):
    """A collective or P2P call failed or timed out; the message names rank, group and op."""


@dataclass(frozen=True)
class P2P:
    """One send or receive for `CommGroup.batch_isend_irecv`; `peer` is a group-local rank."""

    kind: str  # "send" or "recv"
    tensor: torch.Tensor
    peer: int


class _CountedWork:
    """Wraps async work so that waiting on it reports failures like a blocking call does."""

    def __init__(self, works: list, group: CommGroup, op: str) -> None:
        self._works, self._group, self._op = works, group, op

    def wait(self) -> None:
        for work in self._works:
            self._group._guard(self._op, work.wait)


class _DoneWork:
    def wait(self) -> None:
        return None


class PendingAllGather:
    """An all-gather in flight (from `CommGroup.all_gather_async`); `wait()` returns what `all_gather` would.

    It keeps the send buffer alive until the call completes, and reports a failure like a blocking call does.
    """

    def __init__(self, result: torch.Tensor, work, src: torch.Tensor | None, group: CommGroup) -> None:
        self._result, self._work, self._src, self._group = result, work, src, group

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._group._guard("all_gather_async", self._work.wait)
            self._work = self._src = None
        return self._result


# The device type each backend's collectives accept. gloo is used for CPU process groups only here
# (NCCL serves CUDA), so a CUDA tensor on a gloo group is a mistake even where gloo could copy it.
BACKEND_DEVICES = {"nccl": "cuda", "gloo": "cpu"}


class CommGroup:
    """A process group with a name, a ledger and group-local peer addressing.

    `backend` defaults to the process group's own ("gloo", "nccl", ...); every tensor handed to a call
    must live on that backend's device type (see BACKEND_DEVICES).
    """

    def __init__(self, name: str, pg: dist.ProcessGroup | None, ranks: Sequence[int], ledger: CommLedger,
                 backend: str | None = None) -> None:
        self.name = name
        self.pg = pg
        self.ranks = list(ranks)  # global ranks, in group-rank order
        self.ledger = ledger
        self.size = len(self.ranks)
        self.rank = self.ranks.index(dist.get_rank()) if dist.is_initialized() and self.size > 1 else 0
        if backend is None and pg is not None and self.size > 1:
            backend = str(dist.get_backend(pg))
        self.device_type = BACKEND_DEVICES.get(backend or "")

    def _check_device(self, op: str, *tensors: torch.Tensor) -> None:
        """Refuse, in one line, a tensor the backend cannot take (NCCL rejects CPU tensors deep inside)."""
        if self.device_type is None:
            return
        for tensor in tensors:
            if tensor.device.type != self.device_type:
                me = dist.get_rank() if dist.is_initialized() else 0
                raise CommError(f"rank {me}: {op} on group '{self.name}' (global ranks {self.ranks}) got a "
                                f"{tensor.device.type} tensor, but this group's backend takes {self.device_type} "
                                f"tensors; move it to the compute device first")

    def __repr__(self) -> str:
        return f"CommGroup({self.name!r}, ranks={self.ranks})"

    # --- error reporting -------------------------------------------------------------
    def _guard(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            me = dist.get_rank() if dist.is_initialized() else 0
            raise CommError(
                f"rank {me}: {what} on group '{self.name}' (global ranks {self.ranks}) failed: {err}"
            ) from err

    def _global(self, peer: int) -> int:
        if not 0 <= peer < self.size:
            raise ValueError(f"peer {peer} is outside group '{self.name}' of size {self.size}")
        return self.ranks[peer]

    # --- collectives -----------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce; payload = tensor bytes."""
        if self.size > 1:
            self._check_device("all_reduce", tensor)
            self.ledger.record(self.name, "all_reduce", _nbytes(tensor))
            self._guard("all_reduce", dist.all_reduce, tensor, op=op, group=self.pg)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate equal-sized shards along `dim`; payload = local shard bytes."""
        if self.size == 1:
            return tensor
        self._check_device("all_gather", tensor)
        self.ledger.record(self.name, "all_gather", _nbytes(tensor))
        src = tensor.movedim(dim, 0).contiguous()
        out = src.new_empty((self.size * src.shape[0], *src.shape[1:]))
        self._guard("all_gather", _all_gather_flat, out, src, group=self.pg)
        return out.movedim(0, dim)

    def all_gather_async(self, tensor: torch.Tensor, dim: int = 0) -> PendingAllGather:
        """Start `all_gather(tensor, dim)` without blocking, so work can overlap it; `wait()` on the result
        returns the gathered tensor. Payload = local shard bytes, counted as "all_gather" when started."""
        if self.size == 1:
            return PendingAllGather(tensor, None, None, self)
        self._check_device("all_gather_async", tensor)
        self.ledger.record(self.name, "all_gather", _nbytes(tensor))
        src = tensor.movedim(dim, 0).contiguous()
        out = src.new_empty((self.size * src.shape[0], *src.shape[1:]))
        work = self._guard("all_gather_async", _all_gather_flat, out, src, group=self.pg, async_op=True)
        return PendingAllGather(out.movedim(0, dim), work, src, self)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum over ranks, keep this rank's 1/size slice along `dim`; payload = full input bytes."""
        if self.size == 1:
            return tensor
        self._check_device("reduce_scatter", tensor)
        self.ledger.record(self.name, "reduce_scatter", _nbytes(tensor))
        src = tensor.movedim(dim, 0).contiguous()
        out = src.new_empty((src.shape[0] // self.size, *src.shape[1:]))
        self._guard("reduce_scatter", _reduce_scatter_flat, out, src, op=op, group=self.pg)
        return out.movedim(0, dim)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """All-to-all along dim 0; payload = input bytes (the slice kept locally included)."""
        if self.size == 1:
            output.copy_(input)
            return output
        self._check_device("all_to_all", output, input)
        self.ledger.record(self.name, "all_to_all", _nbytes(input))
        self._guard(
            "all_to_all", dist.all_to_all_single, output, input,
            output_split_sizes, input_split_sizes, group=self.pg,
        )
        return output

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast from group-local rank `src`; payload = tensor bytes."""
        if self.size > 1:
            self._check_device("broadcast", tensor)
            self.ledger.record(self.name, "broadcast", _nbytes(tensor))
            self._guard("broadcast", dist.broadcast, tensor, src=self._global(src), group=self.pg)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            self.ledger.record(self.name, "barrier", 0)
            self._guard("barrier", dist.barrier, group=self.pg)

    # --- point to point --------------------------------------------------------------
    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._check_device("send", tensor)
        self.ledger.record(self.name, "send", _nbytes(tensor))
        self._guard("send", dist.send, tensor.contiguous(), dst=self._global(peer), group=self.pg)

    def recv(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        self._check_device("recv", tensor)
        self.ledger.record(self.name, "recv", _nbytes(tensor))
        self._guard("recv", dist.recv, tensor, src=self._global(peer), group=self.pg)
        return tensor

    def batch_isend_irecv(self, ops: Sequence[P2P]) -> _CountedWork | _DoneWork:
        """Start several sends/receives at once; wait() on the result. Payload per op counted."""
        if not ops:
            return _DoneWork()
        p2p_ops = []
        for item in ops:
            if item.kind not in ("send", "recv"):
                raise ValueError(f"P2P kind must be 'send' or 'recv', got {item.kind!r}")
            self._check_device(f"batch_isend_irecv {item.kind}", item.tensor)
            self.ledger.record(self.name, item.kind, _nbytes(item.tensor))
            fn = dist.isend if item.kind == "send" else dist.irecv
            p2p_ops.append(dist.P2POp(fn, item.tensor, self._global(item.peer), group=self.pg))
        works = self._guard("batch_isend_irecv", dist.batch_isend_irecv, p2p_ops)
        return _CountedWork(works, self, "batch_isend_irecv")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def single_process_group(name: str, ledger: CommLedger | None = None) -> CommGroup:
    """A CommGroup of size 1 (no process group needed): every call is local and free."""
    return CommGroup(name, None, [0], ledger or CommLedger())
