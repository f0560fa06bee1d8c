"""`Checkpointer`: the trainer-facing lazy (or synchronous) multi-level checkpointer.

Timeline of one lazy checkpoint at step t (DataStates-LLM):

    optimizer.step(t) -> after_optimizer_step(t): small state captured now, copy of the tensors starts
    forward/backward(t+1)                         copy runs in the background thread (tensors unchanged)
    before_optimizer_step(): waits for the copy only if it is not finished yet
    optimizer.step(t+1) ...                       meanwhile: host -> local disk -> persistent, committed

At most one checkpoint is in flight: the next one first waits for the previous one's flush.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from meshweave.checkpoint import loader, node_local
from meshweave.checkpoint.comms import CheckpointComms
from meshweave.checkpoint.crash import maybe_crash
from meshweave.checkpoint.disk_writer import DiskWriterProcess, SharedBuffers
from meshweave.checkpoint.entries import EntryKinds, capture
from meshweave.checkpoint.settings import CheckpointSettings, validate_checkpoint_settings
from meshweave.checkpoint.staging import CopyHook, HostSnapshot
from meshweave.checkpoint.state import Stateful
from meshweave.checkpoint.writer import LevelWriter, SavePayload
from meshweave.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class CheckpointStats:
    """What the training loop paid for checkpointing (for metrics and benchmarks)."""

    started: int = 0
    committed: int = 0
    failed: int = 0
    stall_after_s: list[float] = field(default_factory=list)  # time inside after_optimizer_step per save
    stall_before_s: list[float] = field(default_factory=list)  # time blocked in before_optimizer_step


class Checkpointer:
    """Saves app_state every `every_steps` optimizer steps and resumes from the newest good checkpoint.

    group: a dedicated gloo group for checkpoint traffic (None on one process). Optional kwargs:
    final_step (also save at this step), dcp_keys / replicated_keys (see entries.EntryKinds),
    copy_hook (called with each tensor's key before it is copied: tests slow the copy with it),
    on_error: "raise" (default) re-raises a failed background save at the next call; "warn" logs it
    and keeps training (saves stop for good when distributed, as the group may be out of step).
    """

    def __init__(self, cfg: CheckpointSettings, group: dist.ProcessGroup | None, rank: int, world_size: int, *,
                 final_step: int | None = None, dcp_keys: tuple[str, ...] = ("model", "optimizer"),
                 replicated_keys: tuple[str, ...] = ("data",), copy_hook: CopyHook | None = None,
                 on_error: str = "raise") -> None:
        problems = validate_checkpoint_settings(cfg)
        if problems:
            raise ValueError("invalid checkpoint settings: " + "; ".join(problems))
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.final_step, self.copy_hook, self.on_error = final_step, copy_hook, on_error
        self.kinds = EntryKinds(tuple(dcp_keys), tuple(replicated_keys))
        # A disabled checkpointer never communicates, so it needs no group.
        self.comms = CheckpointComms(group, rank, world_size) if cfg.enabled else CheckpointComms(None, 0, 1)
        # checkpoint.writer: process: staging buffers in shared memory, written by a writer process
        self.disk = DiskWriterProcess(SharedBuffers()) if cfg.enabled and cfg.writer == "process" else None
        self.writer = LevelWriter(self.comms, cfg.keep, self.disk)
        self.snapshot = HostSnapshot(self.disk.buffers.allocate if self.disk is not None else None)
        self.stats = CheckpointStats()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self._memory: SavePayload | None = None  # the "memory" level: last fully copied snapshot
        self._disabled = False
        self.resumed_from: str | None = None  # "<level> level, <directory>" of the checkpoint load_latest loaded
        if cfg.enabled and self.comms.distributed:
            self._require_shared_dirs()

    # --- trainer interface ---------------------------------------------------------------
    def load_latest(self, app_state: dict[str, Stateful]) -> int | None:
        """Find the newest complete & verified checkpoint (older ones on corruption, with a warning),
        load it into app_state in place and return its step; None if there is none (or resume is off).

        Collective over the checkpoint group: every rank must call it.
        """
        if not self.cfg.enabled or not self.cfg.resume:
            return None
        self._finish_inflight()
        memory_step = self._memory.step if self._memory is not None else None
        own_copy = node_local.info(self.rank, self.world_size, node_local.layout_tensors(self.kinds, app_state)) \
            if self.cfg.node_local else None
        choice = loader.choose(self.comms, self.cfg, memory_step, own_copy)
        if choice is None:
            log.info("no complete checkpoint found under %s: starting from scratch", self.cfg.dir)
            return None
        if choice.level == loader.MEMORY:
            assert self._memory is not None
            replicated = self.comms.broadcast_json(self._memory.replicated_plain if self.rank == 0 else None)
            loader.load_from_memory(self.kinds, self._memory, replicated, app_state)
        elif choice.own:
            loader.load_own_copy(self.kinds, choice.path, app_state)
        else:
            loader.load_from_dir(self.comms, self.kinds, choice.path, app_state)
        self.resumed_from = f"{choice.level} level" + (f", {choice.path}" if choice.path else "")
        log.info("resumed from checkpoint step %d (%s)", choice.step, self.resumed_from)
        return choice.step

    def before_optimizer_step(self) -> None:
        """Block until the in-flight snapshot has copied the model/optimizer tensors (lazy mode)."""
        if self.snapshot.is_copied():
            return
        start = time.perf_counter()
        self.snapshot.wait()
        self.stats.stall_before_s.append(time.perf_counter() - start)

    def after_optimizer_step(self, step: int, app_state: dict[str, Stateful], *, final_step: bool = False) -> None:
        """Start a checkpoint of `step` if it is due (every_steps, or the final step).

        Call after the optimizer step and the LR-scheduler step of `step`. Small state is captured
        now; tensors are copied in the background (lazy) or everything is written before returning (sync).
        """
        if not self._due(step, final_step):
            return
        start = time.perf_counter()
        self._finish_inflight()  # at most one checkpoint in flight
        if not self._disabled:
            self._start(step, app_state)
        self.stats.stall_after_s.append(time.perf_counter() - start)

    def wait(self) -> None:
        """Block until the in-flight checkpoint is committed on every level (or has failed)."""
        self._finish_inflight()

    def close(self) -> None:
        """Finish in-flight work (flush all levels) and join the background thread."""
        try:
            self._finish_inflight()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self.disk is not None:  # the buffers go with it: nothing may use them after close
                self.disk.close()
                self._memory = None
                self.snapshot = HostSnapshot(self.disk.buffers.allocate)

    # --- internals -----------------------------------------------------------------------
    def _require_shared_dirs(self) -> None:
        """ConfigError on every rank when a level that must be shared is not (ranks would write disjoint halves)."""
        for level in loader.shared_levels(self.cfg):
            directory = self.cfg.level_dir(level)
            blind = node_local.ranks_not_seeing(self.comms, directory)
            if blind:
                fix = ("set checkpoint.node_local: true (with a persistent_dir on shared storage to resume elsewhere)"
                       if level == "local" else "point checkpoint.persistent_dir at storage every node mounts")
                raise ConfigError(f"checkpoint: the {level} level's directory {directory} is not shared by all ranks "
                                  f"(rank(s) {blind} do not see rank 0's files there); {fix}")

    def _due(self, step: int, final_step: bool) -> bool:
        if not self.cfg.enabled:
            return False
        periodic = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        return periodic or final_step or step == self.final_step

    def _start(self, step: int, app_state: dict[str, Stateful]) -> None:
        # a node-local copy is loaded alone, so every rank keeps the replicated state in it
        tensors, payload = capture(self.kinds, step, app_state, self.rank, replicated_everywhere=self.cfg.node_local)
        self._memory = None  # the host buffers are about to be overwritten
        self.snapshot.begin(tensors)
        self.stats.started += 1
        if self.cfg.mode == "sync":
            self._guarded(self._save, payload)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshweave-ckpt", initializer=_one_intra_op_thread)
        self._inflight = self._executor.submit(self._save, payload)

    def _save(self, payload: SavePayload) -> None:
        """The whole save of one checkpoint: host copy, then every disk level in order."""
        step = payload.step
        self.snapshot.copy(self.copy_hook, halfway=lambda: maybe_crash("copy", step, self.rank))
        payload.tensors = self.snapshot.staged_state_dict()
        self.snapshot.release_sources()
        if "memory" in self.cfg.levels:
            self._memory = payload
        committed = None
        for level in self.cfg.disk_levels():
            level_dir = self.cfg.level_dir(level)
            if level == node_local.LEVEL and self.cfg.node_local:
                # each rank's own copy; not a checkpoint another level can copy, so the next one is written anew
                self.writer.write_own_copy(level, str(node_local.rank_dir(level_dir, self.rank)), node_local.rank_payload(payload),
                                           {node_local.INFO: node_local.info(self.rank, self.world_size, payload.tensors)})
            elif committed is None:
                committed = self.writer.write_dcp(level, level_dir, payload)
            else:
                committed = self.writer.promote(level, committed, level_dir, step)
        self.stats.committed += 1

    def _finish_inflight(self) -> None:
        future, self._inflight = self._inflight, None
        if future is not None:
            self._guarded(future.result)

    def _guarded(self, fn, *args) -> None:  # noqa: ANN001
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a failed save must not silently vanish
            self.stats.failed += 1
            if self.on_error == "raise":
                raise
            log.error("checkpoint save failed: %s", err, exc_info=True)
            if self.world_size > 1:
                self._disabled = True
                log.error("checkpointing disabled for the rest of this run (the checkpoint group may be out of step)")


def _one_intra_op_thread() -> None:
    """Keep the flush thread's CPU work (copies, serialisation) off the training thread's cores.

    The OpenMP thread count is per calling thread, so this does not change the training thread's;
    without it the background copy starts a second OpenMP team that competes with (and, on a busy
    machine, stalls) the forward/backward running at the same time.
    """
    torch.set_num_threads(1)
