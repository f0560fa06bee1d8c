"""The checkpoint writer process (see disk_writer.py): run as a script, standard library only.

Reads length-prefixed JSON requests on stdin, answers each with length-prefixed JSON on stdout:
  {"op": "write", "path": F, "pieces": [[P, off, n], ...], "fsync": bool, "adopt": [P, ...]}
                                                      -> {"size", "crc32"}; adopted segments are removed when we exit
  {"op": "copy", "src": S, "dst": D}                  -> {"size", "crc32"} (dst fsynced)
An OSError becomes {"error": {"errno", "strerror", "filename", "message"}}. At the end of stdin (the
training process closed it, or died) every adopted segment is removed and the process exits.
"""

import json
import mmap
import os
import struct
import sys
import zlib

LEN = struct.Struct("<Q")
CHUNK = 1 << 22


def _segment(maps, path):
    found = maps.get(path)
    if found is None:
        fd = os.open(path, os.O_RDONLY)
        try:
            found = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        maps[path] = found
    return found


def _write(maps, request):
    crc, size = 0, 0
    with open(request["path"], "wb") as out:
        for path, offset, length in request["pieces"]:
            view = memoryview(_segment(maps, path))[offset:offset + length]
            for start in range(0, length, CHUNK):
                chunk = view[start:start + CHUNK]
                crc = zlib.crc32(chunk, crc)
                out.write(chunk)
            size += length
            view.release()
        out.flush()
        if request.get("fsync", True):
            os.fsync(out.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def _copy(request):
    crc, size = 0, 0
    with open(request["src"], "rb") as fin, open(request["dst"], "wb") as fout:
        while chunk := fin.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def _read_exact(stream, n):
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            return None
        data += more
    return data


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    adopted, maps = [], {}
    try:
        while True:
            head = _read_exact(stdin, LEN.size)
            if head is None:
                return
            request = json.loads(_read_exact(stdin, LEN.unpack(head)[0]) or b"{}")
            op = request.get("op")
            adopted.extend(request.get("adopt", []))
            try:
                if op == "write":
                    reply = _write(maps, request)
                elif op == "copy":
                    reply = _copy(request)
                else:
                    reply = {"error": {"errno": None, "message": f"unknown request {op!r}"}}
            except OSError as err:
                reply = {"error": {"errno": err.errno, "strerror": err.strerror, "message": str(err),
                                   "filename": None if err.filename is None else os.fsdecode(err.filename)}}
            raw = json.dumps(reply).encode()
            stdout.write(LEN.pack(len(raw)) + raw)
            stdout.flush()
    finally:
        for m in maps.values():
            m.close()
        for path in adopted:
            try:
                os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    main()
