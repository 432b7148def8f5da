"""Server-to-client messages of the session socket, typed (CONTRACT.md, "Server to client").

The one place the SDK reads server JSON: everything else handles these models. The names match
the server's own models so that this module can give way to ``stream_server.protocol``'s.
Unknown fields are kept (``extra="allow"``): servers may add fields, and old clients keep working.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class _Server(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    id: str | int | None = None


class Welcome(_Server):
    type: Literal["welcome"]
    session: str
    tier: str
    resume: str
    engine: str | None = None
    limits: dict[str, float | int] = Field(default_factory=dict)


class Queued(_Server):
    type: Literal["queued"]
    position: int
    queue_size: int
    tier: str
    eta_s: float | None = None


class Granted(_Server):
    type: Literal["granted"]
    waited_s: float


class Redirect(_Server):
    type: Literal["redirect"]
    url: str
    grant: str


class StreamStart(_Server):
    type: Literal["stream"]
    transport: Literal["mse", "webrtc"]
    mime: str | None = None
    width: int
    height: int
    fps: int


class WebrtcAnswer(_Server):
    type: Literal["webrtc_answer"]
    sdp: str


class Progress(_Server):
    type: Literal["progress"]
    frames: int
    total: int | None = None


class Done(_Server):
    type: Literal["done"]
    frames: int
    duration_s: float
    clip: str | None = None


class ErrorMessage(_Server):
    type: Literal["error"]
    code: str
    message: str
    retry_after_s: float | None = None


class Pong(_Server):
    type: Literal["pong"]


ServerMessage = Annotated[
    Welcome | Queued | Granted | Redirect | StreamStart | WebrtcAnswer | Progress | Done | ErrorMessage | Pong,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class UnexpectedMessage(ValueError):
    """The server sent text that is not one of the contract's messages."""


def parse_server_message(text: str | bytes) -> ServerMessage:
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise UnexpectedMessage(f"the server sent text that is not JSON: {exc}") from None
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise UnexpectedMessage(f"the server sent a {kind!r} message this client cannot read: {exc}") from None
