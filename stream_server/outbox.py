"""One writer per socket: control messages in order, the latest queue status coalesced, media bounded.

Nothing that wants to talk to a client awaits the socket itself: it hands the outbox a message and
goes on. A slow client therefore never stalls the position fan-out or another session, and the
media it has not read yet is bounded (``send_media`` waits for room).

The writer task exists only while there is something to write: a thousand clients waiting in line
cost a thousand small objects, not a thousand sleeping tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

Sender = Callable[[str | bytes], Awaitable[None]]
STATUS_BURST = 2


class OutboxClosed(Exception):
    pass


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Outbox:
    __slots__ = (
        "_send", "coalesce_s", "max_media_bytes", "_items", "_media_bytes", "_status", "_tokens",
        "_refilled_at", "_writer", "_nap", "_room", "closed", "on_status_sent",
    )

    def __init__(self, send: Sender, *, coalesce_s: float, max_media_bytes: int = 4 << 20) -> None:
        self._send = send
        self.coalesce_s = coalesce_s
        self.max_media_bytes = max_media_bytes
        self._items: deque[str | bytes] | None = None
        """What waits to be written, while anything does: an empty deque costs 600 bytes, and a
        thousand clients waiting in line have nothing but their status to be sent."""
        self._media_bytes = 0
        self._status: str | None = None
        self._tokens = float(STATUS_BURST)
        self._refilled_at = time.monotonic()
        self._writer: asyncio.Task[None] | None = None
        self._nap: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.closed = False
        self.on_status_sent: Callable[[], None] | None = None

    def _queue(self) -> deque[str | bytes]:
        if self._items is None:
            self._items = deque()
        return self._items

    def send(self, text: str) -> None:
        if not self.closed:
            self._queue().append(text)
            self._kick()

    def set_status(self, text: str | None) -> None:
        """Replace the pending queue status; only the newest one is ever sent."""
        if not self.closed:
            self._status = text
            if text is not None:
                self._kick()

    async def send_media(self, data: bytes) -> None:
        while self._media_bytes >= self.max_media_bytes and not self.closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self.closed:
            raise OutboxClosed
        self._queue().append(data)
        self._media_bytes += len(data)
        self._kick()

    async def drained(self) -> None:
        """Wait until everything handed over so far has been written to the socket."""
        while self._writer is not None and not self._writer.done():
            _wake(self._nap)
            await asyncio.shield(self._writer)

    def close(self) -> None:
        self.closed = True
        self._items = None
        self._status = None
        _wake(self._room)
        _wake(self._nap)
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        else:
            _wake(self._nap)

    def _status_wait(self) -> float:
        """Seconds until the next status may go: a token bucket of ``STATUS_BURST`` refilled once
        per ``coalesce_s``, so a change after a quiet spell (or a heartbeat) is never delayed."""
        if self.coalesce_s <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(float(STATUS_BURST), self._tokens + (now - self._refilled_at) / self.coalesce_s)
        self._refilled_at = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) * self.coalesce_s

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                items = self._items
                if items:
                    item = items.popleft()
                    if isinstance(item, bytes):
                        self._media_bytes -= len(item)
                        _wake(self._room)
                    await self._send(item)
                    continue
                self._items = None
                if self._status is None:
                    return
                wait = self._status_wait()
                if wait > 0:
                    self._nap = loop.create_future()
                    timer = loop.call_later(wait, _wake, self._nap)
                    try:
                        await self._nap
                    finally:
                        timer.cancel()
                        self._nap = None
                    continue
                status, self._status = self._status, None
                self._tokens -= 1.0
                await self._send(status)
                if self.on_status_sent is not None:
                    self.on_status_sent()
        except Exception:
            self.close()
