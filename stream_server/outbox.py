"""One writer per socket: control messages in order, the latest queue status coalesced, media bounded.

Nothing that wants to talk to a client awaits the socket itself: it hands the outbox a message and
goes on. A slow client therefore never stalls the position fan-out or another session, and the
media it has not read yet is bounded (``send_media`` waits for room).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

Sender = Callable[[str | bytes], Awaitable[None]]
STATUS_BURST = 2


class OutboxClosed(Exception):
    pass


class Outbox:
    def __init__(self, send: Sender, *, coalesce_s: float, max_media_bytes: int = 4 << 20) -> None:
        self._send = send
        self.coalesce_s = coalesce_s
        self.max_media_bytes = max_media_bytes
        self._items: deque[str | bytes] = deque()
        self._media_bytes = 0
        self._status: str | None = None
        self._status_tokens = float(STATUS_BURST)
        self._status_refill_at = time.monotonic()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False
        self.on_status_sent: Callable[[], None] | None = None

    def send(self, text: str) -> None:
        if self.closed:
            return
        self._items.append(text)
        self._drained.clear()
        self._wake.set()

    def set_status(self, text: str | None) -> None:
        """Replace the pending queue status; only the newest one is ever sent."""
        if self.closed:
            return
        self._status = text
        if text is not None:
            self._drained.clear()
            self._wake.set()

    async def send_media(self, data: bytes) -> None:
        while self._media_bytes >= self.max_media_bytes and not self.closed:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            raise OutboxClosed
        self._items.append(data)
        self._media_bytes += len(data)
        self._drained.clear()
        self._wake.set()

    async def drained(self) -> None:
        """Wait until everything handed over so far has been written to the socket."""
        await self._drained.wait()

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._status = None
        self._room.set()
        self._drained.set()
        self._wake.set()

    def _status_wait(self) -> float:
        """Seconds until the next status may go: a token bucket of ``STATUS_BURST`` refilled once
        per ``coalesce_s``, so a change after a quiet spell (or a heartbeat) is never delayed."""
        now = time.monotonic()
        if self.coalesce_s <= 0:
            return 0.0
        self._status_tokens = min(
            float(STATUS_BURST), self._status_tokens + (now - self._status_refill_at) / self.coalesce_s
        )
        self._status_refill_at = now
        return 0.0 if self._status_tokens >= 1.0 else (1.0 - self._status_tokens) * self.coalesce_s

    async def run(self) -> None:
        """The writer loop; ends when the outbox closes or the socket fails."""
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                while self._items and not self.closed:
                    item = self._items.popleft()
                    if isinstance(item, bytes):
                        self._media_bytes -= len(item)
                        self._room.set()
                    await self._send(item)
                if self._status is not None and not self.closed:
                    wait = self._status_wait()
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), wait)
                        self._wake.set()
                        continue
                    status, self._status = self._status, None
                    self._status_tokens -= 1.0
                    await self._send(status)
                    if self.on_status_sent is not None:
                        self.on_status_sent()
                if not self._items and self._status is None:
                    self._drained.set()
        finally:
            self.close()
