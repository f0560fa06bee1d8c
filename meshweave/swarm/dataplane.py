"""Tensors between peers: one gloo/NCCL group per membership epoch, and waits that an abort interrupts.

torch's default world cannot change size, so each epoch builds its own groups directly on a
PrefixStore of the coordinator's store (torchft's reconfigurable-group pattern): one group of all
members for the point-to-point activations and gradients, one per stage for the gradient average.

A gloo wait cannot be cancelled (`abort()` does not wake it, a timed-out wait closes the pair), so
each wait runs in a helper thread while the caller polls the step's decision key: when the
coordinator aborts the attempt, the caller leaves at once and the old epoch's groups are retired
(kept referenced, never destroyed mid-operation; their waits end by their own timeout or when the
dead peer's sockets close). Tensors travel as raw buffers: no pickle on the wire.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class StepAborted(RuntimeError):
    """The coordinator aborted the attempt in progress (another peer failed); redo under the next plan."""


class TransferFailed(RuntimeError):
    """A transfer with a peer failed or timed out: this peer votes to abort the attempt, naming the suspects
    (the peer of a send or receive; every other peer of a collective)."""

    def __init__(self, message: str, suspects: list[int] | None = None) -> None:
        super().__init__(message)
        self.suspects = suspects or []


def make_group(store: dist.Store, prefix: str, rank: int, size: int, timeout_s: float, device: torch.device) -> Any:
    """A process group of `size` members on `store` under `prefix` (NCCL on CUDA, gloo on CPU)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    scoped = dist.PrefixStore(prefix, store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(scoped, rank, size, options)
    return dist.ProcessGroupGloo(scoped, rank, size, timeout)


class Waiter:
    """Runs blocking group calls while watching for an abort: `call(fn, what)` returns fn's result, raises
    StepAborted as soon as `aborted()` is true, TransferFailed on an error or after `timeout_s`."""

    def __init__(self, aborted: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> None:
        self.aborted, self.timeout_s, self.poll_s = aborted, timeout_s, poll_s

    def wait(self, work: Any, what: str, peer: int | list[int] | None = None) -> None:
        self.call(work.wait, what, peer)

    def call(self, fn: Callable[[], Any], what: str, peer: int | list[int] | None = None) -> Any:
        done = threading.Event()
        error: list[BaseException] = []
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                error.append(err)
            done.set()

        threading.Thread(target=run, daemon=True, name=f"swarm-wait {what}").start()
        suspects = peer if isinstance(peer, list) else [] if peer is None else [peer]
        deadline = time.monotonic() + self.timeout_s
        next_check = 0.0
        while not done.wait(self.poll_s):
            now = time.monotonic()
            if now >= next_check:
                if self.aborted():
                    raise StepAborted(f"attempt aborted by the coordinator while waiting for {what}")
                next_check = now + 0.1
            if now > deadline:
                raise TransferFailed(f"{what}: no answer within {self.timeout_s:g} s", suspects)
        if error:
            raise TransferFailed(f"{what}: {str(error[0]).splitlines()[0][:300]}", suspects)
        return result[0]


class EpochGroups:
    """This peer's groups for one epoch: `p2p` over all members, `stage` over its stage's peers (None alone)."""

    def __init__(self, store: dist.Store, epoch: int, members: list[int], stage_members: list[int], me: int,
                 timeout_s: float, device: torch.device) -> None:
        self.epoch, self.members, self.stage_members, self.me = epoch, members, stage_members, me
        self.rank = {peer: i for i, peer in enumerate(members)}
        self.p2p = make_group(store, f"swarm/e{epoch}/p2p", self.rank[me], len(members), timeout_s, device)
        self.stage = None
        if len(stage_members) > 1:
            stage_rank = stage_members.index(me)
            self.stage = make_group(store, f"swarm/e{epoch}/stage{min(stage_members)}", stage_rank,
                                    len(stage_members), timeout_s, device)

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return _issue(lambda: self.p2p.send([tensor.contiguous()], self.rank[peer], tag), f"a send to peer {peer}", [peer])

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return _issue(lambda: self.p2p.recv([tensor], self.rank[peer], tag), f"a receive from peer {peer}", [peer])

    def stage_sum(self, tensor: torch.Tensor) -> Any | None:
        """All-reduce SUM over the stage's peers (None when the stage has one peer)."""
        if self.stage is None:
            return None
        return _issue(lambda: self.stage.allreduce([tensor]), "the stage all-reduce", self.stage_others())

    def stage_others(self) -> list[int]:
        """The other peers of this peer's stage (the suspects when a stage collective fails)."""
        return [p for p in self.stage_members if p != self.me]


def _issue(start: Callable[[], Any], what: str, suspects: list[int]) -> Any:
    """Start a group call; gloo raises at once when a pair already failed (the peer died during an earlier
    call of this epoch): that is a failed transfer too, not a lost coordinator."""
    try:
        return start()
    except RuntimeError as err:
        raise TransferFailed(f"{what}: {str(err).splitlines()[0][:300]}", suspects) from err
