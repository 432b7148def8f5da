"""The session socket's way to cut a client off that does not read.

A WebSocket close, and the transport's own ``close``, both wait until the bytes already written
have gone out; a client that stopped reading never takes them, so the connection (and whatever
waits on it) would stay for good. This protocol puts the transport's ``abort`` into the ASGI
scope's extensions, under ``ABORT``, so the application can drop such a connection at once.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

ABORT = "musetalk_stream.abort"


class AbortableWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol, with ``transport.abort`` in ``scope["extensions"]``."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][ABORT] = {"abort": self.transport.abort}
