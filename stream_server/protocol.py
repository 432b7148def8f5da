"""The session socket's wire protocol, typed once (CONTRACT.md, "Session socket").

Both directions are models. ``parse_client_message`` turns a client's text frame into one of the
client models or raises ``ProtocolError`` with the code the client will see; every server message
is a ``ServerMessage`` put on the wire by its ``encode`` only, and ``parse_server_message`` reads
one back (for clients). Handlers never touch raw dictionaries.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError


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
    STALLED = "stalled"
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


MAX_ID_BYTES = 256
"""The longest ``id`` a client message may carry: it is echoed, so it must not grow the replies."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string with a lone UTF-16 surrogate (``"\\ud800"``
    is valid JSON but not text). The models refuse such strings; an error must not echo one
    either, as it cannot be encoded. Walked without recursion, however deep the value."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class _Client(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    id: Annotated[str, Field(max_length=MAX_ID_BYTES)] | int | None = None


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
    template: str | None = Field(default=None, min_length=1, max_length=64)
    """A template phrase id instead of audio (clip mode): answered from the clip store when rendered."""


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
    """Best-effort ``id`` of a message that failed to parse, so the error can echo it (not one
    longer than ``MAX_ID_BYTES`` once encoded, nor one that is not text)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    found = raw.get("id") if isinstance(raw, dict) else None
    return found if len(json.dumps(found)) <= MAX_ID_BYTES and not has_lone_surrogate(found) else None


# ----- server to client -----

JsonId = JsonValue
"""The client's ``id``, echoed as given (a message that failed to parse may carry any JSON value)."""


class ServerMessage(BaseModel):
    """A server message. ``encode`` is the one way onto the wire: compact JSON, ``type`` first,
    ``id`` last and only when the client gave one; fields in ``OMIT_NONE`` are left out while
    ``None`` and fields in ``OMIT_UNSET`` while not given (``done`` of a live time limit has no
    ``clip``, a stored clip's ``done`` has ``"clip": null`` when storing failed). The bytes are
    those ``json.dumps`` with compact separators writes: ASCII, other characters escaped."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()
    OMIT_UNSET: ClassVar[frozenset[str]] = frozenset()

    def encode(self) -> str:
        omit = {name for name in self.OMIT_NONE if getattr(self, name) is None}
        omit.update(name for name in self.OMIT_UNSET if name not in self.model_fields_set)
        text = self.model_dump_json(exclude=omit or None)
        # Escaping is several times slower in pydantic, and almost every message is ASCII already.
        return text if text.isascii() else self.model_dump_json(exclude=omit or None, ensure_ascii=True)


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True)
    max_audio_seconds: float
    max_audio_bytes: int
    max_message_bytes: int
    max_live_session_s: float
    fps: int


class Welcome(ServerMessage):
    OMIT_NONE = frozenset({"id"})
    type: Literal["welcome"] = "welcome"
    session: str
    tier: str
    resume: str
    engine: str
    limits: Limits
    id: JsonId = None


class Queued(ServerMessage):
    type: Literal["queued"] = "queued"
    position: int
    queue_size: int
    tier: str
    eta_s: float | None


class Granted(ServerMessage):
    type: Literal["granted"] = "granted"
    waited_s: float


class Redirect(ServerMessage):
    """Multi-node (CONTRACT.md): the slot is on another node; this single node never sends it."""

    type: Literal["redirect"] = "redirect"
    url: str
    grant: str


class StreamStart(ServerMessage):
    """Media follows: fMP4 segments (``mime`` given) or a WebRTC peer connection."""

    OMIT_NONE = frozenset({"mime"})
    type: Literal["stream"] = "stream"
    transport: Literal["mse", "webrtc"]
    mime: str | None = None
    width: int
    height: int
    fps: int


class WebrtcAnswer(ServerMessage):
    OMIT_NONE = frozenset({"id"})
    type: Literal["webrtc_answer"] = "webrtc_answer"
    sdp: str
    id: JsonId = None


class Progress(ServerMessage):
    OMIT_NONE = frozenset({"total"})
    type: Literal["progress"] = "progress"
    frames: int
    total: int | None = None


class Done(ServerMessage):
    OMIT_UNSET = frozenset({"clip"})
    type: Literal["done"] = "done"
    frames: int
    duration_s: float
    clip: str | None = None


class ErrorMessage(ServerMessage):
    OMIT_NONE = frozenset({"retry_after_s", "id"})
    type: Literal["error"] = "error"
    code: Annotated[ErrorCode | str, Field(union_mode="left_to_right")]
    """A code of this version, or (read by an older client) a string it does not know yet."""
    message: str
    retry_after_s: float | None = None
    id: JsonId = None


class Pong(ServerMessage):
    OMIT_NONE = frozenset({"id"})
    type: Literal["pong"] = "pong"
    id: JsonId = None


AnyServerMessage = Annotated[
    Welcome | Queued | Granted | Redirect | StreamStart | WebrtcAnswer | Progress | Done | ErrorMessage | Pong,
    Field(discriminator="type"),
]
_server_adapter: TypeAdapter[AnyServerMessage] = TypeAdapter(AnyServerMessage)


def parse_server_message(text: str | bytes) -> AnyServerMessage:
    """A text frame from the server as its model (for clients); ``ValueError`` if it is none."""
    try:
        return _server_adapter.validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"not a server message: {exc}") from None


def error_message(err: ProtocolError, msg_id: JsonId = None) -> ErrorMessage:
    retry = None if err.retry_after_s is None else round(err.retry_after_s, 1)
    return ErrorMessage(code=err.code, message=err.message, retry_after_s=retry, id=msg_id)
