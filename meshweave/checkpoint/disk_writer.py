"""The lazy checkpointer's disk writes in a separate process (`checkpoint.writer: process`).

With the default thread writer the checkpointer's background thread writes, fsyncs and checksums every
file inside the training process, where it competes with the training thread for the interpreter and
the cores. With the process writer the training process pays only the host copy (and the small
planning/commit collectives): the bytes are written, fsynced and CRC32-checksummed by one writer
process per rank, spawned once at the first save.

How the bytes get there without pickling anything: the host staging buffers are allocated in shared
memory segments (files under /dev/shm, one per buffer, created by the training process), and each
request names a destination file and the (segment, offset, length) pieces to write into it, in order.
Requests and replies are length-prefixed JSON over the writer's stdin/stdout pipes. The writer runs
`disk_writer_main.py` as a script (`python -I`): it imports neither torch nor meshweave, so it starts
in tens of milliseconds and can be fed nothing but paths and byte ranges.

Failures: an OSError in the writer comes back with its errno and file name and is raised as an
OSError in the caller (so DCP and the save's agreement report it like a failed write of the thread
writer: exit 3); a writer that died is a DiskWriterError naming its pid. The writer adopts every segment (each
write request names the ones new since the last) and removes them when its input closes, so a
training process that is killed after its first save leaves no segment behind.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import torch

_MAIN = Path(__file__).with_name("disk_writer_main.py")
_LEN = struct.Struct("<Q")


class DiskWriterError(RuntimeError):
    """The writer process is gone or answered something unexpected."""


class SharedBuffers:
    """Allocates CPU tensors in shared memory segments and finds the segment range of a tensor's bytes."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        if self.directory is None:
            import tempfile

            self.directory = tempfile.gettempdir()
        self._segments: list[tuple[int, int, str, mmap.mmap]] = []  # (start address, end, path, map)
        self._count = 0
        self.unadopted: list[str] = []  # segments the writer process has not been told about yet

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        self._count += 1
        path = os.path.join(self.directory, f"meshweave-ckpt-{os.getpid()}-{self._count}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapped = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.unadopted.append(path)
        tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes).view(dtype).reshape(shape)
        self._segments.append((tensor.data_ptr(), tensor.data_ptr() + nbytes, path, mapped))
        return tensor

    def locate(self, tensor: torch.Tensor) -> tuple[str, int, int] | None:
        """(segment path, byte offset, byte length) of a contiguous CPU tensor's bytes; None if not shared."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return ("", 0, 0)
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        for lo, hi, path, _ in self._segments:
            if lo <= start and start + nbytes <= hi:
                return path, start - lo, nbytes
        return None

    def release(self) -> None:
        """Remove the segments (the tensors allocated here must no longer be used)."""
        for _, _, path, _ in self._segments:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._segments.clear()


class DiskWriterProcess:
    """One writer process (started on first use); `write` and `copy` block until it has answered."""

    def __init__(self, buffers: SharedBuffers) -> None:
        self.buffers = buffers
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one request at a time (the background thread; close from another)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                raise DiskWriterError(f"the checkpoint writer process (pid {self._proc.pid}) exited with "
                                      f"status {self._proc.returncode}")
            self._proc = subprocess.Popen([sys.executable, "-I", str(_MAIN)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, close_fds=True)
        return self._proc

    def _request(self, message: dict) -> dict:
        with self._lock:
            proc = self._ensure_started()
            raw = json.dumps(message).encode()
            try:
                proc.stdin.write(_LEN.pack(len(raw)) + raw)
                proc.stdin.flush()
                head = proc.stdout.read(_LEN.size)
                body = proc.stdout.read(_LEN.unpack(head)[0]) if len(head) == _LEN.size else b""
            except (BrokenPipeError, OSError) as err:
                raise DiskWriterError(f"the checkpoint writer process (pid {proc.pid}) is gone: {err}") from None
            if len(head) != _LEN.size:
                proc.wait(5)
                raise DiskWriterError(f"the checkpoint writer process (pid {proc.pid}) exited with status "
                                      f"{proc.returncode} during {message['op']}")
        reply = json.loads(body)
        error = reply.get("error")
        if error is not None:
            if error.get("errno") is not None:
                raise OSError(error["errno"], error["strerror"], error.get("filename"))
            raise DiskWriterError(f"checkpoint writer process: {error['message']}")
        return reply

    def write(self, path: str | os.PathLike, pieces: list[tuple[str, int, int]], fsync: bool = True) -> tuple[int, str]:
        """Write the pieces, in order, as the file `path`; (size, CRC32 as 8 hex digits) of what was written."""
        adopt, self.buffers.unadopted = self.buffers.unadopted, []  # the writer removes them when it ends
        reply = self._request({"op": "write", "path": os.fspath(path), "pieces": [list(p) for p in pieces if p[2]],
                               "fsync": fsync, "adopt": adopt})
        return reply["size"], reply["crc32"]

    def copy(self, src: str | os.PathLike, dst: str | os.PathLike) -> tuple[int, str]:
        """Copy a file (fsynced); (size, CRC32) of the bytes read."""
        reply = self._request({"op": "copy", "src": os.fspath(src), "dst": os.fspath(dst)})
        return reply["size"], reply["crc32"]

    def close(self) -> None:
        """Stop the writer (it removes the segments it adopted) and remove the segments."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.buffers.release()
        self.buffers.unadopted.clear()
