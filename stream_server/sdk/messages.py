"""The server's messages as the SDK reads them: the models of ``stream_server.protocol``, the one
typing of the wire in both directions, with a client-side error for text that is none of them."""

from __future__ import annotations

from stream_server.protocol import (
    AnyServerMessage,
    Done,
    ErrorMessage,
    Granted,
    Pong,
    Progress,
    Queued,
    Redirect,
    StreamStart,
    WebrtcAnswer,
    Welcome,
)
from stream_server.protocol import parse_server_message as _parse

ServerMessage = AnyServerMessage

__all__ = [
    "Done", "ErrorMessage", "Granted", "Pong", "Progress", "Queued", "Redirect", "ServerMessage", "StreamStart",
    "UnexpectedMessage", "WebrtcAnswer", "Welcome", "parse_server_message",
]


class UnexpectedMessage(ValueError):
    """The server sent text that is not one of the contract's messages."""


def parse_server_message(text: str | bytes) -> ServerMessage:
    try:
        return _parse(text)
    except ValueError as exc:
        raise UnexpectedMessage(f"the server sent a message this client cannot read: {exc}") from None
