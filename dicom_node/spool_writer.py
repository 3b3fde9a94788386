"""Writes to a spool file straight on its descriptor, the few small ones gathered, and the
file read back on that same descriptor.

A spool file takes a 132-byte preamble, a file meta header of about 200 bytes, then one data
set fragment per PDU, each flushed at once (never held in memory). Python's buffered file
would do that in as many writes, but opening it costs three system calls first (fstat, the
isatty ioctl, lseek), and under load each system call is a hand-off of the GIL. Here small
writes wait, in memory, for the next large one or a flush, and go out with it in one writev.
Reading the finished file back on the descriptor (opened for reading and writing) spares the
C-STORE handler an open, a stat and a close.
"""

from __future__ import annotations

import os

HOLD_BYTES = 4096  # writes smaller than this wait for the next (the preamble, the file meta)


class SpoolWriter:
    """The part of a binary file the spool file's writers use (write, flush, fileno, close),
    and ``read_all`` for its reader."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.size = 0  # bytes written so far, held ones included

    def write(self, data) -> int:
        size = len(data)
        self.size += size
        if self._held_bytes + size < HOLD_BYTES:
            self._held.append(bytes(data))  # a copy: the caller may reuse its buffer
            self._held_bytes += size
            return size
        self._write_all([*self._held, data])
        return size

    def flush(self) -> None:
        if self._held:
            self._write_all(self._held)

    def read_all(self) -> bytes:
        """Everything written so far (the descriptor must be open for reading too)."""
        self.flush()
        fd, chunks, offset = self.fileno(), [], 0
        while offset < self.size:
            chunk = os.pread(fd, self.size - offset, offset)
            if not chunk:
                raise OSError(f"spool file shorter than the {self.size} bytes written to it")
            chunks.append(chunk)
            offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("I/O operation on closed spool file")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _write_all(self, buffers: list) -> None:
        fd = self.fileno()
        self._held, self._held_bytes = [], 0
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        while views:
            written = os.writev(fd, views)
            while views and written >= len(views[0]):  # a short write (rare on a local file): go on
                written -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][written:]
