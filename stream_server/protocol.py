"""The session socket's wire protocol, typed once (CONTRACT.md, "Session socket").

Handlers never touch raw dictionaries: ``parse_client_message`` turns a text frame into one of the
client models or raises ``ProtocolError`` with the code the client will see.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class ErrorCode(enum.StrEnum):
    QUEUE_FULL = "queue_full"
    INVALID_TOKEN = "invalid_token"
    BAD_MESSAGE = "bad_message"
    MESSAGE_TOO_LARGE = "message_too_large"
    UNKNOWN_AVATAR = "unknown_avatar"
    BAD_AUDIO = "bad_audio"
    AUDIO_TOO_LONG = "audio_too_long"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    NOT_GRANTED = "not_granted"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    SESSION_EXPIRED = "session_expired"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    INVALID_TOKEN = 4401


class ProtocolError(Exception):
    """A client-visible error: becomes an ``error`` message (and optionally a close)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after_s: float | None = None,
        close: CloseCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.close = close


class _Client(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str | int | None = None


class Hello(_Client):
    type: Literal["hello"]
    token: str | None = None
    resume: str | None = None


class AudioSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["wav", "mp3", "ogg", "flac", "pcm_s16le"]
    sample_rate: int | None = Field(default=None, ge=8000, le=192_000)
    channels: int | None = Field(default=None, ge=1, le=8)


class Start(_Client):
    type: Literal["start"]
    avatar: str = Field(min_length=1, max_length=64)
    mode: Literal["clip", "live"]
    transport: Literal["mse", "webrtc"]
    audio: AudioSpec | None = None


class AudioEnd(_Client):
    type: Literal["audio_end"]


class WebrtcOffer(_Client):
    type: Literal["webrtc_offer"]
    sdp: str = Field(min_length=1, max_length=65_536)


class Interrupt(_Client):
    type: Literal["interrupt"]


class Cancel(_Client):
    type: Literal["cancel"]


class Ping(_Client):
    type: Literal["ping"]


ClientMessage = Annotated[
    Hello | Start | AudioEnd | WebrtcOffer | Interrupt | Cancel | Ping,
    Field(discriminator="type"),
]
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("hello", "start", "audio_end", "webrtc_offer", "interrupt", "cancel", "ping")


def parse_client_message(text: str) -> ClientMessage:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message is a JSON object with a \"type\"")
    kind = raw.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {kind!r}")
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: {problems}") from None


def message_id(text: str) -> Any:
    """Best-effort ``id`` of a message that failed to parse, so the error can echo it."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return raw.get("id") if isinstance(raw, dict) else None


# ----- server to client -----


def encode(kind: str, msg_id: Any = None, **fields: Any) -> str:
    """A server message as compact JSON; ``id`` is echoed only when the client gave one."""
    body: dict[str, Any] = {"type": kind, **fields}
    if msg_id is not None:
        body["id"] = msg_id
    return json.dumps(body, separators=(",", ":"))


def error_message(err: ProtocolError, msg_id: Any = None) -> str:
    fields: dict[str, Any] = {"code": err.code.value, "message": err.message}
    if err.retry_after_s is not None:
        fields["retry_after_s"] = round(err.retry_after_s, 1)
    return encode("error", msg_id, **fields)
