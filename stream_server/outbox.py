"""One writer per socket: control messages in order, the latest queue status coalesced, media bounded.

Nothing that wants to talk to a client awaits the socket itself: it hands the outbox a message and
goes on. A slow client therefore never stalls the position fan-out or another session, and what
it has not read yet is bounded: ``max_bytes`` (``limits.outbox_bytes``) for everything queued, text
included. Media may fill half of it (``send_media`` waits for room), so control messages always
have the other half; text beyond the whole bound means a client that does not read, and the
outbox gives up on it (``on_stuck``).

A write that cannot go out for ``stall_timeout_s`` (the client stopped reading: the socket's send
buffer stays full) also gives up: the outbox closes, and ``on_stuck`` is told, whose job is to abort
the connection (a clean close would wait for the unsent bytes too).

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


class OutboxTally:
    """Bytes queued in every outbox of the node, for the metric; one per node."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Outbox:
    __slots__ = (
        "_send", "coalesce_s", "max_bytes", "stall_timeout_s", "_tally", "_items", "_bytes", "_media_bytes",
        "_status", "_tokens", "_refilled_at", "_writer", "_nap", "_room", "closed", "stuck", "on_status_sent",
        "on_stuck",
    )

    def __init__(
        self,
        send: Sender,
        *,
        coalesce_s: float,
        max_bytes: int = 8 << 20,
        stall_timeout_s: float | None = None,
        tally: OutboxTally | None = None,
    ) -> None:
        self._send = send
        self.coalesce_s = coalesce_s
        self.max_bytes = max_bytes
        self.stall_timeout_s = stall_timeout_s
        self._tally = tally or OutboxTally()
        self._items: deque[str | bytes] | None = None
        """What waits to be written, while anything does: an empty deque costs 600 bytes, and a
        thousand clients waiting in line have nothing but their status to be sent."""
        self._bytes = 0
        """Bytes queued (text and media), not yet handed to the socket."""
        self._media_bytes = 0
        self._status: str | None = None
        self._tokens = float(STATUS_BURST)
        self._refilled_at = time.monotonic()
        self._writer: asyncio.Task[None] | None = None
        self._nap: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.closed = False
        self.stuck: str | None = None
        """Why the outbox gave up on its client (it stopped reading), once it did."""
        self.on_status_sent: Callable[[], None] | None = None
        self.on_stuck: Callable[[str], None] | None = None

    def _queue(self) -> deque[str | bytes]:
        if self._items is None:
            self._items = deque()
        return self._items

    def send(self, text: str) -> None:
        if self.closed:
            return
        if self._bytes + len(text) > self.max_bytes:
            self._give_up(f"more than {self.max_bytes} bytes unread")
            return
        self._queue().append(text)
        self._count(len(text))
        self._kick()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def _count(self, n: int) -> None:
        self._bytes += n
        self._tally.bytes += n

    def set_status(self, text: str | None) -> None:
        """Replace the pending queue status; only the newest one is ever sent."""
        if not self.closed:
            self._status = text
            if text is not None:
                self._kick()

    async def send_media(self, data: bytes) -> None:
        while self._media_bytes >= self.max_bytes // 2 and not self.closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self.closed:
            raise OutboxClosed
        self._queue().append(data)
        self._media_bytes += len(data)
        self._count(len(data))
        self._kick()

    async def drained(self) -> None:
        """Wait until everything handed over so far has been written to the socket."""
        while self._writer is not None and not self._writer.done():
            _wake(self._nap)
            await asyncio.shield(self._writer)

    def close(self) -> None:
        self.closed = True
        self._items = None
        self._count(-self._bytes)
        self._media_bytes = 0
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
                    self._count(-len(item))
                    if isinstance(item, bytes):
                        self._media_bytes -= len(item)
                        _wake(self._room)
                    await self._write(item)
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
                await self._write(status)
                if self.on_status_sent is not None:
                    self.on_status_sent()
        except Exception:
            self.close()

    async def _write(self, item: str | bytes) -> None:
        """Hand one item to the socket; give up on a client that takes none of it for
        ``stall_timeout_s``."""
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                await self._send(item)
        except TimeoutError:
            self._give_up(f"nothing read for {self.stall_timeout_s:g} s")

    def _give_up(self, why: str) -> None:
        if self.stuck is None:
            self.stuck = why
            if self.on_stuck is not None:
                self.on_stuck(why)
        self.close()
