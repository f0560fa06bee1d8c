"""Host staging of model/optimizer tensors: buffers allocated once, copies that overlap compute.

This is the DataStates-LLM "lazy" snapshot, written by hand because DCP's own stager re-allocates
(and re-pins) its buffers on every save in recent torch versions and records no dependency on the
compute stream. Each tensor leaf (for a DTensor: its local shard) gets one host buffer, reused by
every later save. The copy is started right after the optimizer step and runs while the next
forward/backward run (they only read those tensors); `wait()` is the point to call before the next
optimizer step mutates them.

CUDA path: pinned buffers, copies on a side stream that first waits on an event recorded on the
compute stream after the optimizer step (so it never reads half-updated values). CPU path (the twin
the tests run): a plain copy in the background thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

CopyHook = Callable[[str], None]


@dataclass
class _Source:
    """What a copy reads: the local tensor, plus what is needed to rebuild a DTensor around the copy."""

    local: torch.Tensor
    layout: tuple | None  # (mesh, placements, global shape, global stride, spec) of a DTensor source


class HostSnapshot:
    """Host copies of one checkpoint's tensor leaves, in buffers reused across saves."""

    def __init__(self, allocate: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None) -> None:
        """allocate(shape, dtype): where CPU buffers come from (default: torch.empty, pinned for CUDA
        sources); the process writer passes shared-memory segments (disk_writer.SharedBuffers)."""
        self._allocate = allocate
        self.buffers: dict[str, torch.Tensor] = {}
        self._sources: dict[str, _Source] = {}
        self._ready = threading.Event()
        self._ready.set()
        self._start_event = None  # CUDA event recorded after the optimizer step
        self._stream = None
        self._device: torch.device | None = None
        self.allocated_bytes = 0

    # --- training thread -------------------------------------------------------------
    def begin(self, leaves: dict[str, torch.Tensor]) -> None:
        """Take references to the tensors to copy and order the copy after the work queued so far.

        Called in the training thread; allocates buffers only for new or changed leaves.
        """
        self._ready.clear()
        self._sources = {k: _source(v) for k, v in leaves.items()}
        for key, src in self._sources.items():
            self._ensure_buffer(key, src.local)
        for stale in set(self.buffers) - set(self._sources):
            self.allocated_bytes -= _nbytes(self.buffers.pop(stale))
        cuda = [s.local.device for s in self._sources.values() if s.local.is_cuda]
        if cuda:
            self._device = cuda[0]  # one accelerator per rank
            self._start_event = torch.cuda.Event()
            self._start_event.record(torch.cuda.current_stream(self._device))

    def _ensure_buffer(self, key: str, local: torch.Tensor) -> None:
        buf = self.buffers.get(key)
        if buf is not None and buf.shape == local.shape and buf.dtype == local.dtype:
            return
        if buf is not None:
            self.allocated_bytes -= _nbytes(buf)
        if self._allocate is not None:  # shared memory is not pinned: the CUDA copy is then a pageable one
            self.buffers[key] = self._allocate(local.shape, local.dtype)
        else:
            pin = local.is_cuda and torch.cuda.is_available()
            self.buffers[key] = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        self.allocated_bytes += _nbytes(self.buffers[key])

    def wait(self) -> None:
        """Block until the copy started by `begin` has finished (the sources may then change)."""
        self._ready.wait()

    def is_copied(self) -> bool:
        return self._ready.is_set()

    # --- background thread -----------------------------------------------------------
    def copy(self, hook: CopyHook | None = None, halfway: Callable[[], None] | None = None) -> None:
        """Copy every source into its buffer; then release the sources and signal `wait`.

        `hook(key)` runs before each tensor (tests slow the copy with it); `halfway()` runs once
        half of the tensors are copied (the crash point "copy").
        """
        try:
            keys = list(self._sources)
            if self._start_event is not None:
                self._copy_cuda(keys, hook, halfway)
            else:
                self._copy_cpu(keys, hook, halfway)
        finally:
            self._start_event = None
            self._ready.set()

    def _copy_cpu(self, keys: list[str], hook: CopyHook | None, halfway: Callable[[], None] | None) -> None:
        for i, key in enumerate(keys):
            if halfway is not None and i == len(keys) // 2:
                halfway()
            if hook is not None:
                hook(key)
            self.buffers[key].copy_(self._sources[key].local)

    def _copy_cuda(self, keys: list[str], hook: CopyHook | None, halfway: Callable[[], None] | None) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self._device)
        # The background thread's current device is 0 by default: name this rank's device explicitly.
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._stream.wait_event(self._start_event)
            for i, key in enumerate(keys):
                if halfway is not None and i == len(keys) // 2:
                    self._stream.synchronize()
                    halfway()
                if hook is not None:
                    hook(key)
                self.buffers[key].copy_(self._sources[key].local, non_blocking=True)
        # The sources stay referenced until the copies they feed have completed.
        self._stream.synchronize()

    def staged_state_dict(self) -> dict[str, torch.Tensor]:
        """The copied leaves as DCP input: buffers, re-wrapped as DTensors where the source was one."""
        out: dict[str, torch.Tensor] = {}
        for key, src in self._sources.items():
            buf = self.buffers[key]
            if src.layout is None:
                out[key] = buf
            else:
                out[key] = _host_dtensor(buf, src.layout)
        return out

    def release_sources(self) -> None:
        """Drop the references to the live tensors (keeps the buffers)."""
        self._sources = {k: _Source(self.buffers[k], s.layout) for k, s in self._sources.items()}


def _source(t: torch.Tensor) -> _Source:
    if isinstance(t, DTensor):
        return _Source(t.to_local().detach(), (t.device_mesh, t.placements, t.shape, t.stride(), t._spec))
    return _Source(t.detach(), None)


def _host_dtensor(buf: torch.Tensor, layout: tuple) -> DTensor:
    """A DTensor with the source's sharding whose local shard is the host buffer.

    `DTensor.from_local` would move a CPU shard onto a CUDA mesh's device (undoing the staging), so
    for a non-CPU mesh the DTensor is built from the source's spec directly, as DCP's stager does.
    """
    mesh, placements, shape, stride, spec = layout
    if mesh.device_type == buf.device.type:
        return DTensor.from_local(buf, mesh, placements, run_check=False, shape=shape, stride=stride)
    return DTensor(buf, spec, requires_grad=False)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
