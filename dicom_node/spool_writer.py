"""Writes to a spool file straight on its descriptor, the few small ones gathered, and the
file read back on that same descriptor.

A spool file takes a 132-byte preamble, a file meta header of about 200 bytes, then one data
set fragment per PDU, each flushed by its writer as it arrives (never held in memory).
Python's buffered file would do that in as many writes, but opening it costs three system
calls first (fstat, the isatty ioctl, lseek), and under load each system call is a hand-off
of the GIL. Here small writes wait, in memory, for the next large one or a flush, and go out
with it in one writev.
Reading the finished file back on the descriptor (opened for reading and writing) spares the
C-STORE handler an open, a stat and a close.
"""

from __future__ import annotations

import os
import threading

from . import gil_held

HOLD_BYTES = 4096  # writes smaller than this wait for the next (the preamble, the file meta)


class SpoolWriter:
    """The part of a binary file the spool file's writers use (write, flush, close), and
    ``read_all`` and ``sync`` for its reader. One thread writes, reads and syncs; another may
    close it meanwhile (a connection's end removing what a handler still holds): a lock keeps
    a closed, maybe reused, descriptor number from being written, read or fsynced."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._held = bytearray()  # small writes, copied: the caller may reuse its buffer
        self._lock = threading.Lock()
        self.size = 0  # bytes written so far, held ones included

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        with self._lock:
            fd = self._open_fd()
            if len(self._held) + size < HOLD_BYTES:
                self._held += data
            else:
                _write_all(fd, [self._held, data] if self._held else [data])
                self._held = bytearray()
            self.size += size
        return size

    def flush(self) -> None:
        with self._lock:
            self._flush(self._open_fd())

    def read_all(self) -> bytes:
        """Everything written so far (the descriptor must be open for reading too)."""
        with self._lock:
            fd = self._open_fd()
            self._flush(fd)
            chunks, offset = [], 0
            while offset < self.size:
                chunk = os.pread(fd, self.size - offset, offset)
                if not chunk:
                    raise OSError(f"spool file shorter than the {self.size} bytes written to it")
                chunks.append(chunk)
                offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def sync(self, mode: int) -> None:
        """Make what was written durable: held writes out, the file's mode set, fsynced."""
        with self._lock:  # held meanwhile: a close from another thread waits for the fsync
            fd = self._open_fd()
            self._flush(fd)
            gil_held.fchmod(fd, mode)
            os.fsync(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                self._flush(fd)
            finally:
                gil_held.close(fd)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError("I/O operation on closed spool file")
        return self._fd

    def _flush(self, fd: int) -> None:
        if self._held:
            _write_all(fd, [self._held])
            self._held = bytearray()


def _write_all(fd: int, buffers: list) -> None:
    """All of `buffers` (at most two), in order, in one writev unless the kernel writes less."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(f"writev wrote nothing of {sum(len(view) for view in views)} bytes")
        while views and written >= len(views[0]):  # a short write (rare on a local file): go on
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]
