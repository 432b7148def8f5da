"""Bytes kept as received: in memory up to a threshold, beyond it in an anonymous temporary file.

File writes and reads run in worker threads; the owner serialises calls (``AudioInput`` holds a
lock), so chunks stay in order. The file has no name (``tempfile.TemporaryFile``): it is gone when
closed or when the process ends, whatever happens. It is unbuffered: a waiting request holds no
file buffer in memory, only a descriptor.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import IO


class Spool:
    def __init__(self, memory_limit: int) -> None:
        self.memory_limit = memory_limit
        self.size = 0
        self._memory = bytearray()
        self._file: IO[bytes] | None = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    async def append(self, data: bytes) -> None:
        if self._file is None and self.size + len(data) <= self.memory_limit:
            self._memory += data
        elif self._file is None:
            held, self._memory = bytes(self._memory), bytearray()
            self._file = await asyncio.to_thread(_new_file, held + data)
        else:
            await asyncio.to_thread(_write_all, self._file, data)
        self.size += len(data)

    async def read(self, start: int, end: int) -> bytes:
        if self._file is None:
            return bytes(self._memory[start:end])
        return await asyncio.to_thread(_read_range, self._file, start, end)

    def read_blocking(self, start: int, end: int) -> bytes:
        """``read`` for a worker thread that goes on to use the bytes at once: work waiting for
        a thread then holds no copy of them."""
        if self._file is None:
            return bytes(self._memory[start:end])
        return _read_range(self._file, start, end)

    def reset(self) -> None:
        """Forget everything; the file (if any) is closed in a worker thread."""
        file, self._file = self._file, None
        self._memory = bytearray()
        self.size = 0
        if file is not None:
            asyncio.get_running_loop().run_in_executor(None, file.close)


def _new_file(data: bytes) -> IO[bytes]:
    file = tempfile.TemporaryFile(prefix="mts-audio-", buffering=0)  # noqa: SIM115 - the Spool closes it
    _write_all(file, data)
    return file


def _write_all(file: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(file.fileno(), view) :]


def _read_range(file: IO[bytes], start: int, end: int) -> bytes:
    parts = []
    while start < end:
        part = os.pread(file.fileno(), end - start, start)
        if not part:
            raise EOFError(f"the spool file ends at {start} bytes, {end} were written")
        parts.append(part)
        start += len(part)
    return b"".join(parts)
