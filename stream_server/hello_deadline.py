"""A socket must say ``hello`` within ``limits.hello_timeout_s`` of the upgrade, or it is closed.

Without this, sockets that answer pings but never start hold a file descriptor and a session each
for good. Only the wait before ``hello`` is bounded; ``ping`` before it does not extend the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from stream_server.protocol import CloseCode, ErrorCode, ProtocolError

T = TypeVar("T")


class HelloDeadline:
    def __init__(self, timeout_s: float, said_hello: Callable[[], bool]) -> None:
        self.timeout_s = timeout_s
        self._said_hello = said_hello
        self._at = asyncio.get_running_loop().time() + timeout_s

    async def receive(self, receive: Callable[[], Awaitable[T]]) -> T:
        """``receive()``, bounded by the deadline until ``hello`` was said; raises a
        ``ProtocolError`` that closes the socket with 1008 when the deadline passes."""
        if self._said_hello():
            return await receive()
        try:
            async with asyncio.timeout_at(self._at):
                return await receive()
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"no hello within {self.timeout_s:g} s of connecting",
                close=CloseCode.POLICY_VIOLATION,
            ) from None
